"""Plan a job from Parquet footers alone: list input files and cut them into work units."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import with_retries

log = logging.getLogger(__name__)

_GLOB_CHARS = "*?["
_FOOTER_THREADS = 16
_MTIME_KEYS = ("mtime", "LastModified", "last_modified", "created")


class InputError(ValueError):
    """The job's input cannot be used as given; the message names the file or column."""


@dataclass(frozen=True)
class InputFile:
    path: str
    size: int
    etag: str | None
    mtime: str | None
    num_rows: int
    row_group_rows: tuple[int, ...]


@dataclass(frozen=True)
class WorkUnit:
    unit_id: int
    path: str
    first_row: int  # row index within the file
    num_rows: int
    first_key_index: int  # row index across all input files in plan order; derives default keys

    @property
    def shard(self) -> str:
        return shard_name(self.unit_id)


def shard_name(unit_id: int) -> str:
    """Output file stem of a unit; zero-padded so names sort in unit order."""
    return f"{unit_id:05d}"


def list_input_files(fs: fsspec.AbstractFileSystem, path: str, prompt_column: str = "prompt") -> list[InputFile]:
    """Input files at a file, folder (every *.parquet below it) or glob, sorted by path.

    Reads only each file's footer, and checks its columns so bad input fails before any work starts.
    """
    infos = _find_files(fs, path)
    if not infos:
        raise InputError(f"no Parquet files found at {fs.unstrip_protocol(path)}")
    infos = sorted(infos, key=lambda i: i["name"])
    names = [fs.unstrip_protocol(i["name"]) for i in infos]

    def footer(name: str) -> tuple[pa.Schema, tuple[int, ...]]:
        return with_retries(_read_footer, fs, name, what=f"read footer of {name}")

    # Footers are tiny, so planning time is round trips: fetch them concurrently, keep the order.
    with ThreadPoolExecutor(max_workers=_FOOTER_THREADS) as pool:
        footers = list(pool.map(footer, names))
    files = []
    for name, info, (schema, row_group_rows) in zip(names, infos, footers):
        validate_columns(name, schema, prompt_column)
        files.append(
            InputFile(
                path=name,
                size=int(info["size"]),
                etag=_etag(info),
                mtime=_mtime(info),
                num_rows=sum(row_group_rows),
                row_group_rows=row_group_rows,
            )
        )
    return files


def _find_files(fs: fsspec.AbstractFileSystem, path: str) -> list[dict]:
    fs.invalidate_cache()  # listings must be current: they decide what the job covers
    if any(c in path for c in _GLOB_CHARS):
        found = fs.glob(path, detail=True).values()
        return [i for i in found if i["type"] == "file"]
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return []
    if info["type"] == "directory":
        found = fs.find(path, detail=True).values()
        return [i for i in found if i["type"] == "file" and i["name"].endswith(".parquet")]
    return [info]


def _read_footer(fs: fsspec.AbstractFileSystem, path: str) -> tuple[pa.Schema, tuple[int, ...]]:
    # cache_type="none": fetch only the byte ranges pyarrow asks for (the footer), not whole blocks.
    with fs.open(path, "rb", cache_type="none") as f:
        try:
            parquet = pq.ParquetFile(f)
        except pa.ArrowInvalid as e:
            raise InputError(f"{path}: not a valid Parquet file ({e})") from None
        meta = parquet.metadata
        return parquet.schema_arrow, tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))


def _etag(info: dict) -> str | None:
    etag = info.get("ETag", info.get("etag"))
    return None if etag is None else str(etag).strip('"')


def _mtime(info: dict) -> str | None:
    for key in _MTIME_KEYS:
        if info.get(key) is not None:
            return str(info[key])
    return None


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def validate_columns(path: str, schema: pa.Schema, prompt_column: str) -> None:
    """Raise InputError if the file lacks the prompt column or an optional column has a wrong type."""
    if prompt_column not in schema.names:
        raise InputError(f"{path}: no column {prompt_column!r}; columns are {schema.names}")
    checks = {
        prompt_column: (_is_string, "a string"),
        "id": (lambda t: _is_string(t) or pa.types.is_integer(t), "a string or an integer"),
        "seed": (pa.types.is_integer, "an integer"),
        "negative_prompt": (_is_string, "a string"),
    }
    for column, (ok, expected) in checks.items():
        type_ = schema.field(column).type if column in schema.names else None
        if type_ is not None and not (ok(type_) or pa.types.is_null(type_)):  # null: every value missing
            raise InputError(f"{path}: column {column!r} must be {expected}, not {type_}")


def plan_units(files: list[InputFile], rows_per_unit: int) -> list[WorkUnit]:
    """Cut files into units of whole row groups totalling at most rows_per_unit rows.

    A row group larger than rows_per_unit is split into slices of rows_per_unit rows.
    The result depends only on the files' row-group sizes, so the same input gives the same units.
    """
    if rows_per_unit < 1:
        raise ValueError(f"rows_per_unit must be at least 1, got {rows_per_unit}")
    units: list[WorkUnit] = []
    key_base = 0  # global index of the current file's first row

    def add(path: str, first_row: int, num_rows: int) -> None:
        units.append(WorkUnit(len(units), path, first_row, num_rows, key_base + first_row))

    for f in files:
        start = count = 0  # the unit being built: first row in the file, rows so far
        warned = False
        for rows in f.row_group_rows:
            if count and count + rows > rows_per_unit:
                add(f.path, start, count)
                start, count = start + count, 0
            if rows <= rows_per_unit:
                count += rows
                continue
            if not warned:
                log.warning(
                    "%s has row groups of more than %d rows; each unit cut from one reads the whole row group",
                    f.path, rows_per_unit,
                )
                warned = True
            for offset in range(0, rows, rows_per_unit):
                add(f.path, start + offset, min(rows_per_unit, rows - offset))
            start += rows
        if count:
            add(f.path, start, count)
        key_base += f.num_rows
    return units


def input_fingerprint(files: list[InputFile]) -> list[dict]:
    """What identifies the input files' contents, for the job manifest."""
    return [{"path": f.path, "size": f.size, "etag": f.etag, "mtime": f.mtime} for f in files]
