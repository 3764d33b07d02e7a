"""The torch-free runtime against the PyTorch path, side by side in one run:
installed size, a fresh process to the first label map, and images per
second over a folder of frames.

The runtime runs in the Python of a ``pip install "mmrepvgg[runtime]"``
environment (``--runtime-python``), the PyTorch path (mmseg's
``init_model`` and ``inference_model`` on the deploy pair) in this one.
Example::

    python tools/benchmark_runtime.py CONFIG CHECKPOINT WORK_DIR \\
        --runtime-python RUNTIME_VENV/bin/python --images 64
"""
import apps.interrupts  # noqa: F401, isort: skip  (before the heavy imports)
import os
import os.path as osp
import re
import subprocess
import sys
import time

import cv2
import numpy as np

from mmrepvgg.checkpoint import load_checkpoint
from mmrepvgg.cli import run_cli, tool_parser
from mmrepvgg.config import read_config
from mmrepvgg.errors import UsageError
from mmrepvgg.runner import check_work_dir

# A fresh process to the first label map, each way.
RUNTIME_FIRST = '''
import sys
from mmrepvgg.runtime import Segmenter
Segmenter(sys.argv[1])(sys.argv[2])
'''
PYTORCH_FIRST = '''
import sys
import mmrepvgg
from mmseg.apis import inference_model, init_model
inference_model(init_model(sys.argv[1], sys.argv[2], device='cpu'),
                sys.argv[3])
'''
# mmseg's path over a folder: the label PNGs written as the runtime's are,
# the first image (warm-up) left out of the time.
PYTORCH_FOLDER = '''
import os, os.path as osp, sys, time
import cv2
import mmrepvgg
from mmseg.apis import inference_model, init_model
model = init_model(sys.argv[1], sys.argv[2], device='cpu')
images = sorted(os.listdir(sys.argv[3]))
os.makedirs(sys.argv[4], exist_ok=True)
for index, name in enumerate(images):
    if index == 1:
        start = time.perf_counter()
    labels = inference_model(model, osp.join(sys.argv[3], name))
    cv2.imwrite(osp.join(sys.argv[4], name),
                labels.pred_sem_seg.data[0].numpy().astype('uint8'))
print((len(images) - 1) / (time.perf_counter() - start))
'''
PURELIB = 'import sysconfig; print(sysconfig.get_path("purelib"))'


def _folder_bytes(folder):
    return sum(
        osp.getsize(osp.join(root, name)) for root, _, names in os.walk(folder)
        for name in names if not osp.islink(osp.join(root, name)))


def _last_line(*command):
    """What ``command`` prints last; it must succeed."""
    return subprocess.run(
        command, capture_output=True, text=True,
        check=True).stdout.strip().splitlines()[-1]


def _timed(command):
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def _frames(folder, count, size):
    """``count`` frames of smooth random colour at ``size``."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    height, width = size
    for index in range(count):
        small = rng.integers(0, 256, (height // 64, width // 64, 3), np.uint8)
        frame = cv2.resize(small, (width, height), cv2.INTER_CUBIC)
        cv2.imwrite(osp.join(folder, f'frame_{index:04d}.png'), frame)
    return folder


def _deploy_and_export(config, checkpoint, work_dir):
    from mmrepvgg.deploy import (ExportJob, deploy_config_path, export_onnx,
                                 reparameterize)
    deploy = osp.join(work_dir, 'deploy.pth')
    model = osp.join(work_dir, 'model.onnx')
    if not osp.exists(deploy):
        reparameterize(config, checkpoint, deploy)
    if not osp.exists(model):
        export_onnx(
            ExportJob.checked(deploy_config_path(deploy), deploy, model))
    return deploy_config_path(deploy), deploy, model


def build_parser():
    parser = tool_parser(__doc__.split('\n\n')[0])
    parser.add_argument('config', help='a segmentor config')
    parser.add_argument('checkpoint', help='its trained checkpoint')
    parser.add_argument('work_dir', help='for the models, frames and labels')
    parser.add_argument(
        '--runtime-python',
        required=True,
        help='the Python of an environment with mmrepvgg[runtime] only')
    parser.add_argument(
        '--images',
        type=int,
        default=64,
        help='frames to segment, the first untimed (default: 64)')
    parser.add_argument(
        '--size',
        type=int,
        nargs=2,
        default=(1024, 2048),
        metavar=('H', 'W'),
        help='of the frames (default: 1024 2048)')
    return parser


def _check(args):
    """Refuse what cannot run, before any work."""
    if args.images < 2 or min(args.size) < 64:
        raise UsageError('images must be at least 2 and the size at least '
                         f'64 64, got {args.images} and {args.size[0]} '
                         f'{args.size[1]}')
    check_work_dir(args.work_dir)
    read_config(args.config)
    load_checkpoint(args.checkpoint)
    try:
        subprocess.run([args.runtime_python, '-c', 'import mmrepvgg.runtime'],
                       capture_output=True,
                       check=True)
    except (OSError, subprocess.CalledProcessError):
        raise UsageError(f'{args.runtime_python}: is not a Python that can '
                         'import mmrepvgg.runtime') from None


def main(args):
    _check(args)
    os.makedirs(args.work_dir, exist_ok=True)
    config, deploy, model = _deploy_and_export(args.config, args.checkpoint,
                                               args.work_dir)
    frames = _frames(osp.join(args.work_dir, 'frames'), args.images, args.size)
    first = osp.join(frames, sorted(os.listdir(frames))[0])

    sizes = [
        _folder_bytes(_last_line(python, '-c', PURELIB))
        for python in (args.runtime_python, sys.executable)
    ]
    print(f'installed: runtime {sizes[0] / 2**20:.0f} MiB, full '
          f'{sizes[1] / 2**20:.0f} MiB ({sizes[0] / sizes[1]:.2f})')
    # Alternating, twice each; the second of each is reported.
    for _ in range(2):
        runtime = _timed(
            [args.runtime_python, '-c', RUNTIME_FIRST, model, first])
        pytorch = _timed(
            [sys.executable, '-c', PYTORCH_FIRST, config, deploy, first])
    print(f'fresh process to the first label map: runtime {runtime:.2f} s, '
          f'PyTorch {pytorch:.2f} s ({runtime / pytorch:.2f})')

    out = osp.join(args.work_dir, 'runtime_out')
    speed = _last_line(args.runtime_python, '-m', 'mmrepvgg.runtime.infer',
                       model, frames, '--out-dir', out, '--no-vis', '--force')
    torch_rate = float(
        _last_line(sys.executable, '-c', PYTORCH_FOLDER, config, deploy,
                   frames, osp.join(args.work_dir, 'pytorch_out')))
    ms = [float(v) for v in re.findall(r'([\d.]+)ms', speed)]
    rate = float(re.search(r'([\d.]+) images/s', speed).group(1))
    print(f'runtime: {speed}')
    print(f'images/s over {args.images} of {args.size[0]}x{args.size[1]}: '
          f'runtime {rate:.3f}, PyTorch {torch_rate:.3f} '
          f'({rate / torch_rate:.2f}x)')
    print(f'runtime work besides the engine: '
          f'{(ms[0] + ms[2]) / sum(ms[:3]):.1%} of pre+inference+post, '
          f'{(ms[0] + ms[2] + ms[3]) / sum(ms):.1%} with file I/O')


if __name__ == '__main__':
    run_cli(main, build_parser)
