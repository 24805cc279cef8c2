"""`instaflow-batch preview`: committed shards only, the right image under each caption, pairs decoded with the
teacher's VAE (checked against a transcription of the decoder), and captions in every common script."""

import io
import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from jobs import generate, reflow_pairs
from jobs.main import main
from jobs.preview import read_samples
from jobs.sheet import FontChain, thumbnail
from pipeline.writers import read_tensor_column
from tests.jobhelpers import tar_members

SCRIPTS = "a red fox · Москва · Ελλάδα · 東京の夜 · 서울 · قطة · हिमालय · ตลาด"


@pytest.fixture(scope="module")
def outputs(ray_gpus, tiny_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("preview")
    prompts = work / "prompts.parquet"
    pq.write_table(pa.table({"prompt": SCRIPTS.split(" · ")[:6]}), prompts)
    shared = ["--prompts", str(prompts), "--height", "64", "--width", "64", "--rows-per-shard", "3",
              "--batch-size", "3", "--num-workers", "1", "--no-progress"]
    teacher = work / "teacher"  # a copy, so that a test can make the recorded teacher unreachable
    shutil.copytree(tiny_models["sd15"], teacher)
    assert generate.main([*shared, "--output", str(work / "images"), "--model", str(tiny_models["instaflow"])]) == 0
    assert reflow_pairs.main([*shared, "--output", str(work / "pairs"), "--teacher", str(teacher), "--steps", "2"]) == 0
    return {"images": work / "images", "pairs": work / "pairs", "teacher": teacher}


def test_sheet_shows_each_committed_image_under_its_caption(outputs, tmp_path, capsys):
    sheet_path = tmp_path / "sheet.png"
    assert main(["preview", str(outputs["images"]), "--out", str(sheet_path), "--n", "5", "--thumb", "64"]) == 0
    assert "5 images from 2 committed shards" in capsys.readouterr().out
    sheet = np.asarray(Image.open(sheet_path))
    line_height, columns = math.ceil(13 * 1.4), 3  # the sheet's layout: 5 cells in a 3-column grid
    cell_width, cell_height = 64 + 8, 64 + 8 + 4 * line_height
    assert sheet.shape == (2 * cell_height + 8, columns * cell_width + 8, 3)
    images = {**tar_members((outputs["images"] / "00000.tar").read_bytes()),
              **tar_members((outputs["images"] / "00001.tar").read_bytes())}
    for i in range(5):
        expected = np.asarray(thumbnail(Image.open(io.BytesIO(images[f"{i:012d}.jpg"])), 64))
        x, y = 8 + (i % columns) * cell_width, 8 + (i // columns) * cell_height
        assert np.array_equal(sheet[y : y + 64, x : x + 64], expected), f"cell {i}"
        caption = sheet[y + 64 : y + cell_height - 8, x : x + 64]
        assert (caption < 128).any(), f"cell {i} has no caption"


def test_only_committed_shards_are_read(outputs, tmp_path):
    marker = outputs["images"] / "00001.stats.json"
    saved = marker.read_bytes()
    marker.unlink()  # shard 1 is now uncommitted: its tar and parquet must not be read
    try:
        _, samples, shards = read_samples(str(outputs["images"]), 64)
    finally:
        marker.write_bytes(saved)
    assert [s.key for s in samples] == [f"{i:012d}" for i in range(3)] and shards == 1


def test_pairs_are_the_teacher_latents_decoded_by_the_teachers_vae(outputs, tiny_models, tmp_path, capsys):
    kind, samples, _ = read_samples(str(outputs["pairs"]), 6)
    assert kind == "pairs" and len(samples) == 6
    table = pq.read_table(outputs["pairs"] / "00000.parquet")
    latents = torch.from_numpy(read_tensor_column(table, "latent"))
    vae = AutoencoderKL.from_pretrained(tiny_models["sd15"] / "vae").eval()
    with torch.no_grad():  # x = D(z / scaling_factor), from [-1, 1] to 0..255
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    expected = ((decoded / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for sample, image in zip(samples[:3], expected):
        assert np.abs(np.asarray(sample.image).astype(int) - image.astype(int)).max() <= 1

    shutil.rmtree(outputs["teacher"])  # the recorded teacher is gone: --vae names another model's VAE
    out = tmp_path / "pairs.png"
    assert main(["preview", str(outputs["pairs"]), "--out", str(out)]) == 2
    assert "--vae MODEL" in capsys.readouterr().err and not out.exists()
    assert main(["preview", str(outputs["pairs"]), "--out", str(out), "--vae", str(tiny_models["sd15"])]) == 0
    assert Image.open(out).size[0] > 0


def test_empty_output_is_a_clear_error(tmp_path, capsys):
    assert main(["preview", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "no committed shards" in capsys.readouterr().err


def test_captions_render_every_common_script_and_name_what_they_cannot():
    fonts = FontChain(13)
    runs = fonts.runs(SCRIPTS)
    assert "".join(text for _, text in runs) == SCRIPTS  # nothing written as U+XXXX
    coverage = {id(font): covered for font, covered in fonts.fonts}
    for font, text in runs:  # each run in a font that has its glyphs, and they leave ink
        assert all(ord(char) in coverage[id(font)] for char in text)
        assert font.getbbox(text.strip() or "a")[2] > 0
    assert len({id(font) for font, _ in runs}) == 4  # Latin/Greek/Cyrillic/Devanagari, CJK, Arabic, Thai
    assert "".join(text for _, text in fonts.runs("ሀ")) == "U+1200"
    lines = fonts.wrap("word " * 40, 100, 2)
    assert len(lines) == 2 and lines[1].endswith("…") and all(fonts.width(line) <= 100 for line in lines)
