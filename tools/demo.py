"""Run the whole RepVGG workflow: toy data (or Cityscapes), mim training,
evaluation, re-parameterization, evaluation of the deploy pair, and a speed
comparison of train and deploy form, summarized in one table and a chart."""
import argparse
import dataclasses

from apps.demo import DemoSettings, run_demo
from apps.engines import ENGINES, PRECISIONS
from apps.fast_path import FAST_STEPS
from mmrepvgg.cli import run_cli

HELP = dict(
    work_dir='where every output goes',
    config='RepVGG segmentor config',
    data_root='a real Cityscapes folder; none: toy data',
    iters='training iterations',
    image_size='toy image size, also the training crop',
    num_train='toy training images',
    num_val='toy validation images',
    batch_size='training batch size on toy data',
    lr='learning rate on toy data',
    bench_size='benchmark input size',
    bench_rounds='timed benchmark rounds',
    fast_path='steps of an exact fast path to time too',
    threads='torch and engine threads for the benchmark',
    backends='torch and the engines that evaluate and time the ONNX model',
    precisions='precisions of the engines: fp32, bf16, int8',
    calib_num='training images that int8 is calibrated on',
    force='reuse a non-empty work dir, overwriting its outputs')

CHOICES = dict(
    fast_path=FAST_STEPS, backends=('torch', *ENGINES), precisions=PRECISIONS)


def _add_option(parser, setting):
    """An option for one field of DemoSettings, whose default is the
    library's."""
    flag = '--' + setting.name.replace('_', '-')
    if setting.type is bool:
        parser.add_argument(flag, action='store_true', help=HELP[setting.name])
        return
    default = setting.default
    kwargs = dict(default=default)
    if isinstance(default, tuple) and setting.name.endswith('size'):
        kwargs.update(type=int, nargs=2, metavar=('H', 'W'))
    elif setting.name in CHOICES:
        kwargs.update(nargs='*', choices=CHOICES[setting.name])
    elif isinstance(default, (int, float)) or setting.name == 'threads':
        kwargs.update(type=float if isinstance(default, float) else int)
    shown = ' '.join(map(str, default)) if isinstance(default,
                                                      (tuple,
                                                       list)) else default
    parser.add_argument(
        flag,
        help=f'{HELP[setting.name]} (default: {shown or "none"})',
        **kwargs)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    for setting in dataclasses.fields(DemoSettings):
        _add_option(parser, setting)
    run_demo(DemoSettings(**vars(parser.parse_args())))


if __name__ == '__main__':
    run_cli(main)
