"""The encode job on a local Ray (CPU workers) and the tiny SD model: its latents against diffusers' own VAE
encoding of the same images, its noise against the seed contract, rows that fail alone, a missing image column,
an image Parquet output of generate as its input, and its pairs in verify, pipeline.training.pairs_data and training."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs.main import main
from pipeline.reader import derive_seed
from pipeline.spec import JobSpec
from instaflow.sampling import noise_for_seed
from tests.jobhelpers import png_bytes, prompt_table

SIZE = ["--height", "64", "--width", "64", "--dtype", "float32", "--device", "cpu", "--num-workers", "1",
        "--no-progress"]
CAPTIONS = [f"a photo of a red fox, number {i}" for i in range(8)]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """a.parquet: 128x128 PNG bytes with a seed column, three bad (undecodable, missing, another aspect ratio);
    b.parquet: paths relative to its folder, no seeds, one of no file. (Hugging Face image structs: the
    generate test's input.)"""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    smooth = torch.nn.functional.interpolate(torch.from_numpy(rng.random((5, 3, 8, 8))), size=128, mode="bilinear")
    arrays = [a for a in (smooth * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()]
    (folder / "photos").mkdir()
    (folder / "photos" / "fox.png").write_bytes(png_bytes(arrays[3]))
    column = [png_bytes(arrays[0]), png_bytes(arrays[1]), png_bytes(arrays[2]), b"not an image", None, png_bytes(arrays[4][:64])]
    pq.write_table(pa.table({"prompt": CAPTIONS[:6], "seed": [11, 22, 33, 44, 55, 66], "image": column}),
                   folder / "a.parquet")
    pq.write_table(pa.table({"prompt": CAPTIONS[6:8], "image": ["photos/fox.png", "photos/none.png"]}),
                   folder / "b.parquet")
    return folder


@pytest.fixture(scope="module")
def encoded(ray_cpus, tiny_models, images, tmp_path_factory):
    output = tmp_path_factory.mktemp("encoded") / "pairs"
    assert main(["run", "encode", "--prompts", str(images), "--output", str(output), "--model",
                 str(tiny_models["sd15"]), "--rows-per-shard", "4", "--batch-size", "3", *SIZE]) == 0
    return output


def pair_rows(output) -> list[dict]:
    return [row for path in sorted(output.glob("*.parquet")) for row in pq.read_table(path).to_pylist()]


def assert_vae_means_and_seed_noise(rows: list[dict], images: dict[str, bytes], model) -> None:
    """Each row's latent is diffusers' VAE mean of its image (`images` by prompt), preprocessed by diffusers'
    VaeImageProcessor, within 1e-5; its noise is exactly its seed's."""
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor

    vae = AutoencoderKL.from_pretrained(model / "vae")
    processor = VaeImageProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1))
    for row in rows:
        with torch.no_grad():
            x = processor.preprocess(Image.open(io.BytesIO(images[row["prompt"]])), height=64, width=64)
            want = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        assert (torch.tensor(row["latent"]).reshape(want.shape) - want).abs().max() <= 1e-5, row["prompt"]
        assert torch.equal(torch.tensor(row["noise"]).reshape(want.shape), noise_for_seed(row["seed"], 64, 64))
        assert (row["teacher_kind"], row["teacher_steps"], row["teacher_guidance_scale"]) == ("encode", 0, 0.0)
        assert row["teacher"] == str(model) and row["truncated"] is False


def test_latents_are_diffusers_vae_means_and_noise_is_the_seeds(encoded, tiny_models, images):
    rows = {row["prompt"]: row for row in pair_rows(encoded)}
    ok = [row for row in rows.values() if row["status"] == "ok"]
    assert sorted(row["prompt"] for row in ok) == sorted(CAPTIONS[:3] + CAPTIONS[6:7])
    given = dict(zip(CAPTIONS, pq.read_table(images / "a.parquet").column("image").to_pylist()))
    given[CAPTIONS[6]] = (images / "photos" / "fox.png").read_bytes()
    assert_vae_means_and_seed_noise(ok, given, tiny_models["sd15"])
    assert [rows[prompt]["seed"] for prompt in CAPTIONS[:3]] == [11, 22, 33]  # the seed column
    assert rows[CAPTIONS[6]]["seed"] == derive_seed(0, rows[CAPTIONS[6]]["key"])  # else derived
    assert not {"image", "input_image"} & set(ok[0])  # the image column is read, not carried
    table = pq.read_table(sorted(encoded.glob("*.parquet"))[0])
    assert json.loads(table.schema.metadata[b"instaflow.tensor_shape"]) == {"latent": [4, 8, 8], "noise": [4, 8, 8]}
    identity = json.loads((encoded / "_job.json").read_text())["spec"]
    assert identity["teacher_kind"] == "encode" and identity["image_column"] == "image"
    assert identity["teacher_steps"] == 0 and "teacher" in identity


def test_a_bad_image_fails_its_row_alone(encoded):
    failed = {row["prompt"]: row["error_message"] for row in pair_rows(encoded) if row["status"] == "failed"}
    assert failed.keys() == {*CAPTIONS[3:6], CAPTIONS[7]}
    assert "a.parquet row 3: image (image): cannot be decoded" in failed[CAPTIONS[3]]
    assert "a.parquet row 4: image (image): missing" in failed[CAPTIONS[4]]
    assert "a.parquet row 5: image (image): 128x64 has another aspect ratio than the job's 64x64" in failed[CAPTIONS[5]]
    assert "b.parquet row 1: image (image): 'photos/none.png': no such file" in failed[CAPTIONS[7]]
    failed_rows = [row for row in pair_rows(encoded) if row["status"] == "failed"]
    assert all(row["latent"] is None and row["noise"] is None for row in failed_rows)


def test_a_missing_image_column_is_refused_before_any_model_loads(tmp_path, capsys):
    pq.write_table(prompt_table(4), tmp_path / "prompts.parquet")
    output = tmp_path / "out"
    status = main(["run", "encode", "--prompts", str(tmp_path / "prompts.parquet"), "--output", str(output),
                   "--model", str(tmp_path / "no-such-model"), "--image-column", "photo", *SIZE])
    assert status == 2 and not output.exists()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "prompts.parquet: no column 'photo' (--image-column)" in lines[0], lines


def test_generates_image_parquet_is_an_encode_input_and_its_pairs_train(ray_cpus, tiny_models, tmp_path):
    from jobs import train_reflow
    from pipeline.training.pairs_data import PairStream, find_pairs

    pq.write_table(prompt_table(6), tmp_path / "prompts.parquet")
    generated, pairs = tmp_path / "generated", tmp_path / "pairs"
    assert main(["run", "generate", "--prompts", str(tmp_path / "prompts.parquet"), "--output", str(generated),
                 "--model", str(tiny_models["instaflow"]), "--format", "parquet", *SIZE]) == 0
    assert main(["run", "encode", "--prompts", str(generated), "--output", str(pairs), "--model",
                 str(tiny_models["sd15"]), *SIZE]) == 0
    rows = pair_rows(pairs)
    made = pq.read_table(sorted(generated.glob("*.parquet"))[0]).to_pylist()  # images as Hugging Face structs
    assert [row["status"] for row in rows] == ["ok"] * 6
    assert [row["seed"] for row in rows] == [row["seed"] for row in made]  # the generated rows' seeds
    assert_vae_means_and_seed_noise(rows, {row["prompt"]: row["image"]["bytes"] for row in made}, tiny_models["sd15"])
    assert main(["verify", str(pairs)]) == 0
    found = find_pairs(str(pairs))
    sample = next(iter(PairStream(found, seed=0)))
    assert found.num_pairs == 6 and sample["latent"].shape == sample["noise"].shape == (4, 8, 8)
    assert train_reflow.main(["--pairs", str(pairs), "--init", str(tiny_models["sd15"]), "--output",
                              str(tmp_path / "trained"), "--loss", "reflow", "--steps", "2", "--batch-size", "2",
                              "--warmup-steps", "1", "--checkpoint-every", "2", "--log-every", "1", "--num-workers",
                              "1", "--device", "cpu"]) == 0
    assert (tmp_path / "trained" / "final" / "model_index.json").exists()


def test_the_image_column_is_part_of_the_identity_of_encode_jobs_only():
    def identity(**kwargs) -> dict:
        return JobSpec(prompts="p", output="o", **kwargs).resolve(False).identity()

    generate = identity(model="m")
    pairs = identity(tasks=("pairs",), teacher="t")
    # the models themselves are added by the job, as what they are (pipeline/model_source.py job_identity)
    assert sorted(generate) == ["decoder", "device", "dtype", "guidance_scale", "height", "image_format",
                                "output_format", "prompt_column", "rows_per_shard", "samples_per_prompt", "seed",
                                "steps", "tasks", "width"]
    assert sorted(pairs) == ["device", "dtype", "height", "prompt_column", "rows_per_shard", "samples_per_prompt",
                             "seed", "tasks", "teacher_guidance_scale", "teacher_images", "teacher_kind",
                             "teacher_steps", "width"]
    assert identity(model="m", image_column="photo") == generate
    assert identity(tasks=("pairs",), teacher="t", image_column="photo") == pairs
    encode = identity(tasks=("pairs",), teacher="t", teacher_kind="encode")
    assert encode["image_column"] == "image" and (encode["teacher_steps"], encode["teacher_guidance_scale"]) == (0, 0.0)
    assert identity(tasks=("pairs",), teacher="t", teacher_kind="encode", image_column="photo") != encode
    with pytest.raises(ValueError, match="no teacher steps"):
        JobSpec(prompts="p", output="o", tasks=("pairs",), teacher="t", teacher_kind="encode", teacher_steps=4)
    with pytest.raises(ValueError, match="no student"):
        JobSpec(prompts="p", output="o", tasks=("images", "pairs"), model="m", teacher="t", teacher_kind="encode")
