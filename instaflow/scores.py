"""Per-image scores on the device: the Stable Diffusion safety checker's NSFW score and the CLIP score.

Both read the generated images where they are, as (N, H, W, 3) uint8 tensors on the device, and preprocess them
there as transformers' CLIPImageProcessor does on the host with PIL (resize the shortest edge, bicubic, rounded
to 8 bits; centre crop; rescale; normalise), so no image goes through PIL for a score. Neither changes an image:
the safety checker's black-out is not applied.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from instaflow.text import Tokens, tokenize_prompts

_RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}  # PIL's resampling filters that torch's antialiased modes match


@dataclass(frozen=True)
class ImagePreprocess:
    """A CLIPImageProcessor's steps, for images on the device."""

    shortest_edge: int | None  # None: no resize
    mode: str
    crop: tuple[int, int] | None  # (height, width); None: no centre crop
    rescale: float | None
    mean: torch.Tensor | None  # (3,) float32; None: no normalisation
    std: torch.Tensor | None

    @classmethod
    def from_processor(cls, processor) -> "ImagePreprocess":
        """The steps a loaded CLIPImageProcessor would take; raises ValueError for settings it cannot mirror."""
        size = _as_dict(processor.size) if processor.do_resize else None
        if size is not None and set(k for k, v in size.items() if v) != {"shortest_edge"}:
            raise ValueError(f"image processor: only a shortest_edge resize is supported, got size={size}")
        resample = int(processor.resample) if size is not None else 3
        if resample not in _RESAMPLE_MODES:
            raise ValueError(f"image processor: resample={resample} (only bilinear 2 and bicubic 3 are supported)")
        crop_size = _as_dict(processor.crop_size)
        crop = (crop_size["height"], crop_size["width"]) if processor.do_center_crop else None
        if size is not None and crop is not None and min(crop) > size["shortest_edge"]:
            raise ValueError(f"image processor: crop_size {crop} is larger than the resized image's short side")
        mean = std = None
        if processor.do_normalize:
            mean = torch.tensor(processor.image_mean, dtype=torch.float32)
            std = torch.tensor(processor.image_std, dtype=torch.float32)
        return cls(size["shortest_edge"] if size is not None else None, _RESAMPLE_MODES[resample], crop,
                   processor.rescale_factor if processor.do_rescale else None, mean, std)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, h, w) float32 pixel values, on the images' device."""
        images = pixels.permute(0, 3, 1, 2).float()
        height, width = images.shape[-2:]
        if self.shortest_edge is not None:
            # transformers' get_resize_output_image_size: the short side to the size, the long one scaled, floored
            short, long = (height, width) if height <= width else (width, height)
            new_long = int(self.shortest_edge * long / short)
            size = (self.shortest_edge, new_long) if height <= width else (new_long, self.shortest_edge)
            if size != (height, width):
                # antialiased bicubic is PIL's filter (a = -0.5); PIL works on 8-bit images, so round as it does
                images = F.interpolate(images, size=size, mode=self.mode, antialias=True, align_corners=False)
                images = images.round().clamp(0, 255)
            height, width = size
        if self.crop is not None:
            top, left = (height - self.crop[0]) // 2, (width - self.crop[1]) // 2
            images = images[:, :, top:top + self.crop[0], left:left + self.crop[1]]
        if self.rescale is not None:
            images = images * self.rescale
        if self.mean is not None:
            mean, std = self.mean.to(images.device), self.std.to(images.device)
            images = (images - mean[:, None, None]) / std[:, None, None]
        return images


class SafetyScorer:
    """diffusers' StableDiffusionSafetyChecker, scoring without blacking out: `cosines` on the device, then
    `decide` on the host with the checker's own per-image arithmetic, so that `nsfw` is exactly its
    `has_nsfw_concept` and `nsfw_score` the largest of its concept scores."""

    def __init__(self, checker: torch.nn.Module, preprocess: ImagePreprocess):
        self.checker = checker
        self.preprocess = preprocess
        # The thresholds as the checker reads them (`weights[i].item()`: Python floats of the model's dtype).
        self.special_thresholds = [w.item() for w in checker.special_care_embeds_weights]
        self.concept_thresholds = [w.item() for w in checker.concept_embeds_weights]

    @torch.inference_mode()
    def cosines(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3 + 17) float32 on the device: cosine similarity of each image's embedding to the special-care
        concepts, then to the concepts (StableDiffusionSafetyChecker.forward's first lines)."""
        from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

        checker = self.checker
        clip_input = self.preprocess(pixels).to(checker.dtype)
        image_embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
        special = cosine_distance(image_embeds, checker.special_care_embeds).float()
        concept = cosine_distance(image_embeds, checker.concept_embeds).float()
        return torch.cat([special, concept], dim=1)

    def decide(self, cosines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(nsfw_score float32 (N,), nsfw bool (N,)) from `cosines`' rows, as the checker's loop computes them:

            special_i = round(cos_i - w_i + adjustment, 3), adjustment becoming 0.01 once a special_i > 0
            concept_j = round(cos_j - w_j + adjustment, 3);   has_nsfw_concept = any(concept_j > 0)

        in float32, in the same order, so the rounding and the comparisons are the checker's own."""
        num_special = len(self.special_thresholds)
        special, concept = cosines[:, :num_special], cosines[:, num_special:]
        adjustment = np.zeros(len(cosines), dtype=np.float32)
        for index, threshold in enumerate(self.special_thresholds):
            score = np.round(special[:, index] - threshold + adjustment, 3)
            adjustment = np.where(score > 0, np.float32(0.01), adjustment).astype(np.float32)
        scores = np.stack([np.round(concept[:, index] - threshold + adjustment, 3)
                           for index, threshold in enumerate(self.concept_thresholds)], axis=1)
        scores = scores.astype(np.float32)
        return scores.max(axis=1), (scores > 0).any(axis=1)


class ClipScorer:
    """CLIP score as torchmetrics defines it: max(100 x cosine(image embedding, prompt embedding), 0), with the
    prompt cut to CLIP's 77 tokens (BOS, the first 75, EOS)."""

    def __init__(self, model: torch.nn.Module, tokenizer, preprocess: ImagePreprocess):
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess

    def tokens(self, prompts: list[str], pin_memory: bool = False) -> Tokens:
        """Host work, before the device lock."""
        return tokenize_prompts(self.tokenizer, prompts, pin_memory=pin_memory)

    @torch.inference_mode()
    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, projection_dim) on the device, in the model's dtype: CLIP's projected image embeddings, as
        `get_image_features` gives them (not normalised)."""
        return _features(self.model.get_image_features(pixel_values=self.preprocess(pixels).to(self.model.dtype)))

    @torch.inference_mode()
    def scores(self, image: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """(N,) float32 on the device, for N images' `image_embeds` and the first N prompts of `tokens`."""
        model, n = self.model, len(image)
        device = image.device
        input_ids = tokens.input_ids[:n].to(device, non_blocking=True)
        attention_mask = tokens.attention_mask[:n].to(device, non_blocking=True)
        text = _features(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
        image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        return (100 * (image * text).sum(dim=-1)).clamp(min=0)


def _as_dict(size) -> dict:
    """A processor's size setting: a dict in transformers 4, a SizeDict dataclass in transformers 5."""
    return dataclasses.asdict(size) if dataclasses.is_dataclass(size) else dict(size)


def _features(output) -> torch.Tensor:
    """transformers 5 returns the projected embeddings as `pooler_output`, transformers 4 as the tensor itself."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
