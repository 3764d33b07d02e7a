"""Offline conversion of published RepVGG weights to our layout."""
import os.path as osp

from .fileio import (CheckpointError, check_output_path, load_checkpoint_file,
                     save_atomic, weights_of)
from .models import to_mmrepvgg_layout


def convert_pretrained(src, dst, force=False):
    """Write RepVGG ImageNet weights of any known layout in ours.

    Reads the official release layout (training or deploy form, with or
    without a ``module.`` prefix) or the OpenMMLab model-zoo layout, and
    writes an mmengine checkpoint whose keys read ``backbone.stem...``,
    loadable with ``init_cfg=dict(type='Pretrained', checkpoint=dst,
    prefix='backbone.')``. The classifier head is dropped.

    Args:
        src (str): Input weights.
        dst (str): Output file; never an input, and never overwritten
            unless ``force``.
        force (bool): Overwrite ``dst`` if it exists. Defaults to False.

    Returns:
        int: Number of tensors written.
    """
    check_output_path(dst, [src], force)
    weights = to_mmrepvgg_layout(weights_of(load_checkpoint_file(src), src))
    if not any(k.startswith(('stem.', 'stage_')) for k in weights):
        raise CheckpointError(f'{src}: holds no RepVGG backbone weights')
    save_atomic(
        dict(
            state_dict={
                f'backbone.{k}': v
                for k, v in weights.items()
            },
            meta=dict(converted_from=osp.basename(src))), dst)
    return len(weights)
