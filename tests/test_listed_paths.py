"""Names that a store lists or a record holds are data: joined to a folder only when they stay inside it
(`pipeline.storage.join_inside`), never written or read elsewhere."""

import json
import posixpath
from pathlib import Path

import pytest

from instaflow.loading import ModelLoadError
from jobhelpers import prompt_table, write_prompts
from jobs import generate
from pipeline import model_source
from pipeline.model_source import resolve_model_source
from pipeline.storage import UnsafePathError, join_inside

SIZE = ["--height", "64", "--width", "64", "--dtype", "float32", "--rows-per-shard", "4", "--no-progress"]
ESCAPE = "../../../escaped.txt"  # from the model folder: three levels above the copy in the cache


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/x", "a//b", "./a", "a/.", "a\\..\\x", "C:x", "a\0b", ""])
def test_a_name_that_is_not_a_plain_relative_path_is_refused(name):
    with pytest.raises(UnsafePathError, match="listed file: .* is not a relative path inside its folder"):
        join_inside("bucket/model", name, "listed file")
    assert join_inside("bucket/model/", "unet/config.json", "listed file") == "bucket/model/unet/config.json"


def test_a_symbolic_link_inside_a_local_folder_cannot_lead_out_of_it(tmp_path):
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "unet").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError, match="leads outside .* symbolic link"):
        join_inside(tmp_path / "copy", "unet/x", "listed file")
    linked_cache = tmp_path / "cache-link"
    linked_cache.symlink_to(tmp_path / "copy")  # a cache folder that is itself a link is fine
    assert join_inside(linked_cache, "vae/x", "listed file") == linked_cache / "vae" / "x"


@pytest.fixture
def escaping_model(s3, tiny_models, tmp_path, monkeypatch):
    """A model folder on S3 with one key that climbs out of it, and an empty model cache deep in tmp_path."""
    cache = tmp_path / "a" / "b" / "c" / "cache"
    monkeypatch.setenv(model_source.CACHE_ENV, str(cache))
    monkeypatch.setattr(model_source, "_digests", {})
    s3.fs.put(str(tiny_models["instaflow"]), f"{s3.bucket}/models/evil", recursive=True)
    s3.fs.pipe_file(f"{s3.bucket}/models/evil/{ESCAPE}", b"written by whoever can write to the bucket")
    s3.fs.invalidate_cache()
    assert f"{s3.bucket}/models/evil/{ESCAPE}" in s3.fs.find(f"{s3.bucket}/models/evil")  # the store lists it
    return s3.url("models/evil"), cache


def files_outside(root: Path, cache: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and cache not in p.parents and p.name == "escaped.txt"]


def test_a_job_whose_model_lists_a_key_outside_its_folder_is_refused(s3, escaping_model, tmp_path, capsys):
    url, cache = escaping_model
    write_prompts(s3.fs, f"{s3.bucket}/listed-in/p.parquet", prompt_table(4), row_group_size=4)
    status = generate.main(["--prompts", s3.url("listed-in/"), "--output", str(tmp_path / "out"), "--model", url,
                            "--storage-options", json.dumps(s3.storage_options), *SIZE])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert url in err and f"models/evil/{ESCAPE}" in err and "outside the model cache" in err
    assert not files_outside(tmp_path, cache) and not (tmp_path / "out" / "_job.json").exists()


def test_a_worker_never_writes_a_listed_key_outside_its_cache(s3, escaping_model, tmp_path, monkeypatch):
    """The copy checks each listed name itself, whatever the driver pinned: here a driver without the check."""
    url, cache = escaping_model
    with monkeypatch.context() as unchecked:
        unchecked.setattr(model_source, "_listed_name", lambda model, base, path: posixpath.relpath(path, base))
        source = resolve_model_source(url, "float32", s3.storage_options)
    assert ESCAPE in dict(source.files)
    with pytest.raises(ModelLoadError, match=f"models/evil/{ESCAPE}.*outside the model cache"):
        source.local_dir(s3.storage_options)
    assert not files_outside(tmp_path, cache)
    assert not [p for p in cache.iterdir() if p.is_dir()]  # no copy, no leftover


@pytest.mark.parametrize("key, why", [("unet", "as a file and as the folder of other keys"),
                                      (f"unet/{'w' * 300}.safetensors", "a name longer than a local disk takes")])
def test_a_model_whose_keys_no_disk_can_hold_is_refused_on_the_driver(s3, tiny_models, tmp_path, monkeypatch, capsys,
                                                                      key, why):
    """A key `unet` beside `unet/config.json`, or a 300-byte name, was pinned and then failed on every worker ('unet
    has other contents', ENAMETOOLONG): the driver refuses it, naming the model and the key."""
    monkeypatch.setenv(model_source.CACHE_ENV, str(tmp_path / "cache"))
    folder = f"{s3.bucket}/models/{len(key)}"
    s3.fs.put(str(tiny_models["instaflow"]), folder, recursive=True)
    s3.fs.pipe_file(f"{folder}/{key}", b"a file the store holds")
    s3.fs.invalidate_cache()
    write_prompts(s3.fs, f"{s3.bucket}/listed-in/p.parquet", prompt_table(4), row_group_size=4)
    url = s3.url(f"models/{len(key)}")
    status = generate.main(["--prompts", s3.url("listed-in/"), "--output", str(tmp_path / "out"), "--model", url,
                            "--storage-options", json.dumps(s3.storage_options), *SIZE])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: model {url!r}: its store lists {f'{folder}/{key}'!r}") and why in err, err
    assert not (tmp_path / "out" / "_job.json").exists() and not (tmp_path / "cache").exists()
