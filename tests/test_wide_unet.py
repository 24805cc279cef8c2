"""A UNet of another size than SD-1.5's (the tiny instaflow-wide: other widths, depth, heads and cross-attention,
with a matching text encoder), as InstaFlow-1.7B is a larger U-Net than 0.9B's: every job, training and the
straightness report run on it, and nothing assumes SD-1.5's layout."""

import json

import pyarrow.parquet as pq
import pytest

from jobhelpers import prompt_table
from jobs import generate, reflow_pairs, straightness, train_reflow
from jobs.main import main

SIZE = ["--height", "64", "--width", "64", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("wide") / "prompts.parquet"
    pq.write_table(prompt_table(16), path, row_group_size=8)
    return path


def test_the_wide_model_is_not_sd15_sized(tiny_models):
    wide = json.loads((tiny_models["instaflow-wide"] / "unet" / "config.json").read_text())
    base = json.loads((tiny_models["instaflow"] / "unet" / "config.json").read_text())
    for key in ("block_out_channels", "cross_attention_dim", "attention_head_dim", "layers_per_block"):
        assert wide[key] != base[key], key
    text = json.loads((tiny_models["instaflow-wide"] / "text_encoder" / "config.json").read_text())
    assert text["hidden_size"] == wide["cross_attention_dim"]


def test_every_job_training_and_straightness_on_a_wide_unet(ray_cpus, tiny_models, prompts, tmp_path):
    wide = str(tiny_models["instaflow-wide"])
    assert generate.main(["--prompts", str(prompts), "--output", str(tmp_path / "images"), "--model", wide,
                          "--rows-per-shard", "8", "--batch-size", "4", *SIZE]) == 0
    assert main(["verify", str(tmp_path / "images")]) == 0
    # pairs from the wide model as a rectified-flow teacher, with its images in the same pass
    assert reflow_pairs.main(["--prompts", str(prompts), "--output", str(tmp_path / "pairs"), "--teacher", wide,
                              "--teacher-kind", "rf", "--steps", "3", "--model", wide, "--rows-per-shard", "8",
                              "--batch-size", "4", *SIZE]) == 0
    pairs = tmp_path / "pairs" / "pairs"
    rows = pq.read_table(sorted(pairs.glob("*.parquet"))[0]).to_pylist()
    assert all(row["status"] == "ok" for row in rows)
    # reflow of the wide model on its own pairs, a few steps, then straightness of it and of its training run
    assert train_reflow.main(["--pairs", str(pairs), "--init", wide, "--output", str(tmp_path / "train"),
                              "--steps", "4", "--batch-size", "4", "--checkpoint-every", "2", "--log-every", "2",
                              "--warmup-steps", "1", "--device", "cpu"]) == 0
    report = tmp_path / "straightness.jsonl"
    assert straightness.main(["--pairs", str(pairs), "--model", wide, "--model", str(tmp_path / "train" / "final"),
                              "--max-pairs", "8", "--device", "cpu", "--report", str(report)]) == 0
    assert len(report.read_text().splitlines()) >= 2
    # the trained model generates again
    assert generate.main(["--prompts", str(prompts), "--output", str(tmp_path / "again"), "--model",
                          str(tmp_path / "train" / "final"), "--rows-per-shard", "8", "--batch-size", "4",
                          *SIZE]) == 0


def test_a_unet_of_another_class_is_named(tiny_models, tmp_path):
    import shutil

    from instaflow.loading import ComponentCache, ModelLoadError, Runtime

    stacked = tmp_path / "stacked"
    shutil.copytree(tiny_models["instaflow-wide"], stacked)
    config = json.loads((stacked / "unet" / "config.json").read_text())
    (stacked / "unet" / "config.json").write_text(json.dumps(config | {"_class_name": "UNetStacked2DModel"}))
    with pytest.raises(ModelLoadError, match="names the UNet class 'UNetStacked2DModel'"):
        ComponentCache(Runtime.default(device="cpu")).load(str(stacked))


@pytest.fixture(scope="module")
def quarter(tiny_models, tmp_path_factory):
    """The tiny 2-RF model with a VAE of three blocks: latents 1/4 of the image side, not SD-1.5's 1/8."""
    import shutil

    import torch
    from diffusers import AutoencoderKL

    model = tmp_path_factory.mktemp("quarter") / "quarter"
    shutil.copytree(tiny_models["2rf"], model)
    shutil.rmtree(model / "vae")
    torch.manual_seed(3)
    AutoencoderKL(block_out_channels=(8, 8, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1,
                  norm_num_groups=4, sample_size=64).save_pretrained(model / "vae")
    return model


@pytest.fixture(scope="module")
def quarter_pairs(ray_cpus, quarter, prompts, tmp_path_factory):
    """A pairs job's output, teacher and student the quarter model, images beside the pairs."""
    output = tmp_path_factory.mktemp("quarter-pairs")
    assert reflow_pairs.main(["--prompts", str(prompts), "--output", str(output), "--teacher", str(quarter),
                              "--teacher-kind", "rf", "--steps", "2", "--model", str(quarter), "--rows-per-shard",
                              "8", "--batch-size", "4", *SIZE]) == 0
    return output


def test_a_vae_of_another_scale_factor_sets_the_latent_side_of_every_job(quarter, quarter_pairs, tmp_path):
    """The seed noise, the teacher's latents and the encoded images are all at the quarter VAE's latent side, so
    pairs, encode and training agree; its images are decoded at the job's size."""
    import io

    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from instaflow.sampling import noise_for_seed
    from jobhelpers import png_bytes, tar_members
    from pipeline.writers import read_tensor_column

    model = quarter
    table = pa.concat_tables(pq.read_table(path) for path in sorted((quarter_pairs / "pairs").glob("*.parquet")))
    noise, latent = read_tensor_column(table, "noise"), read_tensor_column(table, "latent")
    assert noise.shape == latent.shape == (16, 4, 16, 16)
    for i, seed in enumerate(table["seed"].to_pylist()):
        assert np.array_equal(noise[i], noise_for_seed(seed, 64, 64, vae_scale_factor=4)[0].numpy())
    images = pq.read_table(sorted((quarter_pairs / "images").glob("*.parquet"))[0])
    assert set(images["status"].to_pylist()) == {"ok"}
    decoded = [Image.open(io.BytesIO(data)) for tar in sorted((quarter_pairs / "images").glob("*.tar"))
               for name, data in tar_members(tar.read_bytes()).items() if name.endswith(".jpg")]
    assert len(decoded) == 16 and {image.size for image in decoded} == {(64, 64)}

    pictures = tmp_path / "pictures"
    pictures.mkdir()
    rng = np.random.default_rng(5)
    pq.write_table(pa.table({"prompt": [f"a picture, number {i}" for i in range(4)], "seed": [1, 2, 3, 4],
                             "image": [png_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
                                       for _ in range(4)]}), pictures / "a.parquet")
    assert main(["run", "encode", "--prompts", str(pictures), "--output", str(tmp_path / "encoded"), "--model",
                 str(model), "--rows-per-shard", "4", "--batch-size", "4", *SIZE]) == 0
    encoded = pq.read_table(sorted((tmp_path / "encoded").glob("*.parquet"))[0])
    noise, latent = read_tensor_column(encoded, "noise"), read_tensor_column(encoded, "latent")
    assert noise.shape == latent.shape == (4, 4, 16, 16)
    assert np.array_equal(noise[0], noise_for_seed(1, 64, 64, vae_scale_factor=4)[0].numpy())

    assert train_reflow.main(["--pairs", str(tmp_path / "encoded"), "--init", str(model), "--output",
                              str(tmp_path / "train"), "--steps", "2", "--batch-size", "4", "--checkpoint-every",
                              "2", "--log-every", "1", "--warmup-steps", "1", "--device", "cpu"]) == 0


def error_line(capsys) -> str:
    """The one error line a command printed (Ray's workers of earlier jobs may log to stderr as well)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_pairs_of_another_latent_shape_are_refused_by_training_and_straightness(quarter_pairs, tiny_models,
                                                                                tmp_path, capsys):
    """Pairs at 1/4 of the image side, read with a model whose VAE makes latents at 1/8: refused before any
    model loads or any worker starts, naming both flags and both shapes."""
    other = str(tiny_models["2rf"])
    shapes = "its latents have shape [4, 16, 16] for 64x64 images, but the VAE of {flag} makes [4, 8, 8] of them"
    assert train_reflow.main(["--pairs", str(quarter_pairs), "--init", other, "--output", str(tmp_path / "train"),
                              "--steps", "2", "--batch-size", "4", "--device", "cpu"]) == 2
    line = error_line(capsys)
    assert f"--pairs {quarter_pairs}: " + shapes.format(flag=f"--init {other!r}") in line, line
    assert not (tmp_path / "train").exists()
    assert straightness.main(["--pairs", str(quarter_pairs), "--model", other, "--device", "cpu"]) == 2
    line = error_line(capsys)
    assert f"--pairs {quarter_pairs}: " + shapes.format(flag=f"--model {other!r}") in line, line


def rewritten(model, tmp_path, component: str, **changes) -> str:
    """A copy of `model` whose `component`/config.json (its config.json for "") has `changes`."""
    import shutil

    copy = tmp_path / f"{model.name}-{component or 'module'}-{'-'.join(changes)}"
    shutil.copytree(model, copy)
    config = copy / component / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | changes))
    return str(copy)


def test_models_whose_latents_do_not_agree_are_refused_on_the_driver(quarter, tiny_models, prompts, tmp_path,
                                                                     capsys, monkeypatch):
    """A VAE that does not fit its UNet, an image size that is no multiple of the VAE's scale factor, and a tiny
    decoder or a ControlNet of other latents than the model's VAE: each failed on every worker (or sampled other
    noise); each is refused before any worker starts, naming the flag, the model and the values."""
    import pipeline.job

    def no_worker(*args):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(pipeline.job, "ray_worker_factory", no_worker)
    rf = tiny_models["2rf"]
    wide_unet = rewritten(rf, tmp_path, "unet", in_channels=8, out_channels=8)
    blocks = 5
    sixteenth = rewritten(rf, tmp_path, "vae", block_out_channels=[8] * blocks,
                          down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks)
    taesd, controlnet, sd15 = str(tiny_models["taesd"]), str(tiny_models["controlnet"]), str(tiny_models["sd15"])
    no_blocks = rewritten(rf, tmp_path, "vae", block_out_channels=[])
    text_channels = rewritten(rf, tmp_path, "vae", latent_channels="4")
    text_factor = rewritten(tiny_models["taesd"], tmp_path, "", upsampling_scaling_factor="2")
    flat_controlnet = rewritten(tiny_models["controlnet"], tmp_path, "", conditioning_embedding_out_channels=7)
    quarter_ = str(quarter)
    eighth, fourth = "4 latent channels at 1/8 of the image side", "4 latent channels at 1/4 of the image side"
    cases = [
        ("generate", ["--model", wide_unet], f"--model {wide_unet!r}: its vae/config.json has latent_channels 4, but "
         "its unet/config.json has in_channels 8 and out_channels 8"),
        ("reflow-pairs", ["--teacher", wide_unet], f"--teacher {wide_unet!r}: its vae/config.json has "
         "latent_channels 4, but its unet/config.json has in_channels 8 and out_channels 8"),
        ("generate", ["--model", sixteenth, "--height", "72", "--width", "64"], "--height 72 and --width 64 must "
         f"be multiples of 16: the vae/config.json of --model {sixteenth!r} makes latents at 1/16 of the image side"),
        ("generate", ["--model", quarter_, "--decoder", "tiny", "--tiny-decoder", taesd],
         f"--tiny-decoder {taesd!r} has {eighth}, but the VAE of --model {quarter_!r} has {fourth}"),
        ("generate", ["--model", str(rf), "--merge-finetune", quarter_, "--merge-base", sd15, "--decoder", "tiny",
                      "--tiny-decoder", taesd],
         f"--tiny-decoder {taesd!r} has {eighth}, but the VAE of --merge-finetune {quarter_!r} has {fourth}"),
        ("generate", ["--model", quarter_, "--controlnet", controlnet, "--control-column", "style"],
         f"--controlnet {controlnet!r} has {eighth}, but the VAE of --model {quarter_!r} has {fourth}"),
        ("reflow-pairs", ["--teacher", quarter_, "--controlnet", controlnet, "--control-column", "style"],
         f"--controlnet {controlnet!r} has {eighth}, but the VAE of --teacher {quarter_!r} has {fourth}"),
        # the student's latents are decoded by a merged fine-tune's VAE: the ControlNet must fit that one
        ("generate", ["--model", str(rf), "--merge-finetune", quarter_, "--merge-base", sd15, "--controlnet",
                      controlnet, "--control-column", "style"],
         f"--controlnet {controlnet!r} has {eighth}, but the VAE of --merge-finetune {quarter_!r} has {fourth}"),
        # configs from strangers: values that are not counts are named, with the file
        ("generate", ["--model", no_blocks], f"--model {no_blocks!r}: its vae/config.json: block_out_channels must "
         "be a list of 1 to 16 channel counts, got []"),
        ("generate", ["--model", text_channels], f"--model {text_channels!r}: its vae/config.json: latent_channels "
         "must be an integer between 1 and 4096, got '4'"),
        ("generate", ["--model", str(rf), "--decoder", "tiny", "--tiny-decoder", text_factor],
         f"--tiny-decoder {text_factor!r}: its config.json: upsampling_scaling_factor must be an integer between 1 "
         "and 4096, got '2'"),
        ("generate", ["--model", str(rf), "--controlnet", flat_controlnet, "--control-column", "style"],
         f"--controlnet {flat_controlnet!r}: its config.json: conditioning_embedding_out_channels must be a list "
         "of 1 to 16 channel counts, got 7"),
    ]
    for index, (job, flags, message) in enumerate(cases):
        output = tmp_path / f"out-{index}"
        extra = ["--teacher-kind", "rf", "--steps", "2"] if job == "reflow-pairs" else []
        assert main(["run", job, "--prompts", str(prompts), "--output", str(output), *SIZE, *extra, *flags]) == 2
        assert error_line(capsys) == f"error: {message}", (job, flags)
        assert not output.exists()


def test_the_latent_geometry_is_read_from_the_keys_the_vaes_class_takes(tiny_models, tmp_path):
    """diffusers ignores a key another class takes (AutoencoderKL has no upsampling_scaling_factor, and
    AutoencoderTiny decodes with decoder_block_out_channels): so does the geometry, on the driver and the workers;
    and a fine-tune's base gives its UNet only, so its VAE is not held to the job's size."""
    from types import SimpleNamespace

    from instaflow.loading import LatentGeometry
    from pipeline.model_source import resolve_model_source
    from pipeline.stages.base import check_model_kind, pipeline_kind

    kl = {"block_out_channels": [8, 8, 16, 16], "latent_channels": 4, "upsampling_scaling_factor": 1}
    assert LatentGeometry.of_vae(kl, "AutoencoderKL") == LatentGeometry(4, 8)
    tiny = {"block_out_channels": [8] * 4, "decoder_block_out_channels": [8] * 3, "upsampling_scaling_factor": 2,
            "latent_channels": 4}
    assert LatentGeometry.of_vae(tiny, "AutoencoderTiny") == LatentGeometry(4, 4)
    with pytest.raises(ValueError, match="more than 1/64"):
        LatentGeometry.of_vae(kl | {"block_out_channels": [8] * 8}, "AutoencoderKL")
    blocks = 5
    sixteenth = rewritten(tiny_models["2rf"], tmp_path, "vae", block_out_channels=[8] * blocks,
                          down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks)
    source, spec = resolve_model_source(sixteenth, "float32", {}), SimpleNamespace(height=72, width=72,
                                                                                  storage_options={})
    check_model_kind(source, pipeline_kind("--merge-base", decodes=False), spec)
    with pytest.raises(Exception, match="must be multiples of 16"):
        check_model_kind(source, pipeline_kind("--model"), spec)
