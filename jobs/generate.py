"""Generate an image dataset with InstaFlow (or a 2-Rectified-Flow model) from Parquet prompt shards."""

import argparse

from jobs.cli import base_parser, common_spec_args, run_command_line
from jobs.errors import entry_point, process_exit


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = base_parser(__doc__, prog)
    parser.add_argument("--model", required=True, help="local diffusers folder or hub id")
    parser.add_argument("--steps", type=int, help="Euler steps (default: 1 for InstaFlow, 25 for 2-RF)")
    parser.add_argument("--guidance-scale", type=float, help="default: 0 for InstaFlow, 1.5 for 2-RF")
    return parser


def spec_args(args: argparse.Namespace) -> dict:
    return common_spec_args(args) | {
        "tasks": ("images",), "model": args.model, "steps": args.steps, "guidance_scale": args.guidance_scale,
    }


@entry_point
def main(argv: list[str] | None = None) -> int:
    return run_command_line(parser, spec_args, argv)


if __name__ == "__main__":
    process_exit(main())
