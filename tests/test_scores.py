"""The scorers (instaflow.scores) against diffusers' safety checker, transformers' CLIP and image processor, and a
transcription of the checker's per-image loop, on the tiny models and tiny scorers, fp32 on the CPU."""

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

from instaflow.loading import ComponentCache, Runtime
from instaflow.models import PromptBatch, Settings, Student
from instaflow.scores import ClipScorer, ImagePreprocess, SafetyScorer

# Device preprocessing against PIL's 8-bit resize: PIL rounds in fixed point, so a pixel may differ by one level,
# which is 1 / 255 / std (about 0.015) after normalisation.
PREPROCESS_TOLERANCE = 0.02
CLIP_SCORE_TOLERANCE = 0.5  # on the 0-100 scale, from those one-level differences (0.06 seen here)
PROMPTS = [f"a {colour} {thing} at night" for colour in ("red", "blue", "golden", "green")
           for thing in ("fox", "castle", "boat", "owl", "robot", "tree", "city", "lake")]


@pytest.fixture(scope="module")
def student_pixels(tiny_models):
    components = ComponentCache(Runtime.default(device="cpu")).load(str(tiny_models["instaflow"]))
    batch = PromptBatch(PROMPTS, [100 + i for i in range(len(PROMPTS))], [None] * len(PROMPTS))
    return Student(components, Settings(1, 0.0, 64, 64)).generate(batch).pixels


@pytest.fixture(scope="module")
def checker(tiny_models):
    folder = tiny_models["safety_checker"]
    return StableDiffusionSafetyChecker.from_pretrained(folder).eval(), CLIPImageProcessor.from_pretrained(folder)


def processed(processor, pixels: torch.Tensor) -> torch.Tensor:
    """What the processor makes of the images on the host (PIL), as pipelines call it."""
    return torch.from_numpy(np.stack(processor(images=list(pixels.numpy()), return_tensors="np")["pixel_values"]))


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (320, 200), (24, 40)])
def test_device_preprocessing_equals_the_image_processor(checker, size):
    _, processor = checker
    generator = torch.Generator().manual_seed(size[0] * size[1])
    smooth = torch.nn.functional.interpolate(torch.rand(6, 3, 8, 8, generator=generator), size=size, mode="bilinear")
    pixels = (smooth * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    ours = ImagePreprocess.from_processor(processor)(pixels)
    theirs = processed(processor, pixels)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < PREPROCESS_TOLERANCE


def checker_loop(special_cos, cos, special_weights, concept_weights):
    """StableDiffusionSafetyChecker.forward's loop, transcribed: (largest concept score, has_nsfw_concept) per
    image, from its float32 cosines and its thresholds as Python floats."""
    results = []
    for i in range(len(cos)):
        adjustment, special_scores, concept_scores = 0.0, [], []
        for index in range(len(special_cos[0])):
            special_scores.append(round(special_cos[i][index] - special_weights[index] + adjustment, 3))
            if special_scores[-1] > 0:
                adjustment = 0.01
        for index in range(len(cos[0])):
            concept_scores.append(round(cos[i][index] - concept_weights[index] + adjustment, 3))
        results.append((max(concept_scores), any(score > 0 for score in concept_scores),
                        any(score > 0 for score in special_scores)))
    return results


def test_safety_scores_are_the_checkers_own(checker, student_pixels):
    model, processor = checker
    scorer = SafetyScorer(model, ImagePreprocess.from_processor(processor))
    cosines = scorer.cosines(student_pixels).numpy()
    nsfw_score, nsfw = scorer.decide(cosines)

    expected = checker_loop(cosines[:, :3], cosines[:, 3:], scorer.special_thresholds, scorer.concept_thresholds)
    assert nsfw_score.dtype == np.float32 and nsfw.dtype == bool
    assert nsfw_score.tolist() == pytest.approx([score for score, _, _ in expected], abs=1e-6)
    assert nsfw.tolist() == [flag for _, flag, _ in expected]
    # diffusers' own forward on the same input: has_nsfw_concept exactly, and the images it would black out
    images = student_pixels.numpy().astype(np.float32)
    blacked, has_nsfw_concept = model(clip_input=ImagePreprocess.from_processor(processor)(student_pixels),
                                      images=images.copy())
    assert has_nsfw_concept == nsfw.tolist()
    # the tiny checker exercises every branch: flagged and clean images, and the special-care adjustment
    assert 0 < nsfw.sum() < len(nsfw)
    assert any(special for _, _, special in expected)
    assert np.array_equal(blacked[~nsfw], images[~nsfw]) and not blacked[nsfw].any()


def test_safety_scores_from_host_preprocessing_agree(checker, student_pixels):
    """From the processor's PIL preprocessing, as a pipeline runs the checker: the same flags wherever the score
    is not within rounding of the threshold."""
    model, processor = checker
    scorer = SafetyScorer(model, ImagePreprocess.from_processor(processor))
    ours, flags = scorer.decide(scorer.cosines(student_pixels).numpy())
    with torch.no_grad():
        embeds = model.visual_projection(model.vision_model(processed(processor, student_pixels))[1])
        special, concept = (cosine_distance(embeds, model.special_care_embeds).numpy(),
                            cosine_distance(embeds, model.concept_embeds).numpy())
    theirs = checker_loop(special, concept, scorer.special_thresholds, scorer.concept_thresholds)
    for score, flag, (their_score, their_flag, _) in zip(ours, flags, theirs):
        assert score == pytest.approx(their_score, abs=0.02)
        if abs(their_score) > 0.02:
            assert flag == their_flag


def test_clip_score_is_torchmetrics_definition(tiny_models, student_pixels):
    folder = tiny_models["clip"]
    model, tokenizer = CLIPModel.from_pretrained(folder).eval(), CLIPTokenizer.from_pretrained(folder)
    processor = CLIPImageProcessor.from_pretrained(folder)
    scorer = ClipScorer(model, tokenizer, ImagePreprocess.from_processor(processor))
    long_prompt = " ".join(["a very detailed painting of a red fox in the snow"] * 12)  # over 77 tokens
    prompts = [*PROMPTS[:-1], long_prompt]
    ours = scorer.scores(scorer.image_embeds(student_pixels), scorer.tokens(prompts)).numpy()

    inputs = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=processed(processor, student_pixels)).pooler_output
        text = model.get_text_features(**inputs).pooler_output
    image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
    theirs = torch.clamp(100 * (image * text).sum(dim=-1), min=0).numpy()
    assert ours.dtype == np.float32
    assert np.abs(ours - theirs).max() < CLIP_SCORE_TOLERANCE
    assert len(set(np.round(ours, 3))) > len(ours) // 2  # scores differ from image to image


def test_preprocessing_it_cannot_mirror_is_refused(checker):
    _, processor = checker
    nearest = CLIPImageProcessor.from_dict({**processor.to_dict(), "resample": 0})
    with pytest.raises(ValueError, match="resample=0"):
        ImagePreprocess.from_processor(nearest)
