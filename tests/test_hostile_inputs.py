"""The hostile-input corpus: each case with the outcome it must get, written beside it.

Two kinds of outcome:
- per-row problems give that row status failed and an error naming the file and row; the job goes on, every
  other row is generated and appears once (read_unit here; the job end to end at the bottom);
- per-job problems stop the job before any model loads, as one InputError (exit 2) naming the file or field.
Storage that cannot be read mid-job fails the unit (retried, then reported; a re-run resumes), never its rows.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem

import pipeline.job
from hostile_corpus import (
    ID_CASES,
    LONG_PROMPT,
    PROMPT_CASES,
    SEED_CASES,
    corrupt_row_group,
    parquet_bytes,
    string_column,
)
from jobhelpers import tar_members
from jobs import generate
from pipeline.manifest import SpecMismatchError, check_compatible
from pipeline.plan import InputError, input_fingerprint, list_input_files, plan_units
from pipeline.reader import UnitReadError, derive_seed, read_unit


@pytest.fixture
def memfs():
    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    yield fs
    fs.rm("/", recursive=True)


def put(fs, url: str, table: pa.Table, row_group_size: int | None = None) -> None:
    fs.pipe_file(url, parquet_bytes(table, row_group_size))


def read_all(fs, url: str, job_seed: int = 0) -> list:
    """Every sample of the input at `url`, planned and read as a job would, in input order."""
    units = plan_units(list_input_files(fs, url), rows_per_unit=1000)
    return [sample for unit in units for sample in read_unit(fs, unit, job_seed=job_seed).samples]


def assert_outcome(sample, path: str, row: int, expected: str | None) -> None:
    if expected is None:
        assert sample.error is None, sample.error
    else:
        assert sample.error is not None and sample.error.startswith(f"{path} row {row}: "), sample.error
        assert expected in sample.error, sample.error


# Per-row cases: the row gets its outcome, its neighbours are untouched ------------------------------------------

@pytest.mark.parametrize("name,prompt,expected", PROMPT_CASES, ids=[c[0] for c in PROMPT_CASES])
def test_prompt_values(memfs, name, prompt, expected):
    put(memfs, "memory://p/a.parquet", pa.table({"prompt": string_column(["before", prompt, "after"])}))
    samples = read_all(memfs, "memory://p")
    assert_outcome(samples[1], "memory:///p/a.parquet", 1, expected)
    if expected is None:
        assert samples[1].prompt == prompt  # exactly as given: no normalisation, no stripping
    assert [(s.prompt, s.error) for s in (samples[0], samples[2])] == [("before", None), ("after", None)]


@pytest.mark.parametrize("name,type_,seed,expected", SEED_CASES, ids=[c[0] for c in SEED_CASES])
def test_seed_values(memfs, name, type_, seed, expected):
    put(memfs, "memory://s/a.parquet", pa.table({"prompt": ["a cat", "a dog"], "seed": pa.array([seed, 5], type_)}))
    first, second = read_all(memfs, "memory://s", job_seed=9)
    assert_outcome(first, "memory:///s/a.parquet", 0, expected)
    if expected is None:
        derived = seed is None or (isinstance(seed, float) and math.isnan(seed))
        assert first.seed == (derive_seed(9, first.key) if derived else int(seed))
    else:
        assert first.seed is None
    assert (second.seed, second.error) == (5, None)


@pytest.mark.parametrize("name,id_,expected", ID_CASES, ids=[c[0] for c in ID_CASES])
def test_id_values(memfs, name, id_, expected):
    put(memfs, "memory://i/a.parquet", pa.table({"prompt": ["a cat", "a dog"], "id": [id_, "other"]}))
    first, second = read_all(memfs, "memory://i")
    assert_outcome(first, "memory:///i/a.parquet", 0, expected)
    assert first.key == id_ and (second.key, second.error) == ("other", None)


def test_bad_negative_prompt_fails_only_its_row(memfs):
    table = pa.table({"prompt": ["a", "b", "c"], "negative_prompt": string_column(["blurry", b"\xc3(", None])})
    put(memfs, "memory://n/a.parquet", table)
    samples = read_all(memfs, "memory://n")
    assert [s.negative_prompt for s in samples] == ["blurry", None, None]
    assert_outcome(samples[1], "memory:///n/a.parquet", 1, "negative_prompt is not valid UTF-8")
    assert samples[0].error is None and samples[2].error is None


# Duplicate ids: never merged, never lost ---------------------------------------------------------------------------

def test_duplicate_ids_within_a_unit(memfs):
    """Outcome: the later row fails naming the first; the first stays ok; both rows are in the output.

    The key belongs to the first row even when that row fails for another reason (row 3 here): a key is
    never written twice by one unit, and the valid later row (4) says why it was not generated.
    """
    table = pa.table({
        "prompt": ["a", "b", "c", None, "e", "f"],
        "id": pa.array(["x", "y", "x", "z", "z", None]),  # row 5 has no id: its key is its index, 000000000005
    })
    put(memfs, "memory://d/a.parquet", table)
    put(memfs, "memory://d/b.parquet", pa.table({"prompt": ["g"], "id": ["000000000005"]}))
    samples = read_all(memfs, "memory://d")
    assert [s.key for s in samples] == ["x", "y", "x", "z", "z", "000000000005", "000000000005"]
    path = "memory:///d/a.parquet"
    assert_outcome(samples[2], path, 2, "duplicate id 'x' (first at row 0)")
    assert_outcome(samples[3], path, 3, "prompt is null")
    assert_outcome(samples[4], path, 4, "duplicate id 'z' (first at row 3)")
    # b.parquet's row repeats row 5's default key from another unit: both ok, left for verify (next test).
    assert [samples[i].error for i in (0, 1, 5, 6)] == [None] * 4


def test_duplicate_ids_across_units_are_left_for_verify(memfs):
    """Outcome: a key repeated in two units (of one file or of two files) gives two ok rows, in two shards.

    No unit can see the other, and planning reads footers only. `verify` finds such keys in the output, and
    names their input rows from what the job records: each shard's marker holds its unit (path, first_row), and
    output row i of a shard is input row first_row + i. This test checks that mapping holds.
    """
    put(memfs, "memory://u/a.parquet", pa.table({"prompt": ["a", "b", "c", "d"], "id": ["k1", "k2", "k3", "k1"]}),
        row_group_size=2)
    put(memfs, "memory://u/b.parquet", pa.table({"prompt": ["e", "f"], "id": pa.array([7, 3], pa.int64())}))
    put(memfs, "memory://u/c.parquet", pa.table({"prompt": ["g"], "id": ["7"]}))  # the int 7 and the string "7"
    units = plan_units(list_input_files(memfs, "memory://u"), rows_per_unit=2)
    located = {}  # key -> [(input file, input row)] as verify would locate it
    for unit in units:
        for i, sample in enumerate(read_unit(memfs, unit).samples):
            assert sample.error is None
            located.setdefault(sample.key, []).append((unit.path.rsplit("/", 1)[1], unit.first_row + i))
    assert {key: rows for key, rows in located.items() if len(rows) > 1} == {
        "k1": [("a.parquet", 0), ("a.parquet", 3)],
        "7": [("b.parquet", 0), ("c.parquet", 0)],
    }


# Bad bytes inside a valid file: only the rows they hold fail ------------------------------------------------------

def test_undecodable_row_group_fails_only_its_rows(memfs):
    """Outcome: rows of the damaged row group fail naming it; the unit's other rows are generated."""
    table = pa.table({"prompt": [f"prompt number {i} " * 4 for i in range(30)], "style": ["s"] * 30})
    memfs.pipe_file("memory://c/a.parquet", corrupt_row_group(parquet_bytes(table, row_group_size=10), group=1))
    samples = read_all(memfs, "memory://c")
    failed = [i for i, s in enumerate(samples) if s.error]
    assert failed == list(range(10, 20))
    assert all("row group 1 cannot be decoded" in samples[i].error for i in failed)
    assert samples[15].error.startswith("memory:///c/a.parquet row 15: ")
    assert [s.prompt for s in samples[:10] + samples[20:]] == table["prompt"].to_pylist()[:10] + \
        table["prompt"].to_pylist()[20:]


# Per-job cases: one InputError naming the file or field, before anything runs -------------------------------------

def _schema_files(**columns) -> dict:
    return {"a.parquet": parquet_bytes(pa.table(columns))}


JOB_CASES = [
    # (case, files under the folder, path below memory://j, prompt column, expected message, as a regex)
    ("missing prompt column", _schema_files(caption=["a"], url=["u"]), "", "prompt",
     r"a\.parquet: no column 'prompt'; columns are \['caption', 'url'\]$"),
    ("mistyped prompt column", _schema_files(prompt=["a"]), "", "promt",
     r"a\.parquet: no column 'promt'; columns are \['prompt'\]; did you mean --prompt-column 'prompt'\?"),
    ("prompt column of integers", _schema_files(prompt=[1, 2]), "", "prompt",
     r"a\.parquet: column 'prompt' must be a string, not int64"),
    ("prompt column of bytes", _schema_files(prompt=pa.array([b"a"], pa.binary())), "", "prompt",
     r"a\.parquet: column 'prompt' must be a string, not binary"),
    ("prompt column twice", {"a.parquet": parquet_bytes(pa.Table.from_arrays([pa.array(["a"])] * 2,
                                                                             names=["prompt"] * 2))},
     "", "prompt", r"a\.parquet: column 'prompt' appears 2 times"),
    ("an extra column twice", {"a.parquet": parquet_bytes(pa.Table.from_arrays(
        [pa.array(["a"]), pa.array(["x"]), pa.array(["y"])], names=["prompt", "style", "style"]))},
     "", "prompt", r"a\.parquet: column 'style' appears 2 times"),
    ("seed column of strings", _schema_files(prompt=["a"], seed=["7"]), "", "prompt",
     r"a\.parquet: column 'seed' must be an integer, not string"),
    ("id column of floats", _schema_files(prompt=["a"], id=[1.5]), "", "prompt",
     r"a\.parquet: column 'id' must be a string or an integer, not double"),
    ("negative_prompt of integers", _schema_files(prompt=["a"], negative_prompt=[1]), "", "prompt",
     r"a\.parquet: column 'negative_prompt' must be a string, not int64"),
    ("prompt string in one file, int in another",
     {"a.parquet": parquet_bytes(pa.table({"prompt": ["a"]})), "b.parquet": parquet_bytes(pa.table({"prompt": [1]}))},
     "", "prompt", r"^memory:///j/b\.parquet: column 'prompt' must be a string, not int64$"),
    ("an extra column of two types",
     {"a.parquet": parquet_bytes(pa.table({"prompt": ["a"], "style": ["photo"]})),
      "b.parquet": parquet_bytes(pa.table({"prompt": ["b"], "style": [3]}))},
     "", "prompt", r"column 'style' is string in memory:///j/a\.parquet but int64 in memory:///j/b\.parquet"),
    ("not Parquet, named .parquet", {"a.parquet": b"id,prompt\n1,a cat\n"}, "", "prompt",
     r"a\.parquet: not a valid Parquet file"),
    ("a CSV file given by name", {"p.csv": b"id,prompt\n1,a cat\n"}, "/p.csv", "prompt",
     r"p\.csv: not a valid Parquet file"),
    ("zero-byte file", {"a.parquet": b""}, "", "prompt", r"a\.parquet: not a valid Parquet file"),
    ("truncated Parquet (footer cut off)", {"a.parquet": parquet_bytes(pa.table({"prompt": ["a"] * 100}))[:-30]},
     "", "prompt", r"a\.parquet: not a valid Parquet file"),
    ("many bad files: the first is named, the rest counted",
     {f"{i}.parquet": b"junk" for i in range(5)}, "", "prompt",
     r"0\.parquet: not a valid Parquet file .* \(and 4 more input files with problems\)$"),
    ("an empty folder", {"keep/x.parquet": parquet_bytes(pa.table({"prompt": ["a"]}))}, "/nothing-here", "prompt",
     r"no Parquet files found at memory:///j/nothing-here"),
    ("a path that does not exist", {}, "/missing", "prompt",
     r"^no Parquet files found at memory:///j/missing \(no such file or folder\)$"),
    ("a folder of other files only", {"notes.txt": b"x", "data.csv": b"a"}, "", "prompt",
     r"no Parquet files found at memory:///j"),
    ("a glob that matches nothing", {"a.parquet": parquet_bytes(pa.table({"prompt": ["a"]}))}, "/*.parq", "prompt",
     r"no Parquet files found at memory:///j/\*\.parq"),
    ("only zero-row files", {"a.parquet": parquet_bytes(pa.table({"prompt": pa.array([], pa.string())}))}, "",
     "prompt", r"no rows to generate: the 1 Parquet file\(s\) at memory:///j are all empty"),
]


@pytest.mark.parametrize("name,files,path,column,message", JOB_CASES, ids=[c[0] for c in JOB_CASES])
def test_per_job_problems_stop_before_work(memfs, name, files, path, column, message):
    for relative, data in files.items():
        memfs.pipe_file(f"memory://j/{relative}", data)
    if name == "an empty folder":
        memfs.mkdir("memory://j/nothing-here")
    with pytest.raises(InputError) as error:
        plan_units(list_input_files(memfs, f"memory://j{path}", column), rows_per_unit=10)
    assert "\n" not in str(error.value) and re.search(message, str(error.value)), str(error.value)


# Odd but valid input: planned and read, nothing lost ---------------------------------------------------------------

def test_categorical_and_all_null_prompt_columns(memfs):
    """pandas categoricals (a dictionary column) are prompts like any; an all-null column fails each row."""
    categorical = pa.table({"prompt": pa.array(["a cat", "a dog", "a cat"]).dictionary_encode()})
    put(memfs, "memory://c/a.parquet", categorical)
    put(memfs, "memory://c/b.parquet", pa.table({"prompt": pa.nulls(2)}))
    samples = read_all(memfs, "memory://c")
    assert [s.prompt for s in samples[:3]] == ["a cat", "a dog", "a cat"] and not any(s.error for s in samples[:3])
    assert [s.error.endswith("prompt is null") for s in samples[3:]] == [True, True]


def test_zero_row_files_and_row_groups_are_skipped(memfs):
    """Outcome: no units for zero rows; every real row covered once, keys counting real rows only."""
    buf = pa.BufferOutputStream()
    empty = pa.table({"prompt": pa.array([], pa.string())})
    with pq.ParquetWriter(buf, empty.schema) as writer:
        for table in (empty, pa.table({"prompt": ["a", "b"]}), empty, empty, pa.table({"prompt": ["c"]}), empty):
            writer.write_table(table)
    memfs.pipe_file("memory://z/a.parquet", buf.getvalue().to_pybytes())
    put(memfs, "memory://z/b.parquet", empty)
    put(memfs, "memory://z/c.parquet", pa.table({"prompt": ["d"]}))
    files = list_input_files(memfs, "memory://z")
    assert [f.row_group_rows for f in files] == [(0, 2, 0, 0, 1, 0), (0,), (1,)]
    units = plan_units(files, rows_per_unit=2)
    assert [(u.path.rsplit("/", 1)[1], u.first_row, u.num_rows) for u in units] == [
        ("a.parquet", 0, 2), ("a.parquet", 2, 1), ("c.parquet", 0, 1)]
    samples = [s for u in units for s in read_unit(memfs, u).samples]
    assert [(s.key, s.prompt) for s in samples] == [
        ("000000000000", "a"), ("000000000001", "b"), ("000000000002", "c"), ("000000000003", "d")]


def test_hidden_and_underscore_paths_in_a_folder_are_not_input(memfs):
    """Spark's _temporary and _SUCCESS, Jupyter's checkpoints, dot-files: skipped under a folder, as pyarrow does."""
    for name in ("a.parquet", "_temporary/0/part-0.parquet", ".ipynb_checkpoints/a.parquet", "sub/.a.parquet",
                 "sub/b.parquet"):
        put(memfs, f"memory://h/{name}", pa.table({"prompt": [name]}))
    memfs.pipe_file("memory://h/_SUCCESS", b"")
    assert [f.name for f in list_input_files(memfs, "memory://h")] == ["a.parquet", "sub/b.parquet"]


def test_files_with_different_extra_columns_give_shards_of_one_schema(memfs):
    """Outcome: every unit's extra columns are the union over the job, null where a file lacks one, so globbing
    readers of the output (pyarrow.dataset, datasets) see every column of every shard."""
    put(memfs, "memory://x/a.parquet", pa.table({"prompt": ["a"], "style": ["photo"], "n": pa.array([1], pa.int32())}))
    put(memfs, "memory://x/b.parquet", pa.table({"prompt": ["b"], "n": pa.array([2], pa.int64()),
                                                 "score": [0.5], "style": pa.array(["ink"]).dictionary_encode()}))
    put(memfs, "memory://x/c.parquet", pa.table({"prompt": ["c"]}))
    units = plan_units(list_input_files(memfs, "memory://x"), rows_per_unit=10)
    extras = [read_unit(memfs, unit).extra for unit in units]
    want = pa.schema([("style", pa.string()), ("n", pa.int64()), ("score", pa.float64())])
    assert all(extra.schema == want for extra in extras)
    assert [extra.to_pylist() for extra in extras] == [
        [{"style": "photo", "n": 1, "score": None}],
        [{"style": "ink", "n": 2, "score": 0.5}],
        [{"style": None, "n": None, "score": None}],
    ]
    same = plan_units(list_input_files(memfs, "memory://x/[ab].parquet"), rows_per_unit=10)
    assert same[0].extra_schema is not None
    put(memfs, "memory://y/a.parquet", pa.table({"prompt": ["a"], "style": ["x"]}))
    put(memfs, "memory://y/b.parquet", pa.table({"prompt": ["b"], "style": ["y"]}))
    assert {u.extra_schema for u in plan_units(list_input_files(memfs, "memory://y"), 10)} == {None}  # files agree


# Storage that cannot be read ---------------------------------------------------------------------------------------

def test_bucket_that_does_not_exist(s3):
    fs, _ = fsspec.core.url_to_fs("s3://no-such-bucket-here/in", **s3.storage_options)
    with pytest.raises(InputError, match=r"^no Parquet files found at s3://no-such-bucket-here/in "
                                         r"\(The specified bucket does not exist\)$"):
        list_input_files(fs, "s3://no-such-bucket-here/in")


class Denied(MemoryFileSystem):
    """Storage errors on b.parquet, as s3fs raises them: access denied (a 403) on the calls named in `denied`,
    and `read_failures` connection resets on reads from offset `fail_at` (0: the footer, as pyarrow reads the
    whole of a small file first; 4: the rows, whose first column chunk follows the magic bytes)."""

    denied: set[str] = set()
    read_failures = fail_at = 0
    opened = 0

    def info(self, path, **kwargs):
        if "info" in self.denied:
            raise PermissionError(errno.EACCES, "Access Denied")
        return super().info(path, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        Denied.opened += 1
        if path.endswith("b.parquet") and mode == "rb":
            if "open" in self.denied:
                raise PermissionError(errno.EACCES, "Access Denied")
            f = super()._open(path, mode, **kwargs)
            real_read = f.read

            def read(*args):
                if Denied.read_failures and f.tell() == Denied.fail_at:
                    Denied.read_failures -= 1
                    raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
                return real_read(*args)

            f.read = read
            return f
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def denied():
    fs = Denied(skip_instance_cache=True)
    fs.denied = set()
    put(fs, "memory://d/a.parquet", pa.table({"prompt": ["a", "b"]}))
    put(fs, "memory://d/b.parquet", pa.table({"prompt": ["c", "d"]}))
    Denied.opened = Denied.read_failures = Denied.fail_at = 0
    yield fs
    fs.rm("/", recursive=True)


def test_access_denied_when_listing_or_reading_footers(denied):
    denied.denied = {"info"}
    with pytest.raises(InputError, match=r"^cannot list memory:///d \(PermissionError: .*Access Denied\)$"):
        list_input_files(denied, "memory://d")
    denied.denied = {"open"}
    with pytest.raises(InputError, match=r"^memory:///d/b\.parquet: cannot read \(PermissionError: .*Access Denied"):
        list_input_files(denied, "memory://d")
    assert Denied.opened == 2  # a permanent error is not retried


def test_storage_errors_inside_pyarrow_are_retried_not_taken_for_bad_content(denied):
    """A connection reset while pyarrow reads a footer or rows is retried (and then succeeds): it is neither
    reported as a file that is not Parquet nor turned into failed rows."""
    Denied.read_failures, Denied.fail_at = 1, 0
    files = list_input_files(denied, "memory://d")
    assert Denied.read_failures == 0 and [f.num_rows for f in files] == [2, 2]
    unit = plan_units(files, rows_per_unit=10)[1]
    # Two: the unit's read, then the re-read of single row groups if the first were taken for bad data.
    Denied.read_failures, Denied.fail_at = 2, 4
    samples = read_unit(denied, unit).samples
    assert Denied.read_failures == 0 and [(s.prompt, s.error) for s in samples] == [("c", None), ("d", None)]


def test_input_unreadable_mid_job_fails_the_unit_not_its_rows(denied):
    """Outcome: the unit raises an error naming the file and rows (the pool retries it, then reports the shard
    failed; a re-run resumes). Its rows are not marked failed: they are valid, and must not be lost."""
    units = plan_units(list_input_files(denied, "memory://d"), rows_per_unit=10)
    denied.denied, Denied.opened = {"open"}, 0
    assert [s.prompt for s in read_unit(denied, units[0]).samples] == ["a", "b"]
    with pytest.raises(UnitReadError, match=r"^cannot read memory:///d/b\.parquet rows 0-1: PermissionError"):
        read_unit(denied, units[1])
    assert Denied.opened == 2  # one try each: permanent errors are not retried


def test_file_that_shrank_after_planning_fails_the_unit(memfs):
    put(memfs, "memory://s/a.parquet", pa.table({"prompt": ["a", "b", "c"]}))
    (unit,) = plan_units(list_input_files(memfs, "memory://s"), rows_per_unit=10)
    put(memfs, "memory://s/a.parquet", pa.table({"prompt": ["a"]}))
    with pytest.raises(UnitReadError, match=r"a\.parquet has fewer rows than planned \(unit 0\); did the file change"):
        read_unit(memfs, unit)


# Fingerprints: the same prompts anywhere are the same input --------------------------------------------------------

def test_fingerprint_is_equal_for_a_copy_and_changes_with_the_content(tmp_path):
    """A copy in another folder with new modification times (as Ray's unpacking of a working dir writes) has the
    same fingerprint, so a job resubmitted from there resumes; an edit is still found."""
    fs = fsspec.filesystem("file")
    first = tmp_path / "_ray_pkg_aaaa" / "prompts"
    (first / "sub").mkdir(parents=True)
    (first / "a.parquet").write_bytes(parquet_bytes(pa.table({"prompt": ["a cat", "a dog"]})))
    (first / "sub" / "b.parquet").write_bytes(parquet_bytes(pa.table({"prompt": ["an owl"]})))
    second = tmp_path / "_ray_pkg_bbbb" / "prompts"
    shutil.copytree(first, second, copy_function=shutil.copyfile)  # contents only
    for path in second.rglob("*.parquet"):
        os.utime(path, (1e9, 1e9))  # a new mtime, as Ray's unpacking gives
    inputs = input_fingerprint(list_input_files(fs, str(first)))
    assert [entry["path"] for entry in inputs] == ["a.parquet", "sub/b.parquet"]
    assert input_fingerprint(list_input_files(fs, str(second))) == inputs
    assert input_fingerprint(list_input_files(fs, str(second / "*" / "b.parquet"))) == [inputs[1]]
    assert input_fingerprint(list_input_files(fs, str(second / "a.parquet"))) == [inputs[0]]
    check_compatible({"spec": {}, "inputs": inputs}, {}, input_fingerprint(list_input_files(fs, str(second))))

    (second / "a.parquet").write_bytes(parquet_bytes(pa.table({"prompt": ["a cow", "a dog"]})))  # same size
    assert (second / "a.parquet").stat().st_size == (first / "a.parquet").stat().st_size
    changed = input_fingerprint(list_input_files(fs, str(second)))
    assert changed[0]["etag"] != inputs[0]["etag"] and changed[1] == inputs[1]
    with pytest.raises(SpecMismatchError, match=r"a\.parquet \(etag sha256:"):
        check_compatible({"spec": {}, "inputs": inputs}, {}, changed)


def test_fingerprint_of_an_s3_copy(s3):
    base = f"{s3.bucket}/fingerprint"
    s3.fs.pipe_file(f"{base}/one/a.parquet", parquet_bytes(pa.table({"prompt": ["a cat"]})))
    s3.fs.copy(f"{base}/one/a.parquet", f"{base}/two/a.parquet")
    fs, _ = fsspec.core.url_to_fs(s3.url(""), **s3.storage_options)
    one = input_fingerprint(list_input_files(fs, s3.url("fingerprint/one")))
    assert one == input_fingerprint(list_input_files(fs, s3.url("fingerprint/two/")))
    assert one[0]["path"] == "a.parquet" and not one[0]["etag"].startswith("footer")  # the store's MD5


# End to end: real outputs and exit statuses of `python -m jobs.generate` ----------------------------------------

SIZE = ["--height", "64", "--width", "64", "--dtype", "float32"]  # logical GPUs compute on the CPU
# b.parquet: (id, float seed, expected); the float64 seed column is what pandas writes for integers with gaps.
B_ROWS = [
    ("b0", 7.0, None),
    ("b1", float("nan"), None),
    ("b0", 3.0, "duplicate id 'b0' (first at row 0)"),
    ("b3", 1.5, "seed 1.5 is not a whole number"),
    ("p00", 4.0, None),  # also a.parquet row 0: the job cannot see it; verify reports it
    ("b5", -1.0, "seed -1 outside"),
]
C_ROWS, C_BROKEN_GROUP = 30, 1  # c.parquet: row groups of 10, the second undecodable


def build_hostile_folder(folder) -> list[tuple[str, str | None]]:
    """Three files with different extra columns; returns (file and row, expected error) per input row."""
    folder.mkdir()
    a = pa.table({"id": [f"p{i:02d}" for i in range(len(PROMPT_CASES))],
                  "prompt": string_column([c[1] for c in PROMPT_CASES]), "style": ["photo"] * len(PROMPT_CASES)})
    (folder / "a.parquet").write_bytes(parquet_bytes(a))
    b = pa.table({"id": [r[0] for r in B_ROWS], "prompt": [f"a cat number {i}" for i in range(len(B_ROWS))],
                  "seed": pa.array([r[1] for r in B_ROWS], pa.float64()), "score": [0.5] * len(B_ROWS)})
    (folder / "b.parquet").write_bytes(parquet_bytes(b))
    c = pa.table({"prompt": [f"an owl number {i}, watercolor " * 3 for i in range(C_ROWS)]})
    (folder / "c.parquet").write_bytes(corrupt_row_group(parquet_bytes(c, row_group_size=10), C_BROKEN_GROUP))
    c_expected = ["row group 1 cannot be decoded" if 10 <= i < 20 else None for i in range(C_ROWS)]
    return ([(f"a.parquet row {i}", case[2]) for i, case in enumerate(PROMPT_CASES)]
            + [(f"b.parquet row {i}", row[2]) for i, row in enumerate(B_ROWS)]
            + [(f"c.parquet row {i}", e) for i, e in enumerate(c_expected)])


def output_rows(output) -> tuple[list[dict], list[pa.Schema], dict]:
    """Metadata rows of every committed shard in shard order, each with its input file and row, the shards'
    schemas, and the tar members by shard and name (a key may repeat across shards)."""
    rows, schemas, members = [], [], {}
    for marker in sorted(output.glob("*.stats.json")):
        stats = json.loads(marker.read_text())
        shard, unit = stats["shard"], stats["unit"]
        table = pq.read_table(output / f"{shard}.parquet")
        schemas.append(table.schema.remove_metadata())
        for i, row in enumerate(table.to_pylist()):
            where = f"{unit['path'].rsplit('/', 1)[1]} row {unit['first_row'] + i}"
            rows.append(row | {"shard": shard, "input": where})
        tar = tar_members((output / f"{shard}.tar").read_bytes())
        members.update({(shard, name): data for name, data in tar.items()})
    return rows, schemas, members


def test_hostile_folder_end_to_end(ray_gpus, tiny_models, tmp_path):
    """Every input row appears once in the output, in input order: bad ones with status failed and an error
    naming file and row, all others generated, their text byte-exact. Exit status 0: nothing failed as a job."""
    expected = build_hostile_folder(tmp_path / "in")
    output = tmp_path / "out"
    status = generate.main(["--prompts", str(tmp_path / "in"), "--output", str(output),
                            "--model", str(tiny_models["instaflow"]), *SIZE, "--rows-per-shard", "16",
                            "--batch-size", "8", "--num-workers", "1", "--no-progress"])
    assert status == 0
    rows, schemas, members = output_rows(output)
    assert [row["input"] for row in rows] == [where for where, _ in expected]  # each once, nothing lost
    for row, (where, error) in zip(rows, expected):
        if error is None:
            assert (row["status"], row["error_message"]) == ("ok", None), (where, row["error_message"])
            shard, key = row["shard"], row["key"]
            assert members[shard, f"{key}.txt"] == row["prompt"].encode()  # emoji, RTL, NUL, controls intact
            assert json.loads(members[shard, f"{key}.json"])["prompt"] == row["prompt"]
        else:
            assert row["status"] == "failed"
            assert row["error_message"].startswith(f"file://{tmp_path}/in/{where}: ") and error in row["error_message"]
    prompts = {row["input"]: row for row in rows}
    for i, (_, value, error) in enumerate(PROMPT_CASES):
        if error is None:
            assert prompts[f"a.parquet row {i}"]["prompt"] == value
    long_row = next(i for i, case in enumerate(PROMPT_CASES) if case[1] is LONG_PROMPT)
    assert prompts[f"a.parquet row {long_row}"]["truncated"] is True  # generated from its first 77 tokens
    assert prompts["b.parquet row 0"]["seed"] == 7
    assert len(members) == 3 * sum(error is None for _, error in expected)  # jpg, txt, json of ok rows only
    assert len(set(schemas)) == 1 and schemas[0].names[-2:] == ["style", "score"]  # one schema for every shard
    # The repeated id: two ok rows, each traceable to its input row (what verify reports).
    assert [row["input"] for row in rows if row["key"] == "p00"] == ["a.parquet row 0", "b.parquet row 4"]


@pytest.mark.parametrize("layout,message", [
    ({"a.parquet": pa.table({"caption": ["a"]})}, r"a\.parquet: no column 'prompt'; columns are \['caption'\]"),
    ({"a.parquet": b"PAR1 but not really"}, r"a\.parquet: not a valid Parquet file"),
    ({}, r"no Parquet files found at file://"),
], ids=["missing prompt column", "not Parquet", "empty folder"])
def test_per_job_problem_exits_2_with_one_line(tiny_models, tmp_path, capsys, layout, message):
    (tmp_path / "in").mkdir()
    for name, content in layout.items():
        data = content if isinstance(content, bytes) else parquet_bytes(content)
        (tmp_path / "in" / name).write_bytes(data)
    status = generate.main(["--prompts", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                            "--model", str(tiny_models["instaflow"]), *SIZE, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and re.search(message, err[0]), err
    assert not (tmp_path / "out").exists()


def test_model_path_that_does_not_exist(ray_gpus, tmp_path, capsys):
    """Outcome: exit 2 and one line naming the path; the output is not bound to the job (no _job.json)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.parquet").write_bytes(parquet_bytes(pa.table({"prompt": ["a cat"]})))
    missing = tmp_path / "no-such-model"
    status = generate.main(["--prompts", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                            "--model", str(missing), *SIZE, "--num-workers", "1", "--no-progress"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert status == 2 and len(errors) == 1 and str(missing) in errors[0], errors
    assert not (tmp_path / "out" / "_job.json").exists()


def test_input_unreadable_mid_job_then_resumed(ray_gpus, tiny_models, tmp_path, monkeypatch, caplog):
    """A file that goes away after planning: its shard fails naming the file (exit 1), the other file's shards
    commit; with the file back, the same command resumes and finishes (exit 0), every row once."""
    (tmp_path / "in").mkdir()
    for name, start in (("a.parquet", 0), ("b.parquet", 4)):
        table = pa.table({"prompt": [f"a fox number {i}" for i in range(start, start + 4)]})
        (tmp_path / "in" / name).write_bytes(parquet_bytes(table))
    hidden = tmp_path / "b.parquet.away"
    real_list = pipeline.job.list_input_files

    def list_then_lose_b(*args, **kwargs):
        files = real_list(*args, **kwargs)
        (tmp_path / "in" / "b.parquet").rename(hidden)
        return files

    args = ["--prompts", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
            "--model", str(tiny_models["instaflow"]), *SIZE, "--rows-per-shard", "4", "--num-workers", "1",
            "--max-unit-attempts", "2", "--no-progress"]
    monkeypatch.setattr(pipeline.job, "list_input_files", list_then_lose_b)
    assert generate.main(args) == 1
    failures = [r.getMessage() for r in caplog.records if r.name == "pipeline.job" and r.levelname == "ERROR"]
    assert len(failures) == 1 and re.search(r"^shard 00001 failed after 2 tries: UnitReadError: cannot read "
                                            r"file://\S*/in/b\.parquet rows 0-3: FileNotFoundError", failures[0])
    assert [p.name for p in sorted((tmp_path / "out").glob("*.stats.json"))] == ["00000.stats.json"]

    monkeypatch.setattr(pipeline.job, "list_input_files", real_list)
    hidden.rename(tmp_path / "in" / "b.parquet")
    assert generate.main(args) == 0
    rows, _, _ = output_rows(tmp_path / "out")
    assert [row["prompt"] for row in rows] == [f"a fox number {i}" for i in range(8)]
    assert all(row["status"] == "ok" for row in rows)
