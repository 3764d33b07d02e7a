"""Segment images, folders, lists and videos with an ONNX model written by
tools/export.py, on ONNX Runtime or OpenVINO: the ``mmrepvgg-infer``
command, from a checkout (the same options: ``--help``)."""
import apps.interrupts  # noqa: F401  (before the heavy imports)
from mmrepvgg.runtime.infer import build_parser, console

__all__ = ['build_parser']

if __name__ == '__main__':
    console()
