"""Flags shared by the job entry points, and the one way a job ends: a summary and an exit status.

Exit status: 0 when every shard is committed, 1 when some failed, 2 for bad input or settings (nothing ran),
130 when interrupted. Re-running the same command resumes.
"""

import argparse
import json
import logging
import sys

from instaflow.loading import ModelLoadError
from jobs.main import DefaultsShown
from pipeline.commit import OutputError
from pipeline.job import run_job
from pipeline.plan import InputError
from pipeline.pool import WorkerStartupError
from pipeline.progress import JobProgress
from pipeline.spec import IMAGE_FORMATS, OUTPUT_FORMATS, JobSpec

logger = logging.getLogger(__name__)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def base_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=DefaultsShown)
    parser.add_argument("--prompts", required=True, help="Parquet file, folder or glob, on any fsspec filesystem")
    parser.add_argument("--output", required=True, help="output folder URL (s3://, gs://, file://, a path, ...)")
    parser.add_argument("--prompt-column", default="prompt", help="column holding the prompt text")
    parser.add_argument("--seed", type=int, default=0, help="job seed; per-sample seeds derive from it and the key")
    parser.add_argument("--height", type=int, default=512, help="image height, a multiple of 8")
    parser.add_argument("--width", type=int, default=512, help="image width, a multiple of 8")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per forward pass")
    parser.add_argument("--rows-per-shard", type=int, default=1000, help="target rows per work unit and shard")
    parser.add_argument("--format", dest="output_format", choices=OUTPUT_FORMATS, default="webdataset",
                        help="image shards: webdataset tars, or Hugging Face image Parquet")
    parser.add_argument("--image-format", choices=IMAGE_FORMATS, default="jpeg", help="image encoding")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the UNet and the VAE decoder (default: on with CUDA, off on the CPU)")
    parser.add_argument("--cpus-per-worker", type=float,
                        help="CPUs reserved per worker, one image encoder each (default: a GPU node's CPUs per GPU)")
    parser.add_argument("--num-workers", type=int, help="default: one per GPU in the cluster (1 without GPUs)")
    parser.add_argument("--max-unit-attempts", type=int, default=3, help="tries per shard before it counts as failed")
    parser.add_argument("--storage-options", type=_json_object, default={}, help="JSON passed to fsspec")
    parser.add_argument("--overwrite", action="store_true", help="delete this tool's outputs there and start over")
    parser.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return parser


def common_spec_args(args: argparse.Namespace) -> dict:
    names = (
        "prompts", "output", "prompt_column", "seed", "height", "width", "batch_size", "rows_per_shard",
        "output_format", "image_format", "dtype", "compile", "cpus_per_worker", "num_workers", "max_unit_attempts", "storage_options",
        "overwrite", "ray_address",
    )
    return {name: getattr(args, name) for name in names}


def run(spec_args: dict, show_progress: bool = True) -> int:
    """Builds the spec, runs the job, prints the summary; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = JobSpec(**spec_args)
        progress = run_job(spec, show_progress=show_progress)
    except (ValueError, InputError, ModelLoadError, OutputError, WorkerStartupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(progress.table())
    return exit_status(progress)


def exit_status(progress: JobProgress) -> int:
    if progress.interrupted:
        return 130
    return 0 if progress.complete else 1
