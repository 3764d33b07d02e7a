"""Convert RepVGG ImageNet weights of any known layout to mmrepvgg's."""
import argparse

from mmrepvgg.cli import run_cli
from mmrepvgg.convert import convert_pretrained


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('src', help='official or OpenMMLab-zoo weights')
    parser.add_argument('dst', help='output checkpoint')
    parser.add_argument(
        '--force', action='store_true', help='overwrite dst if it exists')
    args = parser.parse_args()
    count = convert_pretrained(args.src, args.dst, force=args.force)
    print(f'wrote {count} tensors to {args.dst}')


if __name__ == '__main__':
    run_cli(main)
