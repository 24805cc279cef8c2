"""The training recipe against a separate transcription of InstaFlow's formulas, and EMA against diffusers'."""

import pytest
import torch

from jobs.tiny.pipelines import build_unet, build_vae
from instaflow.training import (
    EMA,
    STRAIGHTNESS_TIMES,
    Trainer,
    flow_measures,
    learning_rate_at,
    training_loss,
)

N = 3


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(N, 4, 8, 8, generator=generator)
    latent = 0.8 * torch.randn(N, 4, 8, 8, generator=generator) + 0.3
    embeds = torch.randn(N, 77, 32, generator=generator)
    t = torch.tensor([0.05, 0.5, 0.93])
    return noise, latent, embeds, t


@pytest.fixture(scope="module")
def unet():
    return build_unet(seed=7)


def transcribed_velocity(unet, x, timestep, embeds):
    """One sample at a time, the UNet called as diffusers documents it."""
    return unet(x[None], torch.tensor([timestep]), encoder_hidden_states=embeds[None]).sample[0]


def transcribed_reflow(unet, noise, latent, embeds, t):
    losses = []
    for x0, x1, c, ti in zip(noise, latent, embeds, t.tolist()):
        x_t = ti * x1 + (1 - ti) * x0
        v = transcribed_velocity(unet, x_t, 1000 * (1 - ti), c)
        losses.append(((x1 - x0 - v) ** 2).mean())
    return torch.stack(losses)


def transcribed_one_step(unet, noise, embeds):
    return torch.stack([x0 + transcribed_velocity(unet, x0, 1000.0, c) for x0, c in zip(noise, embeds)])


class FeatureDistance(torch.nn.Module):
    """A stand-in for LPIPS with a random backbone (the real one downloads its weights): per-sample distance of
    fixed random conv features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.conv = torch.nn.Conv2d(3, 5, 3)

    def forward(self, a, b):
        return (self.conv(a) - self.conv(b)).pow(2).mean(dim=(1, 2, 3), keepdim=True)


def test_reflow_loss_equals_transcription(unet, batch):
    noise, latent, embeds, t = batch
    with torch.no_grad():
        ours = training_loss("reflow", unet, noise, latent, embeds, t=t)
        want = transcribed_reflow(unet, noise, latent, embeds, t)
    assert ours.shape == (N,)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)
    # Not a constant: the loss moves with t.
    with torch.no_grad():
        other = training_loss("reflow", unet, noise, latent, embeds, t=1 - t)
    assert (other - ours).abs().max() > 1e-3


def test_distillation_losses_equal_transcription(unet, batch):
    noise, latent, embeds, _ = batch
    vae, perceptual = build_vae(), FeatureDistance()
    with torch.no_grad():
        one_step = transcribed_one_step(unet, noise, embeds)
        l2 = training_loss("distill-l2", unet, noise, latent, embeds)
        lpips = training_loss("distill-lpips", unet, noise, latent, embeds, vae=vae, perceptual=perceptual)
        want_l2 = ((one_step - latent) ** 2).flatten(1).mean(1)
        images = vae.decode(one_step / vae.config.scaling_factor).sample
        targets = vae.decode(latent / vae.config.scaling_factor).sample
        want_lpips = perceptual(images, targets).flatten()
    torch.testing.assert_close(l2, want_l2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lpips, want_lpips, rtol=1e-4, atol=1e-7)


def test_lpips_gradient_reaches_the_unet_only(unet, batch):
    noise, latent, embeds, _ = batch
    vae = build_vae()
    unet.zero_grad()
    latent = latent.clone().requires_grad_(True)
    training_loss("distill-lpips", unet, noise, latent, embeds, vae=vae, perceptual=FeatureDistance()).sum().backward()
    assert latent.grad is None  # the teacher's image is a fixed target
    assert unet.conv_out.weight.grad.abs().sum() > 0
    unet.zero_grad()


def test_flow_measures_equal_transcription(unet, batch):
    noise, latent, embeds, t = batch
    measures = flow_measures(unet, noise, latent, embeds, t)
    with torch.no_grad():
        for at in (0.1, 0.7):
            want = transcribed_reflow(unet, noise, latent, embeds, torch.full((N,), at))
            torch.testing.assert_close(measures[f"straightness_{at}"], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(measures["reflow_loss"], transcribed_reflow(unet, noise, latent, embeds, t),
                                   rtol=1e-5, atol=1e-6)
        one_step = transcribed_one_step(unet, noise, embeds)
        torch.testing.assert_close(measures["one_step_error"], ((one_step - latent) ** 2).flatten(1).mean(1),
                                   rtol=1e-5, atol=1e-6)
    each = torch.stack([measures[f"straightness_{at}"] for at in STRAIGHTNESS_TIMES])
    torch.testing.assert_close(measures["straightness"], each.sum(0) / 5)


def test_ema_follows_diffusers_ema_model():
    from diffusers.training_utils import EMAModel

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[1].bias.requires_grad_(False)  # frozen parameters are not averaged
    ours = EMA(model, decay=0.5)
    theirs = EMAModel(model.parameters(), decay=0.5, foreach=False)
    generator = torch.Generator().manual_seed(3)
    for _ in range(25):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator))
        ours.update(model)
        theirs.step(model.parameters())
        assert ours.current_decay() == theirs.cur_decay_value
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    shadows = dict(zip([name for name, _ in model.named_parameters()], theirs.shadow_params))
    for name in trainable:
        torch.testing.assert_close(ours.weights()[name], shadows[name], rtol=0, atol=1e-6)
    assert ours.current_decay() == 0.5  # the warmup (1 + s) / (10 + s) passed 0.5 at s = 9: capped at decay
    assert not torch.equal(ours.weights()["0.weight"], model[0].weight)


def test_ema_warmup_values():
    ema = EMA(torch.nn.Linear(2, 2), decay=0.9999)
    decays = []
    for _ in range(4):
        ema.num_updates += 1
        decays.append(ema.current_decay())
    assert decays == [0.0, 2 / 11, 3 / 12, 4 / 13]


def test_learning_rate_warmup():
    assert [learning_rate_at(k, 1.0, 4) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert learning_rate_at(0, 3e-5, 0) == 3e-5


def test_accumulated_micro_batches_step_like_the_whole_batch(batch):
    """Four forward passes of one sample against one of four: the same step, clipping and EMA included."""
    noise, latent, embeds, t = (torch.cat([x, x[:1]]) for x in batch)
    results = []
    for micro in (4, 1):
        trainer = Trainer(build_unet(seed=7), "reflow", 1e-3, warmup_steps=2, weight_decay=1e-2, ema_decay=0.5)
        for step in range(3):
            loss_sum, grad_norm = trainer.step(step, noise, latent, embeds, t, micro_batch=micro, mean_over=4)
        results.append((trainer.unet.state_dict(), trainer.ema.weights(), float(loss_sum), float(grad_norm)))
    (whole, whole_ema, whole_loss, whole_norm), (parts, parts_ema, parts_loss, parts_norm) = results
    for name in whole:  # Adam moves a weight whose gradient is ~0 by up to lr on rounding alone: atol well below lr
        torch.testing.assert_close(parts[name], whole[name], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(parts_ema[name], whole_ema[name], rtol=1e-4, atol=1e-4)
    assert parts_loss == pytest.approx(whole_loss, rel=1e-5) and parts_norm == pytest.approx(whole_norm, rel=1e-4)
    assert whole_norm > 1.0  # so clipping at 1 took part
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-3  # warmed up by the third step
