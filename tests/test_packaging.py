"""mmrepvgg installed from a wheel works outside the repository."""
import os.path as osp
import sys

import pytest

from tests.helpers import copy_of_the_sources, output, run

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# Run by the installed package's Python, from a folder outside the clone.
USE_INSTALLED = '''
import importlib, os.path as osp, pkgutil, sys
import torch
import mmrepvgg
from mmrepvgg.config import shipped_config
from mmrepvgg.deploy.compare import compare_fp32
from mmrepvgg.deploy.exact import fp32_and_exact
from mmrepvgg.testing import make_toy_cityscapes, write_toy_config

assert mmrepvgg.__file__.startswith(sys.prefix), mmrepvgg.__file__
for module in pkgutil.walk_packages(mmrepvgg.__path__, 'mmrepvgg.'):
    importlib.import_module(module.name)
model = mmrepvgg.RepVGG('A0').eval()
x = torch.rand(1, 3, 64, 64)
own, exact = fp32_and_exact(model, [x])
with torch.no_grad():
    actual = list(mmrepvgg.switch_to_deploy(model)(x))
assert compare_fp32(actual, own, exact).passed
base = shipped_config(
    'pspnet/pspnet_repvgg-a0-d8_4xb2-80k_cityscapes-512x1024.py')
data = make_toy_cityscapes('data', num_train=2, num_val=1)
write_toy_config(base, data, 'toy.py', iters=2)
print('installed at', osp.dirname(mmrepvgg.__file__))
'''


def test_wheel_install_imports_converts_and_trains_a_shipped_config(tmp_path):
    source = copy_of_the_sources(tmp_path / 'source')
    venv = tmp_path / 'venv'
    # The toolboxes come from the system; mmrepvgg itself from the wheel.
    created = run(sys.executable, '-m', 'venv', '--system-site-packages', venv)
    assert created.returncode == 0, output(created)
    python = str(venv / 'bin' / 'python')
    installed = run(python, '-m', 'pip', 'install', '--no-deps',
                    '--no-build-isolation', '--disable-pip-version-check',
                    source)
    assert installed.returncode == 0, output(installed)

    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    used = run(python, '-c', USE_INSTALLED, cwd=elsewhere)
    assert used.returncode == 0, output(used)
    assert f'installed at {venv}' in used.stdout

    # mim finds the installed package's own tools/train.py in its .mim.
    trained = run(
        python,
        '-m',
        'mim',
        'train',
        'mmrepvgg',
        'toy.py',
        '--work-dir',
        'work',
        cwd=elsewhere)
    assert trained.returncode == 0, output(trained)
    assert osp.isfile(elsewhere / 'work' / 'iter_2.pth')
