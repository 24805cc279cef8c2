"""The worker's encoder processes (pipeline/encoders.py): the same bytes as encoding in the worker, whatever the
pixels' layout; a bad image fails alone; a process that dies fails only what it held and is replaced."""

import errno
import os
import signal
import time

import numpy as np
import pytest
import torch

from pipeline.encoders import IMAGES_PER_TASK, EncoderLost, EncoderProcesses
from pipeline.writers import encode_image


class Pixels:
    """What the worker hands over: `numpy()` gives (N, H, W, 3) uint8 (a HostCopy on the CPU)."""

    def __init__(self, array):
        self.array = array

    def numpy(self):
        return self.array


@pytest.fixture
def encoders():
    pool = EncoderProcesses(2)
    yield pool
    pool.close()


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 24, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("image_format", ["jpeg", "png", "webp"])
def test_bytes_equal_encoding_in_the_worker_for_either_layout(encoders, image_format):
    hwc = images(11)
    planar = torch.from_numpy(np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))).permute(0, 2, 3, 1).numpy()
    assert not planar.flags.c_contiguous  # what to_pixels returns on the CPU: a channels-last view of planes
    for pixels in (hwc, planar):
        futures = encoders.submit(Pixels(pixels), 9, image_format)  # the first 9 of 11, as a short batch
        assert [f.result(timeout=30) for f in futures] == [encode_image(image, image_format) for image in hwc[:9]]
    assert encoders.submit(Pixels(hwc), 0, image_format) == []


def test_an_image_that_cannot_be_encoded_fails_alone(encoders):
    pixels = images(6)
    futures = encoders.submit(Pixels(pixels), 6, "jpeg")
    bad = encoders.submit(Pixels(pixels[:, :, :, :1].repeat(3, axis=3)), 2, "no-such-format")
    assert [f.result(timeout=30) for f in futures] == [encode_image(image, "jpeg") for image in pixels]
    for future in bad:
        with pytest.raises(ValueError, match="unknown image format 'no-such-format'"):
            future.result(timeout=30)


def test_a_dead_process_fails_what_it_held_and_is_replaced(encoders):
    before = encoders.pids()
    os.kill(before[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while encoders.pids()[0] == before[0]:
        assert time.monotonic() < deadline, "the dead encoder process was not replaced"
        time.sleep(0.05)
    assert encoders.pids()[1] == before[1]
    pixels = images(4 * IMAGES_PER_TASK, seed=1)
    futures = encoders.submit(Pixels(pixels), len(pixels), "png")
    assert [f.result(timeout=30) for f in futures] == [encode_image(image, "png") for image in pixels]


def test_images_held_by_a_process_that_dies_fail_and_none_is_lost_or_hangs(encoders):
    pixels = np.random.default_rng(2).integers(0, 256, (64, 256, 256, 3), dtype=np.uint8)
    futures = encoders.submit(Pixels(pixels), len(pixels), "png")
    while not any(f.done() for f in futures):
        time.sleep(0.001)
    os.kill(encoders.pids()[0], signal.SIGKILL)
    failed = 0
    for future, image in zip(futures, pixels):
        try:
            assert future.result(timeout=60) == encode_image(image, "png")
        except EncoderLost as exc:
            assert "the image encoder process exited with status -9" in str(exc)
            failed += 1
    assert 0 < failed < len(pixels)


def test_a_failed_copy_from_the_device_fails_the_batch(encoders):
    class Broken:
        def numpy(self):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    for future in encoders.submit(Broken(), 3, "jpeg"):
        with pytest.raises(EncoderLost, match="illegal memory access"):
            future.result(timeout=30)


def test_without_memory_for_a_block_the_worker_encodes_itself(encoders, monkeypatch, caplog):
    import pipeline.encoders

    def no_room(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline.encoders.os, "posix_fallocate", no_room)
    pixels = images(5, seed=3)
    futures = encoders.submit(Pixels(pixels), 5, "jpeg")
    bad = encoders.submit(Pixels(pixels), 1, "no-such-format")
    assert [f.result(timeout=30) for f in futures] == [encode_image(image, "jpeg") for image in pixels]
    with pytest.raises(ValueError, match="unknown image format"):
        bad[0].result(timeout=30)
    assert encoders.images_encoded == 5 and "no shared memory for a batch's pixels" in caplog.text


def test_when_no_process_can_be_started_again_every_future_still_settles(encoders, monkeypatch):
    """EMFILE or ENOMEM at a replacement: what the dead processes held fails (EncoderLost, the try's fault), and
    later batches are encoded in the worker, never left waiting."""
    import pipeline.encoders

    def cannot_start(self):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(pipeline.encoders._Process, "__init__", cannot_start)
    for pid in encoders.pids():
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while encoders.pids():
        assert time.monotonic() < deadline, "dead encoder processes stayed in the pool"
        time.sleep(0.05)
    pixels = images(6, seed=4)
    futures = encoders.submit(Pixels(pixels), 6, "png")
    assert [f.result(timeout=30) for f in futures] == [encode_image(image, "png") for image in pixels]


def memory_files(pid: int | str = "self") -> list[str]:
    """The encoders' memory files (memfd) a process holds open."""
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:instaflow-encode"):
                held.append(fd)
        except FileNotFoundError:  # the listing's own descriptor, closed since
            pass
    return held


def mapped_shared_memory_blocks(pid: int | str) -> list[str]:
    """Python's named shared-memory blocks (/dev/shm/psm_*) a process maps: what the encoders used to leave."""
    with open(f"/proc/{pid}/maps") as maps:
        return [line for line in maps if "/dev/shm/psm_" in line]


def test_blocks_leave_nothing_in_dev_shm_and_are_freed_with_the_encoders():
    before = set(memory_files())  # another test's pool in this process may hold its own
    pool = EncoderProcesses(2)
    pixels = images(16, seed=5)
    futures = pool.submit(Pixels(pixels), 16, "jpeg")
    assert [f.result(timeout=30) for f in futures] == [encode_image(image, "jpeg") for image in pixels]
    pids = pool.pids()
    ours = set(memory_files()) - before
    assert ours and not mapped_shared_memory_blocks("self")
    assert not any(mapped_shared_memory_blocks(pid) for pid in pids)  # they map the worker's memory file, no name
    pool.close()
    assert not ours & set(memory_files())
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


def test_blocks_reach_the_processes_by_descriptor_not_by_a_path(monkeypatch):
    """In a PID namespace whose /proc is the host's, the worker's own pid names another process's files: the
    blocks go to the processes over a socket, so no pid or path is involved."""
    import pipeline.encoders

    monkeypatch.setattr(pipeline.encoders.os, "getpid", lambda: 1)
    pool = EncoderProcesses(1)
    try:
        pixels = images(5, seed=6)
        futures = pool.submit(Pixels(pixels), 5, "png")
        assert [f.result(timeout=30) for f in futures] == [encode_image(image, "png") for image in pixels]
    finally:
        pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(Pixels(pixels), 1, "png")  # never a future that no one settles

