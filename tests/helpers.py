"""Shared by the tests."""
import copy
import glob
import io
import json
import os
import os.path as osp
import runpy
import shutil
import signal
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
from torch import nn

from mmrepvgg.config import build_model, read_config
from mmrepvgg.deploy import switch_to_deploy
from mmrepvgg.deploy.compare import (Fp32Tolerance, compare_fp32,
                                     compare_labels, tensors_of)
from mmrepvgg.deploy.exact import exact_outputs, fp32_and_exact

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TESTS = osp.dirname(osp.abspath(__file__))
PSPNET_A0 = osp.join(REPO_ROOT, 'configs', 'pspnet',
                     'pspnet_repvgg-a0-d8_4xb2-80k_cityscapes-512x1024.py')
# The toy images' size, at which the toy models are exported.
TOY_SIZE = (64, 128)
# The largest arch, with squeeze-excitation on every block: its cases take
# 5 to 17 s on an AVX2-only 2-core CPU, so they run with the slow tests;
# the quick ones still convert it (every arch does).
D2SE = pytest.param('D2se', marks=pytest.mark.slow)
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


def copy_of_the_sources(target):
    """The repository without what builds and tests leave in it: building
    a wheel writes ``mmrepvgg/.mim`` into the source tree."""
    shutil.copytree(
        REPO_ROOT,
        target,
        ignore=shutil.ignore_patterns('.git', '__pycache__', '*.egg-info',
                                      'build', 'work_dirs', '.mim', '*.pth'))
    return target


def run_tool(name, *args, **kwargs):
    """Run ``tools/<name>``."""
    return run(sys.executable, osp.join(REPO_ROOT, 'tools', name), *args,
               **kwargs)


def run_tool_here(name, *args):
    """Run ``tools/<name>`` in this process, as ``python tools/<name>``
    runs it (the same argument parsing, ``run_cli`` and exit status),
    without the seconds a new Python takes to import torch and the
    toolboxes; returns a completed process with text stdout and stderr."""
    path = osp.join(REPO_ROOT, 'tools', name)
    # Python puts a script's folder first on sys.path: the tools import
    # their applications as ``apps``.
    sys.path.insert(0, osp.dirname(path))
    argv, handlers = sys.argv, {
        s: signal.getsignal(s)
        for s in (signal.SIGINT, signal.SIGTERM)
    }
    sys.argv = [path, *map(str, args)]
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            runpy.run_path(path, run_name='__main__')
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else int(
            exit.code is not None)
    finally:
        sys.argv = argv
        sys.path.remove(osp.dirname(path))
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return subprocess.CompletedProcess(sys.argv, code, stdout.getvalue(),
                                       stderr.getvalue())


def mim(*args, **kwargs):
    """Run ``mim``."""
    return run(sys.executable, '-m', 'mim', *args, **kwargs)


def snapshot(folder):
    """Every file below ``folder`` (links as their targets) and its bytes,
    to show that a refused command left everything as it was."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = osp.join(root, name)
            files[osp.relpath(path, folder)] = (
                open(path, 'rb').read() if osp.exists(path) else None)
    return files


def assert_refused(result, message, folder=None, before=None):
    """Assert that a tool exited 1 with one line on stderr that says
    ``message``, and, given a folder's :func:`snapshot` from before, left
    every file in it as it was."""
    assert result.returncode == 1, output(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, output(result)
    assert lines[0].startswith('error: ') and message in lines[0], lines
    if folder is not None:
        assert snapshot(folder) == before


def output(result):
    """The end of a completed process's output, for assertion messages."""
    return result.stdout[-3000:] + result.stderr[-3000:]


class CarriesCode:
    """Unpickling this runs ``exec``, which creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f'open({self.marker!r}, "w").close()', )


def assert_fp32_close(actual, own, exact, tolerance=Fp32Tolerance()):
    """Assert that fp32 outputs are as close to the exact (float64) ones as
    the reference model's own fp32 outputs allow (see
    :mod:`mmrepvgg.deploy.compare`); returns the comparison."""
    check = compare_fp32(
        tensors_of(actual), tensors_of(own), tensors_of(exact), tolerance)
    assert check.passed, check.describe()
    return check


def assert_computes_as(candidate, reference, inputs, run=None):
    """Assert that ``candidate`` computes what ``reference`` does on each
    input, as exactly as fp32 allows; returns the comparison."""
    own, exact = fp32_and_exact(reference, inputs, run)
    run = run or (lambda m, x: m(x))
    with torch.no_grad():
        actual = [t for x in inputs for t in tensors_of(run(candidate, x))]
    return assert_fp32_close(actual, own, exact)


def assert_converts_exactly(converted, model, inputs, run=None):
    """Assert that a converted model computes what ``model`` does: its
    weights as stored, computed in float64, against ``model``'s exact
    outputs, within the tolerance of ``model``'s own fp32 error (as
    :class:`mmrepvgg.deploy.convert.ConversionCheck` judges)."""
    own, exact = fp32_and_exact(model, inputs, run)
    return assert_fp32_close(exact_outputs(converted, inputs, run), own, exact)


def exact_seg_logits(model, image):
    """The ``seg_logits`` that mmseg's ``inference_model`` gives for an
    image, computed by the model in float64."""
    from mmseg.apis.inference import _preprare_data
    data, _ = _preprare_data(image, model)
    data = model.data_preprocessor(data, False)
    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        result = exact.predict(data['inputs'].double(), data['data_samples'])
    return result[0].seg_logits.data


def assert_labels_match(labels, exact_logits, limit):
    """Assert that ``labels`` are the argmax of the exact logits, except
    where two classes tie within ``limit`` (relative); returns how many
    flipped at such ties."""
    flips = compare_labels(
        torch.as_tensor(labels)[None], exact_logits[None], limit)
    assert flips.untied == 0, f'{flips.untied} label(s) differ'
    return flips.differ


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


def random_checkpoint(config, path, deploy=False):
    """A checkpoint of ``config``'s model with random weights and
    batch-norm statistics, in training or (folded) deploy form."""
    torch.manual_seed(0)
    model = randomize_batch_norms(build_model(read_config(config)), seed=1)
    if deploy:
        switch_to_deploy(model)
    torch.save(dict(state_dict=model.state_dict()), path)
    return str(path)


def logged_metrics(work_dir):
    """The metrics of the one evaluation logged under ``work_dir``:
    mmengine writes them as the last JSON line of
    ``WORK_DIR/TIMESTAMP/TIMESTAMP.json`` (of ``TIMESTAMP/vis_data/`` in a
    training run's work dir)."""
    logs = [
        path for folder in ('*', osp.join('*', 'vis_data'))
        for path in glob.glob(osp.join(str(work_dir), folder, '2*.json'))
    ]
    assert len(logs) == 1, logs
    with open(logs[0]) as f:
        return json.loads(f.read().splitlines()[-1])
