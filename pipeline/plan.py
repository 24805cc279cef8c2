"""Plan a job from Parquet footers alone: list input files and cut them into work units.

Everything wrong with the input as a whole (no files, no rows, a missing or mistyped column, a file that is not
Parquet, extra columns whose types clash, an output that the input would read) is found here, before any model
loads, and reported as one InputError that names the file and field. Problems of single rows are the reader's:
they become failed rows.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import difflib
import hashlib
import logging
import os
import posixpath
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import glob_translate

from pipeline.model_source import local_file_digests
from pipeline.storage import filesystem, redact_text, with_retries

log = logging.getLogger(__name__)

_GLOB_CHARS = "*?["
_FOOTER_THREADS = 16
# Listing keys that hold a digest of the object's bytes, best first: equal bytes give equal tags on any copy.
# (GCS's `etag` changes with every metadata update, so its `md5Hash` comes first; S3's ETag is an MD5; the
# Hugging Face hub's `blob_id` is the git blob's hash.) Files on stores with none are digested here.
_CONTENT_TAG_KEYS = ("md5Hash", "ETag", "etag", "blob_id")
# Files and folders below a folder that Spark, Hadoop, Jupyter and pyarrow.dataset treat as not data.
_IGNORED_PREFIXES = (".", "_")
SAMPLE_FIELDS = ("id", "seed", "negative_prompt")  # optional columns read as sample fields, beside the prompt
# Names of files a job writes below its output, to test whether a prompts glob would read them as input.
_OUTPUT_PROBES = ("00000.parquet", "00000.tar", "00000.stats.json", "images/00000.parquet", "pairs/00000.parquet",
                  "_job.json")


class InputError(ValueError):
    """The job's input cannot be used as given; the message names the file or column."""


@dataclass(frozen=True)
class InputFile:
    path: str  # full URL, as workers open it
    name: str  # path relative to the prompts root (a single file: its base name); the same in any copy
    size: int
    etag: str  # a digest of the content: the store's, or sha256 of the bytes ("sha256:...") where it has none
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


def sample_fields(prompt_column: str) -> tuple[str, ...]:
    """The optional columns read as sample fields: a column named as the prompt column is the prompt, nothing else
    (`--prompt-column id` gives rows keyed by index)."""
    return tuple(name for name in SAMPLE_FIELDS if name != prompt_column)


def list_input_files(fs: fsspec.AbstractFileSystem, path: str, prompt_column: str = "prompt") -> list[InputFile]:
    """Input files at a file, folder (every *.parquet below it, through symbolic links) or glob, sorted by path.

    Reads each file's footer, and checks its columns so bad input fails before any work starts; files whose store
    keeps no digest of them are read whole to digest them (local files once: see local_file_digests).
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
            etag=_content_tag(info) or "",
            num_rows=sum(row_group_rows),
            row_group_rows=row_group_rows,
            extra_schema=pa.schema([f for f in schema if f.name not in (prompt_column, *sample_fields(prompt_column))]),
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
    return _with_content_digests(fs, files)


def _with_content_digests(fs: fsspec.AbstractFileSystem, files: list[InputFile]) -> list[InputFile]:
    """Files whose listing had no content tag, tagged with the sha256 of their bytes: a footer's statistics miss
    an edit that keeps the size and every min and max, and an mtime changes with every copy."""
    untagged = [f for f in files if not f.etag]
    try:
        if isinstance(fs, LocalFileSystem):
            digests = local_file_digests([Path(fs._strip_protocol(f.path)) for f in untagged])
        else:
            with ThreadPoolExecutor(max_workers=_FOOTER_THREADS) as pool:
                digests = list(pool.map(lambda f: _stream_sha256(fs, f.path), untagged))
    except OSError as e:
        raise InputError(f"cannot read {e.filename or 'an input file'} to digest it ({type(e).__name__}: "
                         f"{e.strerror or e})") from None
    tags = {f.path: f"sha256:{digest}" for f, digest in zip(untagged, digests)}
    return [dataclasses.replace(f, etag=tags[f.path]) if f.path in tags else f for f in files]


def _stream_sha256(fs: fsspec.AbstractFileSystem, url: str) -> str:
    def read() -> str:
        digest = hashlib.sha256()
        with fs.open(url, "rb", block_size=1 << 22) as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        return digest.hexdigest()

    return with_retries(read, what=f"digest {url}")


def _find_files(fs: fsspec.AbstractFileSystem, path: str, url: str) -> tuple[str, list[dict]]:
    """The prompts root (the folder names are taken relative to) and the files found under it."""
    fs.invalidate_cache()  # listings must be current: they decide what the job covers
    try:
        if any(c in path for c in _GLOB_CHARS):
            glob = _is_glob(fs, path, url)
            log.info("prompts %s: %s", url, "a glob" if glob else "read as the path of that name, not as a glob")
            if glob:
                return _glob_root(path), _glob_files(fs, path, url)  # a glob takes what it matches
        info = with_retries(fs.info, path, what=f"list {url}")
        if info["type"] not in ("file", "directory"):  # reading a FIFO or a device would block or never end
            raise InputError(f"{url} is not a regular file or a folder (a FIFO, a device or a socket): name a "
                             "Parquet file, a folder or a glob")
        if info["type"] != "directory":
            return posixpath.dirname(path), [info]
        return path, [i for i in _files_below(fs, path, url) if i["name"].endswith(".parquet")]
    except FileNotFoundError as e:  # keep a reason such as s3fs's "The specified bucket does not exist"
        reason = e.strerror or str(e)
        if not reason or path in reason:
            reason = "no such file or folder"
        raise InputError(f"no Parquet files found at {url} ({reason})") from None
    except OSError as e:
        raise InputError(f"cannot list {url} ({type(e).__name__}: {e})") from None


def _is_glob(fs: fsspec.AbstractFileSystem, path: str, url: str) -> bool:
    """A path with glob characters is a glob only when nothing has that very name: a file may be called
    `prompts[1].parquet`."""
    return any(c in path for c in _GLOB_CHARS) and not with_retries(fs.exists, path, what=f"list {url}")


def _glob_files(fs: fsspec.AbstractFileSystem, pattern: str, url: str) -> list[dict]:
    if not isinstance(fs, LocalFileSystem):
        return [i for i in with_retries(fs.glob, pattern, detail=True, what=f"list {url}").values()
                if i["type"] == "file"]
    root = _glob_root(pattern)  # matched as fsspec matches, but through symbolic links
    depth = None if "**" in pattern else pattern[len(root):].count("/")
    match = re.compile(glob_translate(pattern)).match
    return [i for i in _local_files(root or "/", depth, skip_ignored=False) if match(i["name"])]


def _files_below(fs: fsspec.AbstractFileSystem, folder: str, url: str) -> list[dict]:
    """Files below a folder whose path names no `_` or `.` folder or file."""
    if isinstance(fs, LocalFileSystem):
        return _local_files(folder, None, skip_ignored=True)
    found = with_retries(fs.find, folder, detail=True, what=f"list {url}").values()
    return [i for i in found if i["type"] == "file" and not ignored_by_readers(_relative(i["name"], folder))]


def _local_files(root: str, maxdepth: int | None, skip_ignored: bool) -> list[dict]:
    """Files below a local folder, down to `maxdepth` levels, through symbolic links to files and folders (the
    Hugging Face cache is folders of links, which fsspec's listing reports as `other`, not files). A link to a
    folder above it is a loop: skipped with a warning. A link to nothing is listed, to fail naming itself."""
    found = []

    def walk(folder: str, ancestors: frozenset, depth: int) -> None:
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if skip_ignored and entry.name.startswith(_IGNORED_PREFIXES):
                    continue
                try:
                    st = entry.stat()  # of the target, for a link
                except FileNotFoundError:
                    found.append({"name": entry.path, "size": 0, "type": "file"})
                    continue
                if stat.S_ISREG(st.st_mode):
                    found.append({"name": entry.path, "size": st.st_size, "type": "file"})
                elif stat.S_ISDIR(st.st_mode) and (maxdepth is None or depth < maxdepth):
                    if (st.st_dev, st.st_ino) in ancestors:
                        log.warning("skipping %s: a link to a folder above it (a loop)", entry.path)
                        continue
                    walk(entry.path, ancestors | {(st.st_dev, st.st_ino)}, depth + 1)

    top = os.stat(root)
    walk(root, frozenset({(top.st_dev, top.st_ino)}), 1)
    return found


def _glob_root(pattern: str) -> str:
    """The folder above a glob's first wildcard: `bucket/in/*/p*.parquet` -> `bucket/in`."""
    first_wild = min(pattern.index(c) for c in _GLOB_CHARS if c in pattern)
    return posixpath.dirname(pattern[:first_wild]).rstrip("/")


def prompts_root(prompts: str, file: str) -> str:
    """The folder an input file was found under, as _find_files took it (paths without their protocol): the
    prompts folder, a single prompts file's folder, or a glob's folder above its first wildcard."""
    prompts = prompts.rstrip("/") or "/"
    if file == prompts:
        return posixpath.dirname(file)
    if file.startswith(prompts.rstrip("/") + "/"):
        return prompts
    return _glob_root(prompts)


def _relative(name: str, root: str) -> str:
    if root in ("", "/"):
        return name.lstrip("/")
    return name[len(root) + 1 :] if name.startswith(root + "/") else posixpath.basename(name)


def ignored_by_readers(relative: str) -> bool:
    """Whether a path below a folder is one that folder readers skip (Spark, pyarrow.dataset, Ray Data): some part
    of it starts with `_` or `.`."""
    return any(part.startswith(_IGNORED_PREFIXES) for part in relative.split("/"))


def check_output_location(input_fs: fsspec.AbstractFileSystem, prompts: str, output_url: str,
                          output_fs: fsspec.AbstractFileSystem, output_root: str) -> None:
    """Refuses an output that would not be written where `output_url` says, or that the prompts would read as
    input on the next run (a folder or glob that reaches into it), or that holds the prompts (its readers would
    take them for data): one InputError, before anything is written."""
    root = output_root.rstrip("/") or "/"
    if output_fs._strip_protocol(output_url).rstrip("/") != root.rstrip("/") or "::" in output_url:
        why = " ('::' chains filesystems)" if "::" in output_url else ""
        raise InputError(f"output {output_url}: fsspec would not write there but at {output_fs.unstrip_protocol(root)}"
                         f"{why}; name the output folder plainly")
    if any(c in output_url for c in _GLOB_CHARS):
        raise InputError(f"output {output_url}: '*', '?' and '[' are glob characters, which fsspec expands when it "
                         "moves or deletes files; choose a path without them")
    if type(input_fs) is not type(output_fs):
        return
    path = input_fs._strip_protocol(prompts).rstrip("/") or "/"
    url = input_fs.unstrip_protocol(path)
    out = _real(output_fs, root)
    if _is_glob(input_fs, path, url):
        glob_root = _glob_root(path)
        pattern = _real(input_fs, glob_root or "/").rstrip("/") + path[len(glob_root):]
        if any(re.match(glob_translate(pattern), f"{out}/{name}") for name in _OUTPUT_PROBES):
            raise InputError(f"output {output_url} is inside what the prompts glob {url} matches: the next run "
                             "would read its shards as prompts; put the output elsewhere")
        scope = _real(input_fs, glob_root or "/")
    else:
        scope = _real(input_fs, path)
        try:
            folder = with_retries(input_fs.info, path, what=f"list {url}")["type"] == "directory"
        except OSError:
            folder = False  # missing or unreadable: the listing says so
        if folder and _below(out, scope) and not ignored_by_readers(out[len(scope):].strip("/")):
            raise InputError(f"output {output_url} is inside the prompts folder {url}: the next run would read "
                             "its shards as prompts; put the output outside it (or in a folder whose name starts "
                             "with '_')")
    if _below(scope, out) and not ignored_by_readers(scope[len(out):].strip("/")):
        raise InputError(f"prompts {url} are inside the output {output_url}: readers of the output would take them "
                         "for its data; put them elsewhere (or in a folder of the output whose name starts with '_')")


def check_output_apart_from_models(output_url: str, output_fs: fsspec.AbstractFileSystem, output_root: str,
                                   model_folders: dict[str, str], storage_options: dict) -> None:
    """Refuses an output that is a model folder or inside one (named by its key in the identity): its lock and shards
    would change the model's files after the driver pinned them, and every worker would refuse to load it."""
    out = _real(output_fs, output_root)
    for setting, model in model_folders.items():
        fs, path = filesystem(model, storage_options)
        if type(fs) is type(output_fs) and _below(out, _real(fs, path)):
            raise InputError(f"output {output_url} is inside the folder of the job's {setting} model ({model}): it "
                             "would change the model's files; put the output elsewhere")


def _real(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The path with symbolic links and `..` resolved, on a local disk; as it is elsewhere."""
    return os.path.realpath(path) if isinstance(fs, LocalFileSystem) else path.rstrip("/")


def _below(path: str, folder: str) -> bool:
    """`path` is `folder` or inside it."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


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


def is_text(t: pa.DataType) -> bool:
    """Every Arrow string type pyarrow writes: string, large_string, string_view, and dictionaries of them (pandas
    categoricals)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_seed(t: pa.DataType) -> bool:
    # Floats too: pandas stores an integer column with missing values as float64. Rows are checked one by one.
    return pa.types.is_integer(t) or pa.types.is_floating(t)


_COLUMN_TYPES = {  # column: (type check, what it must be)
    "id": (lambda t: is_text(t) or pa.types.is_integer(t), "a string or an integer"),
    "seed": (_is_seed, "an integer"),
    "negative_prompt": (is_text, "a string"),
}


def check_input_columns(files: list[InputFile], columns: dict[str, str]) -> None:
    """Raises InputError naming the first file without one of `columns` (name -> the flag that names it): the
    per-row inputs the job's stages read, checked before any model loads."""
    for file in files:
        for name, flag in columns.items():
            if name not in file.extra_schema.names:
                close = difflib.get_close_matches(name, file.extra_schema.names, n=1, cutoff=0.6)
                hint = f"; did you mean {flag} {close[0]!r}?" if close else ""
                raise InputError(f"{file.path}: no column {name!r} ({flag}); its other columns are "
                                 f"{file.extra_schema.names}{hint}")


def _column_problem(path: str, schema: pa.Schema, prompt_column: str) -> str | None:
    """What makes the file unusable: no prompt column, a column twice, or a sample field of a wrong type."""
    if prompt_column not in schema.names:
        close = difflib.get_close_matches(prompt_column, schema.names, n=1, cutoff=0.6)
        hint = f"; did you mean --prompt-column {close[0]!r}?" if close else ""
        return f"{path}: no column {prompt_column!r}; columns are {schema.names}{hint}"
    twice = [name for name, count in collections.Counter(schema.names).items() if count > 1]
    if twice:  # Arrow allows it; the output metadata and its readers do not
        return f"{path}: column {twice[0]!r} appears {schema.names.count(twice[0])} times"
    # the prompt column is the prompt, whatever its name: its check comes last, over a sample field's
    checks = {**_COLUMN_TYPES, prompt_column: (is_text, "a string")}
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

    Paths are relative to the prompts root and tags are content digests (of the bytes: an edit that keeps the size
    and the Parquet statistics changes them), so the same prompts copied elsewhere
    (a new working dir of a resubmitted Ray job) match. The `mtime` key stays for the manifest's format, unset:
    copies and unpacking change it while the content stays the same. A path is redacted (a signed URL's query is
    part of a single file's name): the content tags tell files apart, and a new signature is the same input.
    """
    return [{"path": redact_text(f.name), "size": f.size, "etag": f.etag, "mtime": None} for f in files]
