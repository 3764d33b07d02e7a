"""mmengine checkpoints load under torch's safe unpickler; code never runs."""
import os.path as osp
import subprocess
import sys

import pytest
import torch
from helpers import REPO_ROOT, CarriesCode
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.runner import Runner, load_checkpoint
from mmseg.apis import init_model

import mmrepvgg  # noqa: F401  (allow-lists mmengine's checkpoint classes)
from mmrepvgg.fileio import CheckpointError, load_checkpoint_file
from mmrepvgg.toy_data import make_toy_cityscapes, write_toy_config

PSPNET_A0 = osp.join(
    REPO_ROOT,
    'configs/pspnet/pspnet_repvgg-a0-d8_4xb2-80k_cityscapes-512x1024.py')


class IterationCounter(Hook):

    def __init__(self):
        self.iterations = []

    def after_train_iter(self, runner, *args, **kwargs):
        self.iterations.append(runner.iter)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A toy PSPNet-RepVGG-A0 run of 2 iterations by mmengine's Runner."""
    root = tmp_path_factory.mktemp('runner')
    data = make_toy_cityscapes(str(root / 'data'), num_train=4, num_val=2)
    config = write_toy_config(PSPNET_A0, data, str(root / 'toy.py'), iters=2)
    cfg = Config.fromfile(config)
    cfg.work_dir = str(root / 'work')
    Runner.from_cfg(cfg).train()
    return cfg, osp.join(cfg.work_dir, 'iter_2.pth')


def load_in_fresh_python(path, preamble=''):
    code = f'{preamble}import torch; torch.load({str(path)!r}); print("ok")'
    return subprocess.run([sys.executable, '-c', code],
                          capture_output=True,
                          text=True)


def test_runner_checkpoint_needs_mmrepvgg_under_safe_loading(trained):
    _, checkpoint = trained
    assert torch.__version__ >= '2.6'
    plain = load_in_fresh_python(checkpoint)
    assert plain.returncode != 0 and 'HistoryBuffer' in plain.stderr
    patched = load_in_fresh_python(checkpoint, 'import mmrepvgg; ')
    assert patched.returncode == 0, patched.stderr
    loaded = torch.load(checkpoint)
    assert loaded['meta']['iter'] == 2 and 'message_hub' in loaded


def test_init_model_loads_runner_checkpoint(trained):
    cfg, checkpoint = trained
    model = init_model(cfg, checkpoint, device='cpu')
    state = torch.load(checkpoint)['state_dict']
    key = 'backbone.stage_1.0.branch_3x3.conv.weight'
    assert torch.equal(model.state_dict()[key], state[key])


def test_resume_continues_from_the_checkpoint(trained):
    cfg, checkpoint = trained
    cfg = cfg.copy()
    cfg.train_cfg.max_iters = 3
    cfg.resume = True
    cfg.load_from = checkpoint
    runner = Runner.from_cfg(cfg)
    counter = IterationCounter()
    runner.register_hook(counter)
    runner.train()
    assert runner.iter == 3
    assert counter.iterations == [2]  # only the missing one ran


class ReachesPastHistoryBuffer:
    """Unpickles to ``getattr(HistoryBuffer, '__init__')``: the getattr that
    mmengine checkpoints need, aimed at something they never hold."""

    def __reduce__(self):
        return getattr, (HistoryBuffer, '__init__')


def test_only_history_buffer_statistics_are_reachable_by_getattr(tmp_path):
    path = tmp_path / 'getattr.pth'
    torch.save({'x': ReachesPastHistoryBuffer()}, path)
    with pytest.raises(Exception, match='refused getattr'):
        torch.load(path)


@pytest.fixture
def code_carrying(tmp_path):
    marker = tmp_path / 'code-ran'
    path = tmp_path / 'evil.pth'
    torch.save(
        {
            'state_dict': {
                'w': torch.ones(1)
            },
            'x': CarriesCode(str(marker))
        }, path)
    return path, marker


def test_checkpoint_carrying_code_is_refused_by_torch_and_mmengine(
        code_carrying):
    path, marker = code_carrying
    with pytest.raises(Exception, match='(?i)weights only|unsupported'):
        torch.load(path)
    with pytest.raises(Exception, match='(?i)weights only|unsupported'):
        load_checkpoint(torch.nn.Linear(1, 1), str(path))
    assert not marker.exists()


def test_checkpoint_carrying_code_is_refused_by_our_loader(code_carrying):
    path, marker = code_carrying
    with pytest.raises(CheckpointError, match='refused'):
        load_checkpoint_file(str(path))
    assert not marker.exists()
