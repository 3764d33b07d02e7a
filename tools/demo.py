"""Run the whole RepVGG workflow: toy data (or Cityscapes), mim training,
evaluation, re-parameterization, evaluation of the deploy pair, and a speed
comparison of train and deploy form, summarized in one table and a chart."""
import apps.interrupts  # noqa: F401  (before the heavy imports)
from apps.demo import DemoSettings, run_demo
from mmrepvgg.cli import add_settings, run_cli, settings_from, tool_parser


def build_parser():
    parser = tool_parser(__doc__)
    add_settings(parser, DemoSettings)
    return parser


def main(args):
    run_demo(settings_from(args, DemoSettings))


if __name__ == '__main__':
    run_cli(main, build_parser)
