"""Training with mmengine over torch.distributed on a CPU-only machine."""
import glob
import json
import os
import os.path as osp
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import mmrepvgg.runner as runner
from mmrepvgg.quantization.training import is_qat_checkpoint
from mmrepvgg.testing import make_toy_cityscapes, write_toy_config
from tests.helpers import (PSPNET_A0, REPO_ROOT, TESTS, output, run,
                           run_tool_here)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PROBE = """
custom_imports = dict(
    imports=['mmrepvgg', 'training_probe'], allow_failed_imports=False)
custom_hooks = [dict(type='TrainingProbeHook')]
"""


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def environment():
    # The training probe is importable: run() puts the tests on the path.
    return dict(os.environ, PORT=str(free_port()), OMP_NUM_THREADS='1')


def probed_config(tmp_path, iters, checkpoint_interval=None, num_train=8):
    data = make_toy_cityscapes(
        str(tmp_path / 'data'), num_train=num_train, num_val=2)
    config = write_toy_config(
        PSPNET_A0,
        data,
        str(tmp_path / 'toy.py'),
        iters=iters,
        checkpoint_interval=checkpoint_interval)
    with open(config, 'a') as f:
        f.write(PROBE)
    return config


def launch(*command):
    """Run a command as a user would; it must succeed. Returns its stdout
    and stderr."""
    result = run(*command, env=environment())
    assert result.returncode == 0, output(result)
    return result.stdout + result.stderr


def read_probes(work_dir):
    probes = {}
    for path in glob.glob(osp.join(work_dir, 'probe_rank*.json')):
        with open(path) as f:
            probes[osp.basename(path)] = json.load(f)
    return probes


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp('dist')
    config = probed_config(tmp_path, iters=2)
    work_dir = str(tmp_path / 'work')
    output = launch('bash', 'tools/dist_train.sh', config, '2', '--work-dir',
                    work_dir)
    return config, work_dir, output


def test_dist_train_runs_two_gloo_processes(two_process_run):
    _, work_dir, output = two_process_run
    assert 'world size 2' in output
    assert 'backend gloo' in output
    assert 'SyncBN has no CPU implementation' in output
    probes = read_probes(work_dir)
    assert sorted(probes) == ['probe_rank0.json', 'probe_rank1.json']
    assert all(p['world_size'] == 2 for p in probes.values())
    assert all(p['iterations'] == [0, 1] for p in probes.values())


def test_ranks_train_on_different_samples(two_process_run):
    _, work_dir, _ = two_process_run
    rank0, rank1 = (set(p['samples'])
                    for _, p in sorted(read_probes(work_dir).items()))
    # Two iterations of 2 images on each of 2 ranks: one epoch of 8 images,
    # split between the ranks.
    assert len(rank0) == len(rank1) == 4
    assert not rank0 & rank1


def test_parameters_are_identical_on_both_ranks(two_process_run):
    _, work_dir, _ = two_process_run
    digests = {p['parameters'] for p in read_probes(work_dir).values()}
    assert len(digests) == 1
    checkpoint = torch.load(osp.join(work_dir, 'iter_2.pth'))
    assert checkpoint['meta']['iter'] == 2


def test_dist_test_evaluates_the_checkpoint(two_process_run, tmp_path):
    config, work_dir, _ = two_process_run
    launch('bash', 'tools/dist_test.sh', config,
           osp.join(work_dir, 'iter_2.pth'), '2', '--work-dir', str(tmp_path))
    metrics = glob.glob(str(tmp_path / '*' / '*.json'))
    assert len(metrics) == 1
    with open(metrics[0]) as f:
        scores = json.load(f)
    assert 0 < scores['aAcc'] <= 100 and 0 <= scores['mIoU'] <= 100


def test_only_rank_0_writes_the_test_metrics(two_process_run, tmp_path,
                                             monkeypatch, users_modules):
    # mmengine's LoggerHook writes them in every process, to one file.
    config, work_dir, _ = two_process_run
    for rank in (1, 0):
        monkeypatch.setattr(runner, 'get_rank', lambda: rank)
        cfg = runner.load_config(config, str(tmp_path / f'rank{rank}'))
        runner.use_checkpoint_or_engine(cfg, osp.join(work_dir, 'iter_2.pth'))
        metrics = runner.build_runner(cfg).test()
        assert 0 < metrics['aAcc'] <= 100
        written = glob.glob(str(tmp_path / f'rank{rank}' / '*' / '*.json'))
        assert len(written) == (rank == 0), rank


def test_dist_checkpoint_converts_to_deploy_form(two_process_run, tmp_path,
                                                 users_modules):
    config, work_dir, _ = two_process_run
    out = tmp_path / 'deploy.pth'
    result = run_tool_here('reparameterize.py', config,
                           osp.join(work_dir, 'iter_2.pth'), out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'converted 22 blocks' in result.stdout
    assert out.exists() and out.with_suffix('.py').exists()


def test_dist_qat_quantizes_alike_on_both_ranks(two_process_run, tmp_path):
    config, work_dir, _ = two_process_run
    qat_dir = str(tmp_path / 'qat')
    launch('bash', 'tools/dist_train.sh', config, '2', '--qat',
           osp.join(work_dir, 'iter_2.pth'), '--work-dir', qat_dir,
           '--cfg-options', 'optim_wrapper.optimizer.lr=1e-4')
    probes = list(read_probes(qat_dir).values())
    assert len(probes) == 2
    # The ranks observe different images: their input ranges are averaged.
    assert probes[0]['quantizers'] == probes[1]['quantizers']
    assert probes[0]['parameters'] == probes[1]['parameters']
    assert is_qat_checkpoint(osp.join(qat_dir, 'iter_2.pth'))


def wait_for(path, process, timeout=600):
    deadline = time.time() + timeout
    while not osp.exists(path):
        assert process.poll() is None, 'training ended before the checkpoint'
        assert time.time() < deadline, f'{path} never appeared'
        time.sleep(0.05)


def test_resume_continues_an_interrupted_run(tmp_path):
    config = probed_config(tmp_path, iters=6, checkpoint_interval=2)
    work_dir = str(tmp_path / 'work')
    train = [sys.executable, 'tools/train.py', config, '--work-dir', work_dir]
    env = environment()
    env['PYTHONPATH'] = TESTS
    interrupted = subprocess.Popen(
        train,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True)
    # mmengine writes last_checkpoint once the checkpoint file is complete.
    wait_for(osp.join(work_dir, 'last_checkpoint'), interrupted)
    os.killpg(interrupted.pid, signal.SIGKILL)
    interrupted.wait()
    assert not osp.exists(osp.join(work_dir, 'iter_6.pth'))
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        resumed_from = torch.load(f.read().strip())['meta']['iter']

    launch(*train, '--resume')
    probe = read_probes(work_dir)['probe_rank0.json']
    assert probe['iterations'] == list(range(resumed_from, 6))
    final = torch.load(osp.join(work_dir, 'iter_6.pth'))
    assert final['meta']['iter'] == 6  # as far as an uninterrupted run


def test_train_reports_a_missing_config_in_one_line(tmp_path):
    result = run_tool_here('train.py', tmp_path / 'missing.py')
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f'error: {tmp_path / "missing.py"}: no such config file'
    ]
