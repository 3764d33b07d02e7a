"""mmengine checkpoints load under torch's safe unpickler; code never runs."""
import sys

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.runner import Runner, load_checkpoint
from mmseg.apis import init_model

import mmrepvgg  # noqa: F401  (allow-lists mmengine's checkpoint classes)
from mmrepvgg.checkpoint import load_checkpoint as load_safely
from mmrepvgg.errors import CheckpointError
from tests.helpers import CarriesCode, run


class IterationCounter(Hook):

    def __init__(self):
        self.iterations = []

    def after_train_iter(self, runner, *args, **kwargs):
        self.iterations.append(runner.iter)


def load_in_fresh_python(path, preamble=''):
    code = f'{preamble}import torch; torch.load({str(path)!r}); print("ok")'
    return run(sys.executable, '-c', code)


def test_runner_checkpoint_needs_mmrepvgg_under_safe_loading(trained_pspnet):
    checkpoint = trained_pspnet.checkpoint
    assert torch.__version__ >= '2.6'
    plain = load_in_fresh_python(checkpoint)
    assert plain.returncode != 0 and 'HistoryBuffer' in plain.stderr
    patched = load_in_fresh_python(checkpoint, 'import mmrepvgg; ')
    assert patched.returncode == 0, patched.stderr
    loaded = torch.load(checkpoint)
    assert loaded['meta']['iter'] == trained_pspnet.iters
    assert 'message_hub' in loaded


def test_init_model_loads_runner_checkpoint(trained_pspnet):
    model = init_model(
        trained_pspnet.config, trained_pspnet.checkpoint, device='cpu')
    state = torch.load(trained_pspnet.checkpoint)['state_dict']
    key = 'backbone.stage_1.0.branch_3x3.conv.weight'
    assert torch.equal(model.state_dict()[key], state[key])


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(trained_pspnet, tmp_path):
    cfg = Config.fromfile(trained_pspnet.config)
    cfg.work_dir = str(tmp_path)
    cfg.train_cfg.max_iters = trained_pspnet.iters + 1
    cfg.resume = True
    cfg.load_from = trained_pspnet.checkpoint
    runner = Runner.from_cfg(cfg)
    counter = IterationCounter()
    runner.register_hook(counter)
    runner.train()
    assert runner.iter == trained_pspnet.iters + 1
    # Only the missing iteration ran (counted from 0).
    assert counter.iterations == [trained_pspnet.iters]


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
        load_safely(str(path))
    assert not marker.exists()
