"""Committed reflow pairs as training data: a torch IterableDataset sharded by rank and data-loader worker, a Ray
Data dataset, and an optional cache of text embeddings beside the pairs (under `_text-embeddings/`, which readers
that glob the output skip, and `verify` does not take for stray data).

Only committed shards are read (`pipeline.commit.committed_shards`), and only their ok rows. Data files are never
globbed: each marker names its shard's files.

The order of the stream is a pure function of the seed and the number of readers S (ranks × loader workers per
rank): every epoch, a reader's pieces come from a seeded permutation of all pieces (whole shards, or each shard cut
into ceil(S / shards) interleaved parts when there are fewer shards than readers), and each piece's rows come in a
seeded shuffle. A reader holds one shard at a time, never the whole set. Each training step takes the same number
of samples from every reader, so a step count is the whole data-order state, and a resumed stream skips whole
pieces without reading them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import posixpath
from dataclasses import dataclass
from typing import Callable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from instaflow.loading import LatentGeometry
from pipeline.commit import committed_shards
from pipeline.manifest import MANIFEST_NAME
from pipeline.plan import shard_name
from pipeline.storage import OutputError, filesystem, get_bytes, put_atomic, with_retries
from pipeline.writers import TENSOR_SHAPE_KEY, read_tensor_column

logger = logging.getLogger(__name__)

PAIR_COLUMNS = ("key", "prompt", "seed", "status", "noise", "latent")
EMBEDDINGS_DIR = "_text-embeddings"
PAIRS_DIR = "pairs"


class PairsError(ValueError):
    """Pairs that cannot be used as given; the message names the file, row or field."""


@dataclass(frozen=True)
class PairShard:
    unit_id: int
    path: str  # the shard's pair Parquet, a path of the store
    num_ok: int  # rows with status ok, as its marker counts them
    sha256: str | None = None  # the file's digest, as its marker records it


@dataclass(frozen=True)
class PairSet:
    """The committed pair shards of one pairs output, with at least one ok row each."""

    url: str  # as the user gave it
    storage_options: dict
    root: str  # the output root (markers live there), a path of the store
    shards: tuple[PairShard, ...]

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return filesystem(self.url, self.storage_options)[0]

    @property
    def num_pairs(self) -> int:
        return sum(shard.num_ok for shard in self.shards)

    def embeddings_path(self, encoder_id: str, shard: PairShard) -> str:
        """Where a shard's cached text embeddings live: beside the pairs, one folder per text encoder."""
        return posixpath.join(self.root, EMBEDDINGS_DIR, encoder_id, f"{shard_name(shard.unit_id)}.parquet")


def find_pairs(url: str, storage_options: dict | None = None) -> PairSet:
    """The committed pair shards under a pairs output root, or under its `pairs/` folder when given that."""
    storage_options = dict(storage_options or {})
    fs, path = filesystem(url, storage_options)
    root = path.rstrip("/")
    manifest = posixpath.join(root, MANIFEST_NAME)
    if posixpath.basename(root) == PAIRS_DIR and not with_retries(fs.exists, manifest, what=f"look up {manifest}"):
        root = posixpath.dirname(root)  # the pairs/ folder of a job that wrote images too
    try:
        markers = committed_shards(fs, root)
    except OutputError as exc:
        raise PairsError(f"{url}: {exc}") from None
    if not markers:
        raise PairsError(f"{url}: no committed shards yet; is it the output of a pairs job?")
    shards = []
    for unit_id, stats in markers.items():
        name = shard_name(unit_id)
        files = stats.get("files", {})
        pair_file = next((f for f in (f"{PAIRS_DIR}/{name}.parquet", f"{name}.parquet") if f in files), None)
        if pair_file is None:
            raise PairsError(f"{url}: shard {name}'s marker lists no pair file ({name}.parquet), only {sorted(files)}")
        if not isinstance(stats.get("successes"), int):
            raise PairsError(f"{url}: shard {name}'s marker has no 'successes' count of ok rows")
        if stats["successes"] > 0:
            digest = files[pair_file].get("sha256") if isinstance(files, dict) else None
            shards.append(PairShard(unit_id, posixpath.join(root, pair_file), stats["successes"], digest))
    if not shards:
        raise PairsError(f"{url}: its {len(markers)} committed shards hold no ok pairs")
    check_pair_schema(fs, shards[0].path)
    skipped = len(markers) - len(shards)
    logger.info("%s: %d pairs in %d shards%s", url, sum(s.num_ok for s in shards), len(shards),
                f" ({skipped} shards without ok rows skipped)" if skipped else "")
    return PairSet(url, storage_options, root, tuple(shards))


def _read_schema(fs: fsspec.AbstractFileSystem, path: str) -> pa.Schema:
    with fs.open(path, "rb") as f:
        return pq.read_schema(f)


def check_pair_schema(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Fails early, from the footer alone, on a file that is not a pair shard (an images output, say)."""
    schema = with_retries(_read_schema, fs, path, what=f"read {path}")
    missing = [name for name in PAIR_COLUMNS if name not in schema.names]
    if missing:
        raise PairsError(f"{path}: missing columns {missing}; not a pair shard (is this an images output?)")


def check_pairs_fit(pairs: PairSet, geometry: LatentGeometry, model: str) -> None:
    """The pairs' tensors must be the latents `model` (its flag and name) makes of their rows' images: its VAE's
    channels, at the side its scale factor makes of the rows' height and width. Read from the first shard's footer
    and its first row's height and width (one job wrote every shard, at one size)."""
    path = pairs.shards[0].path
    schema = with_retries(_read_schema, pairs.fs, path, what=f"read {path}")
    recorded = json.loads((schema.field("latent").metadata or {}).get(TENSOR_SHAPE_KEY, b"null"))
    if not {"height", "width"} <= set(schema.names):
        raise PairsError(f"{path}: no height and width columns; not a pair shard of this engine")
    first = with_retries(_read_columns, pairs.fs, path, ["height", "width"], what=f"read {path}").slice(0, 1)
    sizes = [first.column(name).to_pylist()[:1] for name in ("height", "width")]
    if not all(len(size) == 1 and isinstance(size[0], int) and size[0] > 0 for size in sizes):
        raise PairsError(f"{path}: its first row's height and width are {sizes}, not image sides")
    [height], [width] = sizes
    expected = list(geometry.shape(height, width))
    if recorded != expected:
        raise PairsError(f"--pairs {pairs.url}: its latents have shape {recorded} for {height}x{width} images, but "
                         f"the VAE of {model} makes {expected} of them ({geometry})")


def _read_columns(fs: fsspec.AbstractFileSystem, path: str, columns: list[str]) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


@dataclass
class ShardRows:
    """A shard's ok rows, in file order."""

    keys: list[str]
    prompts: list[str]
    seeds: np.ndarray  # int64
    noise: np.ndarray  # float32 (N, C, h, w)
    latent: np.ndarray
    prompt_embeds: np.ndarray | None = None  # float32 (N, tokens, hidden), from the cache


def ok_rows(table: pa.Table, path: str) -> ShardRows:
    """The ok rows of a pair table, with their tensors; an ok row without both tensors is an error naming it."""
    missing = [name for name in PAIR_COLUMNS if name not in table.column_names]
    if missing:
        raise PairsError(f"{path}: missing columns {missing}; not a pair shard")
    table = table.filter(pc.equal(table.column("status"), "ok"))
    rows = ShardRows(
        keys=table.column("key").to_pylist(),
        prompts=table.column("prompt").to_pylist(),
        seeds=table.column("seed").to_numpy(zero_copy_only=False).astype(np.int64),
        noise=read_tensor_column(table, "noise"),
        latent=read_tensor_column(table, "latent"),
    )
    for name in ("noise", "latent"):
        bad = np.isnan(getattr(rows, name).reshape(len(rows.keys), -1)).any(axis=1)
        if bad.any():
            key = rows.keys[int(np.argmax(bad))]
            raise PairsError(f"{path}: row with key {key!r} is ok but its {name} is null or NaN")
    return rows


def read_shard(fs: fsspec.AbstractFileSystem, shard: PairShard, embeddings_path: str | None = None) -> ShardRows:
    """One GET for the shard (and one for its cached embeddings), checked against its marker's digest and count."""
    data = get_bytes(fs, shard.path)
    if shard.sha256 is not None and hashlib.sha256(data).hexdigest() != shard.sha256:
        raise PairsError(f"{shard.path}: its bytes do not match the digest its marker recorded")
    table = pq.read_table(pa.BufferReader(data), columns=list(PAIR_COLUMNS))
    rows = ok_rows(table, shard.path)
    if len(rows.keys) != shard.num_ok:
        raise PairsError(f"{shard.path}: {len(rows.keys)} ok rows, but its marker counts {shard.num_ok}")
    if embeddings_path is not None:
        rows.prompt_embeds = read_embeddings(fs, embeddings_path, rows)
    return rows


# ---------------------------------------------------------------------------------------------- text embeddings


def embeddings_table(rows: ShardRows, embeds: np.ndarray) -> pa.Table:
    """Key, prompt and the float32 embedding of each ok row, as a tensor column pair files' readers read."""
    shape = [int(d) for d in embeds.shape[1:]]
    size = int(np.prod(shape))
    values = pa.array(np.ascontiguousarray(embeds, dtype=np.float32).reshape(-1))
    field = pa.field("prompt_embeds", pa.list_(pa.float32(), size), metadata={TENSOR_SHAPE_KEY: json.dumps(shape)})
    return pa.table({"key": rows.keys, "prompt": rows.prompts}).append_column(
        field, pa.FixedSizeListArray.from_arrays(values, size)
    )


def read_embeddings(fs: fsspec.AbstractFileSystem, path: str, rows: ShardRows) -> np.ndarray:
    table = pq.read_table(pa.BufferReader(get_bytes(fs, path)))
    if table.column("key").to_pylist() != rows.keys or table.column("prompt").to_pylist() != rows.prompts:
        raise PairsError(f"{path}: cached embeddings do not match their pair shard's rows; delete it to rebuild it")
    return read_tensor_column(table, "prompt_embeds")


def build_embedding_cache(
    pairs: PairSet, shards: list[PairShard], encoder_id: str, encode: Callable[[list[str]], np.ndarray]
) -> int:
    """Writes the cached embeddings of `shards` that are missing or stale; returns how many were written.

    `encode` maps prompts to float32 embeddings (N, tokens, hidden); `encoder_id` names the tokenizer and text
    encoder, so models with other encoders get their own cache.
    """
    fs, written = pairs.fs, 0
    for shard in shards:
        path = pairs.embeddings_path(encoder_id, shard)
        rows = read_shard(fs, shard)
        if with_retries(fs.exists, path, what=f"look up {path}"):
            try:
                read_embeddings(fs, path, rows)
                continue
            except PairsError as exc:
                logger.warning("rebuilding %s", exc)
        buf = pa.BufferOutputStream()
        pq.write_table(embeddings_table(rows, encode(rows.prompts)), buf)
        put_atomic(fs, path, buf.getvalue().to_pybytes())
        written += 1
    return written


# ----------------------------------------------------------------------------------------------------- the stream


class PairStream(torch.utils.data.IterableDataset):
    """Endless stream of ok pairs for one rank, split over its data-loader workers (see the module docstring).

    Each sample is a dict: `noise`, `latent` (float32 tensors), `prompt`, `key`, `seed`, and `prompt_embeds` when
    `encoder_id` names a built cache. `start_sample` is how many samples every reader has already given (a resumed
    run passes step × samples per reader per step).
    """

    def __init__(self, pairs: PairSet, seed: int, rank: int = 0, world_size: int = 1, start_sample: int = 0,
                 encoder_id: str | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.pairs, self.seed, self.rank, self.world_size = pairs, seed, rank, world_size
        self.start_sample, self.encoder_id = start_sample, encoder_id

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        loader_workers, loader_rank = (info.num_workers, info.id) if info else (1, 0)
        num_readers = self.world_size * loader_workers
        reader = self.rank * loader_workers + loader_rank
        return self.reader_samples(reader, num_readers)

    def parts_per_shard(self, num_readers: int) -> int:
        return math.ceil(num_readers / len(self.pairs.shards))

    def reader_pieces(self, epoch: int, reader: int, num_readers: int) -> list[tuple[PairShard, int]]:
        """This reader's (shard, part) pieces in one epoch, from the epoch's seeded permutation of all pieces."""
        parts = self.parts_per_shard(num_readers)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs.shards) * parts)
        return [(self.pairs.shards[p // parts], p % parts) for p in order[reader::num_readers].tolist()]

    def piece_rows(self, epoch: int, shard: PairShard, part: int, parts: int) -> np.ndarray:
        """Indices of the piece's ok rows, in the epoch's seeded shuffle of its shard."""
        return np.random.default_rng([self.seed, epoch, shard.unit_id]).permutation(shard.num_ok)[part::parts]

    def reader_samples(self, reader: int, num_readers: int) -> Iterator[dict]:
        if self.pairs.num_pairs < num_readers:
            raise PairsError(f"{self.pairs.url}: {self.pairs.num_pairs} ok pairs cannot feed {num_readers} readers")
        fs, parts, to_skip = self.pairs.fs, self.parts_per_shard(num_readers), self.start_sample
        for epoch in itertools.count():
            for shard, part in self.reader_pieces(epoch, reader, num_readers):
                size = len(range(part, shard.num_ok, parts))
                if to_skip >= size:
                    to_skip -= size
                    continue
                cache = self.pairs.embeddings_path(self.encoder_id, shard) if self.encoder_id else None
                rows = read_shard(fs, shard, cache)
                for i in self.piece_rows(epoch, shard, part, parts)[to_skip:].tolist():
                    yield sample_of(rows, i)
                to_skip = 0


def sample_of(rows: ShardRows, i: int) -> dict:
    sample = {
        "noise": torch.from_numpy(rows.noise[i]),
        "latent": torch.from_numpy(rows.latent[i]),
        "prompt": rows.prompts[i],
        "key": rows.keys[i],
        "seed": int(rows.seeds[i]),
    }
    if rows.prompt_embeds is not None:
        sample["prompt_embeds"] = torch.from_numpy(rows.prompt_embeds[i])
    return sample


# ------------------------------------------------------------------------------------------------------- Ray Data


def ray_dataset(pairs: PairSet):
    """The ok pairs as a Ray Data dataset: `key`, `prompt`, `seed`, and `noise`/`latent` as tensor columns."""
    import pyarrow.fs
    import ray.data

    arrow_fs = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(pairs.fs))
    dataset = ray.data.read_parquet([shard.path for shard in pairs.shards], filesystem=arrow_fs, include_paths=True)
    return dataset.select_columns([*PAIR_COLUMNS, "path"]).map_batches(_ray_batch, batch_format="pyarrow")


def _ray_batch(table: pa.Table) -> dict:
    paths = table.column("path").unique().to_pylist() if table.num_rows else []
    rows = ok_rows(table.drop_columns(["path"]), ", ".join(paths))
    return {"key": rows.keys, "prompt": rows.prompts, "seed": rows.seeds, "noise": rows.noise, "latent": rows.latent}
