"""The toy reproduction's evaluation: distribution measures of each model's samples, each with a bootstrap
confidence interval, and the claims as differences between two models with theirs.

Every measure compares a model's samples with real images of the same captions, per caption, so that a figure can
be resampled over captions (the unit the claims generalise over) and over samples within each caption:

- **toy FID**: the Fréchet distance between the samples' and the real images' features in the classifier's
  last hidden layer (the classifier is trained on real images before any flow, so the features are fixed);
- **clean share**: the share of samples that are one clean shape (one connected region of one palette colour, of a
  plausible size, on a plain background) of the caption's colour where the caption says one;
- **accuracy**: the classifier agrees with every attribute the caption says (shape and colour where both are
  said), over the captions that say something;
- **mode gap** (partial captions): the total variation distance between the classifier's labels of the samples
  and of real images of the caption, over each attribute the caption leaves out, averaged over those attributes.

A second draw of real images of the same captions, measured as a model is, gives each measure's floor (what a
perfect model would score with these sample sizes).

`bootstrap` resamples captions, then samples within each caption, and gives the 2.5 and 97.5 percentiles; for a
claim it resamples two models' samples with the same captions drawn, so the interval is the difference's. The
toy FID's and the mode gap's intervals are a jackknife over captions instead (`jackknife` says why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from jobs.toy.data import ATTRIBUTES, BACKGROUNDS, COLOURS, PARTIAL_CAPTIONS, captions_by_text

BOOTSTRAP_DRAWS = 200
CLEAN_COLOUR_DISTANCE = 60.0  # L1 over RGB: within this of a palette colour counts as that colour
CLEAN_SHARE_OF_SHAPE = 0.9  # of the pixels that are not the background, the share a blend of it and the colour
SHAPE_AREA = (0.02, 0.2)  # of the image: the drawn shapes cover 0.04 to 0.12
CLEAN_RIM = 0.5  # partial blends (alpha 0.15 to 0.85) per pixel of the shape: at most 0.39 drawn, 0.9 and up averaged


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||² + Tr(A + B - 2 (A^½ B A^½)^½), the FID's formula, with numpy's symmetric eigensolver."""
    mu = a.mean(0) - b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)
    return float(mu @ mu + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(cross).sum())


def clean_shapes(images: np.ndarray, colours: list[str | None]) -> np.ndarray:
    """Per image (uint8 NHWC): one clean shape of `colours[i]` (of any palette colour where None) on a plain
    background. Clean: nearly every pixel that is not the background is a blend of the background and the shape's
    colour (edges are antialiased) and the shape's core is that colour, the pixels that are mostly the shape's
    colour form one region of a shape's size, and its rim of partial blends is thin (a drawn shape's is at most 0.4
    of its area). An average of modes (two colours, shapes or places overlaid, or a blur) is not."""
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    backgrounds = np.array(list(BACKGROUNDS.values()), dtype=np.float32)
    clean = np.zeros(len(images), dtype=bool)
    for i, image in enumerate(images.astype(np.float32)):
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        background = np.median(border, axis=0)
        if np.abs(backgrounds - background).sum(-1).min() >= CLEAN_COLOUR_DISTANCE:
            continue  # not a plain background of the palette
        distance = np.abs(image - background).sum(-1)
        foreground = distance > CLEAN_COLOUR_DISTANCE
        if not foreground.any():
            continue
        if colours[i]:
            colour = palette[list(COLOURS).index(colours[i])]
        else:  # the palette colour nearest the shape's core: its half farthest from the background
            core = image[foreground & (distance >= np.median(distance[foreground]))]
            colour = palette[np.abs(palette - np.median(core, axis=0)).sum(-1).argmin()]
        direction = colour - background
        alpha = ((image - background) @ direction / max(float(direction @ direction), 1e-6)).clip(0, 1)
        blended = np.abs(image - (background + alpha[..., None] * direction)).sum(-1) < CLEAN_COLOUR_DISTANCE
        share, fits = (blended & foreground).sum() / foreground.sum(), alpha > 0.5
        if not (share >= CLEAN_SHARE_OF_SHAPE and SHAPE_AREA[0] <= fits.mean() <= SHAPE_AREA[1]):
            continue
        core, rim = alpha > 0.9, (alpha > 0.15) & (alpha < 0.85)
        if core.any() and np.abs(np.median(image[core], axis=0) - colour).sum() < CLEAN_COLOUR_DISTANCE \
                and rim.sum() <= CLEAN_RIM * fits.sum() and _one_region(fits):
            clean[i] = True
    return clean


def _one_region(mask: np.ndarray) -> bool:
    """Whether the mask's pixels form one 8-connected region (a star's thin points touch at corners): grown from
    one pixel until it stops."""
    region = np.zeros_like(mask)
    region.flat[np.flatnonzero(mask)[0]] = True
    while True:
        grown = np.pad(region, 1)
        grown = np.any([grown[1 + dy : 1 + dy + mask.shape[0], 1 + dx : 1 + dx + mask.shape[1]]
                        for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0) & mask
        if (grown == region).all():
            return bool((region == mask).all())
        region = grown


def fitting(said: dict[str, np.ndarray], drawn: dict[str, np.ndarray]) -> np.ndarray:
    """Where every attribute a caption says (its class index; -1: not said) is the one drawn (or predicted);
    broadcast over the arrays' shapes: per sample, or captions by images."""
    return np.all([(said[name] < 0) | (said[name] == drawn[name]) for name in ATTRIBUTES], axis=0)


def mode_gap(predicted: dict[str, np.ndarray], real: dict[str, np.ndarray], left_out: list[str]) -> float:
    """Mean over the left-out attributes of the total variation distance between the two label histograms."""
    gaps = []
    for name in left_out:
        classes = len(ATTRIBUTES[name])
        p = np.bincount(predicted[name], minlength=classes) / len(predicted[name])
        q = np.bincount(real[name], minlength=classes) / len(real[name])
        gaps.append(0.5 * np.abs(p - q).sum())
    return float(np.mean(gaps)) if gaps else 0.0


def bootstrap(statistic, groups: list[tuple[np.ndarray, ...]], seed: int,
              draws: int = BOOTSTRAP_DRAWS) -> tuple[float, float]:
    """The 2.5 and 97.5 percentiles of `statistic(*sets)` over resamples. Each group is one caption's index
    arrays, one per sample set (a model's samples, another model's, the real images); a resample draws captions
    with replacement, then each set's samples within each drawn caption, and passes for each set the list of its
    drawn captions' indices (a caption drawn twice is two entries)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        chosen = [groups[g] for g in rng.integers(len(groups), size=len(groups))]
        values.append(statistic(*map(list, zip(*[[rng.choice(indices, size=len(indices)) for indices in group]
                                                 for group in chosen]))))
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def jackknife(statistic, groups: list[tuple[np.ndarray, ...]]) -> tuple[float, float]:
    """The value ± t(0.975, n − 1) standard errors, the error from deleting one caption at a time. For the Fréchet
    distance and the mode gap, which are biased upward on a sample with repeats: on a bootstrap resample, repeated
    samples raise the Fréchet distance more for diverse samples than for a model that collapses modes (so a
    bootstrap interval would favour the collapsed model), and a total variation distance between two resampled
    histograms sits above the one between the originals (so its interval need not hold the value)."""
    n = len(groups)
    value = statistic(*map(list, zip(*groups)))
    deleted = np.array([statistic(*map(list, zip(*(groups[:i] + groups[i + 1 :])))) for i in range(n)])
    error = np.sqrt((n - 1) / n * ((deleted - deleted.mean()) ** 2).sum())
    half_width = t_quantile(0.975, n - 1) * error
    return value - half_width, value + half_width


def t_quantile(probability: float, degrees_of_freedom: int) -> float:
    """Student's t quantile for probability in [0.5, 0.999], from its density integrated on a fine grid (this
    environment has no scipy): 2.365 for 7 degrees of freedom, 1.997 for 66."""
    if not 0.5 <= probability <= 0.999 or degrees_of_freedom < 1:
        raise ValueError(f"t_quantile takes a probability in [0.5, 0.999] and 1 or more degrees of freedom, got "
                         f"{probability}, {degrees_of_freedom}")
    nu = degrees_of_freedom
    x = np.linspace(0.0, 700.0, 1_400_001)
    log_scale = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
    density = np.exp(log_scale - (nu + 1) / 2 * np.log1p(x * x / nu))
    cdf = 0.5 + np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(x))])
    return float(np.interp(probability, cdf, x))


# --------------------------------------------------------------------------------------------- the evaluation

CAPTIONS = captions_by_text()
PARTIAL_TEXTS = frozenset(caption.text for caption in PARTIAL_CAPTIONS)
JACKKNIFED = ("fid", "mode_gap")  # biased upward on a resample with repeats (`jackknife`)
INTERVALS = f"{' and '.join(JACKKNIFED)} by jackknife over captions, the others by bootstrap over captions and " \
            "samples"
HIGHER_IS_BETTER = {"accuracy": True, "clean": True, "fid": False, "mode_gap": False}
# The claims, fixed before any run: (better model, other model); the headline measure is the toy FID on the partial
# captions (their conditionals have many modes, where reflow should matter most); the others are reported with it.
CLAIMS = {"one_step_2rf_beats_one_step_1rf": ("2rf_1step", "1rf_1step"),
          "distilled_from_2rf_beats_distilled_from_1rf": ("distilled_from_2rf", "distilled_from_1rf")}
HEADLINE = ("partial", "fid")


def caption_labels(prompts: list[str]) -> dict[str, np.ndarray]:
    """Each attribute's class index that each prompt says (-1 where it leaves the attribute out)."""
    said = [CAPTIONS[prompt].labels() for prompt in prompts]
    return {name: np.array([labels[name] for labels in said], dtype=np.int64) for name in ATTRIBUTES}


@dataclass
class Judged:
    """One set of images as the classifier sees them: features, predicted labels, what the captions say."""

    prompts: np.ndarray
    features: np.ndarray
    predicted: dict[str, np.ndarray]
    truth: dict[str, np.ndarray]  # the drawn attributes of real images; what the caption says of a model's
    agrees: np.ndarray  # the predicted labels agree with every attribute the caption says
    clean: np.ndarray

    @classmethod
    def of(cls, classifier, images: np.ndarray, prompts: list[str], drawn: dict[str, np.ndarray] | None) -> "Judged":
        said = caption_labels(prompts)
        predicted = classifier.predict(images)
        return cls(np.array(prompts), classifier.features(images), predicted, drawn if drawn is not None else said,
                   fitting(said, predicted), clean_shapes(images, [CAPTIONS[p].colour for p in prompts]))

    def indices(self, prompt: str) -> np.ndarray:
        return np.flatnonzero(self.prompts == prompt)


def measure(name: str, model: Judged, real: Judged, model_draws: list[np.ndarray],
            real_draws: list[np.ndarray]) -> float:
    """One measure of a model's samples against the real images, from the index arrays of each caption drawn."""
    ours, theirs = np.concatenate(model_draws), np.concatenate(real_draws)
    if name == "accuracy":
        return float(model.agrees[ours].mean())
    if name == "clean":
        return float(model.clean[ours].mean())
    if name == "fid":
        return frechet_distance(model.features[ours], real.features[theirs])
    gaps = []  # mode_gap: per partial caption drawn, over the attributes it leaves out
    for drawn, reference in zip(model_draws, real_draws):
        left_out = [attribute for attribute in ATTRIBUTES if attribute not in CAPTIONS[model.prompts[drawn[0]]].given]
        gaps.append(mode_gap({k: v[drawn] for k, v in model.predicted.items()},
                             {k: v[reference] for k, v in real.predicted.items()}, left_out))
    return float(np.mean(gaps))


def interval(name: str, statistic, groups: list[tuple[np.ndarray, ...]], seed: int) -> tuple[float, float]:
    return jackknife(statistic, groups) if name in JACKKNIFED else bootstrap(statistic, groups, seed)


def caption_groups(prompts: list[str], *judged: Judged) -> list[tuple[np.ndarray, ...]]:
    """Each caption's index arrays in every set, for the captions every set has (a failed row's caption may be
    missing from a model's samples): a figure and its interval, or a difference, cover the same captions."""
    groups = [tuple(j.indices(prompt) for j in judged) for prompt in prompts]
    return [group for group in groups if all(len(indices) for indices in group)]


def evaluate(judged: dict[str, Judged], seed: int) -> dict:
    """Every model's measures on each caption set ([value, low, high] with the 95% interval; None where fewer than
    2 captions could be measured), and each claim's differences, over the captions both models and the real images
    have (for accuracy, those that say something: each difference records how many captions it covers)."""
    real = judged["real"]
    sets = {"held_out": sorted(set(real.prompts) - PARTIAL_TEXTS), "partial": [c.text for c in PARTIAL_CAPTIONS]}
    names = {"held_out": ("accuracy", "clean", "fid"), "partial": ("accuracy", "clean", "fid", "mode_gap")}

    def measured_on(name: str, prompts: list[str]) -> list[str]:
        """A caption that says nothing (`something`) is right whatever is drawn: it has no accuracy to measure."""
        return [p for p in prompts if CAPTIONS[p].given] if name == "accuracy" else prompts

    def figure(name, statistic, groups):
        if len(groups) < 2:
            return [None, None, None]
        return [statistic(*map(list, zip(*groups))), *interval(name, statistic, groups, seed)]

    measures, claims = {}, {}
    for model_name, model in judged.items():  # the real images too: their accuracy and clean share are the ceiling
        measures[model_name] = {}
        for set_name, prompts in sets.items():
            measures[model_name][set_name] = {
                name: figure(name, lambda m, r, name=name: measure(name, model, real, m, r),
                             caption_groups(measured_on(name, prompts), model, real))
                for name in names[set_name] if model_name != "real" or name in ("accuracy", "clean")}
    for claim, (better, other) in CLAIMS.items():
        a, b = judged[better], judged[other]
        claims[claim] = {"models": [better, other], "headline": "_".join(HEADLINE)}
        for set_name, prompts in sets.items():
            for name in names[set_name]:
                groups = caption_groups(measured_on(name, prompts), a, b, real)

                def difference(ia, ib, ir, name=name):
                    return measure(name, a, real, ia, ir) - measure(name, b, real, ib, ir)
                value, low, high = figure(name, difference, groups)
                claims[claim][f"{set_name}_{name}"] = {
                    "difference": [value, low, high], "captions": len(groups),
                    "verdict": "not measured" if value is None else verdict(low, high, HIGHER_IS_BETTER[name])}
        claims[claim]["verdict"] = claims[claim]["_".join(HEADLINE)]["verdict"]
    return {"measures": measures, "claims": claims}


def verdict(low: float, high: float, higher_is_better: bool) -> str:
    """A difference (better model minus the other) whose interval lies on one side of 0, or not."""
    if (low > 0) if higher_is_better else (high < 0):
        return "shown"
    if (high < 0) if higher_is_better else (low > 0):
        return "contradicted"
    return "not shown"
