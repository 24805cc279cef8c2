"""Hostile --aesthetic-model files (review of the aesthetic score): a head file is the user's data, and reading it
must cost what the released head costs, and fail with one AestheticError naming the file (exit 2 naming the flag)."""

import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch

from instaflow.aesthetic import AestheticError, read_head

MAX_READ_GROWTH_MB = 256  # the released head is 3.5 MB; reading any head file must stay far below this


def empty_first_layer(tmp_path, width: int):
    """A file of under 100 bytes whose `layers.0.weight` is a (0, width) matrix: no data, any claimed width."""
    path = tmp_path / f"empty-{width}.safetensors"
    safetensors.torch.save_file({"layers.0.weight": torch.zeros(0, width)}, str(path))
    return path


def test_a_head_claiming_an_impossible_width_is_refused_as_not_a_head(tmp_path):
    with pytest.raises(AestheticError, match="not the LAION aesthetic predictor's MLP"):
        read_head(empty_first_layer(tmp_path, 10**12))  # today: RuntimeError from torch's allocator (exit 1, "a bug")


def test_reading_a_tiny_head_file_allocates_no_model_of_its_claimed_width(tmp_path):
    path = empty_first_layer(tmp_path, 250_000)  # 88 bytes that make a Linear(250000, 1024): 1 GB of float32
    probe = textwrap.dedent(f"""
        import resource
        from instaflow.aesthetic import AestheticError, read_head
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            read_head({str(path)!r})
        except AestheticError:
            pass
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    grown_mb = int(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
                   .stdout.split()[-1])
    assert grown_mb < MAX_READ_GROWTH_MB, f"reading an 88-byte head file grew the process by {grown_mb} MB"
