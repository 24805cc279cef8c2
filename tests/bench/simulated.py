"""Benchmark 1: does the host keep the device fed? The whole path on a simulated device, Parquet in S3 to
committed shards in S3 (moto, 127.0.0.1), through the engine's driver, pool and worker.

    python tests/bench/simulated.py [--parts feed,cores] [--size 512] [--out DIR]
    python tests/bench/simulated.py --quick      # 64x64, a few units, fewer runs: the test runs this

The stand-in for the UNet and the decoder sleeps a fixed time per sample, as a GPU kernel frees the CPU, and
returns real-sized outputs: (N, H, W, 3) uint8 pixels of 1/f^1.2 noise, whose JPEG (2.6 ms, 190 KB) and PNG
(41 ms, 620 KB) encodes cost what FACTS.md measured for 512x512 images, and (N, 4, H/8, W/8) latents. Tokenising
and the seed noise are the real ones (`PromptBatch.prepare`). Default device times are the H200's eager model
layer from tests/bench/README.md: 16.4 ms per image (60.9 images/s), 9.2 ms compiled (109.1/s), 152 ms per teacher pair
(6.56 pairs/s).

Parts:
- feed: steady-state samples/s over the stand-in's own limit for JPEG, PNG and pairs on one worker with 2 CPUs
  (this machine's count), and the host CPU per image beyond the encode itself (worker, driver, Ray, S3 server);
  "jpeg eager + scores" adds --scores nsfw,clip, whose scorers are stand-ins too (a fixed device time per image,
  SCORE_S), while their host work is the engine's own: CLIP's tokens, the safety checker's decision per row,
  the score columns; "jpeg eager + refiner" adds --refiner at twice the image's side, whose refiner is a stand-in
  too (REFINE_S per image, refined pixels from a bank of that size) after the engine's own host work (its tokens);
  "jpeg float 2 workers" (issue 18) runs the engine's own Student.generate with the UNet and the VAE decode as
  sleeps, the decoder returning float images in [-1, 1] so that to_pixels and the finite check run on the host as
  on a CPU device, on two workers with a CPU each; it prints the host CPU per image machine-wide and per process
  kind, beside the post-processing and the encode of the same images timed in one thread;
- cores: PNG with one worker whose device takes 1 ms per image, so the encoders are the limit, with 1 and 2
  CPUs per worker, over the rate of one thread encoding the same images. Beside each, what as many threads
  and as many processes encode outside the engine just before: the machine is shared, and these say how much
  of it the encoders could have had.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import gc
import resource
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from tests.bench.common import (  # noqa: E402
    CpuMeter,
    Figures,
    build_tiny_models,
    default_out,
    local_ray,
    s3_server,
    timed_pools,
    write_prompt_files,
)
from instaflow.loading import VAE_CONFIG, LatentGeometry, Runtime, component_config  # noqa: E402
from instaflow.models import PromptBatch, Student, StudentOutput, TeacherOutput  # noqa: E402
from pipeline.job import run_job  # noqa: E402
from pipeline.spec import JobSpec  # noqa: E402
from pipeline.stages.images import ImagesStage  # noqa: E402
from pipeline.stages.pairs import PairsStage  # noqa: E402
from pipeline.stages.refiner import RefinerStage  # noqa: E402
from pipeline.stages.scores import ScoresStage  # noqa: E402
from instaflow.sampling import to_pixels  # noqa: E402
from instaflow.refiner import Refiner, RefinerOutput, RefinerSettings, refined_size  # noqa: E402
from instaflow.scores import ClipScorer, SafetyScorer  # noqa: E402
from pipeline.worker import ShardWorker  # noqa: E402
from pipeline.writers import encode_image  # noqa: E402

H200_EAGER_IMAGE_S = 1 / 60.9  # tests/bench/README.md: InstaFlow model layer, fp16, batch 32, contiguous memory
H200_COMPILED_IMAGE_S = 1 / 109.1
H200_PAIR_S = 1 / 6.56  # SD teacher, 25 DPM-Solver steps with guidance, batch 16
SPECTRUM_EXPONENT = 1.2  # amplitude ~ 1/f^1.2: encode costs and sizes like FACTS.md's 512x512 figures
BANK_SIZE = 16


def image_bank(height: int, width: int, count: int = BANK_SIZE, seed: int = 0) -> np.ndarray:
    """(count, height, width, 3) uint8 images with a natural image's 1/f spectrum, channels mostly shared."""
    rng = np.random.default_rng(seed)
    freq = np.hypot(np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :])
    freq[0, 0] = 1.0 / max(height, width)
    amplitude = freq**-SPECTRUM_EXPONENT

    def field() -> np.ndarray:
        return np.fft.irfft2(amplitude * np.exp(2j * np.pi * rng.random(amplitude.shape)), s=(height, width))

    images = np.empty((count, height, width, 3), np.uint8)
    for i in range(count):
        shared = field()
        image = np.stack([0.8 * shared + 0.2 * field() for _ in range(3)], axis=-1)
        image = (image - image.mean()) / (4 * image.std()) + 0.5
        images[i] = np.clip(image * 255, 0, 255).astype(np.uint8)
    return images


@dataclass(frozen=True)
class SimulatedDevice:
    """Seconds the device takes per sample, for the student (one image) and the teacher (one pair)."""

    image_s: float = H200_EAGER_IMAGE_S
    pair_s: float = H200_PAIR_S
    score_s: float = 0.0  # each scorer, per image
    refine_s: float = 0.0  # the refiner, per image
    float_images: bool = False  # the student's decoder returns float images: the engine's to_pixels runs on the host


class StandIn:
    """What the worker needs of a model, on a device that takes a fixed time per sample.

    The outputs are made first, then the device is held for the rest of the sample time; the CPU that making
    them takes is counted apart (`stand_in_s`), since a GPU would make them.
    """

    def __init__(self, components, height: int, width: int, guidance_scale: float, seconds_per_sample: float,
                 count_cpu):
        self.components = components
        self.height, self.width, self.guidance_scale = height, width, guidance_scale
        self.seconds_per_sample = seconds_per_sample
        self.count_cpu = count_cpu

    def prepare(self, batch: PromptBatch) -> None:
        batch.prepare(self.components, self.height, self.width, self.guidance_scale)  # real host work

    def _hold_device(self, num_samples: int, started: float, cpu_started: float) -> None:
        _hold(self.count_cpu, num_samples * self.seconds_per_sample, started, cpu_started)


class SimulatedStudent(StandIn):
    def __init__(self, bank: torch.Tensor, *args):
        super().__init__(*args)
        self.bank = bank

    def generate(self, batch: PromptBatch) -> StudentOutput:
        started, cpu_started = time.perf_counter(), time.thread_time()
        n = len(batch.prompts)
        pixels = self.bank.index_select(0, torch.tensor([seed % len(self.bank) for seed in batch.seeds]))
        truncated = batch.truncated(self.components)
        self._hold_device(n, started, cpu_started)
        return StudentOutput(pixels=pixels, truncated=truncated, finite=torch.ones(n, dtype=torch.bool))


class SimulatedFloatStudent(Student):
    """The engine's own `Student.generate` with diffusers' UNet and VAE decode replaced by a device that takes a
    fixed time per image: the decode returns float images in [-1, 1], (N, 3, H, W), so the engine's own
    post-processing (`to_pixels`, the finite check) runs on the host, as on a CPU device. The UNet's stand-in
    returns the real seed noise as its latent; the decode's makes its images from a float bank (that CPU is
    counted apart, `stand_in_s`, as a GPU would make them)."""

    def __init__(self, bank: torch.Tensor, components, height: int, width: int, guidance_scale: float,
                 seconds_per_sample: float, count_cpu):
        self.stand_in = StandIn(components, height, width, guidance_scale, seconds_per_sample, count_cpu)
        vae = SimpleNamespace(config=SimpleNamespace(scaling_factor=0.18215), decode=self._decode)
        self.components = SimpleNamespace(**vars(components), vae=vae)
        self.settings = SimpleNamespace(steps=1, guidance_scale=guidance_scale, height=height, width=width)
        self.bank, self._seeds = bank, []

    def prepare(self, batch: PromptBatch) -> None:
        self.stand_in.prepare(batch)

    def sample_latents(self, batch: PromptBatch):
        self._started, self._cpu_started = time.perf_counter(), time.thread_time()
        self._seeds = list(batch.seeds)
        latents = batch.noise(self.components, self.settings.height, self.settings.width)  # the real seed noise
        return latents, batch.truncated(self.components)

    def _decode(self, latents: torch.Tensor, return_dict: bool = False):
        images = self.bank.index_select(0, torch.tensor([seed % len(self.bank) for seed in self._seeds]))
        self.stand_in._hold_device(len(latents), self._started, self._cpu_started)
        return (images,)


def float_bank(height: int, width: int) -> torch.Tensor:
    """The uint8 bank as the decoder's float images in [-1, 1], (N, 3, H, W), off the uint8 grid (so that
    to_pixels rounds), which to_pixels turns back into the same pixels."""
    pixels = torch.from_numpy(image_bank(height, width)).permute(0, 3, 1, 2).float()
    return ((pixels + 0.25) / 127.5 - 1).contiguous()


class SimulatedTeacher(StandIn):
    def pairs(self, batch: PromptBatch) -> TeacherOutput:
        started, cpu_started = time.perf_counter(), time.thread_time()
        n = len(batch.prompts)
        noise = batch.noise(self.components, self.height, self.width)
        latents = noise * 0.5
        truncated = batch.truncated(self.components)
        self._hold_device(n, started, cpu_started)
        return TeacherOutput(noise=noise, latents=latents, truncated=truncated, finite=torch.ones(n, dtype=torch.bool))


class SimulatedSafety(SafetyScorer):
    """The safety checker on the simulated device: cosines of the real shape, and the real decision on the host."""

    def __init__(self, seconds_per_image: float, count_cpu):
        self.special_thresholds, self.concept_thresholds = [0.15] * 3, [0.2] * 17
        self.seconds_per_image, self.count_cpu = seconds_per_image, count_cpu

    def cosines(self, pixels: torch.Tensor) -> torch.Tensor:
        started, cpu_started = time.perf_counter(), time.thread_time()
        cosines = torch.rand(len(pixels), 20) * 0.4
        _hold(self.count_cpu, len(pixels) * self.seconds_per_image, started, cpu_started)
        return cosines


class SimulatedClip(ClipScorer):
    """CLIP on the simulated device; its tokens are the real host work (the model's tokenizer)."""

    def __init__(self, tokenizer, seconds_per_image: float, count_cpu):
        self.tokenizer, self.model = tokenizer, SimpleNamespace(device=torch.device("cpu"))
        self.seconds_per_image, self.count_cpu = seconds_per_image, count_cpu

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.rand(len(pixels), 16)  # what the stand-in score reads; its device time is held there

    def scores(self, image: torch.Tensor, tokens) -> torch.Tensor:
        started, cpu_started = time.perf_counter(), time.thread_time()
        scores = torch.rand(len(image)) * 40
        _hold(self.count_cpu, len(image) * self.seconds_per_image, started, cpu_started)
        return scores


class SimulatedRefiner(Refiner):
    """The SDXL refiner on the simulated device: the real host work (tokens for its tokenizer, in prepare), then
    refined pixels of the refine size from a bank, after a fixed time per image; nothing goes to the host."""

    def __init__(self, tokenizer, size: int, seconds_per_image: float, count_cpu):
        components = SimpleNamespace(tokenizers=[tokenizer], device=torch.device("cpu"))
        self.components, self.settings, self.size = components, RefinerSettings(), size
        self.seconds_per_image, self.count_cpu = seconds_per_image, count_cpu
        self.bank: torch.Tensor | None = None

    def refine(self, pixels: torch.Tensor, batch, seeds: list[int]) -> RefinerOutput:
        started, cpu_started = time.perf_counter(), time.thread_time()
        n = len(pixels)
        if self.bank is None:
            self.bank = torch.from_numpy(image_bank(*refined_size(*pixels.shape[1:3], self.size)))
        refined = self.bank.index_select(0, torch.tensor([seed % len(self.bank) for seed in seeds[:n]]))
        _hold(self.count_cpu, n * self.seconds_per_image, started, cpu_started)
        return RefinerOutput(refined, torch.ones(n, dtype=torch.bool))


def _hold(count_cpu, seconds: float, started: float, cpu_started: float) -> None:
    """Holds the device for the rest of `seconds`; the CPU spent making the outputs is counted apart."""
    count_cpu("stand_in_s", time.thread_time() - cpu_started)
    time.sleep(max(0.0, seconds - (time.perf_counter() - started)))


class _MallocInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_mib() -> dict:
    """glibc's view of this process's heap, all arenas: bytes in use, and bytes it holds free (fragmentation or
    caching that resident memory counts but no object uses). Empty where glibc has no mallinfo2."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return {}
    mallinfo2.restype = _MallocInfo
    info = mallinfo2()
    return {"malloc_in_use_mib": (info.uordblks + info.hblkhd) / 2**20, "malloc_held_free_mib": info.fordblks / 2**20}


def stand_in_components(model_dir: Path) -> SimpleNamespace:
    """What the stand-ins and the worker use of a model's components: its real tokenizer, the CPU, and the
    latent geometry its VAE's config gives."""
    from transformers import CLIPTokenizer

    return SimpleNamespace(tokenizer=CLIPTokenizer.from_pretrained(model_dir / "tokenizer"),
                           runtime=Runtime(torch.device("cpu"), torch.float32),
                           latent=LatentGeometry.of_vae(component_config(model_dir / VAE_CONFIG, "vae"),
                                                        "AutoencoderKL"))


def stand_in_student(model_dir: Path, size: int, seconds_per_image: float) -> SimulatedStudent:
    """A stand-in student outside the engine's worker (the Ray Data baseline runs it in its actors)."""
    return SimulatedStudent(torch.from_numpy(image_bank(size, size)), stand_in_components(model_dir), size, size,
                            0.0, seconds_per_image, lambda name, value: None)


def _process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class SimulatedWorker(ShardWorker):
    """The engine's worker with stand-in models; it counts the CPU its encoders and stand-ins use."""

    def __init__(self, spec, sources, fence, device: SimulatedDevice):
        self.device = device
        self._counts_lock = threading.Lock()
        self._counts = {"stand_in_s": 0.0}
        super().__init__(spec, sources, fence)
        self._cpu_after_load_s = _process_cpu_s()
        self._encoders_cpu_after_load_s = self._encoders_cpu_s()
        self._faults_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def load_models(self, sources):
        spec = self.spec
        source = sources.get("model") or sources["teacher"]
        components = stand_in_components(Path(source.local_dir()))
        size = (spec.height, spec.width)
        stages = []
        if "images" in spec.tasks:
            student = (SimulatedFloatStudent(float_bank(*size), components, *size, spec.guidance_scale,
                                             self.device.image_s, self._count) if self.device.float_images else
                       SimulatedStudent(torch.from_numpy(image_bank(*size)), components, *size,
                                        spec.guidance_scale, self.device.image_s, self._count))
            stages.append(ImagesStage(spec, student))
        if "pairs" in spec.tasks:
            stages.append(PairsStage(spec, SimulatedTeacher(components, *size, spec.teacher_guidance_scale,
                                                            self.device.pair_s, self._count)))
        if spec.refiner:
            stages.append(RefinerStage(spec, SimulatedRefiner(components.tokenizer, spec.refine_size,
                                                               self.device.refine_s, self._count), "sdxl-refiner"))
        if spec.scores:
            stages.append(ScoresStage(
                spec, SimulatedSafety(self.device.score_s, self._count) if "nsfw" in spec.scores else None,
                SimulatedClip(components.tokenizer, self.device.score_s, self._count) if "clip" in spec.scores
                else None))
        return stages

    def _count(self, name: str, value: float) -> None:
        with self._counts_lock:
            self._counts[name] += value

    def _encoders_cpu_s(self) -> float:
        """CPU of the worker's encoder processes (they run apart from it: pipeline/encoders.py)."""
        return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in self.encoders.pids())

    def counters(self) -> dict:
        """CPU seconds since the models loaded (all threads), of which encoding and the stand-ins, and memory."""
        with self._counts_lock:
            counts = dict(self._counts)
        encode_s = self._encoders_cpu_s() - self._encoders_cpu_after_load_s
        counts |= {"encode_s": encode_s, "encoded": self.encoders.images_encoded}
        gc.collect()
        return counts | {
            "python_objects": len(gc.get_objects()),  # grows with the run if objects leak
            "process_cpu_s": _process_cpu_s() - self._cpu_after_load_s + encode_s,  # its encoders' too
            "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self._faults_after_load,
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **malloc_mib(),
            "torch_threads": torch.get_num_threads(),
            "encoder_processes": self.encoders.count,
        }


def simulated_job(spec: JobSpec, device: SimulatedDevice) -> dict:
    """Runs `spec` on simulated workers; returns its steady-state rate, its limit, and where the CPU went."""
    pools: list = []
    with CpuMeter() as meter:
        started = time.perf_counter()
        progress = run_job(spec, make_pool=timed_pools(pools, SimulatedWorker, device), show_progress=False)
        wall = time.perf_counter() - started
    if not progress.complete:
        raise RuntimeError(f"the simulated job did not complete: {progress.summary()}")
    pool = pools[0]
    seconds_per_sample = (device.image_s if "images" in spec.tasks else 0) + (
        device.pair_s if "pairs" in spec.tasks else 0) + len(spec.scores) * device.score_s + (
        device.refine_s if spec.refiner else 0)
    limit = pool.num_workers / seconds_per_sample if seconds_per_sample else None  # None: no device time
    steady = pool.steady_rate()
    samples = progress.total_samples
    counters = {key: sum(c[key] for c in pool.worker_counters) for key in ("encode_s", "stand_in_s", "encoded",
                                                                              "process_cpu_s", "minor_faults")}
    host_beyond_encode_s = counters["process_cpu_s"] - counters["encode_s"] - counters["stand_in_s"]
    return {
        **steady,
        "limit_per_s": limit,
        "fraction_of_limit": steady["samples_per_s"] / limit if limit else None,
        "job_wall_s": wall,
        "samples": samples,
        "workers": pool.num_workers,
        "worker_ms_per_sample_beyond_encode": 1000 * host_beyond_encode_s / samples,
        "images_encoded": counters["encoded"],
        "encode_ms_per_image": 1000 * counters["encode_s"] / max(counters["encoded"], 1),
        "stand_in_ms_per_sample": 1000 * counters["stand_in_s"] / samples,
        "worker_page_faults_per_sample": counters["minor_faults"] / samples,
        "driver_ms_per_sample": 1000 * meter.result.get("cpu_s_driver", 0.0) / samples,
        "ray_system_ms_per_sample": 1000 * meter.result.get("cpu_s_ray_system", 0.0) / samples,
        "s3_server_ms_per_sample": 1000 * meter.result.get("cpu_s_s3", 0.0) / samples,
        "other_jobs_cores": meter.result["other_jobs_cores"],
        "machine_ms_per_sample": 1000 * meter.result["machine_busy_cores"] * meter.result["wall_s"] / samples,
        "ms_per_sample_by_process_kind": {key.removeprefix("cpu_s_"): 1000 * value / samples
                                          for key, value in meter.result.items() if key.startswith("cpu_s_")},
        "max_rss_mib": max(c["max_rss_mib"] for c in pool.worker_counters),
        **{key: max(c[key] for c in pool.worker_counters) for key in [*malloc_mib(), "python_objects"]},
        "rss_after_each_unit_mib": pool.worker_rss_mib,
        "torch_threads": pool.worker_counters[0]["torch_threads"],
        "encoder_processes": pool.worker_counters[0]["encoder_processes"],
    }


_BANKS: dict[int, np.ndarray] = {}


def encode_bank_image(index: int, size: int, image_format: str) -> int:
    """Encodes one of the stand-in's images (the bank is made once per process); returns its size."""
    if size not in _BANKS:
        _BANKS[size] = image_bank(size, size)
    return len(encode_image(_BANKS[size][index % BANK_SIZE], image_format))


def postprocess_encode_ms(size: int, image_format: str, batch: int, min_seconds: float) -> dict:
    """CPU ms per image of the host's own share in one thread, outside the engine, on the float stand-in's images:
    the engine's float-to-uint8 post-processing (`to_pixels`, a batch at a time) and the encode of each image."""
    bank = float_bank(size, size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        post_s = encode_s = 0.0
        images = 0
        started = time.perf_counter()
        while time.perf_counter() - started < min_seconds or images < 2 * batch:
            floats = bank.index_select(0, torch.arange(images, images + batch) % len(bank))
            clock = time.thread_time()
            pixels = to_pixels(floats).numpy()
            post_s += time.thread_time() - clock
            clock = time.thread_time()
            for i in range(batch):
                encode_image(pixels[i], image_format)
            encode_s += time.thread_time() - clock
            images += batch
    finally:
        torch.set_num_threads(threads)
    return {"postprocess_ms_per_image": 1000 * post_s / images, "encode_ms_per_image": 1000 * encode_s / images,
            "postprocess_and_encode_ms_per_image": 1000 * (post_s + encode_s) / images}


def encode_rate(size: int, image_format: str, min_seconds: float, workers: int = 1, processes: bool = False) -> float:
    """Images per second that `workers` threads (or processes) encode, on the images the stand-in returns."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    from tests.bench import simulated  # by module name, so that processes can unpickle the function

    pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) if processes
            else ThreadPoolExecutor(workers))
    with pool:
        encode = functools.partial(simulated.encode_bank_image, size=size, image_format=image_format)
        list(pool.map(encode, range(2 * workers)))  # warm-up: banks made, processes started
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < min_seconds:
            list(pool.map(encode, range(count, count + 4 * workers)))
            count += 4 * workers
        return count / (time.perf_counter() - started)


@dataclass
class Setting:
    """One configuration: the sizes that change between the full run and --quick."""

    size: int
    image_s: float
    compiled_image_s: float
    pair_s: float
    fast_image_s: float  # for `cores`: the encoders are the limit
    units: int
    batch: int  # JPEG runs
    rows_per_shard: int
    small_batch: int  # pairs and PNG, whose samples take longer
    small_rows_per_shard: int
    encode_seconds: float
    score_s: float  # each scorer's device time per image (not measured on a GPU yet: a stated stand-in)
    refine_s: float  # the refiner's device time per image (a stated stand-in too)
    feed_runs: tuple[str, ...] = ("jpeg eager", "jpeg compiled", "png eager", "pairs", "jpeg eager + scores",
                                  "jpeg eager + refiner", "jpeg float 2 workers")
    cores_cpus: tuple[int, ...] = (1, 2)


FULL = Setting(size=512, image_s=H200_EAGER_IMAGE_S, compiled_image_s=H200_COMPILED_IMAGE_S, pair_s=H200_PAIR_S,
               fast_image_s=0.001, units=16, batch=32, rows_per_shard=128, small_batch=16, small_rows_per_shard=32,
               encode_seconds=5.0, score_s=0.002, refine_s=0.1)
QUICK = Setting(size=64, image_s=0.002, compiled_image_s=0.001, pair_s=0.004, fast_image_s=0.0005, units=4, batch=4,
                rows_per_shard=8, small_batch=4, small_rows_per_shard=8, encode_seconds=0.3, score_s=0.0005,
                refine_s=0.002, feed_runs=("jpeg eager", "jpeg eager + scores", "jpeg eager + refiner",
                                          "jpeg float 2 workers"),
                cores_cpus=(2,))


class Bench:
    """The S3 server, the prompts and the tiny model folder (the driver pins it; the stand-ins use its
    tokenizer) that every run of this benchmark uses."""

    def __init__(self, s3, models: dict[str, Path], setting: Setting, figures: Figures):
        self.s3, self.fs, self.setting, self.figures = s3, s3.fs(), setting, figures
        self.model_dir = models["instaflow"]
        self.scorers = {"safety_checker": str(models["safety_checker"]), "clip_model": str(models["clip"])}
        self.refiner = str(models["sdxl-refiner"])
        self.runs = 0

    def spec(self, tasks: tuple[str, ...], image_format: str, batch: int, rows_per_shard: int,
             cpus_per_worker: float, num_workers: int = 1, scores: tuple[str, ...] = (),
             refine: bool = False) -> JobSpec:
        """A job over fresh prompts in S3 (the setting's number of units) to a fresh S3 output."""
        self.runs += 1
        units = self.setting.units
        folder = f"{self.s3.bucket}/prompts/{self.runs:03d}"
        write_prompt_files(self.fs, folder, num_files=2, rows_per_file=units * rows_per_shard // 2,
                           row_group_rows=rows_per_shard // 4 or 1)
        model = str(self.model_dir)
        return JobSpec(prompts=self.s3.url(folder.split("/", 1)[1]), output=self.s3.url(f"out/{self.runs:03d}"),
                       tasks=tasks, model=model if "images" in tasks else None,
                       teacher=model if "pairs" in tasks else None, height=self.setting.size,
                       width=self.setting.size, batch_size=batch, rows_per_shard=rows_per_shard,
                       image_format=image_format, dtype="float32", num_workers=num_workers,
                       cpus_per_worker=cpus_per_worker, storage_options=self.s3.storage_options, scores=scores,
                       refiner=self.refiner if refine else None, refine_size=2 * self.setting.size, **self.scorers)


def part_feed(bench: Bench) -> None:
    s, figures = bench.setting, bench.figures
    scores = ("nsfw", "clip")
    runs = {  # name: (tasks, image format, device, scores[, workers])
        "jpeg eager": (("images",), "jpeg", SimulatedDevice(image_s=s.image_s), ()),
        "jpeg compiled": (("images",), "jpeg", SimulatedDevice(image_s=s.compiled_image_s), ()),
        "png eager": (("images",), "png", SimulatedDevice(image_s=s.image_s), ()),
        "pairs": (("pairs",), "jpeg", SimulatedDevice(pair_s=s.pair_s), ()),
        "jpeg eager + scores": (("images",), "jpeg", SimulatedDevice(image_s=s.image_s, score_s=s.score_s), scores),
        "jpeg eager + refiner": (("images",), "jpeg", SimulatedDevice(image_s=s.image_s, refine_s=s.refine_s), ()),
        # as a CPU device does: the decoder's float images post-processed on the host, two workers with a CPU each
        "jpeg float 2 workers": (("images",), "jpeg", SimulatedDevice(image_s=s.image_s, float_images=True), (), 2),
    }
    for name in s.feed_runs:
        tasks, image_format, device, scored, *workers = runs[name]
        workers = workers[0] if workers else 1
        pairs, refine = tasks == ("pairs",), device.refine_s > 0
        small = pairs or image_format == "png" or refine  # slower per sample: smaller units, as many of them
        spec = bench.spec(tasks, image_format, s.small_batch if small else s.batch,
                          s.small_rows_per_shard if small else s.rows_per_shard, cpus_per_worker=2 / workers,
                          scores=scored, refine=refine, num_workers=workers)
        result = simulated_job(spec, device)
        device_s = device.pair_s if pairs else device.image_s + len(scored) * device.score_s + device.refine_s
        if device.float_images:
            result |= host_cpu_per_image(result, postprocess_encode_ms(s.size, image_format, spec.batch_size,
                                                                       s.encode_seconds))
        figures.add(f"feed: {name}", size=s.size, device_ms_per_sample=1000 * device_s, batch=spec.batch_size,
                    rows_per_shard=spec.rows_per_shard, cpus_per_worker=spec.cpus_per_worker,
                    scores=",".join(scored), **result)


def host_cpu_per_image(result: dict, reference: dict) -> dict:
    """The host's CPU per image in all (machine-wide, /proc/stat, over the job's wall time), and what remains
    beyond the post-processing and the encode timed in one thread on the same images (and the stand-in's own
    making of outputs, a GPU's work); per process kind from the process tree."""
    machine = result["machine_ms_per_sample"]
    beyond = machine - reference["postprocess_and_encode_ms_per_image"] - result["stand_in_ms_per_sample"]
    kinds = result["ms_per_sample_by_process_kind"]
    # the workers' CPU from their models' load on (their counters) against all of theirs in the window: the rest
    # is their start-up (imports, models), spread over this job's images
    worker_running = (result["worker_ms_per_sample_beyond_encode"] + result["encode_ms_per_image"]
                      * result["images_encoded"] / result["samples"] + result["stand_in_ms_per_sample"])
    worker_start = kinds.get("workers", 0.0) - worker_running
    # the engine's own steady work per image: the workers' beyond their encodes, the stand-in and the
    # post-processing (as one thread took it), the driver's and Ray's; not the S3 server (moto) nor start-up
    engine = (result["worker_ms_per_sample_beyond_encode"] - reference["postprocess_ms_per_image"]
              + sum(kinds.get(kind, 0.0) for kind in ("driver", "ray_system", "ray_tasks", "other")))
    print(f"host CPU per image: {machine:.2f} ms in all (machine-wide; other jobs "
          f"{result['other_jobs_cores']:.2f} cores), {beyond:.2f} ms beyond post-processing "
          f"{reference['postprocess_ms_per_image']:.2f} + encode {reference['encode_ms_per_image']:.2f} ms "
          f"(one thread) and the stand-in {result['stand_in_ms_per_sample']:.2f} ms; by process kind: "
          + ", ".join(f"{kind} {ms:.2f} ms" for kind, ms in sorted(kinds.items()))
          + f"; workers' start-up {worker_start:.2f} ms; the engine's own steady work {engine:.2f} ms", flush=True)
    return {"reference_one_thread": reference, "machine_ms_beyond_postprocess_and_encode": beyond,
            "worker_start_ms_per_sample": worker_start, "engine_steady_ms_per_sample_beyond": engine}


def part_cores(bench: Bench) -> None:
    s, figures = bench.setting, bench.figures
    for cpus in s.cores_cpus:
        one_thread = encode_rate(s.size, "png", s.encode_seconds)
        references = {f"{kind}_{cpus}_encode_per_s": encode_rate(s.size, "png", s.encode_seconds, cpus,
                                                                   processes=kind == "processes")
                      for kind in ("threads", "processes")}  # what the machine gives now, for comparison
        spec = bench.spec(("images",), "png", s.small_batch, s.small_rows_per_shard, cpus_per_worker=cpus)
        result = simulated_job(spec, SimulatedDevice(image_s=s.fast_image_s))
        figures.add(f"cores: png, one worker, {cpus} cpus_per_worker", size=s.size, one_thread_encode_per_s=one_thread,
                    **references, over_one_thread_encode=result["samples_per_s"] / one_thread, **result)


PARTS = {"feed": part_feed, "cores": part_cores}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="64x64 and a few units: the test's setting")
    parser.add_argument("--feed-runs", help="comma-separated runs of the feed part (default: all of the setting's)")
    parser.add_argument("--out", type=Path, default=None, help="folder for simulated.jsonl (default tests/bench/results)")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    if unknown := sorted(set(parts) - set(PARTS)):
        parser.error(f"unknown parts {unknown}; choose from {sorted(PARTS)}")
    figures = Figures("simulated", args.out or default_out())
    figures.machine(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="bench-simulated-") as tmp, s3_server() as s3, \
            local_ray(num_cpus=2, num_gpus=2, workdir=Path(tmp)):
        setting = QUICK if args.quick else FULL
        if args.feed_runs:
            setting = dataclasses.replace(setting, feed_runs=tuple(args.feed_runs.split(",")))
        bench = Bench(s3, build_tiny_models(Path(tmp)), setting, figures)
        for part in parts:
            PARTS[part](bench)
    return 0


if __name__ == "__main__":
    from tests.bench import simulated  # by module name, so that Ray ships its classes by reference

    sys.exit(simulated.main())
