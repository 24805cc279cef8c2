"""The aesthetic score (--scores aesthetic) through `instaflow-batch run`, against the LAION predictor's own recipe on
the stored images: transformers' CLIP with its image processor (PIL), the embedding L2-normalised, the released
MLP's five linear layers applied in numpy from the head file."""

import io
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel

from instaflow.aesthetic import AestheticError, AestheticHead, head_shapes, read_head
from jobs.tiny.scorers import PROJECTION_DIM
from tests.jobhelpers import image_rows
from tests.test_stage_jobs import error_line, prompts, run  # noqa: F401 - the module's fixtures, shared

LINEARS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")  # improved-aesthetic-predictor's MLP


def laion_scores(tiny_models, images: list[bytes]) -> np.ndarray:
    """improved-aesthetic-predictor's simple_inference.py: CLIP's encode_image on the preprocessed image, the
    embedding divided by its L2 norm, then the MLP (no activations; dropout off), in float64 here."""
    clip = CLIPModel.from_pretrained(tiny_models["clip"]).eval()
    processor = CLIPImageProcessor.from_pretrained(tiny_models["clip"])
    decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    with torch.no_grad():
        embeds = clip.get_image_features(pixel_values=processor(images=decoded, return_tensors="pt").pixel_values)
    embeds = getattr(embeds, "pooler_output", embeds).double().numpy()
    values = embeds / np.linalg.norm(embeds, axis=1, keepdims=True)
    weights = {name: value.double().numpy() for name, value in safetensors.torch.load_file(
        str(tiny_models["aesthetic"])).items()}
    for layer in LINEARS:
        values = values @ weights[f"{layer}.weight"].T + weights[f"{layer}.bias"]
    return values[:, 0]


def aesthetic_flags(tiny_models, scores: str) -> list[str]:
    return ["--scores", scores, "--aesthetic-model", str(tiny_models["aesthetic"]), "--clip-model",
            str(tiny_models["clip"])]


def test_aesthetic_scores_are_the_laion_predictors_on_the_stored_images(run, tiny_models):
    rows, images = image_rows(run("generate", *aesthetic_flags(tiny_models, "aesthetic")))
    keys = sorted(images)
    ours = np.array([next(row["aesthetic_score"] for row in rows if row["key"] == key) for key in keys])
    theirs = laion_scores(tiny_models, [images[key] for key in keys])
    spread = theirs.max() - theirs.min()
    assert spread > 0  # the images differ, and so do their scores
    # the device's preprocessing against PIL's moves the CLIP embedding a little (test_scores.py)
    assert np.abs(ours - theirs).max() < 0.05 * spread

    # with the clip score, the stage reads the clip score's embeddings: the same values, one CLIP pass
    both_rows, both_images = image_rows(run("generate", *aesthetic_flags(tiny_models, "clip,aesthetic")))
    assert both_images == images
    assert {row["key"]: row["aesthetic_score"] for row in both_rows} == {row["key"]: row["aesthetic_score"]
                                                                         for row in rows}
    assert all(row["clip_score"] is not None for row in both_rows)
    table = pq.read_table(sorted(run("generate", *aesthetic_flags(tiny_models, "aesthetic")).glob("*.parquet"))[0])
    assert "aesthetic_score" in table.column_names and "clip_score" not in table.column_names


def test_teacher_images_get_aesthetic_scores(run, tiny_models):
    output = run("reflow-pairs", "--no-student", "--teacher-images", *aesthetic_flags(tiny_models, "aesthetic"))
    table = pq.read_table(sorted(output.glob("*.parquet"))[0])
    assert all(np.isfinite(value) for value in table.column("aesthetic_score").to_pylist())


def test_a_head_that_does_not_fit_or_is_not_a_head_is_refused_naming_its_flag(run, tiny_models, tmp_path, capsys):
    """On the driver, before any worker: a head for another CLIP width, a file that is not a head, a pickle."""
    wide = tmp_path / "wide.safetensors"
    safetensors.torch.save_file({name: value.contiguous() for name, value in AestheticHead(768).state_dict().items()},
                                str(wide))
    lora = tiny_models["lora-kohya"]
    pickle = tmp_path / "head.pth"
    torch.save(AestheticHead(16).state_dict(), pickle)
    for head, said in ((wide, "reads embeddings of 768 values, but --clip-model"),
                       (lora, "not the LAION aesthetic predictor's MLP"),
                       (pickle, "must be a .safetensors file")):
        flags = ["--scores", "aesthetic", "--aesthetic-model", str(head), "--clip-model", str(tiny_models["clip"])]
        run("generate", *flags, status=2)
        line = error_line(capsys)
        assert line.startswith("error: --aesthetic-model") and said in line, line


def test_the_head_is_read_as_released(tiny_models):
    head = read_head(tiny_models["aesthetic"], PROJECTION_DIM)
    assert head_shapes(768) == {name: tuple(value.shape) for name, value in AestheticHead(768).state_dict().items()}
    state = safetensors.torch.load_file(str(tiny_models["aesthetic"]))
    embeds = torch.randn(5, head.input_dim, generator=torch.Generator().manual_seed(0))
    values = torch.nn.functional.normalize(embeds, dim=-1).double()
    for layer in LINEARS:
        values = values @ state[f"{layer}.weight"].double().T + state[f"{layer}.bias"].double()
    assert torch.allclose(head(embeds).double(), values[:, 0], atol=1e-5)
    assert not head.training  # dropout is among the released layers: in training mode it would score at random


MAX_READ_GROWTH_MB = 256  # the released head is 3.5 MB; reading any head file must stay far below this


def empty_first_layer(tmp_path, width: int):
    """A file of under 100 bytes whose `layers.0.weight` is a (0, width) matrix: no data, any claimed width
    (review of the aesthetic score: read_head built Linear(width, 1024) before checking the layout)."""
    path = tmp_path / f"empty-{width}.safetensors"
    safetensors.torch.save_file({"layers.0.weight": torch.zeros(0, width)}, str(path))
    return path


def test_a_head_claiming_an_impossible_width_is_refused_as_not_a_head(tmp_path):
    with pytest.raises(AestheticError, match="not the LAION aesthetic predictor's MLP"):
        read_head(empty_first_layer(tmp_path, 10**12), 768)  # before: torch's allocator failed (exit 1, "a bug")


def test_reading_a_tiny_head_file_allocates_no_model_of_its_claimed_width(tmp_path):
    path = empty_first_layer(tmp_path, 250_000)  # 88 bytes that made a Linear(250000, 1024): 1 GB of float32
    probe = textwrap.dedent(f"""
        import resource
        from instaflow.aesthetic import AestheticError, read_head
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            read_head({str(path)!r}, 768)
        except AestheticError:
            pass
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    grown_mb = int(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
                   .stdout.split()[-1])
    assert grown_mb < MAX_READ_GROWTH_MB, f"reading an 88-byte head file grew the process by {grown_mb} MB"


def test_a_head_of_integers_is_refused_and_one_of_half_floats_read(tmp_path):
    """The shapes alone do not make a head: integer tensors of the right shapes scored around 1e8 (second review)."""
    path = tmp_path / "head.safetensors"
    state = AestheticHead(PROJECTION_DIM).state_dict()
    safetensors.torch.save_file({name: value.to(torch.int64).contiguous() for name, value in state.items()}, str(path))
    with pytest.raises(AestheticError, match="not floating point"):
        read_head(path, PROJECTION_DIM)
    safetensors.torch.save_file({name: value.half().contiguous() for name, value in state.items()}, str(path))
    assert read_head(path, PROJECTION_DIM).layers[0].weight.dtype == torch.float32
