"""``pip install "mmrepvgg[runtime]"`` gives a torch-free environment whose
``mmrepvgg-infer`` segments the toy model's images as the full one does.

The environment is made once per run, from local files only: the wheel
built from this checkout and the runtime's wheels, which
``tools/install_deps.sh`` puts in a wheelhouse (``MMREPVGG_WHEELHOUSE``,
by default ``~/.cache/mmrepvgg/wheelhouse``).
"""
import os
import os.path as osp
import sys

import cv2
import numpy as np
import pytest

from mmrepvgg.runtime import Segmenter
from tests.helpers import copy_of_the_sources, output, run

pytestmark = [pytest.mark.slow, pytest.mark.integration]

WHEELHOUSE = os.environ.get(
    'MMREPVGG_WHEELHOUSE',
    osp.join(
        os.environ.get('XDG_CACHE_HOME', osp.expanduser('~/.cache')),
        'mmrepvgg', 'wheelhouse'))
# The venv's own packages only: none of a checkout on PYTHONPATH.
VENV_ENV = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
# What the runtime must not pull.
STACK = ('torch', 'mmcv', 'mmcv-lite', 'mmengine', 'mmsegmentation', 'mmdet',
         'onnx', 'openvino')


@pytest.fixture(scope='session')
def runtime_venv(tmp_path_factory):
    """A fresh virtual environment with the wheel of this checkout and its
    runtime extra, installed with no index."""
    assert osp.isdir(WHEELHOUSE), (
        f'no wheelhouse at {WHEELHOUSE}: run tools/install_deps.sh')
    root = tmp_path_factory.mktemp('runtime_venv')
    source = copy_of_the_sources(root / 'source')
    built = run(sys.executable, '-m', 'pip', 'wheel', '--no-deps',
                '--no-build-isolation', '--disable-pip-version-check', '-w',
                root / 'wheel', source)
    assert built.returncode == 0, output(built)
    (wheel, ) = (root / 'wheel').glob('mmrepvgg-*.whl')
    venv = root / 'venv'
    created = run(sys.executable, '-m', 'venv', venv)
    assert created.returncode == 0, output(created)
    installed = run(
        venv / 'bin' / 'python',
        '-m',
        'pip',
        'install',
        '--disable-pip-version-check',
        '--no-index',
        '--find-links',
        WHEELHOUSE,
        f'{wheel}[runtime]',
        env=VENV_ENV)
    assert installed.returncode == 0, output(installed)
    return venv


def test_the_runtime_installs_without_the_stack(runtime_venv):
    listed = run(
        runtime_venv / 'bin' / 'python',
        '-m',
        'pip',
        'list',
        '--format=freeze',
        '--disable-pip-version-check',
        env=VENV_ENV)
    assert listed.returncode == 0, output(listed)
    names = {
        line.split('==')[0].lower()
        for line in listed.stdout.splitlines()
    }
    assert {'mmrepvgg', 'onnxruntime', 'opencv-python-headless'} <= names
    assert not names & set(STACK), names & set(STACK)
    imported = run(
        runtime_venv / 'bin' / 'python',
        '-c',
        'import mmrepvgg; print(mmrepvgg.__file__)',
        env=VENV_ENV,
        cwd=runtime_venv)
    assert imported.stdout.startswith(str(runtime_venv)), output(imported)


def test_mmrepvgg_infer_segments_the_val_images(runtime_venv, exported,
                                                trained_pspnet, tmp_path):
    model, _ = exported
    result = run(
        runtime_venv / 'bin' / 'mmrepvgg-infer',
        model,
        osp.dirname(trained_pspnet.val_images[0]),
        '--out-dir',
        tmp_path,
        env=VENV_ENV,
        cwd=tmp_path)
    assert result.returncode == 0, output(result)
    assert 'images/s' in result.stdout
    segmenter = Segmenter(str(model))
    for image in trained_pspnet.val_images:
        stem = osp.splitext(osp.basename(image))[0]
        labels = cv2.imread(
            str(tmp_path / 'pred' / f'{stem}.png'), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(labels, segmenter(image))
        assert (tmp_path / 'vis' / f'{stem}.png').is_file()
