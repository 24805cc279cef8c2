"""`instaflow-batch preview`: a contact sheet of an output's first samples, to see a dataset at a glance.

It reads committed shards only (pipeline.commit.committed_shards), in shard order, until it has --n samples
that succeeded. Images come from webdataset tars or image Parquet; reflow pairs are shown as their teacher
latents decoded with the teacher's VAE (the model their `teacher` column names, or --vae MODEL).
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jobs.errors import shown
from jobs.main import Parser
from jobs.options import json_object
from jobs.sheet import Cell, contact_sheet
from pipeline.commit import committed_shards
from pipeline.display import safe_line
from pipeline.storage import OutputError, filesystem, get_bytes
from pipeline.writers import read_tensor_column

METADATA_COLUMNS = ["key", "prompt", "seed", "status"]
SCORE_COLUMNS = ["nsfw_score", "nsfw", "clip_score"]  # --scores: read where a shard has them
IMAGE_EXTENSIONS = (".jpg", ".png", ".webp")


class PreviewError(ValueError):
    """The output has nothing to show, or its pairs cannot be decoded; the message says why."""


@dataclass
class Sample:
    key: str
    prompt: str
    seed: int
    image: Image.Image
    scores: dict  # the row's score columns that are present

    def caption(self, show_scores: bool) -> list[str]:
        """The lines under the image (the sheet bounds each to what fits; its values are drawn, not run)."""
        lines = [f"{self.key}  seed {self.seed}"]
        if show_scores:
            lines.append(score_line(self.scores))
        return [*lines, str(self.prompt or "")]


def score_line(scores: dict) -> str:
    """The scores a row has, as numbers: a value of another type (a planted file's) is left out, not formatted."""
    nsfw, clip = _number(scores.get("nsfw_score")), _number(scores.get("clip_score"))
    parts = []
    if nsfw is not None:
        parts.append(f"nsfw {nsfw:.3f}" + (" FLAGGED" if scores.get("nsfw") is True else ""))
    if clip is not None:
        parts.append(f"clip {clip:.1f}")
    return "  ".join(parts) or "no scores"


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def main(argv: list[str], prog: str) -> int:
    parser = Parser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the job's output folder URL (s3://..., a path, ...)")
    parser.add_argument("--out", required=True, help="where to write the sheet (PNG, JPEG, ... by extension)")
    parser.add_argument("--n", type=int, default=64, help="samples to show, the first that succeeded")
    parser.add_argument("--kind", choices=("auto", "images", "pairs"), default="auto",
                        help="what to show of an output that has both (auto: images)")
    parser.add_argument("--vae", metavar="MODEL", help="decode pairs with this model's VAE instead of the teacher's "
                                                         "(when the recorded teacher cannot be reached)")
    parser.add_argument("--scores", action="store_true",
                        help="show each sample's scores (nsfw_score, nsfw, clip_score) where the job made them")
    parser.add_argument("--thumb", type=int, default=256, help="image size on the sheet, in pixels")
    parser.add_argument("--storage-options", type=json_object, default={}, help="JSON passed to fsspec, or @FILE")
    args = parser.parse_args(argv)
    if args.n < 1 or args.thumb < 8:
        parser.error("--n must be at least 1 and --thumb at least 8")
    kind, samples, num_shards = read_samples(args.output, args.n, args.kind, args.vae, args.storage_options)
    sheet = contact_sheet([Cell(s.image, s.caption(args.scores)) for s in samples], args.thumb)
    try:
        sheet.save(args.out)
    except ValueError as exc:  # PIL: an extension it cannot write
        raise PreviewError(f"--out {shown(args.out)}: {exc}") from None
    print(safe_line(f"{args.out}: {len(samples)} {kind} from {num_shards} committed shards of {args.output}"))
    return 0


def read_samples(output: str, n: int, kind: str = "auto", vae: str | None = None,
                 storage_options: dict | None = None) -> tuple[str, list[Sample], int]:
    """(kind shown, up to n samples, shards read)."""
    fs, root = filesystem(output, storage_options)
    try:
        shards = committed_shards(fs, root)
    except OutputError as exc:
        raise PreviewError(f"no committed shards in {output}: {exc}") from None
    if not shards:
        raise PreviewError(f"no committed shards in {output}")
    files = {unit_id: _classify(fs, root, marker["files"]) for unit_id, marker in shards.items()}
    if kind == "auto":
        kind = "images" if any(found["images"] for found in files.values()) else "pairs"
    samples, num_shards, decoder = [], 0, LatentDecoder(vae)
    for unit_id in sorted(files):
        if len(samples) >= n:
            break
        num_shards += 1
        for path in files[unit_id][kind]:
            read = _pair_samples(fs, path, decoder) if kind == "pairs" else _image_samples(fs, path)
            samples += read[: n - len(samples)]
    if not samples:
        raise PreviewError(f"no {kind} that succeeded in the committed shards of {output}")
    return kind, samples, num_shards


def _classify(fs, root: str, names: list[str]) -> dict[str, list[str]]:
    """A shard's data files by what they hold: image tars or image Parquet, pair Parquet (metadata skipped)."""
    found = {"images": [], "pairs": []}
    for name in names:
        path = posixpath.join(root.rstrip("/"), name)
        if name.endswith(".tar"):
            found["images"].append(path)
        elif name.endswith(".parquet"):
            columns = pq.read_schema(fs.open(path, "rb")).names
            if "image" in columns:
                found["images"].append(path)
            elif "latent" in columns:
                found["pairs"].append(path)
    return found


def _image_samples(fs, path: str) -> list[Sample]:
    data = get_bytes(fs, path)
    if path.endswith(".tar"):
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = {member.name: tar.extractfile(member).read() for member in tar.getmembers()}
        rows = [json.loads(body) for name, body in members.items() if name.endswith(".json")]
        images = {posixpath.splitext(name)[0]: body for name, body in members.items() if name.endswith(IMAGE_EXTENSIONS)}
        return [_sample(row, images[row["key"]]) for row in rows if row["status"] == "ok"]
    table = _read_columns(data, [*METADATA_COLUMNS, "image"])
    return [_sample(row, row["image"]["bytes"]) for row in table.to_pylist() if row["status"] == "ok"]


def _read_columns(data: bytes, columns: list[str]) -> pa.Table:
    """`columns` of a Parquet file, and its score columns where it has them."""
    names = pq.read_schema(pa.BufferReader(data)).names
    return pq.read_table(pa.BufferReader(data), columns=[*columns, *(c for c in SCORE_COLUMNS if c in names)])


def _sample(row: dict, image: bytes | Image.Image) -> Sample:
    image = image if isinstance(image, Image.Image) else Image.open(io.BytesIO(image))
    return Sample(str(row["key"]), str(row["prompt"] or ""), row["seed"], image,
                  {c: row[c] for c in SCORE_COLUMNS if c in row})


def _pair_samples(fs, path: str, decoder: "LatentDecoder") -> list[Sample]:
    table = _read_columns(get_bytes(fs, path), [*METADATA_COLUMNS, "teacher", "latent"])
    ok = [i for i, status in enumerate(table.column("status").to_pylist()) if status == "ok"]
    if not ok:
        return []
    rows = table.take(ok)
    pixels = decoder.decode(read_tensor_column(rows, "latent"), rows.column("teacher")[0].as_py())
    return [_sample(row, Image.fromarray(image))
            for row, image in zip(rows.drop_columns(["teacher", "latent"]).to_pylist(), pixels)]


class LatentDecoder:
    """Decodes teacher latents on the CPU as the student's images are decoded, with the teacher's VAE (loaded once
    per teacher) or with `vae_model`'s when one is given."""

    def __init__(self, vae_model: str | None):
        self.vae_model = vae_model
        self._vaes: dict[str, object] = {}

    def decode(self, latents: np.ndarray, teacher: str, batch_size: int = 8) -> np.ndarray:
        """uint8 (N, H, W, 3) images of (N, 4, h, w) latents."""
        import torch

        from instaflow.sampling import decode_to_pixels

        vae = self._vae(self.vae_model or teacher)
        with torch.no_grad():
            return np.concatenate([
                decode_to_pixels(vae, torch.from_numpy(latents[i : i + batch_size])).cpu().numpy()
                for i in range(0, len(latents), batch_size)
            ])

    def _vae(self, model: str):
        if model not in self._vaes:
            from diffusers import AutoencoderKL

            from instaflow.loading import ModelLoadError, resolve_model_dir

            try:
                self._vaes[model] = AutoencoderKL.from_pretrained(resolve_model_dir(model) / "vae").eval()
            except (ModelLoadError, OSError, ValueError) as exc:
                hint = "" if self.vae_model else ("; pass --vae MODEL (a model with the same VAE, e.g. SD-1.5) "
                                                  "to decode with that one")
                raise PreviewError(f"cannot load the VAE of {model!r} to decode the pairs ({exc}){hint}") from None
        return self._vaes[model]
