"""Shared by the tests."""
import glob
import json
import os
import os.path as osp
import subprocess
import sys

import torch
from torch import nn

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TESTS = osp.dirname(osp.abspath(__file__))
PSPNET_A0 = osp.join(REPO_ROOT, 'configs', 'pspnet',
                     'pspnet_repvgg-a0-d8_4xb2-80k_cityscapes-512x1024.py')
PSPNET_QAREPVGG_A0 = osp.join(
    REPO_ROOT, 'configs', 'pspnet',
    'pspnet_qarepvgg-a0-d8_4xb2-80k_cityscapes-512x1024.py')


def run(*command, env=None, cwd=REPO_ROOT, timeout=900):
    """Run a command as a user would, from the repository, with the tests'
    helper modules importable; returns the completed process with text
    stdout and stderr."""
    env = dict(os.environ if env is None else env)
    env['PYTHONPATH'] = os.pathsep.join(
        filter(None, [TESTS, env.get('PYTHONPATH')]))
    return subprocess.run([str(c) for c in command],
                          capture_output=True,
                          text=True,
                          cwd=cwd,
                          env=env,
                          timeout=timeout)


def run_tool(name, *args, **kwargs):
    """Run ``tools/<name>``."""
    return run(sys.executable, osp.join(REPO_ROOT, 'tools', name), *args,
               **kwargs)


def mim(*args, **kwargs):
    """Run ``mim``."""
    return run(sys.executable, '-m', 'mim', *args, **kwargs)


def output(result):
    """The end of a completed process's output, for assertion messages."""
    return result.stdout[-3000:] + result.stderr[-3000:]


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


def logged_metrics(work_dir):
    """The metrics of the one evaluation logged under ``work_dir``:
    mmengine writes them as the last JSON line of
    ``WORK_DIR/TIMESTAMP/TIMESTAMP.json``."""
    logs = glob.glob(osp.join(str(work_dir), '*', '*.json'))
    assert len(logs) == 1, logs
    with open(logs[0]) as f:
        return json.loads(f.read().splitlines()[-1])
