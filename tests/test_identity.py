"""One job, one identity: other spellings of the same job resume it, models are pinned by what they are, a model
can live in object storage, and a finished job's re-run starts no worker."""

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import fsspec
import pytest

from jobhelpers import prompt_table, write_prompts
from jobs import generate
from pipeline import model_source
from instaflow.loading import ModelLoadError
from pipeline.job import ray_pool, run_job
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


def test_an_output_inside_a_model_folder_is_refused_before_anything_is_written(tiny_models, tmp_path, capsys):
    """Its lock and shards would change the model's files after the driver pinned them (every worker then
    refused the model); refused for the student and for any other model folder, one line, exit 2."""
    model, decoder = tmp_path / "model", tmp_path / "decoder"
    shutil.copytree(tiny_models["instaflow"], model)
    shutil.copytree(tiny_models["taesd"], decoder)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    write_prompts(FS, str(tmp_path / "prompts.parquet"), prompt_table(4))
    for output, flags, key in ((model, ["--model", str(model)], "model"),
                               (model / "unet" / "out", ["--model", str(model)], "model"),
                               (decoder / "out", ["--model", str(model), "--decoder", "tiny", "--tiny-decoder",
                                                  str(decoder)], "decoder")):
        job = ["--prompts", str(tmp_path / "prompts.parquet"), "--output", str(output), "--num-workers", "1", *SIZE]
        assert generate.main([*job, *flags]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and f"is inside the folder of the job's {key} model" in lines[0], lines
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before + [Path("prompts.parquet")]


def test_local_model_digests_are_kept_for_the_next_run_and_see_every_write(tmp_path, monkeypatch):
    """A re-run does not read a large local model again, yet a file rewritten in place with its old size and
    mtime is read again (its ctime changed)."""
    monkeypatch.setenv(model_source.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(model_source, "_digests", {})
    weights = tmp_path / "model" / "unet" / "weights.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"a" * 1000)
    first = model_source._file_digests(tmp_path / "model")
    assert (tmp_path / "cache" / model_source.DIGESTS_FILE).exists()

    file_sha256 = model_source.file_sha256
    monkeypatch.setattr(model_source, "_digests", {})  # as in a new driver process
    monkeypatch.setattr(model_source, "file_sha256", lambda file: pytest.fail(f"{file} was read again"))
    assert model_source._file_digests(tmp_path / "model") == first

    monkeypatch.setattr(model_source, "file_sha256", file_sha256)
    before = weights.stat()
    time.sleep(0.01)
    weights.write_bytes(b"b" * 1000)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    monkeypatch.setattr(model_source, "_digests", {})
    assert model_source._file_digests(tmp_path / "model") != first


def _rewrite_in_place(path) -> None:
    """Other bytes, the same size: weights that would still load, and silently make other images."""
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(255 - b for b in data[-8:])
    path.write_bytes(bytes(data))


def test_a_worker_whose_local_model_is_not_the_pinned_one_does_not_start(ray_gpus, tiny_models, tmp_path):
    """The driver pins a local model by its files' digests; a node whose folder has other files (another copy on
    a shared path, a file rewritten since) fails to start, naming the model and the file, and nothing is made."""
    model = tmp_path / "instaflow"
    shutil.copytree(tiny_models["instaflow"], model)
    write_prompts(FS, str(tmp_path / "prompts.parquet"), prompt_table(4))
    spec = JobSpec(prompts=str(tmp_path / "prompts.parquet"), output=str(tmp_path / "out"), model=str(model),
                   height=64, width=64, rows_per_shard=4, dtype="float32", num_workers=1)

    def pool_after_the_model_changed(*args):
        _rewrite_in_place(model / "unet" / "diffusion_pytorch_model.safetensors")  # after the driver pinned it
        return ray_pool(*args)

    with pytest.raises(ModelLoadError) as error:
        run_job(spec, pool_after_the_model_changed, show_progress=False)
    assert str(model) in str(error.value) and "unet/diffusion_pytorch_model.safetensors" in str(error.value)
    assert not (tmp_path / "out" / "_job.json").exists()


def test_a_local_model_is_checked_against_its_pinned_digests_without_reading_it_again(tiny_models, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setenv(model_source.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(model_source, "_digests", {})
    model = tmp_path / "instaflow"
    shutil.copytree(tiny_models["instaflow"], model)
    source = resolve_model_source(str(model), "float32")
    file_sha256 = model_source.file_sha256
    monkeypatch.setattr(model_source, "_digests", {})  # as in a worker on the same node: the digests kept on disk
    monkeypatch.setattr(model_source, "file_sha256", lambda file: pytest.fail(f"{file} was read again"))
    assert source.local_dir() == str(model)

    monkeypatch.setattr(model_source, "file_sha256", file_sha256)
    changes = [("text_encoder/config.json", "has other contents", lambda p: p.write_text(p.read_text() + " ")),
               ("vae/config.json", "is missing", lambda p: p.unlink()),
               ("unet/extra.bin", "is not in the driver's copy", lambda p: p.write_bytes(b"x"))]
    for rel, how, change in changes:
        change(model / rel)
        with pytest.raises(ModelLoadError, match=f"model '{model}': {rel} {how}"):
            source.local_dir()
        shutil.rmtree(model)
        shutil.copytree(tiny_models["instaflow"], model)


def test_a_url_models_copy_is_checked_by_sha256_once(s3, tiny_models, tmp_path, monkeypatch):
    """The driver pins each file's sha256 (read once per version of the file: its ETag); a worker's copy is
    checked against them as it is made, and its .complete marker keeps them, so later loads read nothing."""
    monkeypatch.setenv(model_source.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(model_source, "_digests", {})
    s3.fs.put(str(tiny_models["instaflow"]), f"{s3.bucket}/pinned/instaflow", recursive=True)
    url = s3.url("pinned/instaflow")
    source = resolve_model_source(url, "float32", s3.storage_options)
    local = tiny_models["instaflow"]
    assert dict(source.files) == {str(p.relative_to(local)): model_source.file_sha256(p)
                                  for p in local.rglob("*") if p.is_file()}

    rel, digest = source.files[0]
    other = dataclasses.replace(source, files=((rel, "0" * 64), *source.files[1:]))  # as if the copy arrived other
    with pytest.raises(ModelLoadError, match=f"{rel} has other contents"):
        other.local_dir(s3.storage_options)
    assert not (model_source.model_cache_dir() / source.revision).exists()

    copy = Path(source.local_dir(s3.storage_options))
    assert json.loads((copy / ".complete").read_text())["files"] == dict(source.files)
    monkeypatch.setattr(model_source, "file_sha256", lambda file: pytest.fail(f"{file} was read again"))
    monkeypatch.setattr(model_source, "_stream_sha256", lambda fs, path: pytest.fail(f"{path} was read again"))
    assert source.local_dir(s3.storage_options) == str(copy)
    monkeypatch.setattr(model_source, "_digests", {})  # the next run's driver: the digests kept on disk
    assert resolve_model_source(url, "float32", s3.storage_options) == source


def test_weights_files_are_pinned_like_models(ray_gpus, s3, tiny_models, tmp_path):
    """A LoRA at a URL is pinned by its sha256 and copied once per node, as a URL model is; a local LoRA is
    checked against the digest the driver pinned; a name that is neither a file nor HUB_ID/FILE is one error."""
    lora = tiny_models["lora-kohya"]
    s3.fs.put(str(lora), f"{s3.bucket}/loras/style.safetensors")
    url = s3.url("loras/style.safetensors")
    source = resolve_model_source(url, "float32", s3.storage_options, "file")
    digest = hashlib.sha256(lora.read_bytes()).hexdigest()
    assert source.kind == "url" and dict(source.files) == {"style.safetensors": digest}
    copy = Path(source.local_file(s3.storage_options))
    assert copy.read_bytes() == lora.read_bytes() and copy.parent.parent == model_source.model_cache_dir()
    write_prompts(s3.fs, f"{s3.bucket}/lora-in/p.parquet", prompt_table(4), row_group_size=4)
    assert generate.main(["--prompts", s3.url("lora-in/"), "--output", str(tmp_path / "out"), "--model",
                          str(tiny_models["instaflow"]), "--lora", f"{url}:0.5", "--storage-options",
                          json.dumps(s3.storage_options), *SIZE]) == 0
    stats = json.loads(next((tmp_path / "out").glob("*.stats.json")).read_text())
    assert stats["successes"] == 4

    local = tmp_path / "local.safetensors"
    shutil.copy(lora, local)
    pinned = resolve_model_source(str(local), "float32", layout="file")
    assert pinned.revision == digest and pinned.identity()["name"] == "local.safetensors"
    local.write_bytes(local.read_bytes()[:-1] + b"\0")  # another node's copy, or a file changed after pinning
    with pytest.raises(ModelLoadError, match="local.safetensors has other contents"):
        pinned.local_file()
    for name, message in ((str(tmp_path), "is a folder, not a weights file"),
                          ("missing/lora.safetensors", "no such file, and not a file in a Hugging Face hub repo"),
                          (s3.url("loras/missing.safetensors"), "no such file")):
        with pytest.raises(ModelLoadError, match=message):
            resolve_model_source(name, "float32", s3.storage_options, "file")


def test_a_hub_file_offline_and_not_cached_is_one_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="org/styles/watercolor.safetensors.*cannot load watercolor.safetensors"):
        resolve_model_source("org/styles/watercolor.safetensors", "float32", layout="file")
