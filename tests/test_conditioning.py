"""A conditioner plugs into the samplers through one interface (instaflow/conditioning.py): this file adds a second,
test-only conditioner and its stage, touching neither the images or pairs stages nor instaflow/models.py, and the
student and the teacher run under it as they run under a ControlNet."""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from instaflow.conditioning import unet_kwargs
from instaflow.loading import ComponentCache, Runtime
from instaflow.sampling import noise_for_seed
from pipeline import stages as stages_module
from pipeline.plan import list_input_files, plan_units
from pipeline.spec import JobSpec
from pipeline.stages import STAGES, ordered_stages
from pipeline.stages.base import CONDITIONING, Stage
from pipeline.worker import standalone_worker

SHIFT = 0.75


class MidShift:
    """A constant added to the UNet's mid-block output at every step (its `mid_block_additional_residual`; the
    UNet takes it only beside down-block residuals, here zeros of the shapes its down blocks give)."""

    def __init__(self, config: dict):
        channels, layers = config["block_out_channels"], config["layers_per_block"]
        self.down = [(channels[0], 1)]  # (channels, downsampling) of each residual: conv_in's output first
        for index, width in enumerate(channels):
            self.down += [(width, 2 ** index)] * layers
            if index < len(channels) - 1:
                self.down.append((width, 2 ** (index + 1)))
        self.mid = (channels[-1], 2 ** (len(channels) - 1))

    def unet_kwargs(self, model_input, timestep, embeds, guided):
        n, _, height, width = model_input.shape

        def full(channels_and_factor, value):
            channels, factor = channels_and_factor
            return torch.full((n, channels, height // factor, width // factor), value, dtype=model_input.dtype,
                              device=model_input.device)

        return {"down_block_additional_residuals": tuple(full(shape, 0.0) for shape in self.down),
                "mid_block_additional_residual": full(self.mid, SHIFT)}


def mid_shift_for(model: str) -> MidShift:
    return MidShift(json.loads((Path(model) / "unet" / "config.json").read_text()))


class MidShiftStage(Stage):
    """The test-only conditioner's stage: it puts a MidShift among each batch's conditioners."""

    name = "mid_shift"

    def __init__(self, shift: MidShift):
        self.shift = shift

    @classmethod
    def wanted(cls, spec) -> bool:
        return True

    @classmethod
    def produces(cls, spec):
        return (CONDITIONING,)

    @classmethod
    def load(cls, spec, sources, cache):
        return cls(mid_shift_for(spec.model))

    def prepare(self, batch) -> None:
        batch.conditioners.append(self.shift)

    def run(self, batch, n, produced, encode) -> dict:
        return {}


def run_job(tmp_path, name: str, tiny_models) -> tuple[pa.Table, pa.Table]:
    """The images and the pairs of one unit, from a worker (student InstaFlow, teacher SD, 2 steps)."""
    path = tmp_path / "in.parquet"
    if not path.exists():
        pq.write_table(pa.table({"prompt": ["a red fox in the snow", "an owl at night"]}), path)
    spec = JobSpec(prompts=str(path), output=str(tmp_path / name), tasks=("images", "pairs"),
                   model=str(tiny_models["instaflow"]), teacher=str(tiny_models["sd15"]), teacher_steps=2,
                   height=64, width=64, dtype="float32", device="cpu", rows_per_shard=2, output_format="parquet",
                   image_format="png")
    worker, lock = standalone_worker(spec)
    try:
        [unit] = plan_units(list_input_files(worker.input_fs, str(path)), 2)
        marker = worker.process(unit)
    finally:
        worker.close()
        lock.release()
    assert marker["successes"] == 2, marker
    return (pq.read_table(tmp_path / name / "images" / "00000.parquet"),
            pq.read_table(tmp_path / name / "pairs" / "00000.parquet"))


def pixels(table: pa.Table) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(image["bytes"])), dtype=int)
                     for image in table.column("image").to_pylist()])


def transcribed_shifted_step(model: str, prompts: list[str], seeds: list[int]) -> np.ndarray:
    """InstaFlow's one Euler step with the UNet's mid-block output shifted, written with the UNet and no sampler
    of ours: z1 = z0 + v(z0, 1000, mid + SHIFT), decoded."""
    components = ComponentCache(Runtime.default(device="cpu")).load(model)
    shift = mid_shift_for(model)
    with torch.no_grad():
        ids = components.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                                   return_tensors="pt").input_ids
        embeds = components.text_encoder(ids)[0]
        z = torch.cat([noise_for_seed(seed, 64, 64) for seed in seeds])
        t = torch.full((len(prompts),), 1000.0)
        v = components.unet(z, t, encoder_hidden_states=embeds, **shift.unet_kwargs(z, t, embeds, False)).sample
        z = z + v
        x = components.vae.decode(z / components.vae.config.scaling_factor).sample
    return ((x / 2 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1).numpy().astype(int)


def test_a_conditioner_added_by_its_own_stage_conditions_the_student_and_the_teacher(tmp_path, tiny_models,
                                                                                     monkeypatch):
    plain_images, plain_pairs = run_job(tmp_path, "plain", tiny_models)
    monkeypatch.setattr(stages_module, "STAGES", (*STAGES, MidShiftStage))
    spec = JobSpec(prompts="p", output="o", tasks=("images", "pairs"), model=str(tiny_models["instaflow"]),
                   teacher="t").resolve(has_gpus=False)
    assert [stage.name for stage in ordered_stages(spec)][0] == "mid_shift"  # before the samplers it conditions
    images, pairs = run_job(tmp_path, "shifted", tiny_models)

    want = transcribed_shifted_step(str(tiny_models["instaflow"]), images.column("prompt").to_pylist(),
                                    images.column("seed").to_pylist())
    assert np.abs(pixels(images) - want).max() <= 1
    assert np.abs(pixels(images) - pixels(plain_images)).mean() > 1  # the shift moved the student's images
    latents, plain_latents = (np.asarray(table.column("latent").to_pylist(), dtype=np.float32)
                              for table in (pairs, plain_pairs))
    assert np.abs(latents - plain_latents).mean() > 1e-3  # and the teacher's latents
    assert pairs.column("noise").to_pylist() == plain_pairs.column("noise").to_pylist()  # from the same noise


def test_two_conditioners_residuals_are_added():
    class Fixed:
        def __init__(self, value):
            self.value = value

        def unet_kwargs(self, model_input, timestep, embeds, guided):
            return {"mid_block_additional_residual": torch.full((1,), self.value),
                    "down_block_additional_residuals": (torch.full((1,), self.value),) * 2}

    merged = unet_kwargs([Fixed(1.0), Fixed(2.5)], torch.zeros(1), 0, None, False)
    assert merged["mid_block_additional_residual"].item() == 3.5
    assert [t.item() for t in merged["down_block_additional_residuals"]] == [3.5, 3.5]
    assert unet_kwargs([], torch.zeros(1), 0, None, False) == {}
    with pytest.raises(ValueError):  # residuals of different UNets do not line up
        unet_kwargs([Fixed(1.0), type("Short", (), {"unet_kwargs": lambda *a: {
            "down_block_additional_residuals": (torch.ones(1),)}})()], torch.zeros(1), 0, None, False)
