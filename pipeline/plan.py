"""Plan a job from Parquet footers alone: list input files and cut them into work units.

Everything wrong with the input as a whole (no files, no rows, a missing or mistyped column, a file that is not
Parquet, extra columns whose types clash) is found here, before any model loads, and reported as one InputError
that names the file and field. Problems of single rows are the reader's: they become failed rows.
"""

from __future__ import annotations

import base64
import collections
import difflib
import hashlib
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import with_retries

log = logging.getLogger(__name__)

_GLOB_CHARS = "*?["
_FOOTER_THREADS = 16
# Listing keys that hold a digest of the object's bytes, best first: equal bytes give equal tags on any copy.
# (GCS's `etag` changes with every metadata update, so its `md5Hash` comes first; S3's ETag is an MD5.)
_CONTENT_TAG_KEYS = ("md5Hash", "ETag", "etag")
# Files and folders below a folder that Spark, Hadoop, Jupyter and pyarrow.dataset treat as not data.
_IGNORED_PREFIXES = (".", "_")
SAMPLE_FIELDS = ("id", "seed", "negative_prompt")  # optional columns read as sample fields, beside the prompt


class InputError(ValueError):
    """The job's input cannot be used as given; the message names the file or column."""


@dataclass(frozen=True)
class InputFile:
    path: str  # full URL, as workers open it
    name: str  # path relative to the prompts root (a single file: its base name); the same in any copy
    size: int
    etag: str  # a digest of the content: the store's, or of the Parquet footer where the store has none
    num_rows: int
    row_group_rows: tuple[int, ...]
    extra_schema: pa.Schema  # the columns carried into the output metadata as they are


@dataclass(frozen=True)
class WorkUnit:
    unit_id: int
    path: str
    first_row: int  # row index within the file
    num_rows: int
    first_key_index: int  # row index across all input files in plan order; derives default keys
    # Where input files differ in their extra columns: the job's union of them (base64 Arrow IPC), which every
    # shard's metadata carries so that readers of the whole output see one schema. None: the file's own.
    extra_schema: str | None = None

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
    path = fs._strip_protocol(path).rstrip("/") or "/"
    url = fs.unstrip_protocol(path)
    root, infos = _find_files(fs, path, url)
    if not infos:
        raise InputError(f"no Parquet files found at {url}")
    infos = sorted(infos, key=lambda i: i["name"])

    def plan_file(info: dict) -> InputFile | str:
        """The file as planned, or what makes it unusable; footer objects are dropped as soon as read."""
        name = fs.unstrip_protocol(info["name"])
        try:
            schema, meta = with_retries(_read_footer, fs, info, what=f"read footer of {name}")
        except InputError as e:
            return str(e)
        except OSError as e:
            return f"{name}: cannot read ({type(e).__name__}: {e})"
        problem = _column_problem(name, schema, prompt_column)
        if problem is not None:
            return problem
        row_group_rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        return InputFile(
            path=name,
            name=_relative(info["name"], root),
            size=int(info["size"]),
            etag=_content_tag(info) or _footer_digest(meta),
            num_rows=sum(row_group_rows),
            row_group_rows=row_group_rows,
            extra_schema=pa.schema([f for f in schema if f.name != prompt_column and f.name not in SAMPLE_FIELDS]),
        )

    # Footers are tiny, so planning time is round trips: fetch them concurrently, keep the order.
    with ThreadPoolExecutor(max_workers=_FOOTER_THREADS) as pool:
        planned = list(pool.map(plan_file, infos))
    problems = [p for p in planned if isinstance(p, str)]
    files = [f for f in planned if isinstance(f, InputFile)]
    if problems:
        more = f" (and {len(problems) - 1} more input files with problems)" if len(problems) > 1 else ""
        raise InputError(problems[0] + more)
    if not sum(f.num_rows for f in files):
        raise InputError(f"no rows to generate: the {len(files)} Parquet file(s) at {url} are all empty")
    return files


def _find_files(fs: fsspec.AbstractFileSystem, path: str, url: str) -> tuple[str, list[dict]]:
    """The prompts root (the folder names are taken relative to) and the files found under it."""
    fs.invalidate_cache()  # listings must be current: they decide what the job covers
    try:
        if any(c in path for c in _GLOB_CHARS):
            root = _glob_root(path)
            found = with_retries(fs.glob, path, detail=True, what=f"list {url}").values()
            return root, [i for i in found if i["type"] == "file"]  # a glob takes what it matches
        info = with_retries(fs.info, path, what=f"list {url}")
        if info["type"] != "directory":
            return posixpath.dirname(path), [info]
        found = with_retries(fs.find, path, detail=True, what=f"list {url}").values()
        return path, [
            i for i in found if i["type"] == "file" and i["name"].endswith(".parquet") and not _ignored(i["name"], path)
        ]
    except FileNotFoundError as e:  # keep a reason such as s3fs's "The specified bucket does not exist"
        reason = e.strerror or str(e)
        if not reason or path in reason:
            reason = "no such file or folder"
        raise InputError(f"no Parquet files found at {url} ({reason})") from None
    except OSError as e:
        raise InputError(f"cannot list {url} ({type(e).__name__}: {e})") from None


def _glob_root(pattern: str) -> str:
    """The folder above a glob's first wildcard: `bucket/in/*/p*.parquet` -> `bucket/in`."""
    first_wild = min(pattern.index(c) for c in _GLOB_CHARS if c in pattern)
    return posixpath.dirname(pattern[:first_wild]).rstrip("/")


def _relative(name: str, root: str) -> str:
    if root in ("", "/"):
        return name.lstrip("/")
    return name[len(root) + 1 :] if name.startswith(root + "/") else posixpath.basename(name)


def _ignored(name: str, root: str) -> bool:
    return any(part.startswith(_IGNORED_PREFIXES) for part in _relative(name, root).split("/"))


class TrackedFile:
    """A file that remembers the error its storage raised last, to tell storage trouble from bad content.

    pyarrow re-raises a Python file's own exception unchanged, and raises its own (often OSError too) when the
    bytes cannot be decoded. Storage errors are retried and fail the unit; bad content is the input's fault.
    """

    def __init__(self, f):
        self._f = f
        self.storage_error: BaseException | None = None

    def __getattr__(self, name):
        return getattr(self._f, name)

    def read(self, *args):
        try:
            return self._f.read(*args)
        except BaseException as e:
            self.storage_error = e
            raise


def _read_footer(fs: fsspec.AbstractFileSystem, info: dict) -> tuple[pa.Schema, pq.FileMetaData]:
    # cache_type="none": fetch only the byte ranges pyarrow asks for (the footer), not whole blocks;
    # the size is the listing's, so no store needs to be asked for it again.
    with fs.open(info["name"], "rb", cache_type="none", size=info["size"]) as raw:
        f = TrackedFile(raw)
        try:
            parquet = pq.ParquetFile(f)
        except Exception as e:
            if e is f.storage_error:
                raise  # retried, then reported as unreadable
            raise InputError(f"{fs.unstrip_protocol(info['name'])}: not a valid Parquet file ({e})") from None
        return parquet.schema_arrow, parquet.metadata


def _content_tag(info: dict) -> str | None:
    for key in _CONTENT_TAG_KEYS:
        if info.get(key):
            return str(info[key]).strip('"')
    return None


def _footer_digest(meta: pq.FileMetaData) -> str:
    """A digest of the Parquet footer (schema, row groups, column chunk sizes, offsets, statistics).

    For stores whose listings hold no digest (local disks). Unlike an mtime it survives copies, such as Ray's
    unpacking of a job's working dir. It misses only an edit that keeps the file's size and every byte count,
    offset and min/max statistic of every column chunk.
    """
    sink = pa.BufferOutputStream()
    meta.write_metadata_file(sink)
    return "footer-sha256:" + hashlib.sha256(sink.getvalue()).hexdigest()


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):  # pandas categoricals
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_seed(t: pa.DataType) -> bool:
    # Floats too: pandas stores an integer column with missing values as float64. Rows are checked one by one.
    return pa.types.is_integer(t) or pa.types.is_floating(t)


_COLUMN_TYPES = {  # column: (type check, what it must be)
    "id": (lambda t: _is_string(t) or pa.types.is_integer(t), "a string or an integer"),
    "seed": (_is_seed, "an integer"),
    "negative_prompt": (_is_string, "a string"),
}


def _column_problem(path: str, schema: pa.Schema, prompt_column: str) -> str | None:
    """What makes the file unusable: no prompt column, a column twice, or a sample field of a wrong type."""
    if prompt_column not in schema.names:
        close = difflib.get_close_matches(prompt_column, schema.names, n=1, cutoff=0.6)
        hint = f"; did you mean --prompt-column {close[0]!r}?" if close else ""
        return f"{path}: no column {prompt_column!r}; columns are {schema.names}{hint}"
    twice = [name for name, count in collections.Counter(schema.names).items() if count > 1]
    if twice:  # Arrow allows it; the output metadata and its readers do not
        return f"{path}: column {twice[0]!r} appears {schema.names.count(twice[0])} times"
    checks = {prompt_column: (_is_string, "a string"), **_COLUMN_TYPES}
    for column, (ok, expected) in checks.items():
        type_ = schema.field(column).type if column in schema.names else None
        if type_ is not None and not (ok(type_) or pa.types.is_null(type_)):  # null: every value missing
            return f"{path}: column {column!r} must be {expected}, not {type_}"
    return None


def plan_units(files: list[InputFile], rows_per_unit: int) -> list[WorkUnit]:
    """Cut files into units of whole row groups totalling at most rows_per_unit rows.

    A row group larger than rows_per_unit is split into slices of rows_per_unit rows.
    The result depends only on the files' row-group sizes and columns, so the same input gives the same units.
    """
    if rows_per_unit < 1:
        raise ValueError(f"rows_per_unit must be at least 1, got {rows_per_unit}")
    extra_schema = _job_extra_schema(files)
    units: list[WorkUnit] = []
    key_base = 0  # global index of the current file's first row

    def add(path: str, first_row: int, num_rows: int) -> None:
        units.append(WorkUnit(len(units), path, first_row, num_rows, key_base + first_row, extra_schema))

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


def _job_extra_schema(files: list[InputFile]) -> str | None:
    """None when every file has the same extra columns; else their union, encoded for WorkUnit.extra_schema.

    Raises InputError naming the column and two files when a column's types cannot be reconciled.
    """
    with_rows = [f for f in files if f.num_rows]  # an empty file adds no rows, so its columns do not matter
    if len({f.extra_schema.remove_metadata() for f in with_rows}) <= 1:
        return None
    seen: dict[str, tuple[pa.DataType, str]] = {}  # column: (type, first file that has it)
    for f in with_rows:
        for field in f.extra_schema:
            type_ = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
            if field.name not in seen:
                seen[field.name] = (type_, f.path)
                continue
            first_type, first_path = seen[field.name]
            try:
                merged = pa.unify_schemas(
                    [pa.schema([(field.name, first_type)]), pa.schema([(field.name, type_)])],
                    promote_options="permissive",
                )
            except (pa.ArrowTypeError, pa.ArrowInvalid):
                raise InputError(
                    f"column {field.name!r} is {first_type} in {first_path} but {type_} in {f.path}; "
                    "extra columns are copied into the output, so each must have one type in all input files"
                ) from None
            seen[field.name] = (merged.field(0).type, first_path)
    schema = pa.schema([(name, type_) for name, (type_, _) in seen.items()])
    log.info("input files differ in their extra columns; every shard's metadata carries all of %s", schema.names)
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def decode_extra_schema(encoded: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(encoded)))


def input_fingerprint(files: list[InputFile]) -> list[dict]:
    """What identifies the input files' contents, for the job manifest and the resume check.

    Paths are relative to the prompts root and tags are content digests, so the same prompts copied elsewhere
    (a new working dir of a resubmitted Ray job) match. The `mtime` key stays for the manifest's format, unset:
    copies and unpacking change it while the content stays the same.
    """
    return [{"path": f.name, "size": f.size, "etag": f.etag, "mtime": None} for f in files]
