"""Building mmengine Runners for training and testing as mmseg's own tools
do, on GPUs, and on CPUs too (:func:`adapt_to_cpu_distributed`).
"""
import atexit
import logging
import os
import os.path as osp
from dataclasses import asdict

import torch
import torch.distributed as dist
from mmengine.config import DictAction
from mmengine.dist import get_rank
from mmengine.hooks import LoggerHook
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from .checkpoint import load_checkpoint
from .config import config_dicts, read_config
from .errors import UsageError

__all__ = [
    'load_config', 'adapt_to_cpu_distributed', 'replace_sync_bn',
    'build_runner', 'use_checkpoint_or_engine', 'evaluate', 'enable_amp',
    'add_launch_arguments', 'load_launch_config', 'check_work_dir'
]


def load_config(config, work_dir=None, cfg_options=None, launcher='none'):
    """Load ``config`` as mmseg's tools do, and prepare it to launch here.

    Args:
        config (str): Config file, or ``package::path``.
        work_dir (str, optional): Overrides the config's ``work_dir``;
            without either, ``./work_dirs/<config name>`` as in mmseg.
        cfg_options (dict, optional): Overrides merged into the config.
        launcher (str): ``none``, ``pytorch``, ``slurm`` or ``mpi``.

    Returns:
        Config: The config, with ``launcher`` set.
    """
    cfg = read_config(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(config))[0])
    check_work_dir(cfg.work_dir)
    if launcher != 'none' and not torch.cuda.is_available():
        adapt_to_cpu_distributed(cfg, launcher)
    return cfg


def check_work_dir(work_dir):
    """Refuse a work dir that the Runner could not create or write in:
    an existing file, a path through a file, or one in a folder that this
    process may not write in.

    Raises:
        UsageError: Naming the work dir and what is in its way.
    """
    existing = osp.abspath(work_dir)
    while not osp.lexists(existing):
        existing = osp.dirname(existing)
    if not osp.isdir(existing):
        where = '' if existing == osp.abspath(work_dir) else f'{existing} '
        raise UsageError(f'{work_dir}: {where}is a file, not a folder')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f'{work_dir}: cannot write in {existing} '
                         '(permission denied)')


def adapt_to_cpu_distributed(cfg, launcher):
    """Make a distributed launch of ``cfg`` work without CUDA.

    Joins the gloo process group that torchrun describes in the
    environment (mmengine's launcher would call ``torch.cuda.set_device``),
    wraps the model in DDP without device ids, and turns SyncBN into BN,
    which normalizes over each process's batch, with a warning.

    Args:
        cfg (Config): The config, modified in place.
        launcher (str): Must be ``pytorch``: the Slurm and MPI launchers
            are for GPU clusters.
    """
    if launcher != 'pytorch':
        raise UsageError(f'launcher "{launcher}" needs CUDA; on a machine '
                         'without it use tools/dist_train.sh (torchrun)')
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo')
        atexit.register(leave_process_group)
    cfg.env_cfg = dict(cfg.get('env_cfg', {}), dist_cfg=dict(backend='gloo'))
    cfg.model_wrapper_cfg = dict(
        type='MMDistributedDataParallel',
        device_ids=None,
        broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False))
    if replace_sync_bn(cfg.model):
        print_log(
            'SyncBN has no CPU implementation: using BN, which normalizes '
            'over the batch of each process', 'current', logging.WARNING)
    print_log(
        f'distributed on CPU: backend gloo, rank {dist.get_rank()}, '
        f'world size {dist.get_world_size()}', 'current')


def leave_process_group():
    """Destroy the process group while the interpreter is whole: gloo's
    threads still hold tensors, and freeing them during finalization aborts
    the process (SIGABRT) after a finished run."""
    if dist.is_initialized():
        dist.destroy_process_group()


def replace_sync_bn(node):
    """Turn every ``type='SyncBN'`` inside a config node into ``'BN'``.

    Returns:
        bool: Whether anything was replaced.
    """
    synced = [c for c in config_dicts(node) if c.get('type') == 'SyncBN']
    for child in synced:
        child['type'] = 'BN'
    return bool(synced)


def build_runner(cfg):
    """Build the Runner a config asks for, as mmseg's tools do; in a
    distributed run, only rank 0 writes the test metrics' file."""
    runner = RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(
        cfg)
    if get_rank() != 0:
        # mmengine's LoggerHook writes the test metrics (``{timestamp}.json``)
        # in every process, to the same file: two processes writing it at
        # once can leave it corrupt.
        for hook in runner.hooks:
            if isinstance(hook, LoggerHook):
                hook.after_test_epoch = lambda runner, metrics=None: None
    return runner


def use_checkpoint_or_engine(cfg, checkpoint, engine=None):
    """Make ``cfg`` evaluate a checkpoint, or an exported ONNX model on an
    inference engine (:class:`mmrepvgg.deploy.EngineSegmentor`).

    The file is checked first: a missing, corrupt, unsafe or foreign one is
    refused in one line, before the Runner reads it.

    Args:
        cfg (Config): A test config, modified in place.
        checkpoint (str): A checkpoint, or an ONNX model (``.onnx``).
        engine (EngineSettings, optional): How an ONNX model runs.
    """
    if not cfg.get('test_dataloader') or not cfg.get('test_evaluator'):
        raise UsageError(f'{cfg.filename}: has no test_dataloader and '
                         'test_evaluator to evaluate with')
    if checkpoint.endswith('.onnx'):
        # Imported here: it registers EngineSegmentor for the Runner.
        from .deploy.engines import EngineSettings, SegmentationEngine
        engine = (engine or EngineSettings()).check()
        SegmentationEngine(checkpoint, engine)
        cfg.model = dict(
            type='EngineSegmentor', model=checkpoint, **asdict(engine))
        cfg.load_from = None
    else:
        load_checkpoint(checkpoint)
        cfg.load_from = checkpoint


def evaluate(config, checkpoint, work_dir, engine=None):
    """Evaluate a checkpoint or an exported ONNX model on the config's test
    set, in this process, as ``tools/test.py`` does.

    Returns:
        dict: mmseg's metrics (``aAcc``, ``mIoU``, ``mAcc``), as Python
        numbers.
    """
    cfg = load_config(config, work_dir)
    use_checkpoint_or_engine(cfg, checkpoint, engine)
    metrics = build_runner(cfg).test()
    return {k: getattr(v, 'item', lambda: v)() for k, v in metrics.items()}


def enable_amp(cfg):
    """Train with automatic mixed precision, as mmseg's ``--amp`` does."""
    optim_wrapper = cfg.optim_wrapper.type
    if optim_wrapper == 'AmpOptimWrapper':
        print_log('AMP training is already enabled in your config.', 'current',
                  logging.WARNING)
    elif optim_wrapper != 'OptimWrapper':
        raise UsageError('--amp is only supported when the optimizer '
                         f'wrapper type is OptimWrapper, not {optim_wrapper}')
    else:
        cfg.optim_wrapper.update(type='AmpOptimWrapper', loss_scale='dynamic')


def add_launch_arguments(parser):
    """The options that tools/train.py and tools/test.py share with mmseg's:
    ``--work-dir``, ``--cfg-options``, ``--launcher`` and ``--local_rank``.
    """
    parser.add_argument('--work-dir', help='the dir for logs and outputs')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, as key=value pairs')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    # torch.distributed.launch passes --local_rank; torchrun sets LOCAL_RANK,
    # which is what mmengine reads.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return parser


def load_launch_config(args):
    """:func:`load_config` with the options of :func:`add_launch_arguments`.
    """
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return load_config(args.config, args.work_dir, args.cfg_options,
                       args.launcher)
