"""The toy reproduction's report: `report.json`, a static `report.html` (no network: figures inline) and a PNG
copy of each figure under `figures/`."""

from __future__ import annotations

import base64
import html
import io
import json
import posixpath

from PIL import Image, ImageDraw

from jobs.sheet import Cell, FontChain, contact_sheet
from jobs.toy.evaluation import INTERVALS
from pipeline.storage import put_atomic

LABELS = {
    "classifier_real": "classifier on real held-out images",
    "classifier_autoencoded": "classifier on real held-out images through the autoencoder",
    "1rf_1step": "1-RF, 1 step", "1rf_nstep": "1-RF, N steps", "2rf_1step": "2-RF, 1 step",
    "2rf_nstep": "2-RF, N steps", "distilled_from_2rf": "one step, distilled from the 2-RF",
    "distilled_from_1rf": "one step, distilled from the 1-RF (the control)",
}
MEASURE_LABELS = {"real": "real images", "real_again": "real images, a second draw (what a perfect model scores)",
                  **LABELS}
CURVE_COLOURS = {"1rf": (200, 60, 40), "2rf": (40, 90, 200)}


def write_report(fs, root: str, report: dict, grids: dict[str, list[tuple[Image.Image, str]]]) -> None:
    figures = {"straightness": straightness_chart(report["straightness"])}
    for name, samples in grids.items():
        figures[f"samples-{name}"] = contact_sheet([Cell(image, [caption]) for image, caption in samples],
                                                   thumb=128, columns=8, font_size=11, caption_lines=3)
    encoded = {}
    for name, figure in figures.items():
        buffer = io.BytesIO()
        figure.save(buffer, "PNG")
        encoded[name] = buffer.getvalue()
        put_atomic(fs, posixpath.join(root, "figures", f"{name}.png"), encoded[name])
    put_atomic(fs, posixpath.join(root, "report.json"), (json.dumps(report, indent=1) + "\n").encode())
    put_atomic(fs, posixpath.join(root, "report.html"), render(report, encoded).encode())


def straightness_chart(curves: dict[str, dict], width: int = 560, height: int = 320) -> Image.Image:
    """S(t) of each model at the measured flow times, on shared axes from 0."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw, fonts = ImageDraw.Draw(image), FontChain(12)
    left, right, top, bottom = 60, width - 20, 30, height - 40
    times = sorted({float(t) for curve in curves.values() for t in curve["curve"]})
    top_value = max(v for curve in curves.values() for v in curve["curve"].values()) * 1.1 or 1.0

    def xy(t: float, value: float) -> tuple[float, float]:
        return (left + (t - 0.0) / 1.0 * (right - left), bottom - value / top_value * (bottom - top))

    draw.line([(left, top), (left, bottom), (right, bottom)], fill=(0, 0, 0))
    for t in times:
        x, _ = xy(t, 0)
        draw.line([(x, bottom), (x, bottom + 4)], fill=(0, 0, 0))
        fonts.draw(draw, (x - 8, bottom + 6), f"{t:g}")
    for k in range(5):
        value = top_value * k / 4
        _, y = xy(0, value)
        draw.line([(left - 4, y), (left, y)], fill=(0, 0, 0))
        fonts.draw(draw, (4, y - 7), f"{value:.3g}")
    fonts.draw(draw, ((left + right) / 2 - 10, height - 18), "flow time t")
    for i, (model, curve) in enumerate(curves.items()):
        colour = CURVE_COLOURS.get(model, (0, 0, 0))
        points = [xy(float(t), v) for t, v in sorted(curve["curve"].items(), key=lambda item: float(item[0]))]
        draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.line([(right - 150, top + 16 * i + 6), (right - 130, top + 16 * i + 6)], fill=colour, width=2)
        fonts.draw(draw, (right - 125, top + 16 * i - 1), f"{model.upper()}  S = {curve['mean']:.4g}")
    fonts.draw(draw, (left, 6), "S(t) = E ||(X1 − X0) − v(X_t, t)||², held-out pairs")
    return image


MEASURE_COLUMNS = (("held_out", "fid"), ("held_out", "accuracy"), ("held_out", "clean"), ("partial", "fid"),
                   ("partial", "accuracy"), ("partial", "clean"), ("partial", "mode_gap"))


def _interval(values: list[float | None]) -> str:
    return "not measured" if values[0] is None else f"{values[0]:.3g} [{values[1]:.3g}, {values[2]:.3g}]"


def _claim_figure(claim: dict) -> str:
    """The figure a verdict rests on: a difference with its interval, or the two straightness figures."""
    if "headline" in claim:
        return f"({claim['headline'].replace('_', ' ')} difference {_interval(claim[claim['headline']]['difference'])})"
    return f"(S {claim['straightness'][0]:.4g} against {claim['straightness'][1]:.4g}; one-step error " \
           f"{claim['one_step_error'][0]:.4g} against {claim['one_step_error'][1]:.4g})"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def render(report: dict, figures: dict[str, bytes]) -> str:
    claims = report["claims"]
    rows = "".join(
        f"<tr><td>{html.escape(LABELS[name])}</td><td>{report['accuracy'][name]:.3f}</td>"
        + "".join(f"<td>{report['accuracy_detail'][name][k]:.3f}</td>" for k in ("shape", "colour", "background",
                                                                               "position"))
        + "</tr>" for name in LABELS)
    curve_rows = "".join(
        f"<tr><td>{html.escape(model.upper())}</td><td>{curve['mean']:.4g}</td>"
        + "".join(f"<td>{v:.4g}</td>" for _, v in sorted(curve["curve"].items(), key=lambda i: float(i[0])))
        + f"<td>{curve['one_step_error']:.4g}</td></tr>" for model, curve in report["straightness"].items())
    times = sorted(next(iter(report["straightness"].values()))["curve"], key=float)
    grids = "".join(f"<h3>{html.escape(LABELS.get(name[8:], 'real images'))}</h3>"
                    + _img(png, name) for name, png in figures.items() if name.startswith("samples-")
                    and not name.startswith("samples-partial-"))
    partial = "".join(f"<h3>{html.escape(LABELS.get(name[16:], 'real images'))}</h3>"
                      + _img(png, name) for name, png in figures.items() if name.startswith("samples-partial-"))
    measure_heads = "".join(f"<th>{html.escape(f'{set_name}: {name}'.replace('_', ' '))}</th>"
                            for set_name, name in MEASURE_COLUMNS)
    measure_rows = "".join(
        f"<tr><td>{html.escape(MEASURE_LABELS[model])}</td>"
        + "".join(f"<td>{_interval(values[set_name][name]) if name in values[set_name] else ''}</td>"
                  for set_name, name in MEASURE_COLUMNS)
        + "</tr>" for model, values in report["measures"].items())
    seconds = "".join(f"<tr><td>{html.escape(name)}</td><td>{value:.0f}</td></tr>"
                      for name, value in report["seconds"].items())
    verdict = "".join(f"<li>{html.escape(name.replace('_', ' '))}: <b>{html.escape(claim['verdict'])}</b> "
                      f"{html.escape(_claim_figure(claim))}</li>" for name, claim in claims.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Reflow reproduced on a toy set ({html.escape(report['scale'])})</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}</style></head>
<body>
<h1>Reflow reproduced on a toy set ({html.escape(report['scale'])} scale)</h1>
<h2>The paper's claims, as measured here</h2><ul>{verdict}</ul>
<h2>Straightness</h2>
<table><tr><th>model</th><th>S (mean)</th>{''.join(f'<th>S({html.escape(str(t))})</th>' for t in times)}<th>one-step error</th></tr>
{curve_rows}</table>
{_img(figures['straightness'], 'straightness curves')}
<h2>Accuracy on held-out captions</h2>
<p>Shape and colour both right (the headline figure), then each attribute alone.</p>
<table><tr><th>images from</th><th>shape and colour</th><th>shape</th><th>colour</th><th>background</th>
<th>position</th></tr>{rows}</table>
<h2>Distribution measures, with 95% intervals ({html.escape(INTERVALS)})</h2>
<p>Toy FID: Fréchet distance to real images of the same captions in the classifier's features (lower is better).
Clean: one clean shape of the right colour. Accuracy leaves out captions that say nothing. Mode gap: total
variation distance between the labels of the samples and of real images, over what a partial caption leaves out
(lower is better). A second draw of real images, measured as a model is, shows what a perfect model scores.</p>
<table><tr><th>images from</th>{measure_heads}</tr>{measure_rows}</table>
<h2>Samples on held-out captions</h2>{grids}
<h2>Samples of one partial caption</h2>{partial}
<h2>Seconds per phase</h2><table>{seconds}</table>
</body></html>
"""
