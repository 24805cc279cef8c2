"""Encode an image dataset into reflow pairs: per row, the seed's noise and the VAE latent of the row's image."""

import argparse

from jobs.cli import base_parser, common_spec_args, run_command_line
from jobs.errors import entry_point, process_exit
from pipeline.spec import ENCODE


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = base_parser(__doc__, prog)
    parser.add_argument("--model", required=True,
                        help="the diffusers pipeline whose VAE encodes the images: local folder, hub id or fsspec URL")
    parser.add_argument("--image-column", default="image",
                        help="column of images: a Hugging Face image struct, encoded bytes, or a path or URL "
                             "(relative: to the Parquet file's folder)")
    return parser


def spec_args(args: argparse.Namespace) -> dict:
    return common_spec_args(args) | {
        "tasks": ("pairs",), "teacher": args.model, "teacher_kind": ENCODE, "image_column": args.image_column,
    }


@entry_point
def main(argv: list[str] | None = None) -> int:
    return run_command_line(parser, spec_args, argv)


if __name__ == "__main__":
    process_exit(main())
