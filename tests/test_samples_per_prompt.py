"""`generate --samples-per-prompt K` through `instaflow-batch run` on the tiny models: K rows per prompt keyed
{key}-{k} with their own seeds, in tars and in image Parquet, every stage (ControlNet, the refiner, scores) filling
each sample's columns, each sample made as the same prompt with its seed alone, and what reads an output (verify,
preview, the readers) seeing K rows per prompt; a resume with another K and a bad K are refused."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from instaflow.refiner import refiner_seed
from jobs.jobfile import JobFileError, parse_job
from jobs.main import main
from jobs.preview import read_samples
from jobs.submit import job_entrypoint
from pipeline.reader import derive_seed
from tests.jobhelpers import image_rows, png_bytes

K = 3
JOB_SEED = 5
IDS = ["fox", "tower", "ramen"]
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen"]
ROW_SEEDS = [None, 7, None]  # a row without a seed: each sample's is derived from the job seed and its own key
SCORE_COLUMNS = ("nsfw_score", "nsfw", "clip_score")
PER_SAMPLE_COLUMNS = ("refiner_seed", "control_digest", *SCORE_COLUMNS)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("samples")
    rng = np.random.default_rng(4)
    controls = [png_bytes((rng.random((64, 64, 3)) * 255).astype(np.uint8)) for _ in IDS]
    pq.write_table(pa.table({"id": IDS, "prompt": PROMPTS, "seed": pa.array(ROW_SEEDS, pa.int64()),
                             "control_image": controls}), folder / "prompts.parquet", row_group_size=2)
    return folder


@pytest.fixture(scope="module")
def job(tiny_models):
    """The flags of every job here but the prompts and output: all the stages, at 64x64 in fp32."""
    return ["--model", str(tiny_models["instaflow"]), "--seed", str(JOB_SEED), "--height", "64", "--width", "64",
            "--dtype", "float32", "--image-format", "png", "--num-workers", "1", "--batch-size", "4", "--no-progress",
            "--controlnet", str(tiny_models["controlnet"]),
            "--refiner", str(tiny_models["sdxl-refiner"]), "--refine-size", "64", "--refiner-steps", "4",
            "--refiner-strength", "0.5",
            "--scores", "nsfw,clip", "--safety-checker", str(tiny_models["safety_checker"]),
            "--clip-model", str(tiny_models["clip"])]


@pytest.fixture(scope="module")
def outputs(ray_gpus, inputs, job):
    """One K=3 job written as tars (2 prompts a shard: 6 rows, then 3), and the same job as image Parquet from a
    job file."""
    prompts = ["--prompts", str(inputs / "prompts.parquet"), "--rows-per-shard", "2"]
    assert main(["run", "generate", *prompts, "--output", str(inputs / "tars"), *job, "--samples-per-prompt",
                 str(K)]) == 0
    (inputs / "job.yaml").write_text(f"job: generate\nsamples_per_prompt: {K}\nformat: parquet\n")
    assert main(["run", "--config", str(inputs / "job.yaml"), *prompts, "--output", str(inputs / "parquet"),
                 *job]) == 0
    return inputs / "tars", inputs / "parquet"


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def expected_seed(row: int, k: int) -> int:
    """The documented rule: the row's seed + k, or else derived from the job seed and the sample's key."""
    seed = ROW_SEEDS[row]
    return derive_seed(JOB_SEED, f"{IDS[row]}-{k}") if seed is None else seed + k


def test_k_rows_per_prompt_with_their_keys_seeds_and_stages_in_both_formats(outputs):
    tars, parquet = outputs
    rows, images = image_rows(tars)
    table = pq.read_table(sorted(parquet.glob("*.parquet")))
    assert [len(pq.read_table(path)) for path in sorted(tars.glob("*.parquet"))] == [2 * K, K]
    for stored in (rows, table.to_pylist()):
        assert [row["key"] for row in stored] == [f"{key}-{k}" for key in IDS for k in range(K)]
        assert [row["seed"] for row in stored] == [expected_seed(i, k) for i in range(len(IDS)) for k in range(K)]
        assert [row["prompt"] for row in stored] == [prompt for prompt in PROMPTS for _ in range(K)]
        assert all(row["status"] == "ok" for row in stored)
        assert all(row[name] is not None for row in stored for name in PER_SAMPLE_COLUMNS)
        assert all(row["refiner_seed"] == refiner_seed(row["seed"]) for row in stored)  # each sample's own
        for i in range(len(IDS)):  # a prompt's samples share its control image, not their images
            samples = stored[i * K : (i + 1) * K]
            assert len({row["control_digest"] for row in samples}) == 1
            assert len({row["refiner_seed"] for row in samples}) == K
    assert len(images) == len(IDS) * K and len(set(images.values())) == len(IDS) * K
    for row, image in zip(rows, table.column("image").to_pylist()):  # the same job, the same images
        assert np.array_equal(pixels(image["bytes"]), pixels(images[row["key"]]))
        assert image["path"] == f"{row['key']}.png"
    assert json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]["image"] == {"_type": "Image"}
    progress = json.loads((tars / "_job.json").read_text())["progress"]  # counted in samples, not input rows
    assert progress["samples_total"] == progress["samples_now"] == progress["samples_ok_now"] == len(IDS) * K


def test_each_sample_is_its_prompt_with_its_seed_alone(outputs, inputs, job, tmp_path):
    """A K=1 job whose rows carry the samples' keys and seeds, batched as the K=3 job batched its samples, makes
    the same bytes: the refined image and every score."""
    rows, images = image_rows(outputs[0])
    source = pq.read_table(inputs / "prompts.parquet").to_pylist()
    alone = pa.table({"id": [row["key"] for row in rows], "prompt": [row["prompt"] for row in rows],
                      "seed": [row["seed"] for row in rows],
                      "control_image": [source[i]["control_image"] for i in range(len(IDS)) for _ in range(K)]})
    pq.write_table(alone, tmp_path / "alone.parquet", row_group_size=2 * K)
    assert main(["run", "generate", "--prompts", str(tmp_path / "alone.parquet"), "--output", str(tmp_path / "out"),
                 "--rows-per-shard", str(2 * K), *job]) == 0
    single_rows, single_images = image_rows(tmp_path / "out")
    assert single_images == images
    for row, single in zip(rows, single_rows):
        assert {name: single[name] for name in PER_SAMPLE_COLUMNS} == {name: row[name] for name in PER_SAMPLE_COLUMNS}


def test_verify_preview_and_the_readers_see_k_rows_per_prompt(outputs, tmp_path, capsys):
    import datasets
    import webdataset as wds

    tars, parquet = outputs
    capsys.readouterr()
    assert main(["verify", str(tars)]) == 0
    assert f"rows (images)    {len(IDS) * K}\n" in capsys.readouterr().out
    assert main(["verify", str(parquet)]) == 0
    assert main(["preview", str(tars), "--out", str(tmp_path / "sheet.png"), "--n", str(2 * K)]) == 0
    assert f"{2 * K} images" in capsys.readouterr().out
    shown = [f"{key}-{k}" for key in IDS[:2] for k in range(K)]  # the first two prompts' samples, each captioned
    assert [sample.key for sample in read_samples(str(parquet), 2 * K)[1]] == shown
    assert main(["report", str(tars), "--out", str(tmp_path / "report.html"), "--n", str(2 * K)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert all(f"{key} seed {expected_seed(i // K, i % K)}<br>" in page for i, key in enumerate(shown))

    keys = [sample["__key__"] for shard in sorted(tars.glob("*.tar"))
            for sample in wds.WebDataset(str(shard), shardshuffle=False)]
    assert keys == [f"{key}-{k}" for key in IDS for k in range(K)]
    loaded = datasets.load_dataset("parquet", data_files=str(parquet / "*.parquet"), split="train")
    assert loaded.num_rows == len(IDS) * K and loaded[K]["key"] == "tower-0" and loaded[K]["image"].size == (64, 64)


def test_another_k_is_another_job_and_a_bad_k_is_refused(outputs, inputs, job, tmp_path, capsys):
    prompts = ["--prompts", str(inputs / "prompts.parquet"), "--rows-per-shard", "2"]
    capsys.readouterr()
    assert main(["run", "generate", *prompts, "--output", str(outputs[0]), *job, "--samples-per-prompt", "2"]) == 2
    assert "samples_per_prompt" in capsys.readouterr().err
    for bad in ("0", "1.5", "-1"):
        with pytest.raises(SystemExit) as exited:
            main(["run", "generate", *prompts, "--output", str(tmp_path / "bad"), *job, "--samples-per-prompt", bad])
        assert exited.value.code == 2
        assert f"argument --samples-per-prompt: must be a positive integer, got '{bad}'" in capsys.readouterr().err
    assert main(["run", "generate", *prompts, "--output", str(tmp_path / "bad"), *job, "--samples-per-prompt",
                 "99999999999999999999"]) == 2
    assert "samples_per_prompt must be at most 10000" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()

    (tmp_path / "zero.yaml").write_text("samples_per_prompt: 0\n")
    with pytest.raises(JobFileError, match="samples_per_prompt: .*must be a positive integer"):
        parse_job("instaflow-batch run", ["generate", "--config", str(tmp_path / "zero.yaml"), *prompts],
                  lambda parser: None)
    submitted = parse_job("instaflow-batch submit", ["--config", str(inputs / "job.yaml"), *prompts, "--output",
                                                     "s3://bucket/out", *job], lambda parser: None)
    assert f"--samples-per-prompt {K}" in job_entrypoint(submitted)
