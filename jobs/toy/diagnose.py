"""Why the toy's flow draws blobs: a diagnosis outside the reproduction, of the latent grid's size.

The reproduction's autoencoder makes 8x8 latents of 64x64 images (SD-1.5's 1/8), where a shape spans about three
latent cells, and no flow it trained drew the right shapes (jobs/toy/README.md). This trains the same toy's
autoencoder (with `--blocks 3`: 16x16 latents), text encoder and classifier, then a flow in this process with the
engine's reflow loss (instaflow.training.reflow_loss) and Euler steps, and prints the classifier's accuracy on the
autoencoder's reconstructions (the ceiling) and on 1-step and 16-step samples of the held-out captions and of
a fifth of the training captions, as JSON lines. It runs outside the engine's jobs, in one process: a quicker
loop than the reproduction for trying a setting.

    python -m jobs.toy.diagnose --blocks 3 --autoencoder-steps 1200 --flow-steps 1500 --widths 32,64
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from instaflow.training import reflow_loss, velocity
from jobs.toy import models
from jobs.toy.data import draw, split_captions, training_caption
from jobs.toy.evaluation import caption_labels

IMAGE_SIZE = 64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=3, help="the autoencoder's blocks: 4 gives 8x8 latents, 3 16x16")
    parser.add_argument("--autoencoder-steps", type=int, default=1200)
    parser.add_argument("--flow-steps", type=int, default=1500)
    parser.add_argument("--widths", default="32,64", help="the UNet's two levels")
    parser.add_argument("--no-top-attention", action="store_true",
                        help="attention only in the UNet's lower level (a step takes half the time on 16x16 latents)")
    parser.add_argument("--full-caption-share", type=float, default=1.0,
                        help="training images shown with their full caption; the others get a partial one, as in "
                             "the reproduction (0.5 there)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def report(**figures):
        print(json.dumps({"seconds": round(time.perf_counter() - started), **figures}), flush=True)

    training, held_out = split_captions(0.1, 0)
    drawn = [c for c in training for _ in range(8)]
    images = np.stack([draw(c, IMAGE_SIZE, i) for i, c in enumerate(drawn)])
    rng = np.random.default_rng(0)
    prompts = [training_caption(c, args.full_caption_share, rng).text for c in drawn]
    labels = caption_labels([c.text for c in drawn])
    vae = models.train_autoencoder(images, args.autoencoder_steps, 32, 0, log=lambda _: None, blocks=args.blocks)
    tokenizer = models.toy_tokenizer()
    text_encoder = models.train_text_encoder(images, prompts, labels, tokenizer, 400, 128, 0, log=lambda _: None)
    classifier = models.train_classifier(images, labels, 1200, 128, 0, log=lambda _: None)
    held = [c for c in held_out for _ in range(4)]
    held_images = np.stack([draw(c, IMAGE_SIZE, 10**8 + i) for i, c in enumerate(held)])
    with torch.no_grad():
        decoded = vae.decode(vae.encode(models.to_unit_range(held_images)).latent_dist.mean).sample
    report(autoencoder_ceiling=models.accuracy(classifier.predict(to_uint8(decoded)),
                                               caption_labels([c.text for c in held])))

    def embed(texts):
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return text_encoder(ids).last_hidden_state

    scale = vae.config.scaling_factor
    with torch.no_grad():
        latents = torch.cat([vae.encode(models.to_unit_range(images[i : i + 256])).latent_dist.mean
                             for i in range(0, len(images), 256)]) * scale
        embeddings = torch.cat([embed(prompts[i : i + 256]) for i in range(0, len(prompts), 256)])
    side = latents.shape[-1]
    unet = models.build_unet(side, tuple(int(w) for w in args.widths.split(",")), 0, not args.no_top_attention)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=5e-4, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    for step, index in enumerate(models.batches(len(latents), 64, args.flow_steps, 0)):
        for group in optimizer.param_groups:
            group["lr"] = 5e-4 * min(1.0, (step + 1) / max(1, args.flow_steps // 20))
        noise = torch.randn(latents[index].shape, generator=generator)
        t = torch.rand(len(index), generator=generator)
        loss = reflow_loss(unet, noise, latents[index], embeddings[index], t).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % max(1, args.flow_steps // 10) == 0:
            report(flow_step=step + 1, loss=round(loss.item(), 4))
    unet.eval()

    @torch.no_grad()
    def sample(texts, steps):
        x = torch.randn((len(texts), 4, side, side), generator=torch.Generator().manual_seed(7))
        conditioning = embed(texts)
        for i in range(steps):
            x = x + velocity(unet, x, torch.full((len(texts),), i / steps), conditioning) / steps
        return to_uint8(vae.decode(x / scale).sample)

    for name, captions in (("held_out", held), ("training", training[::5])):
        texts = [c.text for c in captions]
        for steps in (1, 16):
            report(captions=name, steps=steps, accuracy=models.accuracy(classifier.predict(sample(texts, steps)),
                                                                         caption_labels(texts)))
    return 0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


if __name__ == "__main__":
    raise SystemExit(main())
