"""Committed pairs as training data: a pairs+images job on moto's S3 read back through the torch stream (by rank and
data-loader worker, seeded, resumable), the text-embedding cache and Ray Data."""

import io
import itertools
import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from instaflow.loading import ComponentCache, Runtime
from instaflow.sampling import decode, noise_for_seed, to_pixels
from instaflow.text import encode_tokens, tokenize_prompts
from jobhelpers import prompt_table, write_prompts
from jobs import reflow_pairs
from pipeline.manifest import ManifestWriter, identity_digest, job_manifest
from pipeline.training.pairs_data import PairsError, PairStream, build_embedding_cache, find_pairs, ray_dataset
from pipeline.reader import MAX_SEED, derive_seed
from pipeline.verify import verify_output
from pipeline.writers import read_tensor_column

FS = fsspec.filesystem("file")
NUM_PROMPTS = 30
FAILED_ROW = 4


@pytest.fixture(scope="module")
def pairs_url(ray_cpus, s3, tiny_models):
    """Pairs and images in one pass (so pairs sit in pairs/), 4 shards, one row failing (an empty prompt)."""
    table = prompt_table(NUM_PROMPTS)
    prompts = table.column("prompt").to_pylist()
    prompts[FAILED_ROW] = ""
    write_prompts(s3.fs, f"{s3.bucket}/pd-in/p.parquet", table.set_column(0, "prompt", [prompts]), row_group_size=8)
    status = reflow_pairs.main([
        "--prompts", s3.url("pd-in/p.parquet"), "--output", s3.url("pd-out"), "--teacher", str(tiny_models["sd15"]),
        "--steps", "4", "--model", str(tiny_models["instaflow"]), "--format", "parquet", "--height", "64",
        "--width", "64", "--rows-per-shard", "8", "--batch-size", "8", "--no-progress", "--device", "cpu",
        "--storage-options", json.dumps(s3.storage_options),
    ])
    assert status == 0
    s3.fs.invalidate_cache()
    return s3.url("pd-out")


@pytest.fixture(scope="module")
def pairs(pairs_url, s3):
    return find_pairs(pairs_url, s3.storage_options)


@pytest.fixture(scope="module")
def file_rows(pairs, s3):
    """Every row of the pair files, read with plain pyarrow, by key."""
    rows = {}
    for shard in pairs.shards:
        table = pq.read_table(io.BytesIO(s3.fs.cat_file(shard.path)))
        noise, latent = read_tensor_column(table, "noise"), read_tensor_column(table, "latent")
        for i, row in enumerate(table.select(["key", "prompt", "seed", "status"]).to_pylist()):
            rows[row["key"]] = {**row, "noise": noise[i], "latent": latent[i]}
    return rows


def first_epoch(stream: PairStream, reader: int, num_readers: int) -> list[dict]:
    pieces = stream.reader_pieces(0, reader, num_readers)
    parts = stream.parts_per_shard(num_readers)
    size = sum(len(range(part, shard.num_ok, parts)) for shard, part in pieces)
    return list(itertools.islice(stream.reader_samples(reader, num_readers), size))


def test_finds_committed_pairs_from_the_root_or_its_pairs_folder(pairs, pairs_url, s3, file_rows):
    assert [shard.path.rsplit("/", 2)[-2:] for shard in pairs.shards] == [["pairs", f"0000{i}.parquet"] for i in range(4)]
    assert pairs.num_pairs == NUM_PROMPTS - 1
    assert find_pairs(pairs_url + "/pairs/", s3.storage_options).shards == pairs.shards
    assert sum(row["status"] == "failed" for row in file_rows.values()) == 1
    with pytest.raises(PairsError, match="no _job.json"):
        find_pairs(pairs_url + "/images", s3.storage_options)


@pytest.mark.parametrize("num_readers", [1, 3, 6])  # 6 readers, 4 shards: shards are cut into parts
def test_an_epoch_gives_every_ok_pair_once_with_its_tensors(pairs, file_rows, num_readers):
    stream = PairStream(pairs, seed=1)
    samples = [s for reader in range(num_readers) for s in first_epoch(stream, reader, num_readers)]
    ok = sorted(key for key, row in file_rows.items() if row["status"] == "ok")
    assert sorted(s["key"] for s in samples) == ok  # failed rows skipped, no pair twice
    for sample in samples[:: max(1, len(samples) // 6)]:
        row = file_rows[sample["key"]]
        assert sample["seed"] == row["seed"] and sample["prompt"] == row["prompt"]
        assert torch.equal(sample["noise"], noise_for_seed(row["seed"], 64, 64)[0])  # the seed contract, exactly
        assert np.array_equal(sample["latent"].numpy(), row["latent"])


def test_the_order_is_seeded_and_a_resumed_stream_goes_on_where_it_stopped(pairs):
    def keys(stream, n, reader=1):
        return [s["key"] for s in itertools.islice(stream.reader_samples(reader, 2), n)]

    run = keys(PairStream(pairs, seed=3), 90)  # several epochs of this reader's half
    assert run == keys(PairStream(pairs, seed=3), 90)
    assert run != keys(PairStream(pairs, seed=4), 90)
    assert keys(PairStream(pairs, seed=3, start_sample=37), 40) == run[37:77]


def test_loader_workers_are_readers_as_ranks_are(pairs):
    """One rank with two loader processes reads what two ranks with none read, batch by batch."""
    loader = torch.utils.data.DataLoader(PairStream(pairs, seed=2), batch_size=3, num_workers=2)
    got = [batch["key"] for batch in itertools.islice(loader, 8)]
    ranks = [PairStream(pairs, seed=2, rank=r, world_size=2).reader_samples(r, 2) for r in range(2)]
    want = [[next(ranks[i % 2])["key"] for _ in range(3)] for i in range(8)]
    assert got == want


def test_text_embedding_cache(pairs, s3, tiny_models):
    components = ComponentCache(Runtime.default()).load(str(tiny_models["sd15"]))

    def encode(prompts):
        return encode_tokens(components.text_encoder, tokenize_prompts(components.tokenizer, prompts)).numpy()

    assert build_embedding_cache(pairs, list(pairs.shards), "tiny", encode) == 4
    assert build_embedding_cache(pairs, list(pairs.shards), "tiny", encode) == 0  # present and current
    cache_file = pairs.embeddings_path("tiny", pairs.shards[0])
    assert cache_file.startswith(f"{s3.bucket}/pd-out/_text-embeddings/tiny/")
    for sample in itertools.islice(PairStream(pairs, seed=0, encoder_id="tiny").reader_samples(0, 1), 10):
        torch.testing.assert_close(sample["prompt_embeds"], torch.from_numpy(encode([sample["prompt"]])[0]))

    # A cache that no longer matches its shard is refused by the reader and rebuilt by the builder.
    s3.fs.pipe_file(cache_file, s3.fs.cat_file(pairs.embeddings_path("tiny", pairs.shards[1])))
    stale = PairStream(pairs, seed=0, world_size=1, encoder_id="tiny")
    with pytest.raises(PairsError, match="do not match"):
        list(itertools.islice(stale.reader_samples(0, 1), pairs.num_pairs))
    assert build_embedding_cache(pairs, list(pairs.shards), "tiny", encode) == 1


def test_ray_dataset(pairs, file_rows):
    rows = ray_dataset(pairs).take_all()
    assert sorted(row["key"] for row in rows) == sorted(k for k, r in file_rows.items() if r["status"] == "ok")
    for row in rows[:5]:
        assert row["noise"].shape == (4, 8, 8)
        assert np.array_equal(row["latent"], file_rows[row["key"]]["latent"])


def committed_by_hand(root, files: dict[str, bytes], stats: dict) -> None:
    """One shard committed the way the engine does it (manifest, fenced marker), by hand."""
    identity = {"made": "by hand"}
    ManifestWriter(FS, str(root), confirm_held=lambda: None).write(job_manifest(identity, [], ["token"]))
    for name, data in files.items():
        (root / name).write_bytes(data)
    fence = {"token": "token", "identity": identity_digest(identity), "try": "0"}
    sized = {name: info | {"bytes": (root / name).stat().st_size} for name, info in stats["files"].items()}
    marker = stats | {"fence": fence, "staging": "_staging/token/00000-0", "files": sized}
    (root / "00000.stats.json").write_text(json.dumps(marker))


def test_bad_pair_outputs_are_named(tmp_path):
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": ["a"], "prompt": ["p"], "status": ["ok"]}), buf)
    committed_by_hand(tmp_path, {"00000.parquet": buf.getvalue()}, {"files": {"00000.parquet": {}}, "successes": 1})
    with pytest.raises(PairsError, match=r"00000\.parquet: missing columns \['seed', 'noise', 'latent'\]"):
        find_pairs(str(tmp_path))
    committed_by_hand(tmp_path, {}, {"files": {"00000.parquet": {}}})
    with pytest.raises(PairsError, match="no 'successes' count"):
        find_pairs(str(tmp_path))
    with pytest.raises(PairsError, match="no _job.json"):
        find_pairs(str(tmp_path / "elsewhere"))


def test_samples_per_prompt_and_teacher_images(ray_cpus, tiny_models, tmp_path, capsys):
    """3 rows per prompt with their keys and seeds, and each pair's image equal to decoding its stored latent."""
    top = MAX_SEED - 1  # its third sample's seed would overflow: that sample fails, the others do not
    table = pa.table({
        "id": ["a", "b", "c"],
        "prompt": ["a red fox, photo", "an old lighthouse", "a bowl of ramen"],
        "seed": pa.array([None, 7, top], pa.int64()),
        "style": ["x", "y", "z"],
    })
    pq.write_table(table, tmp_path / "p.parquet")
    job = ["--prompts", str(tmp_path / "p.parquet"), "--output", str(tmp_path / "out"),
           "--teacher", str(tiny_models["sd15"]), "--steps", "4", "--height", "64", "--width", "64", "--seed", "11",
           "--samples-per-prompt", "3", "--teacher-images", "--batch-size", "4", "--no-progress", "--device", "cpu"]
    assert reflow_pairs.main([*job, "--image-format", "png"]) == 0  # one sample fails, as a row with its reason
    pairs = pq.read_table(tmp_path / "out" / "00000.parquet")
    rows = pairs.select(["key", "seed", "status", "error_message", "style"]).to_pylist()
    assert [r["key"] for r in rows] == [f"{key}-{k}" for key in "abc" for k in range(3)]
    assert [r["style"] for r in rows] == ["x"] * 3 + ["y"] * 3 + ["z"] * 3
    assert [r["seed"] for r in rows] == [derive_seed(11, f"a-{k}") for k in range(3)] + [7, 8, 9, top, top + 1, None]
    assert [r["status"] for r in rows] == ["ok"] * 8 + ["failed"] and "outside" in rows[8]["error_message"]

    features = json.loads(pairs.schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"}
    vae = ComponentCache(Runtime.default()).load(str(tiny_models["sd15"])).vae
    noise, latent = read_tensor_column(pairs, "noise"), read_tensor_column(pairs, "latent")
    want = to_pixels(decode(vae, torch.from_numpy(latent[:8]))).numpy()
    for i, image in enumerate(pairs.column("image").to_pylist()[:8]):
        assert torch.equal(torch.from_numpy(noise[i]), noise_for_seed(rows[i]["seed"], 64, 64)[0])
        pixels = np.asarray(Image.open(io.BytesIO(image["bytes"])))
        assert image["path"] == f"{rows[i]['key']}.png"
        assert np.abs(pixels.astype(int) - want[i].astype(int)).max() <= 1
    assert pairs.column("image")[8].as_py() is None
    report = verify_output(str(tmp_path / "out"))  # 9 rows from a unit of 3 input rows is what was asked
    assert report.problems == [], report.problems

    # the teacher images' format is part of the job: a resume in JPEG would mix formats in one output
    assert reflow_pairs.main([*job, "--image-format", "jpeg"]) == 2
    assert "image_format: 'png' -> 'jpeg'" in capsys.readouterr().err


def dropping_first_calls(call, drops: int = 2):
    """`call`, whose first `drops` calls fail as a store's dropped connection does (botocore's, no OSError)."""
    from botocore.exceptions import EndpointConnectionError

    dropped = []

    def flaky(*args, **kwargs):
        if len(dropped) < drops:
            dropped.append(args)
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1/")
        return call(*args, **kwargs)

    return flaky


def test_training_lookups_ride_out_dropped_connections(pairs, tmp_path, monkeypatch):
    """The embedding cache's and the checkpoints' lookups are asked again, as every other storage call is: a
    dropped connection is not the training run's failure."""
    from pipeline.training.worker import CHECKPOINT_PREFIX, CHECKPOINTS_DIR, STATE_FILE, list_checkpoints

    fs = pairs.fs
    monkeypatch.setattr(fs, "exists", dropping_first_calls(fs.exists))
    encode = lambda prompts: np.zeros((len(prompts), 77, 8), dtype=np.float32)  # noqa: E731
    assert build_embedding_cache(pairs, list(pairs.shards), "zeros", encode) == len(pairs.shards)

    local = fsspec.filesystem("file")
    checkpoint = tmp_path / CHECKPOINTS_DIR / f"{CHECKPOINT_PREFIX}0000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / STATE_FILE).write_text("{}")
    monkeypatch.setattr(local, "ls", dropping_first_calls(local.ls))
    monkeypatch.setattr(local, "exists", dropping_first_calls(local.exists))
    assert list_checkpoints(local, str(tmp_path)) == [(10, str(checkpoint))]
