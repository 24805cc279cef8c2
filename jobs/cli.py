"""Flags shared by the job entry points, and the one way a job ends: a summary and an exit status.

Exit status, the same for every entry point: 0 every shard committed; 1 some shards failed; 2 bad input or
settings (nothing ran); 3 no worker could start in time; 4 the output was lost to another job; 130 interrupted
(SIGINT, or SIGTERM as `ray job stop` sends it). Re-running the same command resumes.
"""

import argparse
import logging

from jobs.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_OUTPUT_LOST, EXIT_SHARDS_FAILED
from jobs.main import Parser
from jobs.options import check_output_folder, json_object, positive_int, storage_options_flag
from pipeline.job import run_job
from pipeline.progress import JobProgress
from pipeline.row_images import DEFAULT_IMAGE_READ_TIMEOUT_S, DEFAULT_MAX_IMAGE_BYTES
from pipeline.storage import redact_text
from pipeline.spec import CLIP_MODEL, CONTROL_PREPROCESS, DECODERS, DEVICE_CHOICES, IMAGE_FORMATS, OUTPUT_FORMATS, \
    SAFETY_CHECKER, SD15, TAESD, JobSpec

logger = logging.getLogger(__name__)


class Repeatable(argparse.Action):
    """A flag that may be given several times, its values kept in order. Values on the command line replace
    the default (a job file's list) rather than add to it, as every other flag overrides the file."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*([] if given is self.default else given), values])


def base_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description=description)
    parser.add_argument("--prompts", required=True, help="Parquet file, folder or glob, on any fsspec filesystem")
    parser.add_argument("--output", required=True, help="output folder URL (s3://, gs://, file://, a path, ...)")
    parser.add_argument("--prompt-column", default="prompt", help="column holding the prompt text")
    parser.add_argument("--seed", type=int, default=0, help="job seed; per-sample seeds derive from it and the key")
    parser.add_argument("--samples-per-prompt", metavar="K", type=positive_int, default=1,
                        help="K samples per input row (images per prompt, pairs per prompt or image), keyed "
                             "{key}-{k}, seeded with the row's seed + k or derived from the job seed and that key")
    parser.add_argument("--height", type=int, default=512, help="image height, a multiple of 8")
    parser.add_argument("--width", type=int, default=512, help="image width, a multiple of 8")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per forward pass")
    parser.add_argument("--rows-per-shard", type=int, default=1000,
                        help="target input rows per work unit and shard (a shard holds --samples-per-prompt times "
                             "as many output rows)")
    parser.add_argument("--format", dest="output_format", choices=OUTPUT_FORMATS, default="webdataset",
                        help="image shards: webdataset tars, or Hugging Face image Parquet")
    parser.add_argument("--image-format", choices=IMAGE_FORMATS, default="jpeg", help="image encoding")
    parser.add_argument("--decoder", choices=DECODERS, default="full",
                        help="tiny: decode images with a tiny decoder (TAESD), far faster, lower quality")
    parser.add_argument("--tiny-decoder", default=TAESD, help="the tiny decoder for --decoder tiny: hub id, "
                        "folder or URL of a diffusers AutoencoderTiny")
    parser.add_argument("--lora", dest="loras", metavar="SRC[:SCALE]", action=Repeatable, default=[],
                        help="fuse a LoRA into the student (repeatable, in order): a .safetensors file (path, URL or "
                             "HUB_ID/FILE), diffusers or kohya format; SCALE default 1.0")
    parser.add_argument("--merge-finetune", metavar="MODEL[:SCALE]",
                        help="add SCALE x (this fine-tune's UNet - --merge-base's) to the student's UNet and take its "
                             "VAE and text encoder (InstaFlow's 'hf' LoRA mode); SCALE default 1.0")
    parser.add_argument("--merge-base", default=SD15, help="the model --merge-finetune was fine-tuned from")
    parser.add_argument("--scores", default="", metavar="nsfw,clip",
                        help="per-row scores of the images made: nsfw (the SD safety checker's score and flag; "
                             "images are not changed) and/or clip (CLIP score of image and prompt)")
    parser.add_argument("--safety-checker", default=SAFETY_CHECKER, help="the model of --scores nsfw")
    parser.add_argument("--clip-model", default=CLIP_MODEL, help="the CLIP model of --scores clip")
    parser.add_argument("--controlnet", metavar="MODEL",
                        help="condition the student and the teacher on each row's control image with this diffusers "
                             "ControlNetModel (hub id, folder or fsspec URL)")
    parser.add_argument("--controlnet-scale", type=float, default=1.0, help="scale of the ControlNet's residuals")
    parser.add_argument("--control-column", default="control_image",
                        help="column of control images: encoded image bytes, or a path or URL (relative: to the "
                             "prompts file's folder)")
    parser.add_argument("--control-preprocess", choices=CONTROL_PREPROCESS, default="none",
                        help="canny: OpenCV's Canny edges of each image; none: the column holds the condition")
    parser.add_argument("--canny-low", type=int, default=100, help="Canny's lower threshold")
    parser.add_argument("--canny-high", type=int, default=200, help="Canny's upper threshold")
    parser.add_argument("--allow-image-source", dest="allow_image_sources", metavar="PREFIX", action=Repeatable,
                        default=[], help="let rows name images below this folder (/data/images/) or URL prefix "
                        "(https://, https://host/, s3://bucket/prefix/) as well as inside the prompts root "
                        "(repeatable; encode and --controlnet); other stores get no storage options")
    parser.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                        help="bytes read at most per row's image; a larger one fails its row")
    parser.add_argument("--image-read-timeout", dest="image_read_timeout_s", type=float,
                        default=DEFAULT_IMAGE_READ_TIMEOUT_S,
                        help="seconds one row's image may take to read (and each request to answer)")
    parser.add_argument("--refiner", metavar="MODEL",
                        help="refine the student's images with this SDXL refiner pipeline (hub id such as "
                             "stabilityai/stable-diffusion-xl-refiner-1.0, folder or fsspec URL)")
    parser.add_argument("--refiner-strength", type=float, default=0.3, help="img2img strength of the refiner")
    parser.add_argument("--refiner-steps", type=int, default=50,
                        help="refiner scheduler steps, of which strength x steps run")
    parser.add_argument("--refiner-guidance-scale", type=float, default=5.0, help="the refiner's guidance scale")
    parser.add_argument("--refine-size", type=int, default=1024,
                        help="the refined image's longer side; the student's image is resized to it first")
    parser.add_argument("--aesthetic-score", type=float, default=6.0, help="the refiner's aesthetic score")
    parser.add_argument("--negative-aesthetic-score", type=float, default=2.5,
                        help="the refiner's negative aesthetic score")
    parser.add_argument("--refiner-offload", action="store_true",
                        help="keep the refiner in host memory and move each of its models to the GPU only while it "
                             "runs (for GPUs too small for the student and the refiner together; slower)")
    parser.add_argument("--keep-unrefined", action="store_true",
                        help="also store the student's image ({key}.unrefined.EXT in tars, unrefined_image in "
                             "Parquet)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                        help="auto: GPUs on a cluster the job joins or a machine with a GPU, else the CPU")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="default: fp16 on GPUs, fp32 on CPU")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the UNet and the VAE decoder (default: on with CUDA, off on the CPU)")
    parser.add_argument("--cpus-per-worker", type=float,
                        help="CPUs reserved per worker, one image encoder each (default: a GPU node's CPUs per GPU)")
    parser.add_argument("--num-workers", type=int, help="default: one per GPU in the cluster (1 without GPUs)")
    parser.add_argument("--max-unit-attempts", type=int, default=3, help="tries per shard before it counts as failed")
    parser.add_argument("--start-timeout", dest="start_timeout_s", type=float, default=900.0,
                        help="seconds without any worker able to run before the job stops (exit 3)")
    parser.add_argument("--unit-timeout", dest="unit_timeout_s", type=float,
                        help="seconds one unit may run before its worker is restarted (default: 10x the measured)")
    parser.add_argument("--lock-lease", dest="lock_lease_s", type=float, default=120.0,
                        help="seconds after which an output lock nobody renews is taken over")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load .bin (pickle) weights of a model without safetensors; pickles can run code")
    parser.add_argument("--storage-options", type=storage_options_flag, default={},
                        help="JSON passed to fsspec, or @FILE to read it from a file on the machine that runs the "
                             "driver (for submit: the cluster's)")
    parser.add_argument("--overwrite", action="store_true", help="delete this tool's outputs there and start over")
    parser.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return parser


def common_spec_args(args: argparse.Namespace) -> dict:
    names = (
        "prompts", "output", "prompt_column", "seed", "height", "width", "batch_size", "rows_per_shard",
        "output_format", "image_format", "decoder", "tiny_decoder", "device", "dtype", "compile", "cpus_per_worker",
        "num_workers", "start_timeout_s", "unit_timeout_s", "lock_lease_s", "allow_pickle", "max_unit_attempts",
        "storage_options", "overwrite", "ray_address", "loras", "merge_finetune", "merge_base", "scores",
        "safety_checker", "clip_model", "controlnet", "controlnet_scale", "control_column", "control_preprocess",
        "canny_low", "canny_high", "refiner", "refiner_strength", "refiner_steps", "refiner_guidance_scale",
        "refine_size", "aesthetic_score", "negative_aesthetic_score", "keep_unrefined", "refiner_offload",
        "allow_image_sources", "max_image_bytes", "image_read_timeout_s",
        "samples_per_prompt",
    )
    return {name: getattr(args, name) for name in names}


def run(spec_args: dict, show_progress: bool = True) -> int:
    """Builds the spec, runs the job, prints the summary; returns the exit status. What stops a job before it
    runs is raised, for jobs.errors.entry_point to report (exit 2 or 3)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = spec_args["storage_options"]
    if isinstance(options, str):  # @FILE, read here: on the machine that runs the driver
        try:
            options = json_object(options)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"--storage-options: {exc}") from None
    spec = JobSpec(**spec_args | {"storage_options": options})
    check_output_folder(spec.output, spec.storage_options)
    progress = run_job(spec, show_progress=show_progress)
    print(progress.table())
    print(where_to_look(spec.output))
    return exit_status(progress)


def run_command_line(parser, spec_args, argv: list[str] | None) -> int:
    """A job module's `main`: its flags (`parser()`), its spec (`spec_args`), the job run with a progress bar
    unless --no-progress."""
    args = parser().parse_args(argv)
    return run(spec_args(args), show_progress=not args.no_progress)


def where_to_look(output: str) -> str:
    """Where the job's outputs, its report and its metrics are: the last lines of a job's log."""
    shown_output = redact_text(output)
    return "\n".join([
        f"outputs      {shown_output}",
        f"report       instaflow-batch report {shown_output} --out report.html",
        "metrics      ray_instaflow_* on each Ray node's metrics endpoint; dashboard: infra/grafana/instaflow.json",
    ])


def exit_status(progress: JobProgress) -> int:
    if progress.lost:
        return EXIT_OUTPUT_LOST
    if progress.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if progress.complete else EXIT_SHARDS_FAILED
