"""Run the whole RepVGG workflow: toy data (or Cityscapes), mim training,
evaluation, re-parameterization, evaluation of the deploy pair, and a speed
comparison of train and deploy form, summarized in one table and a chart."""
import argparse
import inspect

from mmrepvgg.benchmark import FAST_STEPS
from mmrepvgg.cli import run_cli
from mmrepvgg.demo import DemoError, run_demo
from mmrepvgg.errors import MMRepVGGError

# One source of truth for the defaults: the library's.
DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(run_demo).parameters.items()
}


def _option(parser, name, help, **kwargs):
    default = DEFAULTS[name]
    if isinstance(default, (tuple, list)):
        shown = ' '.join(map(str, default)) or 'none'
    else:
        shown = default
    parser.add_argument(
        '--' + name.replace('_', '-'),
        default=default,
        help=f'{help} (default: {shown})',
        **kwargs)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        '--work-dir',
        default='work_dirs/demo',
        help='where every output goes (default: work_dirs/demo)')
    _option(parser, 'config', 'RepVGG segmentor config')
    _option(parser, 'data_root', 'a real Cityscapes folder; none: toy data')
    _option(parser, 'iters', 'training iterations', type=int)
    size = dict(type=int, nargs=2, metavar=('H', 'W'))
    _option(parser, 'image_size', 'toy image size, also the training crop',
            **size)
    _option(parser, 'num_train', 'toy training images', type=int)
    _option(parser, 'num_val', 'toy validation images', type=int)
    _option(parser, 'batch_size', 'training batch size on toy data', type=int)
    _option(parser, 'bench_size', 'benchmark input size', **size)
    _option(parser, 'bench_rounds', 'timed benchmark rounds', type=int)
    _option(
        parser,
        'fast_path',
        'steps of an exact fast path to time too',
        nargs='*',
        choices=FAST_STEPS)
    _option(parser, 'threads', 'torch threads for the benchmark', type=int)
    parser.add_argument(
        '--force',
        action='store_true',
        help='reuse a non-empty work dir, overwriting its outputs')
    args = parser.parse_args()
    run_demo(**vars(args))


if __name__ == '__main__':
    run_cli(main, user_errors=(MMRepVGGError, FileNotFoundError, DemoError))
