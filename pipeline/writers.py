"""Shard encoders: WebDataset tars, Hugging Face image Parquet, reflow pair Parquet.

Each returns bytes (shards are small) in formats common tools read without this code,
and the same input always gives the same bytes.
"""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IMAGE_EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
_PIL_SAVE_ARGS = {
    "jpeg": {"format": "JPEG", "quality": 95, "optimize": False},
    "png": {"format": "PNG"},
    "webp": {"format": "WEBP", "quality": 95, "method": 4},
}

METADATA_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("status", pa.string()),  # "ok" or "failed"
        ("error_message", pa.string()),
        ("model", pa.string()),
        ("steps", pa.int32()),
        ("guidance_scale", pa.float32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("truncated", pa.bool_()),  # prompt cut to the text encoder's 77 tokens
        ("negative_prompt", pa.string()),
        ("decoder", pa.string()),  # images: "full" (the model's VAE) or the tiny decoder used; pairs: null
    ]
)
TENSOR_SHAPE_KEY = b"instaflow.tensor_shape"
_TEACHER_COLUMNS = {  # column: (key in the teacher dict, type)
    "teacher": ("model", pa.string()),
    "teacher_kind": ("kind", pa.string()),
    "teacher_steps": ("steps", pa.int32()),
    "teacher_guidance_scale": ("guidance_scale", pa.float32()),
}
# Every column this module writes; input columns with these names (or those a job's stages add to an output) are
# carried as input_<name>.
OUTPUT_COLUMNS = frozenset(METADATA_SCHEMA.names) | set(_TEACHER_COLUMNS) | {"image", "unrefined_image", "noise",
                                                                            "latent"}


def metadata_table(rows: list[dict], extra: pa.Table, added: list[tuple[pa.Field, list]] = ()) -> pa.Table:
    """One row per input sample (failed ones too) with fixed column types, then the columns a job's stages add
    to this output (scores, the LoRA record), then the extra input columns, renamed apart from those."""
    if extra.num_rows != len(rows):
        raise ValueError(f"{len(rows)} metadata rows but {extra.num_rows} rows of extra columns")
    table = pa.Table.from_pylist(rows, schema=METADATA_SCHEMA)
    for field, values in added:
        table = table.append_column(field, pa.array(values, type=field.type))
    extra = renamed_apart(extra, {field.name for field, _ in added})
    for name, column in zip(extra.column_names, extra.columns):
        table = table.append_column(extra.schema.field(name), column)
    return table


def encode_image(pixels: np.ndarray, image_format: str) -> bytes:
    """Encode an HxWx3 uint8 array with fixed settings, so equal pixels give equal bytes."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 array, got {pixels.dtype} {pixels.shape}")
    if image_format not in _PIL_SAVE_ARGS:
        raise ValueError(f"unknown image format {image_format!r}; expected one of {sorted(_PIL_SAVE_ARGS)}")
    buf = io.BytesIO()
    _rgb_image(pixels).save(buf, **_PIL_SAVE_ARGS[image_format])
    return buf.getvalue()


def _rgb_image(pixels: np.ndarray) -> Image.Image:
    """The same RGB image whatever the array's layout. A channels-last view of planar data (what `to_pixels`
    returns on the CPU, a permuted (N, 3, H, W) batch) is merged from its three contiguous planes, 10x cheaper
    than the byte-by-byte gather that Image.fromarray makes of a strided array."""
    if not pixels.flags.c_contiguous and all(pixels[:, :, c].flags.c_contiguous for c in range(3)):
        return Image.merge("RGB", [Image.fromarray(pixels[:, :, c]) for c in range(3)])
    return Image.fromarray(pixels, "RGB")


def renamed_apart(extra: pa.Table, reserved: set[str] | frozenset[str]) -> pa.Table:
    """Carried input columns with a reserved (output) name become input_<name> (input_input_<name>, ... where
    that is taken too)."""
    names = extra.column_names
    taken = set(reserved) | set(names)
    renamed = []
    for name in names:
        if name in reserved:
            new = f"input_{name}"
            while new in taken:
                new = f"input_{new}"
            taken.add(new)
            name = new
        renamed.append(name)
    return extra.rename_columns(renamed)


def webdataset_shard(metadata: pa.Table, images: dict[str, bytes], extension: str,
                     more_images: dict[str, dict[str, bytes]] | None = None) -> dict[str, bytes]:
    """A tar in img2dataset's layout ({key}.{ext}, .txt, .json per ok sample; each of `more_images` as
    {key}.{name}.{ext}, e.g. the unrefined image) and its metadata Parquet."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for row in metadata.to_pylist():
            if row["status"] != "ok":
                continue
            key = row["key"]
            _add_member(tar, f"{key}.{extension}", _image_of(images, key))
            for name, more in (more_images or {}).items():
                _add_member(tar, f"{key}.{name}.{extension}", _image_of(more, key))
            _add_member(tar, f"{key}.txt", row["prompt"].encode())
            _add_member(tar, f"{key}.json", _standard_json(row).encode())
    return {"tar": buf.getvalue(), "parquet": _parquet_bytes(metadata)}


def _standard_json(row: dict) -> str:
    """The row as RFC 8259 JSON, which has no NaN or infinities: in carried columns they become null, so strict
    parsers read every sample. Values JSON has no type for (dates, bytes, decimals) are written as text."""
    return json.dumps(_finite(row), ensure_ascii=False, default=str, allow_nan=False)


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed owner, mode and time: reproducible archives
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _image_of(images: dict[str, bytes], key: str) -> bytes:
    if key not in images:
        raise ValueError(f"sample {key!r} has status ok but no image")
    return images[key]


def image_parquet_shard(metadata: pa.Table, images: dict[str, bytes], extension: str,
                        more_images: dict[str, dict[str, bytes]] | None = None) -> bytes:
    """Metadata plus an `image` column (and a `{name}_image` column for each of `more_images`) stored the way
    Hugging Face datasets stores Image features."""
    return _parquet_bytes(with_image_column(metadata, images, extension, more_images))


def with_image_column(table: pa.Table, images: dict[str, bytes], extension: str,
                      more_images: dict[str, dict[str, bytes]] | None = None) -> pa.Table:
    """The table with an `image` column (struct of bytes and path, null for failed rows), a `{name}_image` column
    for each of `more_images`, and the `huggingface` schema metadata that makes datasets read them as Image
    features; other schema metadata is kept."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    keys, statuses = table.column("key").to_pylist(), table.column("status").to_pylist()
    columns = {"image": (images, extension)} | {f"{name}_image": (more, f"{name}.{extension}")
                                                for name, more in (more_images or {}).items()}
    for column, (by_key, suffix) in columns.items():
        values = [{"bytes": _image_of(by_key, key), "path": f"{key}.{suffix}"} if status == "ok" else None
                  for key, status in zip(keys, statuses)]
        table = table.append_column(column, pa.array(values, type=image_type))
    features = {f.name: feature for f in table.schema if (feature := _hf_feature(f.type)) is not None}
    features |= {column: {"_type": "Image"} for column in columns}
    hf = json.dumps({"info": {"features": features}})  # in column order, which datasets keeps
    return table.replace_schema_metadata({**(table.schema.metadata or {}), b"huggingface": hf.encode()})


_HF_DTYPES = {"halffloat": "float16", "float": "float32", "double": "float64"}


def _hf_feature(t: pa.DataType) -> dict | None:
    """Hugging Face Value feature for a flat column type; None lets datasets infer the rest."""
    flat = (pa.types.is_boolean, pa.types.is_integer, pa.types.is_floating, pa.types.is_string,
            pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary, pa.types.is_timestamp)
    if not any(check(t) for check in flat):
        return None
    return {"dtype": _HF_DTYPES.get(str(t), str(t)), "_type": "Value"}


def pairs_parquet_shard(
    metadata: pa.Table,
    noise: dict[str, np.ndarray],
    latent: dict[str, np.ndarray],
    teacher: dict,
    tensor_shape: tuple[int, ...],
    images: dict[str, bytes] | None = None,
    extension: str = "png",
) -> bytes:
    """Reflow training pairs: metadata, teacher settings, and float32 `noise` and `latent` tensors.

    Tensors are fixed-size lists (null for failed samples) with their shape in the field and schema
    metadata; `teacher` holds the teacher's model, kind, steps and guidance_scale. `images` (the decoded
    teacher latents, encoded) become an `image` column stored as image_parquet_shard stores images.
    """
    n = metadata.num_rows
    table = metadata
    for column, (field, type_) in _TEACHER_COLUMNS.items():
        table = table.append_column(column, pa.array([teacher[field]] * n, type=type_))
    shape = [int(d) for d in tensor_shape]
    keys = metadata.column("key").to_pylist()
    ok = [s == "ok" for s in metadata.column("status").to_pylist()]
    for name, arrays in (("noise", noise), ("latent", latent)):
        type_ = pa.list_(pa.float32(), int(np.prod(shape)))
        field = pa.field(name, type_, metadata={TENSOR_SHAPE_KEY: json.dumps(shape)})
        table = table.append_column(field, _tensor_column(name, arrays, keys, ok, shape))
    shapes = json.dumps({"latent": shape, "noise": shape}, sort_keys=True)
    table = table.replace_schema_metadata({TENSOR_SHAPE_KEY: shapes.encode()})
    if images is not None:
        table = with_image_column(table, images, extension)
    return _parquet_bytes(table)


def _tensor_column(
    name: str, arrays: dict[str, np.ndarray], keys: list[str], ok: list[bool], shape: list[int]
) -> pa.Array:
    size = int(np.prod(shape))
    values = np.zeros((len(keys), size), dtype=np.float32)  # null rows keep zeros under the mask
    for i, (key, is_ok) in enumerate(zip(keys, ok)):
        if not is_ok:
            continue
        if key not in arrays:
            raise ValueError(f"sample {key!r} has status ok but no {name} tensor")
        array = np.asarray(arrays[key], dtype=np.float32)
        if list(array.shape) != shape:
            raise ValueError(f"sample {key!r}: {name} has shape {list(array.shape)}, expected {shape}")
        values[i] = array.reshape(-1)
    mask = pa.array([not is_ok for is_ok in ok], type=pa.bool_())
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), size, mask=mask)


def read_tensor_column(table: pa.Table, name: str) -> np.ndarray:
    """A tensor column as a float32 (N, *shape) array; rows of failed samples are NaN."""
    field = table.schema.field(name)
    if TENSOR_SHAPE_KEY not in (field.metadata or {}):
        raise ValueError(f"column {name!r} has no {TENSOR_SHAPE_KEY.decode()} metadata; not a tensor column")
    shape = json.loads(field.metadata[TENSOR_SHAPE_KEY])
    column = table.column(name).combine_chunks()
    size = column.type.list_size
    values = column.values.slice(column.offset * size, len(column) * size)
    out = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=True).reshape(len(column), *shape)
    out[column.is_null().to_numpy(zero_copy_only=False)] = np.nan
    return out


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
