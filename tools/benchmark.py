"""Time a RepVGG segmentor's train and deploy forms, and reference
configs, side by side (whole segmentors and their backbones)."""
import apps.interrupts  # noqa: F401  (before the heavy imports)
from apps.benchmark import BenchmarkSettings, run_benchmark
from apps.report import format_report, plot_chart, write_json
from mmrepvgg.cli import add_settings, run_cli, settings_from, tool_parser
from mmrepvgg.errors import UsageError
from mmrepvgg.fileio import check_output_path


def build_parser():
    parser = tool_parser(__doc__)
    add_settings(parser, BenchmarkSettings, 'benchmark', exclude=('seed', ))
    outputs = parser.add_argument_group('outputs')
    outputs.add_argument('--json', help='write the results as JSON here')
    outputs.add_argument('--chart', help='write a PNG bar chart here')
    outputs.add_argument(
        '--force', action='store_true', help='overwrite --json/--chart')
    return parser


def check_outputs(args):
    """Refuse --json and --chart paths that cannot be written, before any
    work."""
    if args.json and args.json == args.chart:
        raise UsageError(f'{args.json}: --json and --chart name the same '
                         'file')
    inputs = [p for p in (args.config, args.checkpoint, args.image) if p]
    for out in filter(None, (args.json, args.chart)):
        check_output_path(out, inputs, args.force)


def main(args):
    settings = settings_from(args, BenchmarkSettings)
    settings.check()
    check_outputs(args)
    result = run_benchmark(settings)
    print(format_report(result))
    if args.json:
        write_json(result.to_dict(), args.json, args.force)
        print(f'wrote {args.json}')
    if args.chart:
        plot_chart(result, args.chart, args.force)
        print(f'wrote {args.chart}')


if __name__ == '__main__':
    run_cli(main, build_parser)
