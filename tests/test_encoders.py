"""The worker's encoder processes (pipeline/encoders.py): the same bytes as encoding in the worker, whatever the
pixels' layout; a bad image fails alone; a process that dies fails only what it held and is replaced."""

import os
import signal
import time

import numpy as np
import pytest
import torch

from pipeline.encoders import IMAGES_PER_TASK, EncoderProcesses
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
        except RuntimeError as exc:
            assert "the image encoder process exited with status -9" in str(exc)
            failed += 1
    assert 0 < failed < len(pixels)


def test_a_failed_copy_from_the_device_fails_the_batch(encoders):
    class Broken:
        def numpy(self):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    for future in encoders.submit(Broken(), 3, "jpeg"):
        with pytest.raises(RuntimeError, match="illegal memory access"):
            future.result(timeout=30)


def test_without_room_in_dev_shm_the_worker_encodes_itself(encoders, monkeypatch, caplog):
    import pipeline.encoders

    monkeypatch.setattr(pipeline.encoders, "SHM_HEADROOM", 1 << 62)  # more than any /dev/shm has free
    pixels = images(5, seed=3)
    futures = encoders.submit(Pixels(pixels), 5, "jpeg")
    bad = encoders.submit(Pixels(pixels), 1, "no-such-format")
    assert [f.result(timeout=30) for f in futures] == [encode_image(image, "jpeg") for image in pixels]
    with pytest.raises(ValueError, match="unknown image format"):
        bad[0].result(timeout=30)
    assert encoders.images_encoded == 5 and "too little for a batch's pixels" in caplog.text
