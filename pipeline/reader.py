"""Read one work unit's rows and turn them into validated samples.

Every input row becomes exactly `samples_per_prompt` samples (one by default), in input order, each knowing its
input row (`Sample.row`), so output row i of a shard is input row `unit.first_row + i // samples_per_prompt` of
`unit.path` (what `verify` needs to name the input rows of a key found in two shards). With more than one sample
per prompt, sample k of a row has the key `{key}-{k}` and the seed of the row's `seed` column plus k, or else one
derived from the job seed and that key.
A bad row, or a row group whose bytes cannot be decoded, gives samples with an error naming the file and row;
only storage that cannot be read (after retries) fails the unit, which is then retried and never half-written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import unicodedata
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.plan import SAMPLE_FIELDS, TrackedFile, WorkUnit, decode_extra_schema, is_text
from pipeline.storage import with_retries
from pipeline.writers import OUTPUT_COLUMNS, renamed_apart

MAX_SEED = 2**63 - 1
MAX_EXACT_FLOAT_SEED = 2**53  # beyond it a float column cannot hold every integer: the seed may not be the one meant
# Keys become member names in tar archives and file names, so keep them to a safe alphabet and length.
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
MAX_KEY_CHARS = 200  # with an extension, within the 255-byte file names of common file systems
_INVISIBLE_CATEGORIES = ("Cc", "Cf", "Zs", "Zl", "Zp")  # control, format (zero-width, bidi marks), spaces


class UnitReadError(Exception):
    """A unit's input could not be read from storage (after retries); the message names the file and rows."""


@dataclass
class Sample:
    key: str
    prompt: str | None
    seed: int | None
    negative_prompt: str | None
    error: str | None  # None: the sample is valid
    row: int | None = None  # the input row it comes from, in its file
    inputs: dict = dataclasses.field(default_factory=dict)  # the row's input columns that stages read, by name
    # By input column whose image the row names from a store: whether reading it failed as an outage (row_images)
    outages: dict = dataclasses.field(default_factory=dict)


@dataclass
class UnitInput:
    unit: WorkUnit
    samples: list[Sample]
    extra: pa.Table  # the other input columns, row-aligned with samples


def derive_seed(job_seed: int, key: str) -> int:
    """Seed for a row without one: depends only on the job seed and the key, on any machine."""
    digest = hashlib.sha256(f"{job_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


def read_unit(
    fs: fsspec.AbstractFileSystem, unit: WorkUnit, prompt_column: str = "prompt", job_seed: int = 0,
    samples_per_prompt: int = 1, input_columns: tuple[str, ...] = (),
) -> UnitInput:
    """Rows of a unit as samples; bad rows become samples with an error. Raises UnitReadError only when storage
    cannot give the rows (after retries), so that the unit is retried, never committed without them.
    `input_columns` (a stage's per-row inputs, such as control images) go to each sample's `inputs`, not into
    the carried columns."""
    rows = f"rows {unit.first_row}-{unit.first_row + unit.num_rows - 1}"
    try:
        table, undecodable = with_retries(_read_rows, fs, unit, what=f"read {unit.path} {rows}")
    except Exception as e:
        raise UnitReadError(f"cannot read {unit.path} {rows}: {type(e).__name__}: {e}") from e
    # (prompt, id, seed, negative_prompt); a field named as the prompt column is read as the prompt only
    fields = [prompt_column, *(None if name == prompt_column else name for name in SAMPLE_FIELDS)]
    present = {name for name in fields if name in table.column_names}
    values = [_values(table.column(n)) if n in present else [None] * table.num_rows for n in fields]
    consumed = [name for name in input_columns if name in table.column_names and name not in present]
    inputs = {name: table.column(name).to_pylist() for name in consumed}
    samples = []
    first_row_of_key: dict[str, int] = {}
    for i, (prompt, raw_id, seed, negative) in enumerate(zip(*values)):
        row = unit.first_row + i
        if i in undecodable:
            unreadable = Sample(_default_key(unit.first_key_index + i), None, None, None, None)
            row_sample, row_problems, no_seed = unreadable, [undecodable[i]], True
        else:
            row_sample, row_problems, no_seed = _sample(unit.first_key_index + i, prompt, raw_id, seed, negative)
        for sample, problems in _per_prompt(row_sample, row_problems, no_seed, samples_per_prompt, job_seed):
            sample.row = row
            sample.inputs = {name: column[i] for name, column in inputs.items()}
            if sample.key in first_row_of_key:
                problems.append(f"duplicate id {sample.key!r} (first at row {first_row_of_key[sample.key]})")
            else:
                first_row_of_key[sample.key] = row
            if problems:
                sample.error = f"{unit.path} row {row}: {'; '.join(problems)}"
            samples.append(sample)
    if samples_per_prompt > 1:  # repeated before the extra columns are picked: a table of none keeps its rows
        table = table.take(pa.array([i for i in range(table.num_rows) for _ in range(samples_per_prompt)]))
    return UnitInput(unit, samples, _extra_columns(table, present | set(input_columns), unit.extra_schema))


def _per_prompt(
    sample: Sample, problems: list[str], no_seed: bool, count: int, job_seed: int
) -> list[tuple[Sample, list[str]]]:
    """The row's `count` samples: keyed `{key}-{k}` (the key itself for one), seeded with the row's seed plus k,
    or else derived from the job seed and their own key; `no_seed`: the row's seed was unusable, derive none."""
    samples = []
    for k in range(count):
        key, seed, own = sample.key if count == 1 else f"{sample.key}-{k}", None, list(problems)
        if sample.seed is not None:
            seed = sample.seed + k
            if seed > MAX_SEED:
                own.append(f"seed {sample.seed} + {k} outside [0, {MAX_SEED}]")
                seed = None
        elif not no_seed:
            seed = derive_seed(job_seed, key)
        samples.append((dataclasses.replace(sample, key=key, seed=seed), own))
    return samples


def _read_rows(fs: fsspec.AbstractFileSystem, unit: WorkUnit) -> tuple[pa.Table, dict[int, str]]:
    """The unit's rows, and the problem of each row (by index in the unit) whose row group cannot be decoded.

    Reads only the row groups overlapping the unit, then slices to its rows. A row group that storage returns
    but pyarrow cannot decode becomes null rows with a reason; a storage error is raised (and retried).
    """
    end = unit.first_row + unit.num_rows
    with fs.open(unit.path, "rb", cache_type="none") as raw:  # fetch just the column chunks pyarrow asks for
        f = TrackedFile(raw)
        try:
            parquet = pq.ParquetFile(f)
        except Exception as e:
            if e is f.storage_error:
                raise
            raise ValueError(f"{unit.path} is no longer a valid Parquet file ({e}); did it change?") from None
        spans, offset = [], 0  # (row group, first and end row of the unit within it)
        for i in range(parquet.metadata.num_row_groups):
            rows = parquet.metadata.row_group(i).num_rows
            first, last = max(offset, unit.first_row), min(offset + rows, end)
            if first < last:
                spans.append((i, first - offset, last - first))
            offset += rows
        if sum(n for _, _, n in spans) < unit.num_rows:
            raise ValueError(f"{unit.path} has fewer rows than planned (unit {unit.unit_id}); did the file change?")
        try:  # the common case: one read of all the unit's row groups
            table = parquet.read_row_groups([i for i, _, _ in spans])
            return table.slice(spans[0][1], unit.num_rows), {}
        except Exception as e:
            if e is f.storage_error:
                raise
        return _read_groups_apart(parquet, f, unit, spans)


def _read_groups_apart(
    parquet: pq.ParquetFile, f: TrackedFile, unit: WorkUnit, spans: list[tuple[int, int, int]]
) -> tuple[pa.Table, dict[int, str]]:
    """Row group by row group, so that only the rows of a group that cannot be decoded are lost."""
    pieces, undecodable = [], {}
    for group, start, count in spans:
        try:
            pieces.append(parquet.read_row_group(group).slice(start, count))
        except Exception as e:
            if e is f.storage_error:
                raise
            reason = f"row group {group} cannot be decoded ({type(e).__name__}: {e})"
            first = sum(piece.num_rows for piece in pieces)
            undecodable.update({first + i: reason for i in range(count)})
            schema = parquet.schema_arrow
            pieces.append(pa.Table.from_arrays([pa.nulls(count, fld.type) for fld in schema], schema=schema))
    return pa.concat_tables(pieces), undecodable


def _values(column: pa.ChunkedArray) -> list:
    """A column's Python values; strings that are not valid UTF-8 come back as their raw bytes."""
    if not is_text(column.type):
        return column.to_pylist()
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    try:
        column.validate(full=True)  # Parquet readers do not check UTF-8; other writers may not have either
    except pa.ArrowInvalid:
        raw = column.cast(pa.large_binary()).to_pylist()
        return [None if v is None else _utf8_or_bytes(v) for v in raw]
    return column.to_pylist()


def _utf8_or_bytes(value: bytes) -> str | bytes:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value


def _sample(
    key_index: int, prompt: object, raw_id: object, seed: object, negative: object
) -> tuple[Sample, list[str], bool]:
    """The row as a sample with its own seed (None when it has none: the caller derives one), its problems, and
    whether its seed was unusable."""
    problems = []
    key = _default_key(key_index) if raw_id is None else _text(raw_id)
    if raw_id is not None and not (_KEY_PATTERN.fullmatch(key) and len(key) <= MAX_KEY_CHARS):
        problems.append(
            f"id {_shown(key)} must be 1 to {MAX_KEY_CHARS} characters of A-Z a-z 0-9 _ - "
            "(it becomes a file name in tar archives)"
        )

    if prompt is None:
        problems.append("prompt is null")
    elif isinstance(prompt, bytes):
        problems.append(f"prompt is not valid UTF-8 ({_shown(prompt)})")
        prompt = None
    elif not _has_visible_character(prompt):
        problems.append(f"empty prompt (no visible characters: {_shown(prompt)})")

    if isinstance(negative, bytes):
        problems.append(f"negative_prompt is not valid UTF-8 ({_shown(negative)})")
        negative = None

    seed, seed_problem = _checked_seed(seed)
    if seed_problem:
        problems.append(seed_problem)
    return Sample(key, prompt, seed, negative, None), problems, seed_problem is not None


def _default_key(key_index: int) -> str:
    """The key of a row without an id: its index across the job's input, so unique within the job."""
    return f"{key_index:012d}"


def _checked_seed(seed: object) -> tuple[int | None, str | None]:
    """The row's seed (None: derive one) and what is wrong with it, if anything."""
    if seed is None or (isinstance(seed, float) and math.isnan(seed)):  # NaN: pandas' missing value
        return None, None
    if isinstance(seed, float):
        if not seed.is_integer():
            return None, f"seed {seed} is not a whole number"
        if abs(seed) > MAX_EXACT_FLOAT_SEED:
            return None, f"seed {seed} is a float beyond 2**53, where floats skip integers; store seeds as integers"
        seed = int(seed)
    if not 0 <= seed <= MAX_SEED:
        return None, f"seed {seed} outside [0, {MAX_SEED}]"
    return seed, None


def _has_visible_character(text: str) -> bool:
    return any(unicodedata.category(c) not in _INVISIBLE_CATEGORIES for c in text)


def _text(value: object) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def _shown(value: str | bytes, limit: int = 60) -> str:
    """A value for an error message: escaped, so control characters cannot garble a log, and cut short."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(value)} {'bytes' if isinstance(value, bytes) else 'characters'})"


def _extra_columns(table: pa.Table, used: set[str], extra_schema: str | None) -> pa.Table:
    """Input columns not consumed as sample fields, renamed where they would clash with output columns (and, when
    a shard is written, with the columns its job's stages add: writers.metadata_table).

    With a job-wide extra schema (the input files differ in their columns) each is cast to it, and missing
    ones are null, so that every shard of the job has the same columns.
    """
    extra = table.select([n for n in table.column_names if n not in used])
    if extra_schema is not None:
        schema = decode_extra_schema(extra_schema)
        schema = pa.schema([f for f in schema if f.name not in used])
        columns = {
            f.name: extra.column(f.name).cast(f.type) if f.name in extra.column_names
            else pa.nulls(extra.num_rows, f.type)
            for f in schema
        }
        extra = pa.table(columns, schema=schema) if columns else extra.select([])  # no columns: keep the rows
    return renamed_apart(extra, OUTPUT_COLUMNS)
