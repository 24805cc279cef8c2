"""`instaflow-batch report`: one self-contained HTML page about an output, to open in the morning before training.

The page needs no network and no other file: images are inlined, the chart is inline SVG, the one script is
inline. It shows `verify`'s verdict and problems, a gallery of the first samples (prompt, key, seed, scores when
present; for pairs, the decoded noise beside the decoded teacher latent), a table of the committed shards (rows,
failures, worker, timings, when each was committed), samples committed over time, the failed rows with their
reasons, and the job's identity and settings and the runs of its lineage. It reads committed shards only, on any fsspec
URL. The script marks the page's <body> with how many images decoded, for browsers and tests to check.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import posixpath
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jobs.errors import shown
from jobs.main import Parser
from jobs.options import json_object
from jobs.preview import LatentDecoder, PreviewError, Sample, read_samples, score_line
from pipeline.commit import committed_shards
from pipeline.display import MESSAGE_CHARS, safe_line
from pipeline.manifest import read_manifest
from pipeline.storage import OutputError, filesystem, get_bytes
from pipeline.verify import verify_output
from pipeline.writers import read_tensor_column

THUMB = 192  # gallery image side, in pixels
MAX_FAILED_ROWS = 200


class ReportError(ValueError):
    """The output cannot be reported on; the message says why."""


@dataclass
class Report:
    output: str
    manifest: dict
    verdict: object  # pipeline.verify.VerifyReport
    shards: dict[int, dict]  # committed shards' markers, by unit id
    kind: str = "images"
    samples: list[Sample] = field(default_factory=list)
    noise_images: dict[str, Image.Image] = field(default_factory=dict)  # pairs: decoded noise, by key
    failed_rows: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)


def main(argv: list[str], prog: str) -> int:
    parser = Parser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the job's output folder URL (s3://..., a path, ...)")
    parser.add_argument("--out", required=True, help="the HTML file to write")
    parser.add_argument("--n", type=int, default=64, help="samples in the gallery, the first that succeeded")
    parser.add_argument("--vae", metavar="MODEL", help="decode pairs with this model's VAE instead of the teacher's")
    parser.add_argument("--storage-options", type=json_object, default={}, help="JSON passed to fsspec, or @FILE")
    args = parser.parse_args(argv)
    if args.n < 0:
        parser.error("--n must be 0 or more")
    page = render(gather(args.output, args.n, args.vae, args.storage_options))
    try:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(page)
    except OSError as exc:
        raise ReportError(f"--out {shown(args.out)}: {exc.strerror or exc}") from None
    print(safe_line(f"{args.out}: a report of {args.output} ({len(page) // 1024} KiB)"))
    return 0


def gather(output: str, n: int, vae: str | None = None, storage_options: dict | None = None) -> Report:
    fs, root = filesystem(output, storage_options)
    manifest = read_manifest(fs, root)
    if manifest is None:
        raise ReportError(f"{output} has no _job.json: not an output of this tool, or no job has started there")
    try:
        shards = committed_shards(fs, root)
    except OutputError as exc:
        raise ReportError(f"{output}: {exc}") from None
    report = Report(output, manifest, verify_output(output, storage_options), shards)
    if shards and n:
        try:
            report.kind, report.samples, _ = read_samples(output, n, "auto", vae, storage_options)
        except PreviewError:  # no sample succeeded: the failed rows say why
            pass
        if report.kind == "pairs" and report.samples:
            report.noise_images = _decoded_noise(fs, root, shards, {s.key for s in report.samples}, vae)
    report.failed_rows = _failed_rows(fs, root, shards)
    return report


def _metadata_files(shards: dict[int, dict]) -> list[str]:
    """Each committed shard's metadata Parquet (images' beside their tar, or the pairs'), in shard order."""
    return [name for _, marker in sorted(shards.items()) for name in sorted(marker["files"])
            if name.endswith(".parquet")]


def _failed_rows(fs, root: str, shards: dict[int, dict]) -> list[tuple[str, str]]:
    rows = []
    for name in _metadata_files(shards):
        table = pq.read_table(pa.BufferReader(get_bytes(fs, posixpath.join(root, name))),
                              columns=["key", "status", "error_message"])
        rows += [(str(row["key"]), str(row["error_message"] or "")[:MESSAGE_CHARS])  # as the data has them: any type
                 for row in table.to_pylist() if row["status"] != "ok"]
        if len(rows) >= MAX_FAILED_ROWS:
            break
    return rows[:MAX_FAILED_ROWS]


def _decoded_noise(fs, root: str, shards: dict[int, dict], keys: set[str], vae: str | None) -> dict[str, Image.Image]:
    """The starting noise of the gallery's pairs, decoded with the same VAE as their latents."""
    decoder, found = LatentDecoder(vae), {}
    for name in _metadata_files(shards):
        data = get_bytes(fs, posixpath.join(root, name))
        if "noise" not in pq.read_schema(pa.BufferReader(data)).names:
            continue
        table = pq.read_table(pa.BufferReader(data), columns=["key", "status", "teacher", "noise"])
        wanted = [i for i, (key, status) in enumerate(zip(table.column("key").to_pylist(),
                                                          table.column("status").to_pylist()))
                  if key in keys and status == "ok"]
        if wanted:
            rows = table.take(wanted)
            pixels = decoder.decode(read_tensor_column(rows, "noise"), rows.column("teacher")[0].as_py())
            found |= {key: Image.fromarray(image) for key, image in zip(rows.column("key").to_pylist(), pixels)}
        if len(found) == len(keys):
            break
    return found


# ------------------------------------------------------------------------------------------------------- the page

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
th { background: #f4f4f4; } .num { text-align: right; } .ok { color: #176f2c; } .bad { color: #b00020; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; } figure { width: 192px; margin: 0; }
figure img { width: 192px; height: 192px; object-fit: cover; display: block; background: #eee; }
figure.pair { width: 396px; } figure.pair img { display: inline-block; }
figcaption { font-size: 12px; word-wrap: break-word; } pre { background: #f8f8f8; padding: 8px; overflow: auto; }
"""

SCRIPT = """
window.addEventListener("load", () => {
  const images = Array.from(document.querySelectorAll("img"));
  const decoded = images.filter((img) => img.complete && img.naturalWidth > 0).length;
  document.body.dataset.images = String(images.length);
  document.body.dataset.imagesDecoded = String(decoded);
  document.body.dataset.shardRows = String(document.querySelectorAll("#shards tbody tr").length);
});
"""


def render(report: Report) -> str:
    e = html.escape
    verdict = report.verdict
    parts = [
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>instaflow-batch report: {e(report.output)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{e(report.output)}</h1>",
        f"<p>verify: <b class='{'ok' if verdict.ok else 'bad'}'>{'OK' if verdict.ok else 'NOT OK'}</b>, "
        f"{verdict.committed_units} of {verdict.planned_units} shards committed, "
        + ", ".join(f"{count} {task} rows" for task, count in sorted(verdict.rows.items()))
        + f", {len(verdict.failed_rows)} failed rows</p>",
        _problems(verdict.problems),
        f"<h2>Gallery: the first {len(report.samples)} {report.kind} that succeeded</h2>", _gallery(report),
        "<h2>Shards</h2>", _shard_table(report.shards),
        "<h2>Samples committed over time</h2>", _throughput_svg(report.shards),
        f"<h2>Failed rows ({len(report.failed_rows)}{'+' if len(report.failed_rows) >= MAX_FAILED_ROWS else ''})</h2>",
        _failed_table(report.failed_rows),
        "<h2>Job</h2>", _settings(report.manifest),
        f"<script>{SCRIPT}</script></body></html>",
    ]
    return "\n".join(parts)


def _problems(problems: list[str]) -> str:
    if not problems:
        return "<p>no problems</p>"
    return "<ul class='bad'>" + "".join(f"<li>{html.escape(p)}</li>" for p in problems) + "</ul>"


def _settings(manifest: dict) -> str:
    e = html.escape
    spec = manifest.get("spec", {})
    rows = "".join(f"<tr><th>{e(str(key))}</th><td>{e(json.dumps(value, sort_keys=True))}</td></tr>"
                   for key, value in sorted(spec.items()))
    lineage = manifest.get("lineage", [])
    inputs = manifest.get("inputs", [])
    progress = manifest.get("progress", {})
    return (f"<p>{len(inputs)} input files; prompts {e(str(manifest.get('prompts', '')))}</p>"
            f"<p>runs in its lineage (oldest first): {e(', '.join(lineage))}</p>"
            f"<details open><summary>identity and settings</summary><table id='settings'>{rows}</table></details>"
            f"<details><summary>the last run's summary</summary>"
            f"<pre>{e(json.dumps(progress, indent=2, sort_keys=True))}</pre></details>")


def _committed_at(marker: dict) -> float:
    """When the shard's try finished: its start plus its timed phases."""
    timings = marker.get("timings", {})
    return marker.get("started_at", 0.0) + sum(v for k, v in timings.items() if k != "encode_wait_s")


def _time(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _shard_table(shards: dict[int, dict]) -> str:
    e = html.escape
    head = ("<tr><th>shard</th><th>rows</th><th>ok</th><th>failed</th><th>truncated</th><th>worker</th>"
            "<th>try</th><th>read s</th><th>generate s</th><th>write s</th><th>committed at (UTC)</th></tr>")
    body = []
    for unit_id, marker in sorted(shards.items()):
        worker = marker.get("worker", {})
        where = f"{str(worker.get('node_id', ''))[:8]} pid {worker.get('pid', '')} {worker.get('device', '')}"
        timings = marker.get("timings", {})
        counts = "".join(f"<td class='num'>{e(str(marker.get(name, '')))}</td>"
                         for name in ("count", "successes", "failed", "truncated"))
        body.append(
            f"<tr><td>{unit_id:05d}</td>{counts}<td>{e(where)}</td>"
            f"<td class='num'>{e(str(marker.get('attempt', '')))}</td>"
            + "".join(f"<td class='num'>{timings.get(name, 0.0):.2f}</td>" for name in ("read_s", "generate_s",
                                                                                      "shard_s"))
            + f"<td>{_time(_committed_at(marker))}</td></tr>")
    return f"<table id='shards'><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def _throughput_svg(shards: dict[int, dict], width: int = 640, height: int = 200) -> str:
    """Samples committed so far against time since the first shard started, as an inline SVG line."""
    if not shards:
        return "<p>no shard committed yet</p>"
    start = min(marker.get("started_at", 0.0) for marker in shards.values())
    points = sorted((_committed_at(marker) - start, marker.get("count", 0)) for marker in shards.values())
    times, totals = [0.0], [0]
    for t, count in points:
        times.append(t)
        totals.append(totals[-1] + count)
    span, top = max(times[-1], 1e-9), max(totals[-1], 1)
    path = " ".join(f"{40 + (width - 60) * t / span:.1f},{height - 30 - (height - 50) * n / top:.1f}"
                    for t, n in zip(times, totals))
    rate = totals[-1] / span
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
            f"aria-label='samples committed over time'>"
            f"<line x1='40' y1='{height - 30}' x2='{width - 20}' y2='{height - 30}' stroke='#999'/>"
            f"<line x1='40' y1='20' x2='40' y2='{height - 30}' stroke='#999'/>"
            f"<polyline fill='none' stroke='#1f77b4' stroke-width='2' points='{path}'/>"
            f"<text x='40' y='14' font-size='12'>{totals[-1]} samples</text>"
            f"<text x='{width - 20}' y='{height - 10}' font-size='12' text-anchor='end'>{span:.1f} s</text>"
            f"</svg><p>{rate:.2f} samples/s from the first shard's start to the last shard's commit</p>")


def _data_uri(image: Image.Image) -> str:
    thumb = image.convert("RGB")
    thumb.thumbnail((THUMB, THUMB))
    buffer = io.BytesIO()
    thumb.save(buffer, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _gallery(report: Report) -> str:
    e = html.escape
    if not report.samples:
        return "<p>no sample succeeded in the committed shards</p>"
    figures = []
    for sample in report.samples:
        caption = f"{e(str(sample.key))} seed {e(str(sample.seed))}<br>{e(str(sample.prompt or ''))}"
        if sample.scores:
            caption += f"<br>{e(score_line(sample.scores))}"
        noise = report.noise_images.get(sample.key)
        if noise is not None:
            figures.append(f"<figure class='pair'><img src='{_data_uri(noise)}' alt='noise {e(sample.key)}'> "
                           f"<img src='{_data_uri(sample.image)}' alt='teacher latent {e(sample.key)}'>"
                           f"<figcaption>noise, then where the teacher took it: {caption}</figcaption></figure>")
        else:
            figures.append(f"<figure><img src='{_data_uri(sample.image)}' alt='{e(sample.key)}'>"
                           f"<figcaption>{caption}</figcaption></figure>")
    return f"<div class='gallery' id='gallery'>{''.join(figures)}</div>"


def _failed_table(rows: list[tuple[str, str]]) -> str:
    if not rows:
        return "<p>none</p>"
    body = "".join(f"<tr><td>{html.escape(key)}</td><td>{html.escape(reason)}</td></tr>" for key, reason in rows)
    return f"<table id='failed'><tr><th>key</th><th>reason</th></tr>{body}</table>"

