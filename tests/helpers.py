"""Shared by the tests."""
import os.path as osp
import subprocess
import sys

import torch
from torch import nn

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def run_tool(name, *args, timeout=900, env=None):
    """Run ``tools/<name>`` as a user would; returns the completed process
    with text stdout and stderr."""
    return subprocess.run(
        [sys.executable,
         osp.join(REPO_ROOT, 'tools', name), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=timeout)


class CarriesCode:
    """Unpickling this runs ``exec``, which creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f'open({self.marker!r}, "w").close()', )


def randomize_batch_norms(model, seed=0, gain=(0.2, 0.6)):
    """Give every batch norm random statistics and affine parameters.

    Fresh norms (mean 0, var 1, weight 1, bias 0) would hide mistakes in the
    fusion math. The default gains keep a deep random net out of the chaotic
    regime: with gains near 1, a random D2se amplifies rounding so much that
    its own fp32 and fp64 outputs differ by 1e-4, and no fp32 comparison
    means anything. Trained nets are far from that regime. Returns ``model``.
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(like, low, high):
        values = torch.rand(like.shape, generator=generator)
        return (low + (high - low) * values).to(like)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(
                    uniform(module.running_mean, -0.2, 0.2))
                module.running_var.copy_(uniform(module.running_var, 0.5, 2))
                module.weight.copy_(uniform(module.weight, *gain))
                module.bias.copy_(uniform(module.bias, -0.2, 0.2))
    return model


def relative_error(actual, expected):
    """max|actual - expected| / max|expected|."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()
