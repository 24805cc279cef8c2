"""InstaFlow's training recipe: reflow to a 2-rectified flow, then distillation to one step, the measures that show
each stage working (straightness, one-step error), the learning-rate warmup and the EMA of the saved weights.

Notation (InstaFlow's): X0 is a pair's recorded noise, X1 the teacher's latent, t in [0, 1] runs from noise to
image, and the UNet is called at timestep 1000·(1 − t), so t = 0 (pure noise) is timestep 1000, where the sampler
in sampling.py starts. Every loss is returned per sample, ||·||² being the mean over a sample's elements (as
diffusers' training scripts' `F.mse_loss`), so callers can average over any batch split the same way.
"""

import contextlib

import torch

from instaflow.sampling import MAX_STEPS

LOSSES = ("reflow", "distill-l2", "distill-lpips")
STRAIGHTNESS_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)
MAX_GRAD_NORM = 1.0


def unet_timestep(t: torch.Tensor) -> torch.Tensor:
    """The UNet's timestep for flow time t: 1000·(1 − t)."""
    return MAX_STEPS * (1.0 - t)


def velocity(unet, x: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
    """v(X, t) in float32, whatever dtype the UNet computes in."""
    return unet(x, unet_timestep(t), encoder_hidden_states=prompt_embeds, return_dict=False)[0].float()


def squared_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a − b||² per sample, as the mean over its elements."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def reflow_loss(unet, noise, latent, prompt_embeds, t: torch.Tensor) -> torch.Tensor:
    """Rectified-flow regression on the straight path from X0 to X1, at the given per-sample times t."""
    t_ = t.float().view(-1, 1, 1, 1)
    x_t = t_ * latent.float() + (1.0 - t_) * noise.float()  # X_t = t·X1 + (1 − t)·X0
    v = velocity(unet, x_t.to(latent.dtype), t, prompt_embeds)  # v(X_t, t) at timestep 1000·(1 − t)
    return squared_error(latent - noise, v)  # ||(X1 − X0) − v||²


def one_step_latent(unet, noise, prompt_embeds) -> torch.Tensor:
    """The one-step sample X1' = X0 + v(X0, t=0), the UNet at timestep 1000, in float32."""
    t = torch.zeros(noise.shape[0], device=noise.device)
    return noise.float() + velocity(unet, noise, t, prompt_embeds)  # X1' = X0 + v(X0, 1000)


def distill_l2_loss(unet, noise, latent, prompt_embeds) -> torch.Tensor:
    """One-step distillation in latent space."""
    return squared_error(one_step_latent(unet, noise, prompt_embeds), latent)  # ||X1' − X1||²


def decode_with_grad(vae, latents: torch.Tensor) -> torch.Tensor:
    """x = D(z / scaling_factor) in [-1, 1], as sampling.decode gives it, but where gradients flow (that one runs
    in inference mode)."""
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]


def distill_lpips_loss(unet, vae, perceptual, noise, latent, prompt_embeds) -> torch.Tensor:
    """One-step distillation in pixel space: both latents decoded, compared by `perceptual` (lpips.LPIPS or any
    module taking two image batches in [-1, 1] and giving one distance per sample). Gradients flow through the
    student's decoding only."""
    student_images = decode_with_grad(vae, one_step_latent(unet, noise, prompt_embeds))  # D(X1')
    with torch.no_grad():
        teacher_images = decode_with_grad(vae, latent)  # D(X1)
    return perceptual(student_images, teacher_images).float().flatten()  # LPIPS(D(X1'), D(X1))


def training_loss(loss: str, unet, noise, latent, prompt_embeds, t=None, vae=None, perceptual=None) -> torch.Tensor:
    """The per-sample loss named by `loss` (one of LOSSES); `t` is needed by reflow, `vae`/`perceptual` by LPIPS."""
    if loss == "reflow":
        return reflow_loss(unet, noise, latent, prompt_embeds, t)
    if loss == "distill-l2":
        return distill_l2_loss(unet, noise, latent, prompt_embeds)
    if loss == "distill-lpips":
        return distill_lpips_loss(unet, vae, perceptual, noise, latent, prompt_embeds)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


@torch.no_grad()
def flow_measures(unet, noise, latent, prompt_embeds, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample measures of how straight the flow is on held-out pairs.

    - `reflow_loss`: the reflow loss at the given random times t;
    - `straightness_{t}`: S(t) = E ||(X1 − X0) − v(X_t, t)||² at each of STRAIGHTNESS_TIMES, and their mean
      `straightness`; a perfectly straight flow has S = 0 everywhere, and then one Euler step is exact;
    - `one_step_error`: ||X0 + v(X0, 1000) − X1||², what distillation lowers.
    """
    n = noise.shape[0]
    measures = {"reflow_loss": reflow_loss(unet, noise, latent, prompt_embeds, t)}
    for at in STRAIGHTNESS_TIMES:
        fixed = torch.full((n,), at, device=noise.device)
        measures[f"straightness_{at}"] = reflow_loss(unet, noise, latent, prompt_embeds, fixed)
    measures["straightness"] = torch.stack([measures[f"straightness_{at}"] for at in STRAIGHTNESS_TIMES]).mean(0)
    measures["one_step_error"] = distill_l2_loss(unet, noise, latent, prompt_embeds)
    return measures


def learning_rate_at(step: int, learning_rate: float, warmup_steps: int) -> float:
    """Linear warmup from learning_rate / warmup_steps at the first step to learning_rate, then constant."""
    if warmup_steps <= 0:
        return learning_rate
    return learning_rate * min(1.0, (step + 1) / warmup_steps)  # lr_k = lr · min(1, (k + 1) / warmup)


class EMA:
    """Exponential moving average of a module's trainable weights, with the warmup of diffusers' `EMAModel`.

    The k-th update (k = 1, 2, ...) uses decay_k = min(decay, (1 + s) / (10 + s)) with s = k − 1, and 0 for the
    first (so the average starts at the weights): short runs move the saved weights too.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay!r}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        """The decay of the update numbered `num_updates` (diffusers' `get_decay` without update_after_step)."""
        s = max(0, self.num_updates - 1)
        if s <= 0:
            return 0.0
        return min(self.decay, (1 + s) / (10 + s))  # decay_k = min(decay, (1 + s) / (10 + s))

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.num_updates += 1
        one_minus_decay = 1.0 - self.current_decay()
        for name, p in module.named_parameters():
            if name in self.shadow:
                shadow = self.shadow[name]
                # s ← s − (1 − d)(s − θ) = d·s + (1 − d)·θ
                shadow.sub_(one_minus_decay * (shadow - p.detach()))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("EMA state does not match the model's trainable parameters")
        self.decay, self.num_updates = float(state["decay"]), int(state["num_updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)

    def weights(self) -> dict[str, torch.Tensor]:
        """The averaged weights by parameter name, for `module.load_state_dict(..., strict=False)`."""
        return self.shadow


class Trainer:
    """The model side of one training step on one device, with no data, storage or Ray: AdamW with linear warmup,
    gradient accumulation over micro-batches, clipping at MAX_GRAD_NORM, bf16 autocast on CUDA (fp32 elsewhere),
    and the EMA (None where a worker keeps none).

    `model` is what the forward passes call: the UNet itself, or DDP around it, which the caller may set.
    """

    def __init__(self, unet: torch.nn.Module, loss: str, learning_rate: float, warmup_steps: int,
                 weight_decay: float, ema_decay: float | None, vae=None, perceptual=None):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.unet = self.model = unet.train().requires_grad_(True)
        self.loss, self.vae, self.perceptual = loss, vae, perceptual
        self.learning_rate, self.warmup_steps = learning_rate, warmup_steps
        self.optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=weight_decay)
        self.ema = EMA(unet, ema_decay) if ema_decay is not None else None
        cuda = next(unet.parameters()).device.type == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step(self, step: int, noise, latent, prompt_embeds, t, micro_batch: int, mean_over: int):
        """Optimizer step number `step` on this batch, in forward passes of `micro_batch` samples; the losses are
        averaged over `mean_over` samples (this worker's share: DDP averages the workers' gradients).

        Returns (the sum of the per-sample losses, the gradient norm before clipping), both on the device.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate_at(step, self.learning_rate, self.warmup_steps)
        loss_sum = torch.zeros((), device=noise.device)
        starts = range(0, noise.shape[0], micro_batch)
        for start in starts:
            part = slice(start, start + micro_batch)
            last = start == starts[-1]
            sync = contextlib.nullcontext() if last or self.model is self.unet else self.model.no_sync()
            with sync:
                with self.autocast:
                    losses = training_loss(self.loss, self.model, noise[part], latent[part], prompt_embeds[part],
                                           t=t[part], vae=self.vae, perceptual=self.perceptual)
                (losses.sum() / mean_over).backward()
            loss_sum += losses.detach().sum()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.unet.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.unet)
        return loss_sum, grad_norm
