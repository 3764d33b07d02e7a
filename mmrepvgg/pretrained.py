"""Offline conversion of published RepVGG weights to our layout."""
import os.path as osp

import torch

from .checkpoint import load_checkpoint
from .errors import CheckpointError
from .fileio import check_output_path, serialize, write_files
from .models import RepVGG
from .models.weight_layouts import (check_weights_fit, is_deploy_form,
                                    to_mmrepvgg_layout)

__all__ = ['match_arch', 'convert_pretrained']


def match_arch(weights, layout, arch=None):
    """The arch and form of RepVGG backbone weights in our layout.

    Args:
        weights (dict): Backbone weights, without prefix.
        layout (Layout): The layout they came in, for messages.
        arch (str, optional): Check this arch only; its error names the
            tensors that do not fit. Defaults to None: every arch of
            :attr:`RepVGG.arch_settings` is tried.

    Returns:
        tuple[str, bool]: The arch and whether the weights are in deploy
        form.

    Raises:
        CheckpointError: The weights fit no arch (or not ``arch``).
    """
    deploy = is_deploy_form(weights)
    for candidate in [arch] if arch else RepVGG.arch_settings:
        # Built on the meta device: only the names and shapes are needed.
        with torch.device('meta'):
            expected = RepVGG(candidate, deploy=deploy).state_dict()
        try:
            check_weights_fit(expected, weights, layout, deploy)
            return candidate, deploy
        except CheckpointError:
            if arch:
                raise
    raise CheckpointError(
        f'RepVGG weights ({layout.value} layout) fit none of the archs '
        f'{", ".join(RepVGG.arch_settings)}; pass --arch to see what differs')


def convert_pretrained(src, dst, arch=None, force=False):
    """Write RepVGG ImageNet weights of any known layout in ours.

    Checks that the weights (training or deploy form) hold every tensor of
    one arch and nothing else, and writes an mmengine checkpoint whose keys
    read ``backbone.stem...`` (no classifier head), loadable with
    ``init_cfg=dict(type='Pretrained', checkpoint=dst, prefix='backbone.')``.

    Args:
        src (str): Input weights.
        dst (str): Output file; never an input, and never overwritten
            unless ``force``.
        arch (str, optional): The arch the weights must fit. Defaults to
            None: found from the weights.
        force (bool): Overwrite ``dst`` if it exists. Defaults to False.

    Returns:
        tuple[int, str, bool]: Tensors written, the arch, and whether they
        are in deploy form.
    """
    check_output_path(dst, [src], force)
    weights = dict(load_checkpoint(src).weights)
    layout = to_mmrepvgg_layout(weights)
    try:
        arch, deploy = match_arch(weights, layout, arch)
    except CheckpointError as error:
        raise CheckpointError(f'{src}: {error}') from error
    state_dict = {f'backbone.{k}': v for k, v in weights.items()}
    meta = dict(converted_from=osp.basename(src), arch=arch, deploy=deploy)
    write_files({dst: serialize(dict(state_dict=state_dict, meta=meta))},
                force)
    return len(weights), arch, deploy
