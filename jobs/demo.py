"""End-to-end demo on embedded defaults: a local Ray, the tiny offline models, the shipped prompts, local files.

Builds the tiny models (once) under `--workdir`, then runs the image job and the reflow-pair job over
jobs/data/prompts.parquet, verifies both outputs and prints where they are. Re-running resumes (and finds nothing
left to do).
"""

from pathlib import Path

from jobs.tiny import build_tiny_models
from jobs import generate, reflow_pairs
from jobs.errors import entry_point, process_exit
from jobs.main import Parser
from pipeline.verify import verify_output

PROMPTS = Path(__file__).parent / "data" / "prompts.parquet"


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="out/demo", help="where models and outputs go")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    models_dir = workdir / "models"
    if not (models_dir / "instaflow" / "model_index.json").exists():
        build_tiny_models(models_dir)
    shared = ["--prompts", str(PROMPTS), "--height", "64", "--width", "64", "--rows-per-shard", "16",
              "--batch-size", "8", "--num-workers", "2"]
    status = generate.main(
        [*shared, "--output", str(workdir / "images"), "--model", str(models_dir / "instaflow")]
    )
    if status == 0:
        status = reflow_pairs.main([
            *shared, "--output", str(workdir / "pairs"), "--teacher", str(models_dir / "sd15"), "--steps", "10",
        ])
    for output in ("images", "pairs"):
        if status == 0:
            report = verify_output(str(workdir / output))
            print(f"verify {workdir / output}: {'OK' if report.ok else 'NOT OK'}")
            status = 0 if report.ok else 1
    print(f"images: {workdir / 'images'}  pairs: {workdir / 'pairs'}")
    return status


if __name__ == "__main__":
    process_exit(main())
