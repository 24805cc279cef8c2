"""Tiny random-initialised models in the exact diffusers folder layout, for tests and the demo.

`instaflow-batch tiny OUT_DIR` (or `python -m jobs.tiny OUT_DIR`) writes models that load through the same code as
the real ones:

- `OUT_DIR/sd15`: a Stable Diffusion 1.5 teacher (`StableDiffusionPipeline`-loadable, PNDM scheduler config as SD-1.5 ships);
- `OUT_DIR/instaflow`: an InstaFlow one-step student (`model_index.json` names `RectifiedFlowPipeline`, as the hub repo does);
- `OUT_DIR/2rf`: a 2-Rectified-Flow model;
- `OUT_DIR/taesd`: a tiny decoder (AutoencoderTiny, TAESD's architecture) for `--decoder tiny`;
- `OUT_DIR/lora-kohya.safetensors`, `OUT_DIR/lora-diffusers.safetensors` and `OUT_DIR/finetune`: one LoRA in two
  formats and a fine-tune of sd15/, for `--lora` and `--merge-finetune` (adapters.py);
- `OUT_DIR/safety_checker` and `OUT_DIR/clip`: scorers for `--scores` (scorers.py);
- `OUT_DIR/controlnet`: a ControlNet for the tiny UNet (all three UNets share its layout), for `--controlnet`;
- `OUT_DIR/instaflow-wide`: a one-step model of another size, as InstaFlow-1.7B is a larger U-Net than 0.9B's:
  other block widths, depth and attention heads, and a wider cross-attention with a matching text encoder;
- `OUT_DIR/sdxl-refiner`: an SDXL refiner for `--refiner` (refiner.py);
- then each stage's own tiny models (`Stage.tiny_models`, in the stage's module).

The three models share byte-identical VAE, text encoder and tokenizer folders, as the real InstaFlow repos share
SD-1.5's.
Everything is derived from fixed seeds, so two builds give the same weights.

The pipelines' building blocks are in pipelines.py; adapters.py, scorers.py and refiner.py build on them.
"""

import argparse
import shutil
from pathlib import Path

from diffusers import StableDiffusionPipeline

from jobs.tiny.adapters import write_tiny_adapters
from jobs.tiny.pipelines import (build_controlnet, build_scheduler, build_text_encoder, build_tiny_decoder,
                                 build_tokenizer, build_unet, build_vae, build_wide_text_encoder, build_wide_unet,
                                 write_rectified_flow_model, write_slow_tokenizer_files)
from jobs.tiny.refiner import write_tiny_refiner
from jobs.tiny.scorers import write_tiny_scorers
from pipeline.stages import STAGES


def build_tiny_models(out_dir: str | Path) -> dict[str, Path]:
    """Writes the tiny models, adapters and scorers under `out_dir` and returns their paths by name."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    teacher = StableDiffusionPipeline(
        vae=build_vae(),
        text_encoder=build_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        unet=build_unet(seed=3),
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    paths = {"sd15": out_dir / "sd15", "instaflow": out_dir / "instaflow", "2rf": out_dir / "2rf",
             "taesd": out_dir / "taesd", "controlnet": out_dir / "controlnet",
             "instaflow-wide": out_dir / "instaflow-wide"}
    if paths["sd15"].exists():
        shutil.rmtree(paths["sd15"])
    teacher.save_pretrained(paths["sd15"])
    write_slow_tokenizer_files(paths["sd15"] / "tokenizer")
    write_rectified_flow_model(paths["instaflow"], paths["sd15"], build_unet(seed=4))
    write_rectified_flow_model(paths["2rf"], paths["sd15"], build_unet(seed=5))
    build_tiny_decoder().save_pretrained(paths["taesd"])
    build_controlnet(build_unet(seed=4)).save_pretrained(paths["controlnet"])
    write_rectified_flow_model(paths["instaflow-wide"], paths["sd15"], build_wide_unet())
    shutil.rmtree(paths["instaflow-wide"] / "text_encoder")
    build_wide_text_encoder(len(tokenizer)).save_pretrained(paths["instaflow-wide"] / "text_encoder")
    paths |= write_tiny_adapters(out_dir, paths["sd15"])
    paths |= write_tiny_scorers(out_dir, paths["instaflow"])
    paths |= write_tiny_refiner(out_dir)
    for stage in STAGES:
        paths |= stage.tiny_models(out_dir, dict(paths))
    return paths


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write sd15/, instaflow/, 2rf/ and the rest into")
    args = parser.parse_args(argv)
    for name, path in build_tiny_models(args.out_dir).items():
        print(f"{name}: {path}")
    return 0

