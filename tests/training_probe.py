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
    """Records the iterations run, the samples seen, and digests of the
    final parameters and of the fake quantizers' ranges, scales and zero
    points (none outside QAT)."""

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
        quantizers = [(name, buffer) for name, buffer in model.named_buffers()
                      if 'fake_quant' in name]
        rank, world_size = get_dist_info()
        with open(osp.join(runner.work_dir, f'probe_rank{rank}.json'),
                  'w') as f:
            json.dump(
                dict(
                    world_size=world_size,
                    iterations=self.iterations,
                    samples=self.samples,
                    parameters=_digest(model.named_parameters()),
                    quantizers=_digest(quantizers)), f)


def _digest(named_tensors):
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()
