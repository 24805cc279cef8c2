"""The aesthetic score (--scores aesthetic) through `instaflow-batch run`, against the LAION predictor's own recipe on
the stored images: transformers' CLIP with its image processor (PIL), the embedding L2-normalised, the released
MLP's five linear layers applied in numpy from the head file."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel

from instaflow.aesthetic import AestheticHead, read_head
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
    head = read_head(tiny_models["aesthetic"])
    state = safetensors.torch.load_file(str(tiny_models["aesthetic"]))
    embeds = torch.randn(5, head.input_dim, generator=torch.Generator().manual_seed(0))
    values = torch.nn.functional.normalize(embeds, dim=-1).double()
    for layer in LINEARS:
        values = values @ state[f"{layer}.weight"].double().T + state[f"{layer}.bias"].double()
    assert torch.allclose(head(embeds).double(), values[:, 0], atol=1e-5)
    assert not head.training  # dropout is among the released layers: in training mode it would score at random
