"""Image encoders in threads against encoders in processes, beside a device that holds the interpreter lock.

    python tests/bench/encoders.py [--size 512] [--batch 32] [--batches 24] [--image-ms 8.33] [--gil 0 0.5 0.9]
                             [--encoders 1 2] [--repeats 2]
    python tests/bench/encoders.py --quick      # a few small batches: the test runs this

A stand-in device runs batches as the worker's generating thread does on a GPU: each batch launches its work,
holding the interpreter lock (GIL) for `--gil` of the batch's device time in pure Python, as eager kernel launches
do, while the device computes alongside; the batch is done when both are (a CUDA synchronize waits with the lock
released). So encoders that take the lock from the launching thread for long enough slow the device down. The
batch's outputs are tests/bench/simulated.py's 1/f images, written into one of the host buffers (a ring of
MAX_BATCHES_AWAITING_ENCODE + 1 batches, as the worker lets that many wait): when none is free the device waits
for the encoders, and that wait is counted. Each image is encoded with the engine's `encode_image` (JPEG, as the
worker's default):

- threads: a ThreadPoolExecutor of N threads in the device's process, one task per image (the worker's encoders
  until issue 18);
- processes: the worker's own `pipeline.encoders.EncoderProcesses` with N processes (a feeder thread copies each
  batch into shared memory, the processes send back the bytes of a few images at a time).

Per setting: images/s and its fraction of the device's limit, the device's wait for encoders, how much longer
than alone the GIL-held launches took (the lock lost to encoders), and CPU ms per image of the process and its
encoder processes. The settings run in turn, `--repeats` rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from tests.bench.common import CpuMeter, Figures, default_out  # noqa: E402
from tests.bench.simulated import image_bank  # noqa: E402
from pipeline.encoders import EncoderProcesses  # noqa: E402
from pipeline.worker import MAX_BATCHES_AWAITING_ENCODE  # noqa: E402
from pipeline.writers import encode_image  # noqa: E402

SLOTS = MAX_BATCHES_AWAITING_ENCODE + 1


def _python_work(iterations: int) -> int:
    """Pure Python under the GIL, a stand-in for eager kernel launches (interpreter work between C calls)."""
    total = 0
    for i in range(iterations):
        total += i & 7
    return total


def iterations_per_second() -> float:
    """`_python_work` iterations per second in this process with no other thread running (best of 5)."""
    _python_work(100_000)
    best = min(_timed_work(200_000) for _ in range(5))
    return 200_000 / best


def _timed_work(iterations: int) -> float:
    started = time.perf_counter()
    _python_work(iterations)
    return time.perf_counter() - started


class Ring:
    """SLOTS host buffers of one batch each; `acquire` blocks while all await their encodes (the device's wait),
    as the worker waits once more than MAX_BATCHES_AWAITING_ENCODE batches are being encoded."""

    def __init__(self, batch: int, size: int):
        self.slots = np.zeros((SLOTS, batch, size, size, 3), np.uint8)
        self.free = threading.Semaphore(SLOTS)
        self.left = [0] * SLOTS
        self.lock = threading.Lock()
        self.next = 0
        self.images_encoded = 0

    def acquire(self) -> int:
        self.free.acquire()
        slot, self.next = self.next, (self.next + 1) % SLOTS
        return slot

    def track(self, slot: int, futures: list) -> None:
        """The slot is free again once every one of its images is encoded."""
        self.left[slot] = len(futures)
        for future in futures:
            future.add_done_callback(lambda future, slot=slot: self._encoded(slot, future))

    def _encoded(self, slot: int, future) -> None:
        future.result()  # an image that failed to encode fails the run
        with self.lock:
            self.left[slot] -= 1
            self.images_encoded += 1
            if self.left[slot] == 0:
                self.free.release()


class Batch:
    """A slot's images as the worker hands them over (a HostCopy's `numpy()`)."""

    def __init__(self, pixels: np.ndarray):
        self.pixels = pixels

    def numpy(self) -> np.ndarray:
        return self.pixels


class ThreadEncoders:
    """The worker's encoders until issue 18: a task per image on a thread pool in the device's process."""

    def __init__(self, count: int):
        self.pool = ThreadPoolExecutor(count, thread_name_prefix="encode")

    def submit(self, pixels: Batch, n: int, image_format: str) -> list:
        return [self.pool.submit(encode_image, pixels.numpy()[i], image_format) for i in range(n)]

    def close(self) -> None:
        self.pool.shutdown()


def run_setting(kind: str, encoders: int, gil: float, args, bank: np.ndarray, rate: float) -> dict:
    """One run: `args.batches` batches through the stand-in device and `encoders` encoders of `kind`."""
    batch = args.batch
    device_s = args.image_ms / 1000 * batch
    launch_iterations = int(gil * device_s * rate)
    ring = Ring(batch, args.size)
    pool = EncoderProcesses(encoders) if kind == "processes" else ThreadEncoders(encoders)

    def submit(slot: int) -> None:
        ring.track(slot, pool.submit(Batch(ring.slots[slot]), batch, args.image_format))

    try:
        for _ in range(SLOTS):  # warm-up: processes started, their first encodes done
            slot = ring.acquire()
            ring.slots[slot] = bank[:batch]
            submit(slot)
        for _ in range(SLOTS):
            ring.free.acquire()
        ring.free.release(SLOTS)
        ring.images_encoded = 0
        waited = launched = 0.0
        with CpuMeter() as meter:
            started = time.perf_counter()
            for index in range(args.batches):
                clock = time.perf_counter()
                slot = ring.acquire()
                waited += time.perf_counter() - clock
                batch_started = time.perf_counter()
                _python_work(launch_iterations)  # the launches, under the GIL
                launched += time.perf_counter() - batch_started
                ring.slots[slot] = bank[(index * batch + np.arange(batch)) % len(bank)]  # a GPU's copy-out
                time.sleep(max(0.0, device_s - (time.perf_counter() - batch_started)))  # synchronize
                submit(slot)
            for _ in range(SLOTS):
                ring.free.acquire()
            wall = time.perf_counter() - started
        cpu = meter.result["ours_cores"] * meter.result["wall_s"]  # this process and its encoder processes
    finally:
        pool.close()
    images = ring.images_encoded
    alone = launch_iterations / rate * args.batches
    return {
        "encoders": f"{encoders} {kind}", "gil_fraction": gil, "images_encoded": images,
        "images_per_s": round(images / wall, 1), "limit_images_per_s": round(1000 / args.image_ms, 1),
        "fraction_of_limit": round(images / wall * args.image_ms / 1000, 3),
        "device_waited_for_encoders_s": round(waited, 3),
        "launches_slowed_by": round(launched / alone, 3) if alone else None,
        "cpu_ms_per_image": round(1000 * cpu / images, 2),
        "other_jobs_cores": round(meter.result["other_jobs_cores"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--image-ms", type=float, default=1000 / 120, help="device ms per image (120 images/s)")
    parser.add_argument("--gil", type=float, nargs="+", default=[0.0, 0.5, 0.9])
    parser.add_argument("--encoders", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--image-format", default="jpeg")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.batches, args.gil, args.encoders, args.repeats = 64, 8, 4, [0.5], [1], 1
    figures = Figures("encoders", args.out or default_out())
    figures.machine(argv if argv is not None else sys.argv[1:])
    bank = image_bank(args.size, args.size, count=max(16, args.batch))
    rate = iterations_per_second()
    one_thread_ms = _encode_ms(bank[: args.batch], args.image_format)
    figures.add("setting", size=args.size, batch=args.batch, batches=args.batches, image_ms=args.image_ms,
                encode_ms_per_image_one_thread=round(one_thread_ms, 3), python_iterations_per_s=round(rate))
    results: dict[tuple, list[dict]] = {}
    for _ in range(args.repeats):
        for gil in args.gil:
            for encoders in args.encoders:
                for kind in ("threads", "processes"):
                    result = run_setting(kind, encoders, gil, args, bank, rate)
                    results.setdefault((kind, encoders, gil), []).append(result)
                    figures.add("run", **result)
    for (kind, encoders, gil), runs in results.items():
        figures.add("median", encoders=f"{encoders} {kind}", gil_fraction=gil, runs=len(runs),
                    images_per_s=statistics.median(r["images_per_s"] for r in runs),
                    fraction_of_limit=statistics.median(r["fraction_of_limit"] for r in runs),
                    device_waited_for_encoders_s=statistics.median(r["device_waited_for_encoders_s"] for r in runs),
                    cpu_ms_per_image=statistics.median(r["cpu_ms_per_image"] for r in runs))
    return 0


def _encode_ms(images: np.ndarray, image_format: str) -> float:
    """ms per image of `encode_image` in this thread alone."""
    encode_image(images[0], image_format)
    clock = time.thread_time()
    for image in images:
        encode_image(image, image_format)
    return 1000 * (time.thread_time() - clock) / len(images)


if __name__ == "__main__":
    sys.exit(main())
