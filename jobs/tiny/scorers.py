"""Tiny scorers for the tiny models: a safety checker and a CLIP model, loadable as the real ones are.

`write_tiny_scorers(out_dir)` writes, from fixed seeds:

- `safety_checker/`: a tiny diffusers `StableDiffusionSafetyChecker` (config.json and model.safetensors) with its
  `CLIPImageProcessor` (preprocessor_config.json) in one folder, as `CompVis/stable-diffusion-safety-checker`
  ships them. Its thresholds are set from the cosines its random embeddings have with images of the tiny
  student, so that some of its images are flagged and some not, and a special-care concept fires for some (the
  checker's 0.01 adjustment is exercised);
- `clip/`: a tiny transformers `CLIPModel` with its processor and the tiny models' tokenizer, as
  `openai/clip-vit-large-patch14` ships them.

Both preprocess to 32x32 (the real ones: 224x224), through the same CLIPImageProcessor code.
"""

import shutil
from pathlib import Path

import torch

from jobs.tiny.pipelines import build_tokenizer, write_slow_tokenizer_files

IMAGE_SIZE = 32
PROJECTION_DIM = 16
NUM_SPECIAL, NUM_CONCEPTS = 3, 17  # as the real checker has


def clip_config(vocab_size: int) -> dict:
    from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=8)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJECTION_DIM)


def _processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE,
                                                                               "width": IMAGE_SIZE})


def build_safety_checker(vocab_size: int, student_dir: Path):
    """Random concept embeddings. A random vision tower maps every image close to one direction, so each
    threshold is the mean cosine of the tiny student's images with its concept plus a seeded number of standard
    deviations: 1.5 to 3.5 for the concepts (each flags a few images), 0.5 to 1.5 for special care."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    torch.manual_seed(30)
    checker = StableDiffusionSafetyChecker(clip_config(vocab_size)).eval()
    generator = torch.Generator().manual_seed(31)
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn(NUM_CONCEPTS, PROJECTION_DIM, generator=generator))
        checker.special_care_embeds.copy_(torch.randn(NUM_SPECIAL, PROJECTION_DIM, generator=generator))
        cosines = _student_cosines(checker, student_dir)
        mean, std = cosines.mean(dim=0), cosines.std(dim=0)
        spread = torch.cat([0.5 + torch.rand(NUM_SPECIAL, generator=generator),
                            1.5 + 2 * torch.rand(NUM_CONCEPTS, generator=generator)])
        thresholds = mean + spread * std
        checker.special_care_embeds_weights.copy_(thresholds[:NUM_SPECIAL])
        checker.concept_embeds_weights.copy_(thresholds[NUM_SPECIAL:])
    return checker


def _student_cosines(checker, student_dir: Path) -> torch.Tensor:
    """(64, 3 + 17): the cosines of 64 images of the tiny student (fixed prompts and seeds, fp32 on the CPU)."""
    from instaflow.loading import ComponentCache, Runtime
    from instaflow.models import PromptBatch, Settings, Student
    from instaflow.scores import ImagePreprocess, SafetyScorer

    components = ComponentCache(Runtime.default(device="cpu")).load(str(student_dir))
    prompts = [f"a {colour} {thing}" for colour in ("red", "blue", "green", "golden") for thing in
               ("fox", "castle", "boat", "tree", "robot", "owl", "city", "flower", "dragon", "lake", "cat", "moon",
                "train", "book", "horse", "storm")]
    batch = PromptBatch(prompts, list(range(len(prompts))), [None] * len(prompts))
    pixels = Student(components, Settings(1, 0.0, 64, 64)).generate(batch).pixels
    return SafetyScorer(checker, ImagePreprocess.from_processor(_processor())).cosines(pixels)


def build_clip(vocab_size: int):
    from transformers import CLIPModel

    torch.manual_seed(32)
    return CLIPModel(clip_config(vocab_size)).eval()


def write_tiny_scorers(out_dir: str | Path, student_dir: str | Path) -> dict[str, Path]:
    """Writes safety_checker/ and clip/ under `out_dir`, the checker set for the tiny student in `student_dir`;
    returns their folders by name."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    paths = {"safety_checker": out_dir / "safety_checker", "clip": out_dir / "clip"}
    for path in paths.values():
        if path.exists():
            shutil.rmtree(path)
    build_safety_checker(len(tokenizer), Path(student_dir)).save_pretrained(paths["safety_checker"])
    _processor().save_pretrained(paths["safety_checker"])
    build_clip(len(tokenizer)).save_pretrained(paths["clip"])
    _processor().save_pretrained(paths["clip"])
    tokenizer.save_pretrained(paths["clip"])
    write_slow_tokenizer_files(paths["clip"])
    return paths
