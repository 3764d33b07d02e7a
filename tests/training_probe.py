"""A hook that records what each training process did, for the tests.

Imported by the configs that tests/test_distributed.py derives, in the
training subprocesses; writes ``probe_rank<R>.json`` into the work dir.
"""
import hashlib
import json
import os.path as osp

from mmengine.dist import get_dist_info
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class TrainingProbeHook(Hook):
    """Records the iterations run, the samples seen, and a digest of the
    final parameters."""

    def __init__(self):
        self.iterations = []
        self.samples = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.iterations.append(runner.iter)
        self.samples += [
            osp.basename(s.img_path) for s in data_batch['data_samples']
        ]

    def after_train(self, runner):
        model = runner.model.module if is_model_wrapper(
            runner.model) else runner.model
        digest = hashlib.sha256()
        for name, param in sorted(model.named_parameters()):
            digest.update(name.encode())
            digest.update(param.detach().cpu().numpy().tobytes())
        rank, world_size = get_dist_info()
        with open(osp.join(runner.work_dir, f'probe_rank{rank}.json'),
                  'w') as f:
            json.dump(
                dict(
                    world_size=world_size,
                    iterations=self.iterations,
                    samples=self.samples,
                    parameters=digest.hexdigest()), f)
