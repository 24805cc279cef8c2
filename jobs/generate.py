"""Generate an image dataset with InstaFlow (or a 2-Rectified-Flow model) from Parquet prompt shards."""

import sys

from jobs.cli import base_parser, common_spec_args, run


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--model", required=True, help="local diffusers folder or hub id")
    parser.add_argument("--steps", type=int, help="Euler steps (default: 1 for InstaFlow, 25 for 2-RF)")
    parser.add_argument("--guidance-scale", type=float, help="default: 0 for InstaFlow, 1.5 for 2-RF")
    args = parser.parse_args(argv)
    spec = common_spec_args(args) | {
        "tasks": ("images",), "model": args.model, "steps": args.steps, "guidance_scale": args.guidance_scale,
    }
    return run(spec, show_progress=not args.no_progress)


if __name__ == "__main__":
    sys.exit(main())
