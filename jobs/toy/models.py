"""The models of the toy reflow reproduction that are not the flow itself, each trained from scratch here.

- an **autoencoder** (diffusers' `AutoencoderKL`; with 4 blocks latents are 1/8 of the image side as SD-1.5's, with 3 1/4):
  reconstruction plus a small KL term, then the latents' scaling factor measured as SD's was (1 / their std);
- a **text encoder** (transformers' `CLIPTextModel`) trained as CLIP's was, contrastively against a small image
  encoder, so the flow gets text embeddings that mean something, as SD-1.5 gets CLIP's;
- a **classifier** of shape, colour, background and position, trained on the real images, that judges samples;
- the **init folder**: a complete diffusers pipeline (the autoencoder, the text encoder, a tokenizer of the
  captions' words, a random-initialised `UNet2DConditionModel`) that the engine's own `encode` and `train` jobs
  take as they take SD-1.5.

All of it runs on the CPU in seconds to minutes, seeded and in one thread order, so a re-run gives the same
weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from torch import nn
from torch.nn import functional as F
from transformers import CLIPTextConfig, CLIPTextModel

from jobs.tiny.pipelines import build_scheduler, build_tokenizer, write_slow_tokenizer_files
from jobs.toy.data import ATTRIBUTES, tokenizer_corpus
from jobs.toy.evaluation import caption_labels, fitting

TEXT_WIDTH = 64  # the text encoder's hidden size, and so the UNet's cross-attention size
TOKENIZER_MERGES = 200
SHAPE_WEIGHT = 3.0


def to_unit_range(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], as diffusers' image processor gives VAEs."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def batches(n: int, batch_size: int, steps: int, seed: int):
    """`steps` index batches drawn from seeded shuffles of range(n), epoch after epoch."""
    rng = np.random.default_rng(seed)
    order, at = rng.permutation(n), 0
    for _ in range(steps):
        if at + batch_size > n:
            order, at = rng.permutation(n), 0
        yield torch.from_numpy(order[at : at + batch_size])
        at += batch_size


def optimizer_step(optimizer, loss: torch.Tensor, step: int, steps: int, log, what: str) -> None:
    """One step of a toy model's training, logged ten times a run."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if (step + 1) % max(1, steps // 10) == 0:
        log(f"{what} step {step + 1}/{steps}: loss {loss.item():.4f}")


# ------------------------------------------------------------------------------------------------ autoencoder


def build_autoencoder(image_size: int, seed: int, blocks: int = 4) -> AutoencoderKL:
    """Latents 1/2^(blocks-1) of the image side: 4 blocks as SD-1.5's autoencoder (1/8)."""
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16, 32, 32)[:blocks],
                         down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, latent_channels=4, layers_per_block=1,
                         norm_num_groups=8, sample_size=image_size, mid_block_add_attention=False)


def shape_mask(x: torch.Tensor) -> torch.Tensor:
    """1 where a pixel differs from its image's background (the median of its border), else 0: N1HW."""
    border = torch.cat([x[:, :, 0, :], x[:, :, -1, :], x[:, :, :, 0], x[:, :, :, -1]], dim=2)
    background = border.median(dim=2).values[:, :, None, None]
    return ((x - background).abs().sum(1, keepdim=True) > 0.1).float()


def train_autoencoder(images: np.ndarray, steps: int, batch_size: int, seed: int, log=print,
                      blocks: int = 4) -> AutoencoderKL:
    """L1 + MSE reconstruction from the latent means, the shape's pixels weighted up, with a KL weight of 1e-4;
    Adam at 2e-3 on a cosine schedule; the scaling factor set to 1 / std of the training images' latent means."""
    vae = build_autoencoder(images.shape[1], seed, blocks).train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for step, index in enumerate(batches(len(images), batch_size, steps, seed)):
        x = to_unit_range(images[index.numpy()])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean
        y = vae.decode(z).sample
        weight = 1.0 + SHAPE_WEIGHT * shape_mask(x)  # the shape is a small part of the image, and all that matters
        error = (y - x).abs() + (y - x).pow(2)
        loss = (weight * error).mean() / weight.mean() + 1e-4 * posterior.kl().mean() / z[0].numel()
        optimizer_step(optimizer, loss, step, steps, log, "autoencoder")
        schedule.step()
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(to_unit_range(images[i : i + 256])).latent_dist.mean
                           for i in range(0, min(len(images), 2048), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return vae


# ----------------------------------------------------------------------------------------------- text encoder


class ImageEncoder(nn.Module):
    """A small CNN: 64x64 images to one vector; the vision side of the toy CLIP and the classifier's body."""

    def __init__(self, width: int = 16, out: int = TEXT_WIDTH):
        super().__init__()
        layers, channels = [], 3
        for c in (width, 2 * width, 2 * width, 4 * width):
            layers += [nn.Conv2d(channels, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            channels = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


def build_text_encoder(vocab_size: int, seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return CLIPTextModel(config)


def train_text_encoder(images: np.ndarray, captions: list[str], drawn: dict[str, np.ndarray], tokenizer, steps: int,
                       batch_size: int, seed: int, log=print) -> CLIPTextModel:
    """CLIP's contrastive loss between the text encoder's pooled output and the image encoder, both projected. A
    caption's positives in a batch are every image it fits (`drawn`: each image's attributes), so `a red shape`
    is pulled toward every red image, not pushed from the ones shown with another caption."""
    text_encoder = build_text_encoder(len(tokenizer), seed).train()
    vision, projection = ImageEncoder(), nn.Linear(TEXT_WIDTH, TEXT_WIDTH, bias=False)
    log_temperature = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))
    parameters = [*text_encoder.parameters(), *vision.parameters(), *projection.parameters(), log_temperature]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.01)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    said = caption_labels(captions)
    for step, index in enumerate(batches(len(images), batch_size, steps, seed)):
        text = F.normalize(projection(text_encoder(ids[index]).pooler_output), dim=-1)
        image = F.normalize(vision(to_unit_range(images[index.numpy()])), dim=-1)
        logits = log_temperature.exp().clamp(max=100) * text @ image.T
        picked = index.numpy()  # caption i's positives: the images j it fits
        positive = torch.from_numpy(fitting({k: v[picked, None] for k, v in said.items()},
                                            {k: np.asarray(v)[None, picked] for k, v in drawn.items()})).float()
        loss = (F.cross_entropy(logits, positive / positive.sum(1, keepdim=True))
                + F.cross_entropy(logits.T, positive.T / positive.T.sum(1, keepdim=True))) / 2
        optimizer_step(optimizer, loss, step, steps, log, "text encoder (contrastive)")
    return text_encoder.eval()


# ------------------------------------------------------------------------------------------------- classifier


class Classifier(nn.Module):
    """One head per attribute (shape, colour, background, position) on the small CNN."""

    def __init__(self):
        super().__init__()
        self.body = ImageEncoder(out=128)
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = F.silu(self.body(x))
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def features(self, images: np.ndarray) -> np.ndarray:
        """The last hidden layer's activations for uint8 NHWC images: the toy FID's feature space."""
        self.eval()
        return torch.cat([F.silu(self.body(to_unit_range(images[i : i + 256]))) for i in range(0, len(images), 256)]
                         ).numpy().astype(np.float64)

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Each attribute's predicted class index for uint8 NHWC images."""
        self.eval()
        parts = [self(to_unit_range(images[i : i + 256])) for i in range(0, len(images), 256)]
        return {name: torch.cat([p[name] for p in parts]).argmax(1).numpy() for name in ATTRIBUTES}


def train_classifier(images: np.ndarray, labels: dict[str, np.ndarray], steps: int, batch_size: int, seed: int,
                     log=print) -> Classifier:
    torch.manual_seed(seed)
    classifier = Classifier().train()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=2e-3, weight_decay=0.01)
    targets = {name: torch.from_numpy(values) for name, values in labels.items()}
    for step, index in enumerate(batches(len(images), batch_size, steps, seed)):
        outputs = classifier(to_unit_range(images[index.numpy()]))
        loss = sum(F.cross_entropy(outputs[name], targets[name][index]) for name in ATTRIBUTES)
        optimizer_step(optimizer, loss, step, steps, log, "classifier")
    return classifier.eval()


def accuracy(predicted: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, float]:
    """`shape_and_colour` (both right: the headline figure) and each attribute's own accuracy."""
    right = {name: predicted[name] == labels[name] for name in ATTRIBUTES}
    return {"shape_and_colour": float(np.mean(right["shape"] & right["colour"])),
            **{name: float(np.mean(value)) for name, value in right.items()}}


# ------------------------------------------------------------------------------------------------ init folder


def build_unet(latent_size: int, widths: tuple[int, int], seed: int, top_attention: bool = True
               ) -> UNet2DConditionModel:
    """The flow's UNet: two levels, attention (self and cross, at the text encoder's width) in the lower one and,
    with `top_attention`, in the upper one too (on 16x16 latents it doubles a training step's time)."""
    torch.manual_seed(seed)
    top = "CrossAttn" if top_attention else ""
    return UNet2DConditionModel(
        block_out_channels=widths, layers_per_block=1, sample_size=latent_size, in_channels=4, out_channels=4,
        down_block_types=(f"{top}DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", f"{top}UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=16)


def toy_tokenizer():
    return build_tokenizer(tokenizer_corpus(), TOKENIZER_MERGES)


def write_init_model(folder: Path, vae: AutoencoderKL, text_encoder: CLIPTextModel, unet: UNet2DConditionModel) -> None:
    """A diffusers folder in SD-1.5's layout (a rectified-flow pipeline's index, as the InstaFlow repos have)."""
    if folder.exists():
        shutil.rmtree(folder)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=toy_tokenizer(), unet=unet,
                                       scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    write_slow_tokenizer_files(folder / "tokenizer", tokenizer_corpus(), TOKENIZER_MERGES)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "RectifiedFlowPipeline"
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
