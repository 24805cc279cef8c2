"""`instaflow-batch verify` on a real output, intact and with each kind of damage."""

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import generate, reflow_pairs
from jobs.main import main
from pipeline import verify as verify_module

SIZE = ["--height", "64", "--width", "64", "--dtype", "float32"]  # logical GPUs compute on the CPU


@pytest.fixture(scope="module")
def finished(ray_gpus, tiny_models, tmp_path_factory):
    """A finished images job of 3 shards, with one failed row and an id repeated across two units."""
    root = tmp_path_factory.mktemp("verify")
    ids = [f"k{i}" for i in range(12)]
    ids[9] = "k1"  # a duplicate in another unit: the job cannot see it, verify must
    prompts = [f"a lighthouse at dusk, number {i}" for i in range(12)]
    prompts[4] = "   "
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), root / "prompts.parquet", row_group_size=4)
    assert generate.main(["--prompts", str(root / "prompts.parquet"), "--output", str(root / "out"),
                          "--model", str(tiny_models["instaflow"]), *SIZE, "--rows-per-shard", "4",
                          "--num-workers", "2", "--no-progress"]) == 0
    return root


def damaged(finished, tmp_path, damage=None):
    out = tmp_path / "out"
    shutil.copytree(finished / "out", out)
    if damage:
        damage(out)
    return out


def _edit_job_file(out, edit) -> None:
    job = json.loads((out / "_job.json").read_text())
    edit(job)
    (out / "_job.json").write_text(json.dumps(job))


def verify(out, capsys) -> tuple[int, str]:
    status = main(["verify", str(out)])
    return status, capsys.readouterr().out


def test_a_sound_output_passes_and_its_failed_rows_are_listed(finished, tmp_path, capsys):
    fixed = damaged(finished, tmp_path, lambda out: None)
    status, text = verify(fixed, capsys)
    assert "shards           3 committed of 3 planned" in text and "rows (images)    12" in text
    assert "images k4:" in text and "row 4: empty prompt" in text  # listed, not a problem
    # The duplicate id across units is the one problem of this output.
    assert status == 1 and "1 keys appear more than once in images: 'k1' in 00000+00002" in text


@pytest.mark.parametrize("damage,problem", [
    (lambda out: [(out / f"00001.{ext}").unlink() for ext in ("tar", "parquet", "stats.json")],
     "1 planned shards not committed: 00001"),
    (lambda out: (out / "00000.tar").write_bytes((out / "00000.tar").read_bytes()[:1000]),
     "shard 00000: 00000.tar is 1000 bytes and not what its marker recorded"),
    (lambda out: (out / "00002.parquet").unlink(), "shard 00002: 00002.parquet is missing"),
    (lambda out: shutil.copy(out / "00000.tar", out / "00007.tar"),
     "1 data files that no committed shard claims (a reader that globs the output would read them): 00007.tar"),
    (lambda out: unfinish(out, 1), "1 commits were not moved into place (a crash)"),
    (lambda out: shutil.copy(out / "00000.parquet", out / "copy.parquet"), "claims (a reader that globs the output "
     "would read them): copy.parquet"),
    (lambda out: (out / "images").mkdir() or shutil.copy(out / "00001.tar", out / "images" / "foo.tar"),
     "claims (a reader that globs the output would read them): images/foo.tar"),
    (lambda out: (out / "pairs" / "x").mkdir(parents=True) or shutil.copy(out / "00001.parquet",
                                                                         out / "pairs" / "x" / "old.parquet"),
     "pairs/x/old.parquet"),
    (lambda out: _edit_job_file(out, lambda job: job["spec"].update(samples_per_prompt="3")),
     "_job.json: spec.samples_per_prompt is not a positive integer: '3'"),
])
def test_each_kind_of_damage_is_reported(finished, tmp_path, capsys, damage, problem):
    status, text = verify(damaged(finished, tmp_path, damage), capsys)
    assert status == 1 and problem in text, text
    assert "verdict          NOT OK" in text


def test_files_that_readers_skip_are_not_strays(finished, tmp_path, capsys):
    """Below `_` and `.` folders (the training's embedding cache, a tool's cache), and files that are not data."""
    def add(out):
        for name in ("_text-embeddings/tiny/00000.parquet", ".cache/x.parquet", "notes.txt", "00000.parquet.tmp-1"):
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(b"x")

    status, text = verify(damaged(finished, tmp_path, add), capsys)
    assert "problems         1" in text and "'k1' in 00000+00002" in text, text  # only the known duplicate


def test_failed_rows_with_repeated_keys_and_k_samples_on_a_prompt_only_file_verify(ray_gpus, tiny_models, tmp_path,
                                                                                   capsys):
    """`reflow-pairs --samples-per-prompt 2` (with images) on a file of only prompt and id columns: every shard
    commits, and verify says OK although keys repeat in failed rows: a duplicate id in its unit (failed by design),
    and an id repeated in another unit whose row failed (an empty prompt)."""
    ids = ["a", "b", "a", "c", "d", "c"]
    prompts = ["a red fox", "an owl", "a cat", "a lighthouse", "a bowl of ramen", "  "]
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), tmp_path / "p.parquet", row_group_size=4)
    status = reflow_pairs.main(["--prompts", str(tmp_path / "p.parquet"), "--output", str(tmp_path / "out"),
                                "--teacher", str(tiny_models["sd15"]), "--steps", "2", "--model",
                                str(tiny_models["instaflow"]), "--samples-per-prompt", "2", *SIZE,
                                "--rows-per-shard", "4", "--num-workers", "1", "--no-progress"])
    assert status == 0
    status, text = verify(tmp_path / "out", capsys)
    assert status == 0 and "rows (pairs)     12" in text and "rows (images)    12" in text, text
    assert " a-0: " in text and "duplicate id 'a-0' (first at row 0)" in text and "c-1: " in text


def unfinish(out, unit_id: int) -> None:
    """Puts a committed shard back as a crash between its marker and its move would have left it."""
    marker = json.loads((out / f"{unit_id:05d}.stats.json").read_text())
    staging = out / marker["staging"]
    staging.mkdir(parents=True)
    for name in marker["files"]:
        shutil.move(out / name, staging / name)


def test_a_pairs_output_verifies(ray_gpus, tiny_models, finished, tmp_path, capsys):
    assert reflow_pairs.main(["--prompts", str(finished / "prompts.parquet"), "--output", str(tmp_path / "pairs"),
                              "--teacher", str(tiny_models["sd15"]), "--steps", "3", *SIZE, "--rows-per-shard", "4",
                              "--num-workers", "1", "--no-progress"]) == 0
    status, text = verify(tmp_path / "pairs", capsys)
    assert "shards           3 committed of 3 planned" in text and "rows (pairs)     12" in text
    assert "'k1' in 00000+00002" in text and status == 1  # the same duplicate id


def test_something_that_is_not_an_output_is_refused(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "not an output of this tool" in capsys.readouterr().err


def forge(out, unit_id: int, copied: int = 0) -> None:
    """A marker for an unplanned unit that counts: shard `copied`'s marker and files under `unit_id`'s names."""
    text = (out / f"{copied:05d}.stats.json").read_text()
    for name in json.loads(text)["files"]:
        shutil.copy(out / name, out / name.replace(f"{copied:05d}", f"{unit_id:05d}"))
    (out / f"{unit_id:05d}.stats.json").write_text(text.replace(f"{copied:05d}", f"{unit_id:05d}"))


@pytest.mark.parametrize("damage,named", [
    (lambda out: shutil.copy(out / "00000.stats.json", out / "00007.stats.json"), "00007.stats.json"),
    (lambda out: shutil.copy(out / "00001.stats.json", out / "000001.stats.json"), "000001.stats.json"),  # unread
    (lambda out: forge(out, 9), "00009.stats.json"),
])
def test_a_marker_that_no_planned_shard_owns_is_reported(finished, tmp_path, capsys, damage, named):
    status, text = verify(damaged(finished, tmp_path, damage), capsys)
    assert status == 1 and f"1 markers that no planned shard owns (copied or planted): {named}" in text, text


def test_names_in_a_marker_or_job_file_that_leave_the_output_are_reported_never_read(finished, tmp_path, capsys,
                                                                                    monkeypatch):
    def plant(out):
        marker = json.loads((out / "00001.stats.json").read_text())
        marker["files"] = {f"../{name}": info for name, info in marker["files"].items()}
        (out / "00001.stats.json").write_text(json.dumps(marker))
        job = json.loads((out / "_job.json").read_text())
        job["inputs"][0]["path"] = "../../outside.parquet"
        (out / "_job.json").write_text(json.dumps(job))

    out = damaged(finished, tmp_path, plant)
    for name in json.loads((out / "00001.stats.json").read_text())["files"]:
        shutil.copy(out / name[len("../"):], tmp_path / name[len("../"):])  # what the names point at exists
    read = []
    real_get_bytes = verify_module.get_bytes
    monkeypatch.setattr(verify_module, "get_bytes", lambda fs, path: read.append(path) or real_get_bytes(fs, path))
    status, text = verify(out, capsys)
    assert status == 1 and "marker 00001.stats.json is damaged and does not count: file '../0000" in text, text
    assert "../../outside.parquet (removed)" in text
    assert read and all(os.path.realpath(path).startswith(f"{out}/") for path in read), read
