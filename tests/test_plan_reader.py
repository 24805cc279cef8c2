"""Planning from Parquet footers and reading units, on local disk, memory:// and S3 (moto)."""

from __future__ import annotations

import io
import logging

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.plan import InputError, WorkUnit, input_fingerprint, list_input_files, plan_units
from pipeline.reader import derive_seed, read_unit


def parquet_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue()


def prompts(n: int, start: int = 0) -> pa.Table:
    return pa.table({"prompt": pa.array([f"prompt {i}" for i in range(start, start + n)], type=pa.string())})


@pytest.fixture
def memfs():
    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    yield fs
    fs.rm("/", recursive=True)


def covered_rows(units: list[WorkUnit]) -> list[tuple[str, int]]:
    return [(u.path, u.first_row + i) for u in units for i in range(u.num_rows)]


def test_folder_plan_covers_every_row_once_and_is_stable(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.parquet").write_bytes(parquet_bytes(prompts(10), row_group_size=3))  # groups 3,3,3,1
    (tmp_path / "sub" / "b.parquet").write_bytes(parquet_bytes(prompts(7, 10), row_group_size=7))
    (tmp_path / "empty.parquet").write_bytes(parquet_bytes(prompts(0)))
    (tmp_path / "notes.txt").write_text("not input")
    fs = fsspec.filesystem("file")

    files = list_input_files(fs, str(tmp_path))
    assert [f.path.rsplit("/", 1)[1] for f in files] == ["a.parquet", "empty.parquet", "b.parquet"]
    assert [f.path.split("://")[0] for f in files] == ["file"] * 3
    assert files[0].row_group_rows == (3, 3, 3, 1) and files[0].num_rows == 10
    assert files[0].size == (tmp_path / "a.parquet").stat().st_size
    assert [f.name for f in files] == ["a.parquet", "empty.parquet", "sub/b.parquet"]

    units = plan_units(files, rows_per_unit=6)
    assert [(u.path.rsplit("/", 1)[1], u.first_row, u.num_rows, u.first_key_index) for u in units] == [
        ("a.parquet", 0, 6, 0),
        ("a.parquet", 6, 4, 6),
        ("b.parquet", 0, 6, 10),  # one row group of 7 > 6 rows: split
        ("b.parquet", 6, 1, 16),
    ]
    assert [u.unit_id for u in units] == [0, 1, 2, 3] and units[3].shard == "00003"
    rows = covered_rows(units)
    assert len(rows) == len(set(rows)) == 17
    assert plan_units(list_input_files(fs, str(tmp_path)), rows_per_unit=6) == units
    assert input_fingerprint(files)[0] == {"path": "a.parquet", "size": files[0].size, "etag": files[0].etag,
                                           "mtime": None}
    assert files[0].etag.startswith("sha256:") and files[0].etag != files[1].etag


def test_plan_reads_only_footers(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    big = pa.table({"prompt": [rng.bytes(128).hex() for _ in range(20_000)]})  # incompressible: ~4 MB
    path = tmp_path / "big.parquet"
    path.write_bytes(parquet_bytes(big, row_group_size=1000))
    fs = fsspec.filesystem("file", skip_instance_cache=True)
    read = []
    real_open = fs.open

    def counting_open(*args, **kwargs):
        f = real_open(*args, **kwargs)
        real_read = f.read
        f.read = lambda *a: read.append(len(data := real_read(*a))) or data
        return f

    monkeypatch.setattr(fs, "open", counting_open)
    files = list_input_files(fs, str(path))
    assert files[0].num_rows == 20_000 and len(files[0].row_group_rows) == 20
    assert 0 < sum(read) < path.stat().st_size / 20


def test_memory_glob_single_file_and_row_groups(memfs):
    for name, n in (("x/p1.parquet", 5), ("x/p2.parquet", 5), ("x/q.parquet", 5)):
        memfs.pipe_file(f"memory://{name}", parquet_bytes(prompts(n), row_group_size=1))
    files = list_input_files(memfs, "memory://x/p*.parquet")
    assert [f.path for f in files] == ["memory:///x/p1.parquet", "memory:///x/p2.parquet"]
    assert files[0].row_group_rows == (1,) * 5
    units = plan_units(files, rows_per_unit=2)
    assert [u.num_rows for u in units] == [2, 2, 1, 2, 2, 1]
    assert len(set(covered_rows(units))) == 10
    single = list_input_files(memfs, "memory://x/q.parquet")
    assert [f.path for f in single] == ["memory:///x/q.parquet"]


def test_s3_folder_glob_and_file(s3):
    base = f"{s3.bucket}/plan"
    s3.fs.pipe_file(f"{base}/b.parquet", parquet_bytes(prompts(4), row_group_size=2))
    s3.fs.pipe_file(f"{base}/a.parquet", parquet_bytes(prompts(3)))
    s3.fs.pipe_file(f"{base}/readme.md", b"# not input")
    fs, path = fsspec.core.url_to_fs(s3.url("plan"), **s3.storage_options)

    files = list_input_files(fs, path)
    assert [f.path for f in files] == [s3.url("plan/a.parquet"), s3.url("plan/b.parquet")]
    assert all(f.etag and '"' not in f.etag and not f.etag.startswith("footer") for f in files)
    assert [f.name for f in files] == ["a.parquet", "b.parquet"]
    assert list_input_files(fs, s3.url("plan/*.parquet")) == files
    assert list_input_files(fs, s3.url("plan/b.parquet")) == files[1:]

    units = plan_units(files, rows_per_unit=2)
    assert [(u.first_row, u.num_rows, u.first_key_index) for u in units] == [(0, 2, 0), (2, 1, 2), (0, 2, 3), (2, 2, 5)]
    assert [s.prompt for s in read_unit(fs, units[3]).samples] == ["prompt 2", "prompt 3"]


def test_giant_row_group_is_split_with_one_warning(memfs, caplog):
    memfs.pipe_file("memory://g/big.parquet", parquet_bytes(prompts(10)))
    files = list_input_files(memfs, "memory://g/big.parquet")
    with caplog.at_level(logging.WARNING, logger="pipeline.plan"):
        units = plan_units(files, rows_per_unit=4)
    assert [(u.first_row, u.num_rows) for u in units] == [(0, 4), (4, 4), (8, 2)]
    assert len([r for r in caplog.records if "big.parquet" in r.getMessage()]) == 1
    assert [s.prompt for s in read_unit(memfs, units[1]).samples] == [f"prompt {i}" for i in range(4, 8)]


def test_input_errors_name_the_file_or_url(memfs):
    memfs.pipe_file("memory://e/ok.parquet", parquet_bytes(prompts(2)))
    memfs.pipe_file("memory://e/captions.parquet", parquet_bytes(pa.table({"caption": ["a"], "url": ["u"]})))
    with pytest.raises(InputError, match=r"captions\.parquet: no column 'prompt'; columns are \['caption', 'url'\]"):
        list_input_files(memfs, "memory://e")
    assert list_input_files(memfs, "memory://e/captions.parquet", prompt_column="caption")[0].num_rows == 1

    memfs.pipe_file("memory://t/ints.parquet", parquet_bytes(pa.table({"prompt": ["a"], "seed": ["7"]})))
    with pytest.raises(InputError, match=r"ints\.parquet: column 'seed' must be an integer, not string"):
        list_input_files(memfs, "memory://t")

    memfs.pipe_file("memory://n/broken.parquet", b"this is not parquet at all")
    with pytest.raises(InputError, match=r"broken\.parquet: not a valid Parquet file"):
        list_input_files(memfs, "memory://n")

    with pytest.raises(InputError, match="no Parquet files found at memory://+nowhere"):
        list_input_files(memfs, "memory://nowhere")
    with pytest.raises(InputError, match=r"memory://+e/\*\.csv"):
        list_input_files(memfs, "memory://e/*.csv")


def test_default_keys_and_derived_seeds(memfs):
    memfs.pipe_file("memory://k/a.parquet", parquet_bytes(prompts(3)))
    memfs.pipe_file("memory://k/b.parquet", parquet_bytes(prompts(4), row_group_size=2))
    units = plan_units(list_input_files(memfs, "memory://k"), rows_per_unit=2)
    unit = units[-1]  # b.parquet rows 2-3: global rows 5-6
    samples = read_unit(memfs, unit, job_seed=42).samples
    assert [s.key for s in samples] == ["000000000005", "000000000006"]
    assert [s.seed for s in samples] == [derive_seed(42, "000000000005"), derive_seed(42, "000000000006")]
    assert all(s.error is None and s.negative_prompt is None for s in samples)
    # Fixed value: seeds must not change across machines or versions.
    assert derive_seed(0, "000000000000") == 5621406764896913372
    assert derive_seed(42, "abc") == 5503711311217626450
    assert derive_seed(1, "k") != derive_seed(2, "k")


def test_id_seed_and_negative_prompt_columns(memfs):
    table = pa.table({
        "prompt": ["a cat", "a dog", "a fox"],
        "id": pa.array([10, 11, None], type=pa.int64()),
        "seed": pa.array([5, None, 2**63 - 1], type=pa.int64()),
        "negative_prompt": ["blurry", None, ""],
    })
    memfs.pipe_file("memory://i/p.parquet", parquet_bytes(table))
    unit = plan_units(list_input_files(memfs, "memory://i"), rows_per_unit=10)[0]
    samples = read_unit(memfs, unit, job_seed=3).samples
    assert [(s.key, s.seed, s.negative_prompt, s.error) for s in samples] == [
        ("10", 5, "blurry", None),
        ("11", derive_seed(3, "11"), None, None),
        ("000000000002", 2**63 - 1, "", None),
    ]


def test_bad_rows_become_errors_naming_the_row(memfs):
    table = pa.table({
        "prompt": ["fine 0", None, "   ", "fine 3", "bad seed", "bad id", "empty id", "dup", "fine 8"],
        "id": ["r0", "r1", "r2", "r3", "r4", "a/b", "", "r0", "r8"],
        "seed": pa.array([1, 2, 3, 4, -1, 6, 7, 8, 9], type=pa.int64()),
    })
    memfs.pipe_file("memory://b/bad.parquet", parquet_bytes(table, row_group_size=4))
    files = list_input_files(memfs, "memory://b")
    unit = WorkUnit(0, files[0].path, 0, 9, 0)
    samples = read_unit(memfs, unit).samples
    errors = {i: s.error for i, s in enumerate(samples) if s.error}
    assert sorted(errors) == [1, 2, 4, 5, 6, 7]
    assert all(e.startswith(f"{files[0].path} row {i}: ") for i, e in errors.items())
    assert "prompt is null" in errors[1]
    assert "empty prompt" in errors[2]
    assert "seed -1 outside" in errors[4] and samples[4].seed is None
    assert "'a/b'" in errors[5] and "tar" in errors[5]
    assert "id ''" in errors[6]
    assert "duplicate id 'r0' (first at row 0)" in errors[7]
    assert [(s.key, s.prompt, s.seed) for s in samples if not s.error] == [
        ("r0", "fine 0", 1), ("r3", "fine 3", 4), ("r8", "fine 8", 9)]

    # A unit starting mid-file names rows by their position in the file.
    later = read_unit(memfs, WorkUnit(1, files[0].path, 4, 4, 4)).samples
    assert later[0].error.startswith(f"{files[0].path} row 4: seed -1")


def test_extra_columns_are_carried_and_renamed(memfs):
    table = pa.table({
        "caption": ["a", "b", "c", "d"],
        "url": ["u0", "u1", "u2", "u3"],
        "prompt": ["p0", "p1", "p2", "p3"],
        "status": ["x", "y", "z", "w"],
        "score": pa.array([0.1, 0.2, 0.3, 0.4], type=pa.float32()),
    })
    memfs.pipe_file("memory://x/e.parquet", parquet_bytes(table, row_group_size=2))
    path = list_input_files(memfs, "memory://x", prompt_column="caption")[0].path
    unit_input = read_unit(memfs, WorkUnit(0, path, 1, 2, 1), prompt_column="caption")
    assert [s.prompt for s in unit_input.samples] == ["b", "c"]
    extra = unit_input.extra
    assert extra.column_names == ["url", "input_prompt", "input_status", "score"]
    assert extra.to_pydict()["url"] == ["u1", "u2"] and extra.schema.field("score").type == pa.float32()
