"""Inputs and outputs are what the user named: a literal file name with glob characters, folders of symbolic
links (the Hugging Face cache), outputs that fsspec would put elsewhere or that the input would read, prompt
columns named like sample fields, every Arrow string type, in-place edits, and options on inputs with no, many or
output-named extra columns."""

from __future__ import annotations

import io
import json
import logging
import os
import re

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hostile_corpus import parquet_bytes
from jobhelpers import tar_members
from jobs import generate
from pipeline.manifest import SpecMismatchError, check_compatible
from pipeline.plan import InputError, check_output_location, input_fingerprint, list_input_files, plan_units
from pipeline.reader import read_unit
from pipeline.spec import JobSpec
from pipeline.worker import standalone_worker

FS = fsspec.filesystem("file")


def write(path, table: pa.Table, row_group_size: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(parquet_bytes(table, row_group_size))


def prompts_of(path: str, column: str = "prompt") -> list:
    units = plan_units(list_input_files(FS, path, column), rows_per_unit=100)
    return [s.prompt for u in units for s in read_unit(FS, u, column).samples]


# A literal name first, a glob only when nothing has that name ----------------------------------------------------

@pytest.mark.parametrize("name", ["p[1].parquet", "p*.parquet", "what?.parquet"])
def test_a_file_named_with_glob_characters_is_read_as_that_file(tmp_path, caplog, name):
    write(tmp_path / name, pa.table({"prompt": ["the literal file"]}))
    write(tmp_path / "p1.parquet", pa.table({"prompt": ["a file the glob would match"]}))
    write(tmp_path / "whatx.parquet", pa.table({"prompt": ["another the glob would match"]}))
    with caplog.at_level(logging.INFO, logger="pipeline.plan"):
        assert prompts_of(str(tmp_path / name)) == ["the literal file"]
    assert "read as the path of that name, not as a glob" in caplog.text


def test_a_folder_named_with_glob_characters_and_a_glob_where_no_such_name_exists(tmp_path, caplog):
    write(tmp_path / "run[2]" / "a.parquet", pa.table({"prompt": ["in the folder"]}))
    write(tmp_path / "run2" / "a.parquet", pa.table({"prompt": ["not in it"]}))
    assert prompts_of(str(tmp_path / "run[2]")) == ["in the folder"]
    with caplog.at_level(logging.INFO, logger="pipeline.plan"):
        assert prompts_of(str(tmp_path / "run[23]" / "*.parquet")) == ["not in it"]  # no such name: a glob
    assert re.search(r"run\[23\]/\*\.parquet: a glob$", caplog.text, re.M)


# Symbolic links are inputs ---------------------------------------------------------------------------------------

def hf_cache_layout(root) -> None:
    """A Hugging Face hub cache of a dataset: snapshot files are relative links into blobs/."""
    blobs = root / "blobs"
    blobs.mkdir(parents=True)
    for i, blob in enumerate(("1f3a", "9c2e")):
        (blobs / blob).write_bytes(parquet_bytes(pa.table({"prompt": [f"train {i}"]})))
    data = root / "snapshots" / "abc123" / "data"
    data.mkdir(parents=True)
    for i, blob in enumerate(("1f3a", "9c2e")):
        os.symlink(f"../../../blobs/{blob}", data / f"train-0000{i}-of-00002.parquet")


def test_a_folder_of_symbolic_links_is_read_through_them(tmp_path, caplog):
    """The Hugging Face cache layout, a linked folder, and a link back up (a loop): every linked file once, the
    loop skipped with a warning, names as the links give them."""
    hf_cache_layout(tmp_path / "hub")
    prompts = tmp_path / "prompts"
    write(prompts / "own.parquet", pa.table({"prompt": ["own"]}))
    os.symlink(tmp_path / "hub" / "snapshots" / "abc123", prompts / "linked")
    os.symlink(prompts, prompts / "linked-loop")
    os.symlink(tmp_path / "hub" / "blobs" / "1f3a", prompts / "one-file.parquet")
    with caplog.at_level(logging.WARNING, logger="pipeline.plan"):
        files = list_input_files(FS, str(prompts))
    assert [f.name for f in files] == ["linked/data/train-00000-of-00002.parquet",
                                       "linked/data/train-00001-of-00002.parquet", "one-file.parquet", "own.parquet"]
    assert prompts_of(str(prompts)) == ["train 0", "train 1", "train 0", "own"]
    assert "linked-loop: a link to a folder above it (a loop)" in caplog.text
    # the same through a glob, and given the snapshot folder itself
    assert prompts_of(str(prompts / "linked" / "data" / "*.parquet")) == ["train 0", "train 1"]
    assert prompts_of(str(prompts / "**" / "train-*.parquet")) == ["train 0", "train 1"]
    assert prompts_of(str(tmp_path / "hub" / "snapshots" / "abc123")) == ["train 0", "train 1"]


def test_a_link_to_nothing_is_named(tmp_path):
    write(tmp_path / "in" / "a.parquet", pa.table({"prompt": ["a"]}))
    os.symlink(tmp_path / "gone.parquet", tmp_path / "in" / "b.parquet")
    with pytest.raises(InputError, match=r"in/b\.parquet: cannot read \(FileNotFoundError"):
        list_input_files(FS, str(tmp_path / "in"))


# Outputs: where the user said, and never read as input -----------------------------------------------------------

def run_generate(tmp_path, prompts, output, capsys) -> tuple[int, list[str]]:
    status = generate.main(["--prompts", str(prompts), "--output", str(output), "--model", str(tmp_path / "model"),
                            "--height", "64", "--width", "64", "--no-progress"])
    return status, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("output,message", [
    ("{tmp}/out::memory://elsewhere", r"fsspec would not write there but at file://\S*/out \('::' chains"),
    ("{tmp}/out[1]", r"'\*', '\?' and '\[' are glob characters"),
    ("{tmp}/in/out", r"output \S*/in/out is inside the prompts folder \S*/in: the next run would read its shards"),
    ("{tmp}/in", r"output \S*/in is inside the prompts folder"),
    ("{tmp}/in/linked-away/../out", r"inside the prompts folder"),
    ("{tmp}", r"prompts \S*/in are inside the output"),
], ids=["chained", "glob characters", "inside the prompts", "the prompts folder", "a dotted path", "holds the prompts"])
def test_an_output_that_is_not_where_named_or_is_input_is_refused(tmp_path, capsys, output, message):
    write(tmp_path / "in" / "a.parquet", pa.table({"prompt": ["a cat"]}))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    status, err = run_generate(tmp_path, tmp_path / "in", output.format(tmp=tmp_path), capsys)
    assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and re.search(message, err[0]), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written anywhere


def test_outputs_beside_or_below_the_prompts_that_the_input_does_not_read(tmp_path, capsys):
    """Refused only when the input would read the output: a glob that reaches into it, not one beside it."""
    write(tmp_path / "data" / "a.parquet", pa.table({"prompt": ["a cat"]}))
    link = tmp_path / "data-link"
    os.symlink(tmp_path / "data", link)

    def check(prompts, output) -> None:
        fs, root = fsspec.core.url_to_fs(str(output))
        check_output_location(FS, str(prompts), str(output), fs, root)

    check(tmp_path / "data" / "*.parquet", tmp_path / "data" / "out")  # *.parquet does not reach out/
    check(tmp_path / "data", tmp_path / "data" / "_out")  # skipped by the folder's listing
    check(tmp_path / "data" / "a.parquet", tmp_path / "data" / "out")  # one file: its folder is not input
    check(tmp_path / "data", tmp_path / "out")
    write(tmp_path / "out" / "_prompts" / "a.parquet", pa.table({"prompt": ["kept with the dataset"]}))
    check(tmp_path / "out" / "_prompts", tmp_path / "out")  # readers of the output skip its `_` folders
    for prompts, output in ((tmp_path / "data" / "*" / "*.parquet", tmp_path / "data" / "out"),
                            (tmp_path / "data" / "**", tmp_path / "data" / "_out"),
                            (link, tmp_path / "data" / "out"),  # the same folder through a link
                            (tmp_path / "data" / "a.parquet", tmp_path / "data")):
        with pytest.raises(InputError):
            check(prompts, output)
    status, err = run_generate(tmp_path, tmp_path / "data" / "*" / "*.parquet", tmp_path / "data" / "out", capsys)
    assert status == 2 and re.search(r"output \S*/data/out is inside what the prompts glob \S* matches", err[0]), err


# Prompt columns named like sample fields; every Arrow string type --------------------------------------------

@pytest.mark.parametrize("column", ["seed", "id", "negative_prompt"])
def test_a_prompt_column_named_like_a_sample_field_is_the_prompt(tmp_path, column):
    """It passes planning and every row is read as a prompt; it is not also taken as the seed, key or negative."""
    write(tmp_path / "a.parquet", pa.table({column: ["a red fox", "an owl"], "style": ["ink", "oil"]}))
    files = list_input_files(FS, str(tmp_path), column)
    [unit] = plan_units(files, 10)
    samples = read_unit(FS, unit, column, job_seed=3).samples
    assert [(s.prompt, s.error, s.negative_prompt) for s in samples] == [("a red fox", None, None),
                                                                         ("an owl", None, None)]
    assert [s.key for s in samples] == ["000000000000", "000000000001"] and all(s.seed is not None for s in samples)
    assert files[0].extra_schema.names == ["style"]


def test_a_mistyped_sample_field_beside_the_prompt_column_is_still_refused(tmp_path):
    write(tmp_path / "a.parquet", pa.table({"seed": ["a red fox"], "id": [1.5]}))
    with pytest.raises(InputError, match=r"column 'id' must be a string or an integer, not double"):
        list_input_files(FS, str(tmp_path), "seed")
    write(tmp_path / "b" / "a.parquet", pa.table({"id": [1, 2]}))
    with pytest.raises(InputError, match=r"column 'id' must be a string, not int64"):
        list_input_files(FS, str(tmp_path / "b"), "id")


TEXT_TYPES = [pa.string(), pa.large_string(), pa.string_view(), pa.dictionary(pa.int32(), pa.string()),
              pa.dictionary(pa.int8(), pa.large_string())]


@pytest.mark.parametrize("type_", TEXT_TYPES, ids=str)
def test_every_arrow_string_type_is_text(tmp_path, type_):
    """As prompt, negative_prompt and id columns, valid values are read, and bytes that are not UTF-8 fail their row."""
    table = pa.table({
        "prompt": pa.array(["a red fox", "an owl", "a cat"]).cast(type_),
        "negative_prompt": pa.array(["blurry", None, "dark"]).cast(type_),
        "id": pa.array(["k0", "k1", "k2"]).cast(type_),
    })
    write(tmp_path / "a.parquet", table)
    [unit] = plan_units(list_input_files(FS, str(tmp_path)), 10)
    samples = read_unit(FS, unit).samples
    assert [(s.key, s.prompt, s.negative_prompt, s.error) for s in samples] == [
        ("k0", "a red fox", "blurry", None), ("k1", "an owl", None, None), ("k2", "a cat", "dark", None)]
    bad = pa.array([b"a red fox", b"an \xff owl"], pa.binary()).cast(pa.binary_view()).view(pa.string_view())
    write(tmp_path / "b" / "a.parquet", pa.table({"prompt": bad}))
    [unit] = plan_units(list_input_files(FS, str(tmp_path / "b")), 10)
    assert [s.error is not None and "prompt is not valid UTF-8" in s.error for s in read_unit(FS, unit).samples] == [
        False, True]


# Edits in place are found ----------------------------------------------------------------------------------------

def test_an_edit_in_place_with_the_same_size_and_statistics_is_found(tmp_path):
    """One character of a middle row changed: the size, every offset and the min/max statistics stay the same, and
    so does the mtime (restored); the fingerprint changes, so a resume is refused."""
    path = tmp_path / "in" / "a.parquet"
    rows = [f"prompt number {i:03d}" for i in range(50)]
    path.parent.mkdir()
    pq.write_table(pa.table({"prompt": rows}), path, row_group_size=10, compression="none", use_dictionary=False)
    before = input_fingerprint(list_input_files(FS, str(tmp_path / "in")))
    stat = path.stat()
    data = path.read_bytes()
    at = data.index(b"prompt number 025")
    edited = data[:at] + b"prompt number 0x5" + data[at + 17:]
    assert len(edited) == len(data)
    path.write_bytes(edited)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    meta = [pq.ParquetFile(io.BytesIO(d)).metadata.row_group(2).column(0).statistics for d in (data, edited)]
    assert meta[0] == meta[1]  # the footer alone cannot tell them apart
    after = input_fingerprint(list_input_files(FS, str(tmp_path / "in")))
    assert after[0]["etag"] != before[0]["etag"] and after[0]["etag"].startswith("sha256:")
    with pytest.raises(SpecMismatchError, match=r"a\.parquet \(etag sha256:"):
        check_compatible({"spec": {}, "inputs": before}, {}, after)


def test_an_unchanged_local_input_is_not_read_again(tmp_path, monkeypatch):
    import pipeline.model_source as model_source

    monkeypatch.setenv(model_source.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(model_source, "_digests", {})
    for i in range(3):
        write(tmp_path / "in" / f"{i}.parquet", pa.table({"prompt": [f"p{i}"]}))
    first = input_fingerprint(list_input_files(FS, str(tmp_path / "in")))
    monkeypatch.setattr(model_source, "_digests", {})  # as in the next run's driver
    monkeypatch.setattr(model_source, "file_sha256", lambda file: pytest.fail(f"{file} was read again"))
    assert input_fingerprint(list_input_files(FS, str(tmp_path / "in"))) == first


def test_a_tagless_store_is_digested_by_content(tmp_path):
    """memory:// lists no content tag: the bytes decide, so equal copies match and an edit does not."""
    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    try:
        data = parquet_bytes(pa.table({"prompt": ["a cat", "a dog", "a cow"]}))
        fs.pipe_file("/one/a.parquet", data)
        fs.pipe_file("/two/a.parquet", data)
        fs.pipe_file("/three/a.parquet", data.replace(b"a dog", b"a hog"))
        one, two, three = (input_fingerprint(list_input_files(fs, f"memory://{d}")) for d in ("one", "two", "three"))
        assert one == two and one[0]["etag"] != three[0]["etag"]
    finally:
        fs.rm("/", recursive=True)


# Options on inputs with no, many, and output-named extra columns -------------------------------------------------

# (input columns, the name each has in the output: input_<name> where it clashes with an output column)
OUTPUT_NAMED = ("status", "key", "image", "noise", "latent", "teacher", "error_message", "decoder")
EXTRA_COLUMNS = {
    "none": ({}, {}),
    "many": ({f"c{i}": [i, i + 1] for i in range(30)} | {"score": [0.5, float("nan")], "tags": [["a"], []]},
             {f"c{i}": f"c{i}" for i in range(30)} | {"score": "score", "tags": "tags"}),
    "output-named": ({name: ["x", "y"] for name in (*OUTPUT_NAMED, "input_status")},
                     {name: f"input_{name}" for name in OUTPUT_NAMED} | {"status": "input_input_status",
                                                                          "input_status": "input_status"}),
}
OPTIONS = {  # (tasks, spec changes): what `generate` and `reflow-pairs` can ask for
    "images": (("images",), {}),
    "images as parquet": (("images",), {"output_format": "parquet"}),
    "pairs": (("pairs",), {}),
    "pairs, 3 samples": (("pairs",), {"samples_per_prompt": 3}),
    "pairs and images, 3 samples": (("images", "pairs"), {"samples_per_prompt": 3}),
    "pairs and images as parquet, 2 samples, teacher images": (("images", "pairs"), {
        "samples_per_prompt": 2, "output_format": "parquet", "teacher_images": True}),
}
CASES = [(columns, options) for columns in EXTRA_COLUMNS for options in OPTIONS]


@pytest.mark.parametrize("columns,options", CASES, ids=[f"{c} columns, {o}" for c, o in CASES])
def test_every_option_on_inputs_with_any_extra_columns(tmp_path, tiny_models, columns, options):
    """The worker writes every shard (no `metadata rows but 0 rows of extra columns`): each output row carries its
    input row's extra columns, renamed input_<name> where they clash with output columns, and tar metadata is
    strict JSON (NaN as null)."""
    tasks, changes = OPTIONS[options]
    models = {"model": str(tiny_models["instaflow"])} if "images" in tasks else {}
    if "pairs" in tasks:
        models |= {"teacher": str(tiny_models["sd15"]), "teacher_steps": 2}
    extra, renamed = EXTRA_COLUMNS[columns]
    path = tmp_path / "in.parquet"
    write(path, pa.table({"prompt": ["a red fox", "an owl"], **extra}))
    spec = JobSpec(prompts=str(path), output=str(tmp_path / "out"), tasks=tasks, height=64, width=64, batch_size=4,
                   rows_per_shard=2, dtype="float32", device="cpu", **models, **changes)
    worker, lock = standalone_worker(spec)
    try:
        [unit] = plan_units(list_input_files(FS, str(path)), spec.rows_per_shard)
        marker = worker.process(unit)
    finally:
        worker.close()
        lock.release()
    k = spec.samples_per_prompt
    assert marker["successes"] == 2 * k, marker
    parquets = [name for name in marker["files"] if name.endswith(".parquet")]
    assert len(parquets) == len(spec.tasks)
    for name in parquets:
        table = pq.read_table(tmp_path / "out" / name)
        assert table.column("prompt").to_pylist() == ["a red fox"] * k + ["an owl"] * k
        for column, output_name in renamed.items():
            assert repr(table.column(output_name).to_pylist()) == repr([v for v in extra[column] for _ in range(k)])
    for name in (n for n in marker["files"] if n.endswith(".tar")):
        for member, data in tar_members((tmp_path / "out" / name).read_bytes()).items():
            if member.endswith(".json"):
                row = json.loads(data, parse_constant=lambda c: pytest.fail(f"{member}: {c} is not JSON"))
                assert columns != "many" or row["score"] in (0.5, None)


def test_on_object_storage_a_literal_key_first_and_edits_change_the_etag(s3):
    """S3 (moto): a key with glob characters is that object; an object rewritten with bytes of the same size gets
    another ETag, so a resume is refused."""
    fs, _ = fsspec.core.url_to_fs(s3.url(""), **s3.storage_options)
    data = parquet_bytes(pa.table({"prompt": ["the literal object"]}))
    s3.fs.pipe_file(f"{s3.bucket}/named/p[1].parquet", data)
    s3.fs.pipe_file(f"{s3.bucket}/named/p1.parquet", parquet_bytes(pa.table({"prompt": ["matched by the glob"]})))
    files = list_input_files(fs, s3.url("named/p[1].parquet"))
    assert [f.name for f in files] == ["p[1].parquet"]
    assert [s.prompt for s in read_unit(fs, plan_units(files, 10)[0]).samples] == ["the literal object"]
    assert [f.name for f in list_input_files(fs, s3.url("named/p[12].parquet"))] == ["p1.parquet"]
    s3.fs.pipe_file(f"{s3.bucket}/named/p[1].parquet", data.replace(b"literal", b"LITERAL"))
    edited = list_input_files(fs, s3.url("named/p[1].parquet"))
    assert edited[0].size == files[0].size and edited[0].etag != files[0].etag
