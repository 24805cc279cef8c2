"""Read one work unit's rows and turn them into validated samples."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.plan import WorkUnit
from pipeline.storage import with_retries
from pipeline.writers import OUTPUT_COLUMNS

MAX_SEED = 2**63 - 1
# Keys become member names in tar archives and file names, so keep them to a safe alphabet.
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class Sample:
    key: str
    prompt: str | None
    seed: int | None
    negative_prompt: str | None
    error: str | None  # None: the sample is valid


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
    fs: fsspec.AbstractFileSystem, unit: WorkUnit, prompt_column: str = "prompt", job_seed: int = 0
) -> UnitInput:
    """Rows of a unit as samples; bad rows become samples with an error, never an exception."""
    what = f"read {unit.path} rows {unit.first_row}+{unit.num_rows}"
    table = with_retries(_read_rows, fs, unit, what=what)
    fields = [prompt_column, "id", "seed", "negative_prompt"]
    present = {name for name in fields if name in table.column_names}
    values = [table.column(n).to_pylist() if n in present else [None] * table.num_rows for n in fields]
    samples = []
    first_row_of_key: dict[str, int] = {}
    for i, (prompt, raw_id, seed, negative) in enumerate(zip(*values)):
        row = unit.first_row + i
        sample, problems = _sample(unit.first_key_index + i, job_seed, prompt, raw_id, seed, negative)
        if sample.key in first_row_of_key:
            problems.append(f"duplicate id {sample.key!r} (first at row {first_row_of_key[sample.key]})")
        else:
            first_row_of_key[sample.key] = row
        if problems:
            sample.error = f"{unit.path} row {row}: {'; '.join(problems)}"
        samples.append(sample)
    return UnitInput(unit, samples, _extra_columns(table, present))


def _read_rows(fs: fsspec.AbstractFileSystem, unit: WorkUnit) -> pa.Table:
    """Read only the row groups overlapping the unit, then slice to its rows."""
    end = unit.first_row + unit.num_rows
    with fs.open(unit.path, "rb", cache_type="none") as f:  # fetch just the column chunks pyarrow asks for
        parquet = pq.ParquetFile(f)
        groups, first_group_row, offset = [], None, 0
        for i in range(parquet.metadata.num_row_groups):
            rows = parquet.metadata.row_group(i).num_rows
            if offset < end and offset + rows > unit.first_row:
                groups.append(i)
                first_group_row = offset if first_group_row is None else first_group_row
            offset += rows
        table = parquet.read_row_groups(groups)
    if first_group_row is None or table.num_rows < unit.first_row - first_group_row + unit.num_rows:
        raise ValueError(f"{unit.path} has fewer rows than planned (unit {unit.unit_id}); did the file change?")
    return table.slice(unit.first_row - first_group_row, unit.num_rows)


def _sample(
    key_index: int, job_seed: int, prompt: object, raw_id: str | int | None, seed: int | None, negative: str | None
) -> tuple[Sample, list[str]]:
    problems = []
    key = f"{key_index:012d}" if raw_id is None else str(raw_id)
    if raw_id is not None and not _KEY_PATTERN.fullmatch(key):
        problems.append(
            f"id {key!r} must be non-empty and use only A-Z a-z 0-9 _ - (it becomes a file name in tar archives)"
        )

    if prompt is None:
        problems.append("prompt is null")
    elif not isinstance(prompt, str):
        problems.append(f"prompt is a {type(prompt).__name__}, not a string")
        prompt = None
    elif not prompt.strip():
        problems.append("empty prompt")

    if seed is None:
        seed = derive_seed(job_seed, key)
    elif not 0 <= seed <= MAX_SEED:
        problems.append(f"seed {seed} outside [0, {MAX_SEED}]")
        seed = None
    return Sample(key, prompt, seed, negative, None), problems


def _extra_columns(table: pa.Table, used: set[str]) -> pa.Table:
    """Input columns not consumed as sample fields, renamed where they would clash with output columns."""
    names = [n for n in table.column_names if n not in used]
    taken = set(OUTPUT_COLUMNS) | set(names)
    renamed = []
    for name in names:
        if name in OUTPUT_COLUMNS:
            new = f"input_{name}"
            while new in taken:
                new = f"input_{new}"
            taken.add(new)
            name = new
        renamed.append(name)
    return table.select(names).rename_columns(renamed)
