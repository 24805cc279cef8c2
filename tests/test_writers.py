"""Shard encoders, checked by the tools users read them with: webdataset, datasets, pyarrow, PIL."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobhelpers import tar_members

from pipeline.writers import (
    IMAGE_EXTENSIONS,
    encode_image,
    image_parquet_shard,
    metadata_table,
    pairs_parquet_shard,
    read_tensor_column,
    webdataset_shard,
)

SETTINGS = {"model": "tiny", "steps": 1, "guidance_scale": 1.5, "height": 16, "width": 24, "truncated": False}
SHAPE = (4, 2, 3)


def pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(16, 24, 3), dtype=np.uint8)


@pytest.fixture
def metadata() -> pa.Table:
    rows = [
        {"key": "a0", "prompt": "a red cube", "seed": 1, "status": "ok", **SETTINGS},
        {"key": "a1", "prompt": "", "seed": 2, "status": "failed", "error_message": "in.parquet row 1: empty prompt",
         **SETTINGS},
        {"key": "a2", "prompt": "ünïcode prompt", "seed": 3, "status": "ok", "negative_prompt": "blurry", **SETTINGS},
    ]
    extra = pa.table({"url": ["u0", "u1", "u2"], "score": pa.array([0.5, None, 0.25], type=pa.float32())})
    return metadata_table(rows, extra)


def test_metadata_table_has_fixed_types(metadata):
    schema = metadata.schema
    assert schema.names[:13] == ["key", "prompt", "seed", "status", "error_message", "model", "steps",
                                 "guidance_scale", "height", "width", "truncated", "negative_prompt", "decoder"]
    assert schema.names[13:] == ["url", "score"]
    assert (schema.field("seed").type, schema.field("steps").type, schema.field("guidance_scale").type) == (
        pa.int64(), pa.int32(), pa.float32())
    assert metadata.column("error_message").to_pylist() == [None, "in.parquet row 1: empty prompt", None]
    with pytest.raises(ValueError, match="2 metadata rows but 3 rows"):
        metadata_table([{}, {}], pa.table({"x": [1, 2, 3]}))


@pytest.mark.parametrize("image_format", sorted(IMAGE_EXTENSIONS))
def test_encode_image_is_deterministic_and_decodes(image_format):
    data = encode_image(pixels(0), image_format)
    assert encode_image(pixels(0), image_format) == data
    image = Image.open(io.BytesIO(data))
    assert image.format == {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[image_format]
    assert (image.size, image.mode) == ((24, 16), "RGB")
    if image_format == "png":
        assert np.array_equal(np.asarray(image), pixels(0))
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        encode_image(pixels(0).astype(np.float32), image_format)


@pytest.mark.parametrize("image_format", sorted(IMAGE_EXTENSIONS))
def test_encode_image_bytes_do_not_depend_on_the_layout(image_format):
    """A channels-last view of planar data (to_pixels' output on the CPU) and any other strided view encode to
    the bytes of the same pixels laid out contiguously."""
    image = pixels(3)
    planar = np.ascontiguousarray(image.transpose(2, 0, 1)).transpose(1, 2, 0)
    assert not planar.flags.c_contiguous and np.array_equal(planar, image)
    assert encode_image(planar, image_format) == encode_image(image, image_format)
    strided = np.ascontiguousarray(np.repeat(image, 2, axis=1))[:, ::2]
    assert encode_image(strided, image_format) == encode_image(image, image_format)


def test_webdataset_shard_reads_with_webdataset(metadata, tmp_path):
    import webdataset as wds

    images = {"a0": encode_image(pixels(0), "jpeg"), "a2": encode_image(pixels(2), "jpeg")}
    shard = webdataset_shard(metadata, images, "jpg")
    assert webdataset_shard(metadata, images, "jpg") == shard
    (tmp_path / "00000.tar").write_bytes(shard["tar"])

    samples = list(wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["a0", "a2"]  # the failed sample is only in the Parquet
    for sample, row in zip(samples, [metadata.slice(0, 1), metadata.slice(2, 1)]):
        row = row.to_pylist()[0]
        assert sample["txt"].decode() == row["prompt"]
        assert json.loads(sample["json"]) == pytest.approx(row)
        assert Image.open(io.BytesIO(sample["jpg"])).size == (24, 16)
    assert pq.read_table(io.BytesIO(shard["parquet"])).equals(metadata)

    with pytest.raises(ValueError, match="'a2' has status ok but no image"):
        webdataset_shard(metadata, {"a0": images["a0"]}, "jpg")


def test_image_parquet_loads_with_hf_datasets(metadata, tmp_path):
    import datasets

    images = {"a0": encode_image(pixels(0), "png"), "a2": encode_image(pixels(2), "png")}
    data = image_parquet_shard(metadata, images, "png")
    assert image_parquet_shard(metadata, images, "png") == data
    (tmp_path / "00000.parquet").write_bytes(data)

    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "00000.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert ds.features["image"] == datasets.Image()
    assert ds["key"] == ["a0", "a1", "a2"] and ds["status"] == ["ok", "failed", "ok"]
    first, failed = ds[0], ds[1]
    assert isinstance(first["image"], Image.Image) and np.array_equal(np.asarray(first["image"]), pixels(0))
    assert failed["image"] is None and failed["error_message"].endswith("empty prompt")
    assert first["url"] == "u0" and first["guidance_scale"] == pytest.approx(1.5)


def test_pairs_parquet_round_trips_tensors_bit_exactly(metadata):
    rng = np.random.default_rng(7)
    noise = {k: rng.standard_normal(SHAPE).astype(np.float32) for k in ("a0", "a2")}
    latent = {k: rng.standard_normal(SHAPE).astype(np.float32) * 1e-30 for k in ("a0", "a2")}
    teacher = {"model": "tiny-teacher", "kind": "sd", "steps": 25, "guidance_scale": 7.5}
    data = pairs_parquet_shard(metadata, noise, latent, teacher, SHAPE)
    assert pairs_parquet_shard(metadata, noise, latent, teacher, SHAPE) == data

    table = pq.read_table(io.BytesIO(data))
    assert table.schema.field("noise").type == pa.list_(pa.float32(), 24)
    assert json.loads(table.schema.field("latent").metadata[b"instaflow.tensor_shape"]) == list(SHAPE)
    assert json.loads(table.schema.metadata[b"instaflow.tensor_shape"]) == {"latent": [4, 2, 3], "noise": [4, 2, 3]}
    assert table.column("noise").null_count == 1 and table.column("latent").to_pylist()[1] is None
    assert table.column("teacher").to_pylist() == ["tiny-teacher"] * 3
    assert table.column("teacher_steps").to_pylist() == [25] * 3
    assert table.column("teacher_guidance_scale").to_pylist() == [7.5] * 3

    for name, arrays in (("noise", noise), ("latent", latent)):
        recovered = read_tensor_column(table, name)
        assert recovered.shape == (3, *SHAPE) and recovered.dtype == np.float32
        assert np.array_equal(recovered[0], arrays["a0"]) and np.array_equal(recovered[2], arrays["a2"])
        assert np.isnan(recovered[1]).all()
    assert np.array_equal(read_tensor_column(table.slice(2), "noise")[0], noise["a2"])

    with pytest.raises(ValueError, match=r"'a2': latent has shape \[4, 3, 2\], expected \[4, 2, 3\]"):
        pairs_parquet_shard(metadata, noise, {**latent, "a2": np.zeros((4, 3, 2))}, teacher, SHAPE)


def test_all_failed_shard_keeps_the_schema(metadata):
    failed = metadata.set_column(3, "status", pa.array(["failed"] * 3))
    table = pq.read_table(io.BytesIO(pairs_parquet_shard(failed, {}, {}, {"model": "t", "kind": "sd", "steps": 2,
                                                                          "guidance_scale": 1.0}, SHAPE)))
    assert table.schema.field("noise").type == pa.list_(pa.float32(), 24)
    assert read_tensor_column(table, "noise").shape == (3, *SHAPE)
    assert webdataset_shard(failed, {}, "jpg")["tar"]  # an empty but valid tar


def test_tar_metadata_is_strict_json_and_the_parquet_keeps_nan(metadata):
    """NaN and infinities in carried columns, nested in lists and structs too, are null in the JSON (RFC 8259 has
    none), so strict parsers read every sample; the Parquet keeps the floats as they were."""
    extra = pa.table({
        "score": [float("nan"), 1.0, float("-inf")],
        "scores": [[float("inf"), 2.0], [], None],
        "box": [{"x": float("nan"), "label": "cat"}, None, {"x": 3.0, "label": None}],
    })
    table = metadata_table(metadata.select(list(range(13))).to_pylist(), extra)
    images = {"a0": encode_image(pixels(0), "png"), "a2": encode_image(pixels(2), "png")}
    shard = webdataset_shard(table, images, "png")
    rows = {}
    for name, data in tar_members(shard["tar"]).items():
        if name.endswith(".json"):
            rows[name] = json.loads(data, parse_constant=lambda c: pytest.fail(f"{name}: {c} is not JSON"))
    assert [(r["score"], r["scores"], r["box"]) for _, r in sorted(rows.items())] == [
        (None, [None, 2.0], {"x": None, "label": "cat"}), (None, None, {"x": 3.0, "label": None})]
    scores = pq.read_table(io.BytesIO(shard["parquet"])).column("score").to_pylist()
    assert np.isnan(scores[0]) and scores[2] == float("-inf")
