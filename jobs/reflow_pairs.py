"""Write reflow training pairs (prompt, seed, noise, teacher latent); optionally images from a student too."""

import argparse

from jobs.cli import base_parser, common_spec_args, run_command_line
from jobs.errors import entry_point, process_exit


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = base_parser(__doc__, prog)
    parser.add_argument("--teacher", required=True, help="teacher model: local diffusers folder or hub id")
    parser.add_argument("--teacher-kind", choices=("sd", "rf"), default="sd",
                        help="sd: SD-1.5 with DPM-Solver; rf: a rectified-flow model with Euler steps")
    parser.add_argument("--steps", type=int, help="teacher steps (default 25)")
    parser.add_argument("--guidance-scale", type=float, help="teacher guidance (default: 5.0 sd, 1.5 rf)")
    parser.add_argument("--model", help="also write images from this student model in the same pass")
    parser.add_argument("--student-steps", type=int, help="student steps (default: as for generate)")
    parser.add_argument("--student-guidance-scale", type=float, help="student guidance (default: as for generate)")
    parser.add_argument("--teacher-images", action="store_true",
                        help="also store the decoded teacher latent (--image-format) as the pairs' image column")
    return parser


def spec_args(args: argparse.Namespace) -> dict:
    return common_spec_args(args) | {
        "tasks": ("images", "pairs") if args.model else ("pairs",),
        "teacher": args.teacher,
        "teacher_kind": args.teacher_kind,
        "teacher_steps": args.steps,
        "teacher_guidance_scale": args.guidance_scale,
        "model": args.model,
        "steps": args.student_steps,
        "guidance_scale": args.student_guidance_scale,
        "teacher_images": args.teacher_images,
    }


@entry_point
def main(argv: list[str] | None = None) -> int:
    return run_command_line(parser, spec_args, argv)


if __name__ == "__main__":
    process_exit(main())
