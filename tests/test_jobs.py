"""End-to-end jobs on a local Ray with 4 logical GPUs, the tiny models, local files and moto's S3 server."""

import io
import json
import threading

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from instaflow.loading import ComponentCache, Runtime
from instaflow.models import PromptBatch, Settings, Student, Teacher
from instaflow.sampling import noise_for_seed
from jobhelpers import data_files, metadata_rows, prompt_table, stats, tar_members, write_prompts
from jobs import generate, reflow_pairs
from pipeline.lock import OutputLock
from pipeline.writers import read_tensor_column

# 64x64 on logical GPUs: the workers compute on the CPU, so in fp32 like the references they are compared with.
SIZE = ["--height", "64", "--width", "64", "--dtype", "float32"]


@pytest.fixture(scope="module")
def cache():
    return ComponentCache(Runtime.default())


def student_pixels(cache, model_dir, prompt, seed) -> np.ndarray:
    student = Student(cache.load(str(model_dir)), Settings(1, 0.0, 64, 64))
    return student.generate(PromptBatch([prompt], [seed], [None])).pixels[0].numpy()


def test_images_from_s3_to_s3(ray_gpus, s3, tiny_models, cache, tmp_path):
    """Two input files (one with bad rows, one with id/seed/negative_prompt columns) through 4 GPU workers."""
    plain = prompt_table(20)
    plain = plain.set_column(0, "prompt", pa.array(["", *plain["prompt"].to_pylist()[1:6], None,
                                                    *plain["prompt"].to_pylist()[7:]]))
    keyed = pa.table({
        "id": [f"img-{i}" for i in range(13)],
        "prompt": [f"a lighthouse at night, number {i}" for i in range(13)],
        "seed": pa.array([None if i % 3 else 1000 + i for i in range(13)], pa.int64()),
        "negative_prompt": ["blurry"] * 13,
    })
    write_prompts(s3.fs, f"{s3.bucket}/in/a.parquet", plain)
    write_prompts(s3.fs, f"{s3.bucket}/in/b.parquet", keyed)
    status = generate.main([
        "--prompts", s3.url("in/"), "--output", s3.url("out/"), "--model", str(tiny_models["instaflow"]),
        *SIZE, "--rows-per-shard", "8", "--batch-size", "3", "--image-format", "png", "--seed", "7",
        "--storage-options", json.dumps(s3.storage_options), "--no-progress",
    ])
    assert status == 0
    s3.fs.invalidate_cache()
    root = f"{s3.bucket}/out"

    rows = metadata_rows(s3.fs, root)
    assert len(rows) == 33  # every prompt exactly once, failed ones included
    assert len({row["key"] for row in rows}) == 33
    failed = [row for row in rows if row["status"] != "ok"]
    assert [row["key"] for row in failed] == ["000000000000", "000000000006"]

    files = data_files(s3.fs, root)
    assert sorted(files) == [f"{i:05d}.{ext}" for i in range(5) for ext in ("parquet", "tar")]
    members = {}
    for name, data in files.items():
        if name.endswith(".tar"):
            members.update(tar_members(data))
    assert len(members) == 31 * 3  # png, txt, json per ok sample
    first = json.loads(members["img-0.json"])
    assert first["seed"] == 1000 and first["negative_prompt"] == "blurry" and first["model"].endswith("instaflow")
    assert members["000000000003.txt"].decode() == plain["prompt"][3].as_py()

    # The pixels are the model's, for that prompt and seed, whatever batch and worker made them.
    for key, prompt_row in (("000000000003", 3), ("img-4", None)):
        meta = json.loads(members[f"{key}.json"])
        image = np.asarray(Image.open(io.BytesIO(members[f"{key}.png"])))
        want = student_pixels(cache, tiny_models["instaflow"], meta["prompt"], meta["seed"])
        assert np.abs(image.astype(int) - want.astype(int)).max() <= 1

    # One worker per logical GPU, each seeing its own device.
    workers = {shard["worker"]["pid"]: tuple(shard["worker"]["gpu_ids"]) for shard in stats(s3.fs, root)}
    assert all(len(ids) == 1 for ids in workers.values())
    assert len(set(workers.values())) == len(workers) >= 2

    manifest = json.loads(s3.fs.cat_file(f"{root}/_job.json"))
    assert manifest["progress"]["status"] == "complete"
    assert all(entry["etag"] for entry in manifest["inputs"])
    assert manifest["storage_options"]["secret"] == "***"

    import webdataset as wds

    local_tar = tmp_path / "00004.tar"
    local_tar.write_bytes(files["00004.tar"])
    samples = list(wds.WebDataset(str(local_tar), shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == [f"img-{i}" for i in range(8, 13)]
    assert samples[0]["png"].size == (64, 64)


def test_pairs_and_images_in_one_pass(ray_gpus, s3, tiny_models, cache, tmp_path, monkeypatch):
    """Storage configured by the environment only, as the AWS SDKs read it, on driver and workers."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
    write_prompts(s3.fs, f"{s3.bucket}/pairs-in/p.parquet", prompt_table(10), row_group_size=5)
    status = reflow_pairs.main([
        "--prompts", s3.url("pairs-in/p.parquet"), "--output", s3.url("pairs-out"),
        "--teacher", str(tiny_models["sd15"]), "--teacher-kind", "sd", "--steps", "6", "--guidance-scale", "5",
        "--model", str(tiny_models["instaflow"]), "--format", "parquet",
        *SIZE, "--rows-per-shard", "5", "--batch-size", "4", "--num-workers", "2", "--no-progress",
    ])
    assert status == 0
    s3.fs.invalidate_cache()
    files = data_files(s3.fs, f"{s3.bucket}/pairs-out")
    assert sorted(files) == ["images/00000.parquet", "images/00001.parquet", "pairs/00000.parquet", "pairs/00001.parquet"]

    pairs = pa.concat_tables(pq.read_table(pa.BufferReader(files[f"pairs/0000{i}.parquet"])) for i in range(2))
    noise, latent = read_tensor_column(pairs, "noise"), read_tensor_column(pairs, "latent")
    assert noise.shape == latent.shape == (10, 4, 8, 8)
    teacher = Teacher(cache.load(str(tiny_models["sd15"])), "sd", Settings(6, 5.0, 64, 64))
    for i, row in enumerate(pairs.select(["prompt", "seed", "teacher_kind", "teacher_steps"]).to_pylist()):
        assert row["teacher_kind"] == "sd" and row["teacher_steps"] == 6
        assert np.array_equal(noise[i], noise_for_seed(row["seed"], 64, 64)[0].numpy())  # bit-exact
    want = teacher.pairs(PromptBatch(pairs["prompt"].to_pylist()[:3], pairs["seed"].to_pylist()[:3], [None] * 3))
    np.testing.assert_allclose(latent[:3], want.latents.numpy(), atol=1e-4, rtol=0)

    # Ecosystem readers, without our code: Ray Data for pairs, Hugging Face datasets for images.
    import datasets
    import ray

    local = tmp_path / "copy"
    s3.fs.get(f"{s3.bucket}/pairs-out/", str(local), recursive=True)
    batch = ray.data.read_parquet(str(local / "pairs")).take_batch(10)
    assert np.asarray(batch["noise"][0], dtype=np.float32).size == 4 * 8 * 8
    images = datasets.load_dataset("parquet", data_files=str(local / "images" / "*.parquet"), split="train")
    assert images[0]["image"].size == (64, 64) and len(images) == 10


def test_resume_redoes_only_what_is_missing(ray_gpus, tiny_models, tmp_path):
    fs = fsspec.filesystem("file")
    write_prompts(fs, str(tmp_path / "prompts.parquet"), prompt_table(24))
    args = ["--prompts", str(tmp_path / "prompts.parquet"), "--output", str(tmp_path / "out"),
            "--model", str(tiny_models["instaflow"]), *SIZE, "--rows-per-shard", "8", "--num-workers", "2",
            "--no-progress"]
    assert generate.main(args) == 0
    first = data_files(fs, str(tmp_path / "out"))
    before = {shard["shard"]: shard["started_at"] for shard in stats(fs, str(tmp_path / "out"))}

    # A crash between data and marker: shard 1's tar is truncated and its marker never written.
    (tmp_path / "out" / "00001.stats.json").unlink()
    (tmp_path / "out" / "00001.tar").write_bytes(first["00001.tar"][:100])
    assert generate.main(args) == 0
    after = {shard["shard"]: shard["started_at"] for shard in stats(fs, str(tmp_path / "out"))}
    assert after["00000"] == before["00000"] and after["00002"] == before["00002"]
    assert after["00001"] != before["00001"]
    assert data_files(fs, str(tmp_path / "out")) == first

    # Same output, another seed: refused, and nothing is touched; --overwrite starts over.
    assert generate.main([*args, "--seed", "1"]) == 2
    assert data_files(fs, str(tmp_path / "out")) == first
    assert generate.main([*args, "--seed", "1", "--overwrite"]) == 0
    assert data_files(fs, str(tmp_path / "out")) != first


def test_second_live_job_is_refused(ray_gpus, tiny_models, tmp_path, capsys):
    fs = fsspec.filesystem("file")
    write_prompts(fs, str(tmp_path / "prompts.parquet"), prompt_table(4))
    lock = OutputLock(fs, str(tmp_path / "out"), lease_s=2)  # held by this live process, renewing it
    lock.acquire()
    stop = threading.Event()
    renewing = threading.Thread(target=lambda: [lock.refresh() for _ in iter(lambda: stop.wait(0.2), True)])
    renewing.start()
    try:
        status = generate.main(["--prompts", str(tmp_path / "prompts.parquet"), "--output", str(tmp_path / "out"),
                                "--model", str(tiny_models["instaflow"]), *SIZE, "--no-progress"])
    finally:
        stop.set()
        renewing.join()
        lock.release()
    assert status == 2
    assert "in use by another job" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.tar"))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--height", "60"], "height must be a multiple of 8"),
        (["--prompt-column", "caption"], "no column 'caption'"),
        (["--guidance-scale", "-2"], "guidance_scale must be between"),
    ],
)
def test_bad_input_is_refused_before_any_work(tiny_models, tmp_path, capsys, extra, message):
    fs = fsspec.filesystem("file")
    write_prompts(fs, str(tmp_path / "prompts.parquet"), prompt_table(4))
    status = generate.main(["--prompts", str(tmp_path / "prompts.parquet"), "--output", str(tmp_path / "out"),
                            "--model", str(tiny_models["instaflow"]), *extra, "--no-progress"])
    assert status == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_model_that_cannot_load_fails_the_job_clearly(ray_gpus, tmp_path, capsys):
    fs = fsspec.filesystem("file")
    write_prompts(fs, str(tmp_path / "prompts.parquet"), prompt_table(4))
    status = generate.main(["--prompts", str(tmp_path / "prompts.parquet"), "--output", str(tmp_path / "out"),
                            "--model", str(tmp_path / "no-such-model"), *SIZE, "--num-workers", "2",
                            "--no-progress"])
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-model" in err and "Traceback" not in err  # one line, naming it
    assert not (tmp_path / "out").exists()  # the output is not bound: nothing written, not even a lock
