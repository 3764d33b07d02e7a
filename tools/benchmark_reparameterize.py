"""Time converting a checkpoint to deploy form against loading plus saving
it, side by side in one process.

Each round times, on a training-form checkpoint of CONFIG's model written to
a temporary directory: ``file``, reading it with
:func:`mmrepvgg.checkpoint.load_checkpoint` and writing it back; ``model``,
loading it for use as mmseg's ``init_model`` does
(:func:`mmrepvgg.deploy.loading.load_model`) and writing its weights; and
``reparameterize`` (:func:`mmrepvgg.deploy.pair.reparameterize`). The
medians and, per baseline, the median of the per-round ratios are printed.
"""
import apps.interrupts  # noqa: F401, isort: skip  (before the heavy imports)
import os.path as osp
import statistics
import tempfile

import torch

from apps.report import timed
from mmrepvgg.checkpoint import load_checkpoint
from mmrepvgg.cli import run_cli, tool_parser
from mmrepvgg.config import build_model, read_config
from mmrepvgg.deploy.loading import load_model
from mmrepvgg.deploy.pair import reparameterize
from mmrepvgg.errors import UsageError
from mmrepvgg.fileio import serialize, write_files

DEFAULT_CONFIG = osp.join(
    osp.dirname(osp.dirname(osp.abspath(__file__))), 'configs', 'pspnet',
    'pspnet_repvgg-b1g2-d8_4xb2-80k_cityscapes-512x1024.py')


def _tasks(config, folder):
    """The three tasks on a training-form checkpoint written to
    ``folder``."""
    checkpoint = osp.join(folder, 'train.pth')
    copy = osp.join(folder, 'copy.pth')
    # The values do not change the work, only the shapes do.
    model = build_model(read_config(config))
    torch.save(dict(state_dict=model.state_dict()), checkpoint)
    params = sum(p.numel() for p in model.parameters())
    print(f'{osp.basename(config)}: {params / 1e6:.1f}M parameters, '
          f'checkpoint {osp.getsize(checkpoint) / 2**20:.0f} MiB, '
          f'{torch.get_num_threads()} threads')

    def file_round_trip():
        write_files({copy: serialize(load_checkpoint(checkpoint).contents)},
                    force=True)

    def model_round_trip():
        loaded = load_model(read_config(config), checkpoint, config)
        write_files(
            {copy: serialize(dict(state_dict=loaded.model.state_dict()))},
            force=True)

    def convert():
        reparameterize(
            config, checkpoint, osp.join(folder, 'deploy.pth'), force=True)

    return dict(
        file=file_round_trip, model=model_round_trip, reparameterize=convert)


def build_parser():
    parser = tool_parser(__doc__)
    parser.add_argument(
        '--config', default=DEFAULT_CONFIG, help='training-form config')
    parser.add_argument(
        '--rounds', type=int, default=3, help='timed rounds of each')
    return parser


def main(args):
    if args.rounds < 1:
        raise UsageError(f'rounds must be at least 1, got {args.rounds}')
    with tempfile.TemporaryDirectory() as folder:
        tasks = _tasks(args.config, folder)
        # One untimed round warms caches and lazy imports.
        for task in tasks.values():
            task()
        times = {name: [] for name in tasks}
        for _ in range(args.rounds):
            for name, task in tasks.items():
                times[name].append(timed(task)[0])
    conversions = times.pop('reparameterize')
    print(f'reparameterize: {statistics.median(conversions):.2f} s '
          f'(median of {args.rounds} rounds)')
    for name, baseline in times.items():
        # Ratios within a round share the machine's load at the time.
        ratio = statistics.median(c / b for c, b in zip(conversions, baseline))
        print(f'load + save ({name}): {statistics.median(baseline):.2f} s; '
              f'reparameterize takes {ratio:.1f}x as long')


if __name__ == '__main__':
    run_cli(main, build_parser)
