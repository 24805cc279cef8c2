"""One job, one identity: other spellings of the same job resume it, models are pinned by what they are, a model
can live in object storage, and a finished job's re-run starts no worker."""

import json
import os
import shutil
import time

import fsspec
import pytest

from jobhelpers import prompt_table, write_prompts
from jobs import generate
from pipeline import model_source
from pipeline.job import run_job
from pipeline.model_source import resolve_model_source
from pipeline.spec import JobSpec

FS = fsspec.filesystem("file")
SIZE = ["--height", "64", "--width", "64", "--dtype", "float32", "--rows-per-shard", "4", "--no-progress"]


def test_other_spellings_of_the_same_job_resume_it(ray_gpus, tiny_models, tmp_path, monkeypatch, capsys):
    (tmp_path / "a").mkdir()
    write_prompts(FS, str(tmp_path / "a" / "prompts.parquet"), prompt_table(8), row_group_size=4)
    model = tmp_path / "instaflow"
    shutil.copytree(tiny_models["instaflow"], model)
    monkeypatch.chdir(tmp_path)
    assert generate.main(["--prompts", "a/prompts.parquet", "--output", "out", "--model", "instaflow", *SIZE]) == 0
    capsys.readouterr()
    # The prompts moved (a new working dir, as under `ray job submit`), the output with a trailing slash, the
    # model by its absolute path in another folder: the same job, so everything is already there.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    moved = tmp_path / "elsewhere" / "instaflow"
    shutil.copytree(model, moved)
    assert generate.main(["--prompts", str(tmp_path / "b" / "prompts.parquet"), "--output", f"file://{tmp_path}/out/",
                          "--model", str(moved), *SIZE]) == 0
    assert "shards_committed_before        2" in capsys.readouterr().out
    # Other weights under the same name are another model: refused.
    (moved / "unet" / "config.json").write_text((moved / "unet" / "config.json").read_text() + " ")
    assert generate.main(["--prompts", "b/prompts.parquet", "--output", "out", "--model", str(moved), *SIZE]) == 2
    assert "model:" in capsys.readouterr().err


def test_a_finished_jobs_rerun_starts_no_worker(ray_gpus, tiny_models, tmp_path):
    write_prompts(FS, str(tmp_path / "prompts.parquet"), prompt_table(8), row_group_size=4)
    spec = JobSpec(prompts=str(tmp_path / "prompts.parquet"), output=str(tmp_path / "out"),
                   model=str(tiny_models["instaflow"]), height=64, width=64, rows_per_shard=4, dtype="float32")
    assert run_job(spec, show_progress=False).complete

    def no_pool(*args):
        raise AssertionError("a finished job started workers")

    progress = run_job(spec, no_pool, show_progress=False)
    assert progress.complete and progress.skipped_units == 2


def test_a_model_in_object_storage_is_pinned_and_copied_once_per_node(ray_gpus, s3, tiny_models, tmp_path):
    s3.fs.put(str(tiny_models["instaflow"]), f"{s3.bucket}/models/instaflow", recursive=True)
    url = s3.url("models/instaflow")
    source = resolve_model_source(url, "float32", s3.storage_options)
    assert source.kind == "url" and source.identity()["name"] == url
    write_prompts(s3.fs, f"{s3.bucket}/model-in/p.parquet", prompt_table(8), row_group_size=4)
    args = ["--prompts", s3.url("model-in/"), "--output", s3.url("model-out"), "--model", url, "--num-workers", "2",
            "--storage-options", json.dumps(s3.storage_options), *SIZE]
    assert generate.main(args) == 0
    cache = model_source.model_cache_dir() / source.revision
    assert os.path.exists(f"{cache}/.complete") and os.path.exists(f"{cache}/unet/config.json")
    with pytest.raises(Exception, match="no files there"):
        resolve_model_source(s3.url("models/missing"), "float32", s3.storage_options)


def test_a_model_whose_weights_do_not_load_is_one_line_and_exit_2(ray_gpus, tiny_models, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["instaflow"], broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # found by the driver; its workers cannot load it
    write_prompts(FS, str(tmp_path / "prompts.parquet"), prompt_table(4))
    status = generate.main(["--prompts", str(tmp_path / "prompts.parquet"), "--output", str(tmp_path / "out"),
                            "--model", str(broken), "--num-workers", "1", *SIZE])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 2 and len(lines) == 1 and str(broken) in lines[0], err[-2000:]
    assert not (tmp_path / "out" / "_job.json").exists()


def test_local_model_digests_are_kept_for_the_next_run_and_see_every_write(tmp_path, monkeypatch):
    """A re-run does not read a large local model again, yet a file rewritten in place with its old size and
    mtime is read again (its ctime changed)."""
    monkeypatch.setenv(model_source.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(model_source, "_digests", {})
    weights = tmp_path / "model" / "unet" / "weights.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"a" * 1000)
    first = model_source._local_digest(tmp_path / "model")
    assert (tmp_path / "cache" / model_source.DIGESTS_FILE).exists()

    file_sha256 = model_source.file_sha256
    monkeypatch.setattr(model_source, "_digests", {})  # as in a new driver process
    monkeypatch.setattr(model_source, "file_sha256", lambda file: pytest.fail(f"{file} was read again"))
    assert model_source._local_digest(tmp_path / "model") == first

    monkeypatch.setattr(model_source, "file_sha256", file_sha256)
    before = weights.stat()
    time.sleep(0.01)
    weights.write_bytes(b"b" * 1000)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    monkeypatch.setattr(model_source, "_digests", {})
    assert model_source._local_digest(tmp_path / "model") != first
