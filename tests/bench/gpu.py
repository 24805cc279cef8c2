"""GPU benchmark: SD-1.5-sized random models at 512x512, without Ray, in parts that can be chosen one by one.

    python tests/bench/gpu.py [--parts peak,flops,...] [--out DIR]      # all parts by default, in the order below
    python tests/bench/gpu.py --tiny      # the same code on tiny models and the CPU, in seconds (the test runs this)

Models are built from SD-1.5's configs with random weights (no download): UNet 860M, VAE, CLIP ViT-L text
encoder. Every figure is printed as a line and appended to OUT/gpu.jsonl as it is measured, so a run that is cut
short keeps what it measured. Throughput is also given as a fraction of the card's limit: the FLOPs counted with
torch.utils.flop_counter per sample, over the dense matrix rate measured on this card.

Parts:
- peak: bf16 and fp16 matrix products of 8192^3, the card's measured ceiling;
- flops: counted FLOPs per sample of the UNet, the VAE decoder and the text encoder;
- student: InstaFlow one-step images/s through `instaflow.models.Student` (prompts to uint8 pixels on the host);
- teacher: SD teacher pairs/s (25 DPM-Solver steps, guidance 5) through `instaflow.models.Teacher`;
- calibrate: one student and one teacher figure at the default settings, to compare runs on one card;
- baseline: the same two through plain diffusers code (`StableDiffusionPipeline`, and the official
  RectifiedFlowPipeline's loop written with its helpers);
- plainloop: what a user writes without this engine: read Parquet, generate, save JPEG files, one process;
- worker: `pipeline.worker.ShardWorker` on one GPU without Ray: Parquet on local disk to committed shards,
  eager and compiled (compiled only on CUDA);
- options: speed settings one at a time against the default (contiguous, eager): channels_last, fused QKV,
  cudnn.benchmark, CUDA graphs, the tiny decoder;
- stages: the worker with a fused LoRA (rank 4 on every attention projection of the UNet and text encoder) and
  with `--scores nsfw,clip` (random CLIP ViT-L/14-sized safety checker and CLIP model) against the plain worker,
  and each scorer's device time per image (preprocessing on the device included);
- train: reflow training samples/s and peak memory on one GPU through `instaflow.training.Trainer` (fp32 weights,
  AdamW, EMA, bf16 autocast on CUDA), batch 32 at 512x512 (64x64 latents), fewer samples per forward pass where 32
  do not fit, and with gradient checkpointing;
- compile: torch.compile of the UNet and the VAE decoder (slow to warm up, so last).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from instaflow.loading import Components, Runtime  # noqa: E402
from instaflow.models import PromptBatch, Settings, Student, Teacher  # noqa: E402

PARTS = (
    "peak", "flops", "calibrate", "student", "teacher", "baseline", "plainloop", "worker", "options", "stages", "train",
    "compile",
)
CLIP_VIT_L_14 = dict(  # openai/clip-vit-large-patch14, the CLIP of the SD safety checker and of --scores clip
    text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     max_position_embeddings=77),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14),
    projection_dim=768,
)

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)
CLIP_VIT_L_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
WORDS = "red fox owl castle river city night forest photo painting golden misty ancient robot garden".split()


class Report:
    """Prints each figure and appends it to a JSON-lines file at once."""

    def __init__(self, out: Path, device: str, dtype: str):
        self.path = out / "gpu.jsonl"
        self.rows: list[dict] = []
        self.context = {"device": device, "dtype": dtype}

    def add(self, part: str, name: str, **values) -> None:
        row = {"part": part, "name": name, **values}
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        print(f"[{part}] {name}: {shown}", flush=True)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def prompts_for(n: int, offset: int = 0) -> list[str]:
    """Distinct prompts of realistic length, so tokenising and encoding do real work."""
    return [
        f"a {WORDS[(i + offset) % 15]} {WORDS[(3 * i + offset) % 15]} in the {WORDS[(7 * i + offset) % 15]}, "
        f"highly detailed {WORDS[(11 * i + offset) % 15]} number {i + offset}"
        for i in range(n)
    ]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, min_seconds: float, warmup: int = 2, min_repeats: int = 3) -> float:
    """Median seconds per call after warm-up; repeats until min_seconds have passed."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    started = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - started < min_seconds:
        clock = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - clock)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------------- models


def build_models(tiny: bool, device: torch.device, dtype: torch.dtype) -> dict:
    """SD-1.5-sized (or tiny) random models on the device, built from configs; the same seeds give the same weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from jobs.tiny import pipelines as tiny_models

    tokenizer = tiny_models.build_tokenizer()
    if tiny:
        with torch.device(device):
            models = {
                "unet": tiny_models.build_unet(seed=4),
                "teacher_unet": tiny_models.build_unet(seed=3),
                "vae": tiny_models.build_vae(),
                "text_encoder": tiny_models.build_text_encoder(len(tokenizer)),
            }
    else:
        with torch.device(device):
            torch.manual_seed(0)
            models = {
                "unet": UNet2DConditionModel(**SD15_UNET),
                "vae": AutoencoderKL(**SD15_VAE),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_VIT_L_TEXT)),
            }
        models["teacher_unet"] = models["unet"]  # same architecture; one copy saves memory and start-up
    for name in ("unet", "teacher_unet", "vae", "text_encoder"):
        models[name] = models[name].to(dtype).eval().requires_grad_(False)
    models["tokenizer"] = tokenizer
    models["scheduler_config"] = dict(tiny_models.build_scheduler().config)
    return models


def components(models: dict, runtime: Runtime, unet_key: str = "unet", vae=None) -> Components:
    return Components(
        name=unet_key,
        unet=models[unet_key],
        vae=vae if vae is not None else models["vae"],
        text_encoder=models["text_encoder"],
        tokenizer=models["tokenizer"],
        scheduler_config=models["scheduler_config"],
        runtime=runtime,
    )


def set_channels_last(models: dict, enabled: bool) -> None:
    fmt = torch.channels_last if enabled else torch.contiguous_format
    for name in ("unet", "teacher_unet", "vae"):
        models[name].to(memory_format=fmt)


# ----------------------------------------------------------------------------------------------------------- parts


def part_peak(ctx) -> None:
    if ctx.device.type != "cuda":
        ctx.report.add("peak", "skipped", reason="no CUDA device")
        return
    n = 8192
    for dtype in (torch.bfloat16, torch.float16):
        a = torch.randn(n, n, device=ctx.device, dtype=dtype)
        b = torch.randn(n, n, device=ctx.device, dtype=dtype)
        seconds = timed(lambda: a @ b, ctx.device, min_seconds=1.0, warmup=3, min_repeats=10)
        tflops = 2 * n**3 / seconds / 1e12
        ctx.peak_tflops[str(dtype)] = tflops
        ctx.report.add("peak", f"matmul {n}^3 {dtype}", tflops=tflops)
        del a, b


def part_flops(ctx) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    m, size = ctx.models, ctx.size
    latent = torch.randn(1, 4, size // 8, size // 8, device=ctx.device, dtype=ctx.dtype)
    ids = m["tokenizer"](["a photo of a fox"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    embeds = m["text_encoder"](ids.to(ctx.device))[0]
    t = torch.full((1,), 999.0, device=ctx.device)
    counts = {}
    with torch.inference_mode():
        for name, fn in (
            ("unet", lambda: m["unet"](latent, t, encoder_hidden_states=embeds)),
            ("vae_decode", lambda: m["vae"].decode(latent)),
            ("text_encoder", lambda: m["text_encoder"](ids.to(ctx.device))),
        ):
            with FlopCounterMode(display=False) as counter:
                fn()
            counts[name] = counter.get_total_flops()
    ctx.flops = {
        "image": counts["unet"] + counts["vae_decode"] + counts["text_encoder"],
        # teacher: 25 guided steps run the UNet on 2 samples each; prompt and negative prompt are encoded
        "pair": 2 * ctx.teacher_steps * counts["unet"] + 2 * counts["text_encoder"],
    }
    for name, flops in counts.items():
        ctx.report.add("flops", name, tflop_per_sample=flops / 1e12)
    for name, flops in ctx.flops.items():
        ctx.report.add("flops", f"per {name}", tflop=flops / 1e12)


def _fraction(ctx, kind: str, per_second: float) -> float | None:
    """Counted FLOPs per second over the card's measured dense bf16 rate (the issue's limit uses the same)."""
    peak = ctx.peak_tflops.get(str(torch.bfloat16))
    if not peak or kind not in ctx.flops:
        return None
    return per_second * ctx.flops[kind] / 1e12 / peak


def student_images_per_s(ctx, student: Student, batch_size: int, min_seconds: float = 1.5) -> float:
    """Our model layer: fresh prompts each call (tokenise, encode, noise), one step, decode, pixels to the host."""
    calls = iter(range(10**9))

    def run():
        i = next(calls)
        batch = PromptBatch(prompts_for(batch_size, i * batch_size), list(range(batch_size)), [None] * batch_size)
        student.generate(batch).pixels.cpu()

    return batch_size / timed(run, ctx.device, min_seconds)


def teacher_pairs_per_s(ctx, teacher: Teacher, batch_size: int, min_seconds: float = 2.0) -> float:
    calls = iter(range(10**9))

    def run():
        i = next(calls)
        batch = PromptBatch(prompts_for(batch_size, i * batch_size), list(range(batch_size)), [None] * batch_size)
        out = teacher.pairs(batch)
        out.latents.float().cpu(), out.noise.float().cpu()

    return batch_size / timed(run, ctx.device, min_seconds, warmup=1)


def part_student(ctx) -> None:
    for dtype in ctx.dtypes:
        models = ctx.models_in(dtype)
        runtime = Runtime(ctx.device, dtype)
        student = Student(components(models, runtime), Settings(1, 0.0, ctx.size, ctx.size))
        for batch_size in ctx.image_batches if dtype == ctx.dtype else ctx.image_batches[-2:]:
            rate = student_images_per_s(ctx, student, batch_size)
            ctx.report.add("student", f"instaflow {dtype} batch {batch_size}", images_per_s=rate,
                           fraction_of_limit=_fraction(ctx, "image", rate))


def part_teacher(ctx) -> None:
    for dtype in ctx.dtypes:
        models = ctx.models_in(dtype)
        runtime = Runtime(ctx.device, dtype)
        settings = Settings(ctx.teacher_steps, 5.0, ctx.size, ctx.size)
        teacher = Teacher(components(models, runtime, "teacher_unet"), "sd", settings)
        for batch_size in ctx.pair_batches if dtype == ctx.dtype else ctx.pair_batches[1:2]:
            rate = teacher_pairs_per_s(ctx, teacher, batch_size)
            ctx.report.add("teacher", f"sd teacher {dtype} batch {batch_size}", pairs_per_s=rate,
                           fraction_of_limit=_fraction(ctx, "pair", rate))


def plain_pipeline(ctx, unet_key: str = "unet"):
    """A StableDiffusionPipeline over the same modules, as a diffusers user builds it (no channels_last)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    m = ctx.models
    pipe = StableDiffusionPipeline(
        vae=m["vae"],
        text_encoder=m["text_encoder"],
        tokenizer=m["tokenizer"],
        unet=m[unet_key],
        scheduler=DPMSolverMultistepScheduler.from_config(m["scheduler_config"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(ctx.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.inference_mode()
def plain_instaflow(pipe, prompts: list[str], size: int, steps: int = 1):
    """The official RectifiedFlowPipeline.__call__ at guidance 0, with diffusers' own helpers: PIL images out."""
    device = pipe._execution_device
    prompt_embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    latents = pipe.prepare_latents(len(prompts), 4, size, size, prompt_embeds.dtype, device, None)
    dt = 1.0 / steps
    for i in range(steps):
        t = torch.full((len(prompts),), (1.0 - i / steps) * 1000.0, device=device)
        v_pred = pipe.unet(latents, t, encoder_hidden_states=prompt_embeds).sample
        latents = latents + dt * v_pred
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")


def part_baseline(ctx) -> None:
    pipe = plain_pipeline(ctx)
    for batch_size in ctx.image_batches:
        calls = iter(range(10**9))
        seconds = timed(lambda: plain_instaflow(pipe, prompts_for(batch_size, next(calls)), ctx.size), ctx.device, 1.5)
        rate = batch_size / seconds
        ctx.report.add("baseline", f"plain instaflow loop (PIL out) batch {batch_size}", images_per_s=rate,
                       fraction_of_limit=_fraction(ctx, "image", rate))
    teacher_pipe = plain_pipeline(ctx, "teacher_unet")
    for batch_size in ctx.pair_batches[:2]:
        calls = iter(range(10**9))

        def run():
            out = teacher_pipe(prompts_for(batch_size, next(calls)), num_inference_steps=ctx.teacher_steps,
                               guidance_scale=5.0, height=ctx.size, width=ctx.size, output_type="latent")
            out.images.float().cpu()

        rate = batch_size / timed(run, ctx.device, 2.0, warmup=1)
        ctx.report.add("baseline", f"StableDiffusionPipeline teacher batch {batch_size}", pairs_per_s=rate,
                       fraction_of_limit=_fraction(ctx, "pair", rate))


def part_calibrate(ctx) -> None:
    runtime = Runtime(ctx.device, ctx.dtype)
    student = Student(components(ctx.models, runtime), Settings(1, 0.0, ctx.size, ctx.size))
    rate = student_images_per_s(ctx, student, ctx.worker_batch)
    ctx.report.add("calibrate", f"instaflow {ctx.dtype} batch {ctx.worker_batch}", images_per_s=rate,
                   fraction_of_limit=_fraction(ctx, "image", rate))
    settings = Settings(ctx.teacher_steps, 5.0, ctx.size, ctx.size)
    teacher = Teacher(components(ctx.models, runtime, "teacher_unet"), "sd", settings)
    rate = teacher_pairs_per_s(ctx, teacher, ctx.pair_batches[1])
    ctx.report.add("calibrate", f"sd teacher {ctx.dtype} batch {ctx.pair_batches[1]}", pairs_per_s=rate,
                   fraction_of_limit=_fraction(ctx, "pair", rate))


def part_plainloop(ctx) -> None:
    pipe = plain_pipeline(ctx)
    rate = plain_loop_end_to_end(ctx, pipe, ctx.workdir / "plain_loop")
    ctx.report.add("plainloop", f"plain loop: Parquet -> pipeline -> JPEG files, batch {ctx.worker_batch}",
                   images_per_s=rate, prompts=ctx.worker_prompts)


def plain_loop_end_to_end(ctx, pipe, out: Path) -> float:
    """What a user writes without this engine: read the prompts, generate a batch, save each image as a JPEG."""
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    prompts = pq.read_table(ctx.prompts_file).column("prompt").to_pylist()
    size = ctx.worker_batch
    plain_instaflow(pipe, prompts[:size], ctx.size)  # warm-up
    synchronize(ctx.device)
    started = time.perf_counter()
    for start in range(0, len(prompts), size):
        for i, image in enumerate(plain_instaflow(pipe, prompts[start : start + size], ctx.size)):
            image.save(out / f"{start + i:09d}.jpg", quality=95)
    return len(prompts) / (time.perf_counter() - started)


def save_model_folder(ctx, folder: Path) -> Path:
    """The random models in diffusers' folder layout, so the worker loads them through its real loading code."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from jobs.tiny.pipelines import write_slow_tokenizer_files

    m = ctx.models
    pipe = StableDiffusionPipeline(
        vae=m["vae"], text_encoder=m["text_encoder"], tokenizer=m["tokenizer"], unet=m["unet"],
        scheduler=PNDMScheduler.from_config(m["scheduler_config"]), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    write_slow_tokenizer_files(folder / "tokenizer")
    return folder


def run_worker(ctx, tasks: tuple[str, ...], image_format: str, prompts_file: Path, batch_size: int,
               rows_per_shard: int, out: Path, compile: bool, threads: int = 2, **options) -> dict:
    """ShardWorker as the Ray actor runs it (two units at a time), minus Ray: one warm-up unit, then the rest."""
    from pipeline.plan import list_input_files, plan_units
    from pipeline.spec import JobSpec
    from pipeline.storage import filesystem
    from pipeline.worker import standalone_worker

    model = str(ctx.model_folder)
    spec = JobSpec(
        prompts=str(prompts_file), output=str(out), tasks=tasks, model=model if "images" in tasks else None,
        teacher=model if "pairs" in tasks else None, teacher_steps=ctx.teacher_steps, height=ctx.size,
        width=ctx.size, batch_size=batch_size, rows_per_shard=rows_per_shard, image_format=image_format,
        dtype=str(ctx.dtype).removeprefix("torch."), compile=compile, **options,
    )
    fs, path = filesystem(spec.prompts, spec.storage_options)
    units = plan_units(list_input_files(fs, path), spec.rows_per_shard)
    clock = time.perf_counter()
    worker, output_lock = standalone_worker(spec)
    load_s = time.perf_counter() - clock
    clock = time.perf_counter()
    worker.process(units[0])  # warm-up: kernels chosen (or compiled), allocator grown
    synchronize(ctx.device)
    warmup_s = time.perf_counter() - clock
    pending = list(units[1:])
    queue_lock = threading.Lock()
    stats = []

    def drain():
        while True:
            with queue_lock:
                if not pending:
                    return
                unit = pending.pop(0)
            stats.append(worker.process(unit))

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(drain) for _ in range(threads)]:
            future.result()
    wall = time.perf_counter() - started
    samples = sum(s["count"] for s in stats)
    worker.close()
    output_lock.release()
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and not f.name.startswith("_"))
    timing = {key: sum(s["timings"][key] for s in stats) for key in stats[0]["timings"]}
    return {"samples_per_s": samples / wall, "samples": samples, "wall_s": wall, "load_s": load_s,
            "warmup_unit_s": warmup_s, "encoder_processes": worker.encoders.count,
            "bytes_per_sample": written / (samples + units[0].num_rows),
            **{f"sum_{k}": v for k, v in timing.items()}}


def part_worker(ctx) -> None:
    batch, rows = ctx.worker_batch, ctx.worker_rows_per_shard
    for name, tasks, fmt, prompts, batch_size, rows_per_shard, compile in (
        ("images jpeg", ("images",), "jpeg", ctx.prompts_file, batch, rows, False),
        ("images png", ("images",), "png", ctx.small_prompts_file, batch, rows // 2, False),
        ("pairs", ("pairs",), "jpeg", ctx.small_prompts_file, ctx.pair_batches[1], rows // 4, False),
        ("images jpeg", ("images",), "jpeg", ctx.prompts_file, batch, rows, True),
        ("pairs", ("pairs",), "jpeg", ctx.small_prompts_file, ctx.pair_batches[1], rows // 4, True),
    ):
        name = f"ShardWorker {name} batch {batch_size} {'compiled' if compile else 'eager'}"
        if compile and ctx.device.type != "cuda":
            ctx.report.add("worker", name, skipped="compiled runs only on CUDA (minutes of warm-up on the CPU)")
            continue
        out = ctx.workdir / "worker_out"
        result = run_worker(ctx, tasks, fmt, prompts, batch_size, rows_per_shard, out, compile)
        kind = "pair" if tasks == ("pairs",) else "image"
        ctx.report.add("worker", name, **result, fraction_of_limit=_fraction(ctx, kind, result["samples_per_s"]))
        shutil.rmtree(out, ignore_errors=True)


def part_stages(ctx) -> None:
    """The worker with a fused LoRA (which should cost nothing) and with both scores, against the plain worker in
    the same part; then each scorer alone on the device."""
    from instaflow.scores import ClipScorer, ImagePreprocess, SafetyScorer
    from jobs.tiny.adapters import write_lora_files

    m, folder = ctx.models, ctx.workdir / "stages"
    folder.mkdir(exist_ok=True)
    lora = write_lora_files(folder, m["unet"], m["text_encoder"])["lora-kohya"]
    scorers = save_scorer_folders(ctx, folder)
    batch, rows = ctx.worker_batch, ctx.worker_rows_per_shard
    for name, options in (("plain", {}), ("LoRA fused", {"loras": [f"{lora}:0.8"]}),
                          ("scores nsfw,clip", {"scores": "nsfw,clip", **scorers})):
        out = ctx.workdir / "worker_out"
        result = run_worker(ctx, ("images",), "jpeg", ctx.prompts_file, batch, rows, out, False, **options)
        ctx.report.add("stages", f"ShardWorker images jpeg batch {batch} eager, {name}", **result)
        shutil.rmtree(out, ignore_errors=True)

    from instaflow.loading import ComponentCache

    cache = ComponentCache(Runtime(ctx.device, ctx.dtype))
    checker, checker_processor = cache.load_scorer("safety_checker", scorers["safety_checker"])
    clip, clip_processor, tokenizer = cache.load_scorer("clip", scorers["clip_model"])
    safety = SafetyScorer(checker, ImagePreprocess.from_processor(checker_processor))
    clip_scorer = ClipScorer(clip, tokenizer, ImagePreprocess.from_processor(clip_processor))
    pixels = torch.randint(0, 256, (batch, ctx.size, ctx.size, 3), dtype=torch.uint8, device=ctx.device)
    tokens = clip_scorer.tokens(prompts_for(batch))
    for name, run in (("safety checker", lambda: safety.cosines(pixels)),
                      ("CLIP score", lambda: clip_scorer.scores(clip_scorer.image_embeds(pixels), tokens))):
        seconds = timed(run, ctx.device, min_seconds=1.0)
        ctx.report.add("stages", f"{name} alone batch {batch}", images_per_s=batch / seconds,
                       device_ms_per_image=1000 * seconds / batch)


def save_scorer_folders(ctx, folder: Path) -> dict[str, str]:
    """A safety checker and a CLIP model with random weights in the hub repos' layouts (CLIP ViT-L/14-sized; tiny
    with --tiny), as the spec's safety_checker and clip_model."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from jobs.tiny.scorers import clip_config

    tokenizer = ctx.models["tokenizer"]
    config = clip_config(len(tokenizer)) if ctx.tiny else CLIPConfig(**CLIP_VIT_L_14)
    config.text_config.vocab_size = len(tokenizer)
    processor = CLIPImageProcessor(**({"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
                                      if ctx.tiny else {}))
    paths = {"safety_checker": folder / "safety_checker", "clip_model": folder / "clip"}
    torch.manual_seed(7)
    for key, model in (("safety_checker", StableDiffusionSafetyChecker(config)), ("clip_model", CLIPModel(config))):
        model.save_pretrained(paths[key])
        processor.save_pretrained(paths[key])
    tokenizer.save_pretrained(paths["clip_model"])
    return {key: str(path) for key, path in paths.items()}


def part_options(ctx) -> None:
    """Each speed setting alone against the default (contiguous memory, SDPA attention, eager)."""
    batch_size = ctx.worker_batch
    runtime = Runtime(ctx.device, ctx.dtype)
    settings = Settings(1, 0.0, ctx.size, ctx.size)
    m = ctx.models

    def measure(name: str, student: Student, batch: int = batch_size) -> None:
        rate = student_images_per_s(ctx, student, batch)
        ctx.report.add("options", f"{name} batch {batch}", images_per_s=rate,
                       fraction_of_limit=_fraction(ctx, "image", rate))

    default = Student(components(m, runtime), settings)
    measure("default", default)
    set_channels_last(m, True)
    measure("channels_last", default)
    set_channels_last(m, False)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        measure("cudnn.benchmark", default)
        torch.backends.cudnn.benchmark = False
    measure_fused_qkv(ctx, measure, default)
    measure_cuda_graph(ctx, default, 1)
    measure_cuda_graph(ctx, default, batch_size)
    measure_tiny_decoder(ctx, runtime, settings, measure)


def measure_fused_qkv(ctx, measure, student: Student) -> None:
    m = ctx.models
    m["unet"].fuse_qkv_projections()
    m["vae"].fuse_qkv_projections()
    try:
        measure("fused QKV (unet + vae)", student)
    finally:
        m["unet"].unfuse_qkv_projections()
        m["vae"].unfuse_qkv_projections()


def measure_cuda_graph(ctx, student: Student, batch_size: int) -> None:
    """One-step sampling and decoding captured once and replayed; text encoding and noise stay outside."""
    if ctx.device.type != "cuda":
        ctx.report.add("options", "cuda graph", skipped="no CUDA device")
        return
    from instaflow.sampling import decode_to_pixels, rectified_flow_euler

    c = student.components
    first = PromptBatch(prompts_for(batch_size), list(range(batch_size)), [None] * batch_size)
    static_noise = first.noise(c, ctx.size, ctx.size).clone()
    static_embeds = first.encode(c).clone()

    def body():
        latents = rectified_flow_euler(c.unet, static_noise, static_embeds, None, 1, 0.0)
        return decode_to_pixels(c.vae, latents)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_pixels = body()
    calls = iter(range(10**9))

    def run():
        i = next(calls)
        batch = PromptBatch(prompts_for(batch_size, i * batch_size), list(range(batch_size)), [None] * batch_size)
        static_embeds.copy_(batch.encode(c))
        static_noise.copy_(batch.noise(c, ctx.size, ctx.size))
        graph.replay()
        static_pixels.cpu()

    rate = batch_size / timed(run, ctx.device, 1.5)
    ctx.report.add("options", f"cuda graph batch {batch_size}", images_per_s=rate,
                   fraction_of_limit=_fraction(ctx, "image", rate))
    del graph


def measure_tiny_decoder(ctx, runtime: Runtime, settings: Settings, measure) -> None:
    from diffusers import AutoencoderTiny

    with torch.device(ctx.device):
        torch.manual_seed(0)
        taesd = AutoencoderTiny().to(ctx.dtype).eval().requires_grad_(False)  # TAESD's architecture for SD-1.5
    measure("tiny decoder (AutoencoderTiny)", Student(components(ctx.models, runtime, vae=taesd), settings))


def part_train(ctx) -> None:
    """The training job's step without its data and storage: precomputed text embeddings (as with the embedding
    cache), the reflow loss, a fresh fp32 UNet per variant. Samples/s counts the global batch per step."""
    from diffusers import UNet2DConditionModel

    from jobs.tiny import pipelines as tiny_models
    from instaflow.training import Trainer

    batch, side = ctx.train_batch, ctx.size // 8
    generator = torch.Generator().manual_seed(0)
    hidden = ctx.models["text_encoder"].config.hidden_size
    noise, latent = (torch.randn(batch, 4, side, side, generator=generator).to(ctx.device) for _ in range(2))
    embeds = torch.randn(batch, 77, hidden, generator=generator).to(ctx.device)
    t = torch.rand(batch, generator=generator).to(ctx.device)
    variants = [(f"micro-batch {m}", m, False) for m in (batch, batch // 2, batch // 4)] + [
        (f"gradient checkpointing, micro-batch {batch}", batch, True)
    ]
    whole_batch_fits = False
    for name, micro, checkpointing in variants:
        if whole_batch_fits and micro < batch:
            continue  # halving the forward passes tells nothing new once the whole batch fits
        with torch.device(ctx.device):
            torch.manual_seed(0)
            unet = tiny_models.build_unet(seed=4) if ctx.tiny else UNet2DConditionModel(**SD15_UNET)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        trainer = Trainer(unet, "reflow", 1e-5, 0, 1e-2, ema_decay=0.9999)
        steps = iter(range(10**9))
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(ctx.device)
        try:
            seconds = timed(lambda: trainer.step(next(steps), noise, latent, embeds, t, micro, batch), ctx.device,
                            min_seconds=1.0 if ctx.tiny else 5.0)
        except torch.OutOfMemoryError as exc:
            ctx.report.add("train", f"reflow batch {batch} {name}", out_of_memory=str(exc)[:200])
            continue
        finally:
            del trainer, unet
        peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else None
        ctx.report.add("train", f"reflow batch {batch} {name}", samples_per_s=batch / seconds, peak_gib=peak,
                       autocast="bf16" if ctx.device.type == "cuda" else "none (fp32)")
        whole_batch_fits = whole_batch_fits or (micro == batch and not checkpointing)


def part_compile(ctx) -> None:
    batch_size = ctx.worker_batch
    m = ctx.models
    runtime = Runtime(ctx.device, ctx.dtype)
    unet, decode = m["unet"], m["vae"].decode
    m["unet"] = torch.compile(unet)
    m["vae"].decode = torch.compile(decode)
    try:
        student = Student(components(m, runtime), Settings(1, 0.0, ctx.size, ctx.size))
        batch = PromptBatch(prompts_for(batch_size), list(range(batch_size)), [None] * batch_size)
        clock = time.perf_counter()
        student.generate(batch).pixels.cpu()
        ctx.report.add("compile", f"torch.compile warm-up batch {batch_size}", seconds=time.perf_counter() - clock)
        rate = student_images_per_s(ctx, student, batch_size)
        ctx.report.add("compile", f"torch.compile unet + vae.decode batch {batch_size}", images_per_s=rate,
                       fraction_of_limit=_fraction(ctx, "image", rate))
    finally:
        m["unet"], m["vae"].decode = unet, decode


# ------------------------------------------------------------------------------------------------------------ main


class Context:
    def __init__(self, args, workdir: Path, report: Report):
        self.tiny = args.tiny
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
        self.dtypes = [self.dtype] + ([torch.bfloat16] if self.dtype == torch.float16 else [])
        self.size = 64 if args.tiny else 512
        self.teacher_steps = 25
        self.image_batches = [1, 2, 4] if args.tiny else [1, 8, 32, 64]
        self.pair_batches = [2, 4] if args.tiny else [8, 16, 32]
        self.worker_batch = 4 if args.tiny else 32
        self.train_batch = 4 if args.tiny else 32
        self.worker_rows_per_shard = 16 if args.tiny else 128
        self.worker_prompts = 64 if args.tiny else args.worker_prompts
        self.workdir = workdir
        self.report = report
        self.peak_tflops: dict[str, float] = {}
        self.flops: dict[str, float] = {}
        clock = time.perf_counter()
        self.models = build_models(args.tiny, self.device, self.dtype)
        report.add("setup", "models built", seconds=time.perf_counter() - clock,
                   unet_params_m=sum(p.numel() for p in self.models["unet"].parameters()) / 1e6)
        self._other_dtype_models: dict = {}
        self.prompts_file = self._write_prompts("prompts.parquet", self.worker_prompts)
        self.small_prompts_file = self._write_prompts("prompts_small.parquet", max(self.worker_prompts // 4, 32))
        self._model_folder = None

    def models_in(self, dtype: torch.dtype) -> dict:
        """The same weights in another dtype, made on first use."""
        if dtype == self.dtype:
            return self.models
        if dtype not in self._other_dtype_models:
            copy = dict(self.models)
            for name in ("unet", "vae", "text_encoder"):
                copy[name] = _converted(self.models[name], dtype)
            shared = self.models["teacher_unet"] is self.models["unet"]
            copy["teacher_unet"] = copy["unet"] if shared else _converted(self.models["teacher_unet"], dtype)
            self._other_dtype_models = {dtype: copy}
        return self._other_dtype_models[dtype]

    @property
    def model_folder(self) -> Path:
        if self._model_folder is None:
            clock = time.perf_counter()
            self._model_folder = save_model_folder(self, self.workdir / "models" / "sd15-sized")
            self.report.add("setup", "model folder written", seconds=time.perf_counter() - clock)
        return self._model_folder

    def _write_prompts(self, name: str, n: int) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.workdir / name
        rows_per_group = self.worker_rows_per_shard // 4  # every unit the worker part plans ends on a group edge
        pq.write_table(pa.table({"prompt": prompts_for(n, offset=10**6)}), path, row_group_size=rows_per_group)
        return path


def _converted(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module).to(dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu.jsonl (default $OUT)")
    parser.add_argument("--tiny", action="store_true", help="tiny models at 64x64: the CPU check of this script")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, help="float16 (default on CUDA), bfloat16 or float32 (CPU)")
    parser.add_argument("--worker-prompts", type=int, default=1024, help="prompts for the worker and plain loop")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {PARTS}")
    if args.dtype is None:
        args.dtype = "float16" if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) != "cpu" \
            else "float32"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = Report(out, device_name, args.dtype)
    report.add("setup", "machine", device=device_name, torch=torch.__version__, cpus=os.cpu_count(),
               dtype=args.dtype, parts=",".join(parts))
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(args, Path(tmp), report)
        for part in parts:
            clock = time.perf_counter()
            try:
                globals()[f"part_{part}"](ctx)
            except Exception as exc:  # one broken part must not cost the figures of the others
                report.add(part, "FAILED", error=f"{type(exc).__name__}: {exc}"[:500])
            report.add(part, "part time", seconds=time.perf_counter() - clock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
