"""Inputs and checks shared by the end-to-end job tests."""

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

SUBJECTS = ["a red fox", "an old lighthouse", "a bowl of ramen", "a snowy mountain", "a city street", "a cat"]
STYLES = ["photo", "oil painting", "watercolor", "pencil drawing"]


def prompt_table(num_rows: int, start: int = 0) -> pa.Table:
    rows = range(start, start + num_rows)
    return pa.table({
        "prompt": [f"{SUBJECTS[i % len(SUBJECTS)]}, {STYLES[i % len(STYLES)]}, number {i}" for i in rows],
        "style": [STYLES[i % len(STYLES)] for i in rows],
    })


def write_prompts(fs, path: str, table: pa.Table, row_group_size: int = 8) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    fs.pipe_file(path, buf.getvalue())


def data_files(fs, root: str) -> dict[str, bytes]:
    """Every shard data file under `root` (a path of `fs`, no protocol) by relative path; no markers."""
    root = root.rstrip("/")
    return {
        path[len(root) :].lstrip("/"): fs.cat_file(path)
        for path in sorted(fs.find(root))
        if path.endswith((".tar", ".parquet"))
    }


def tar_members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def metadata_rows(fs, root: str) -> list[dict]:
    """All rows of the shard metadata tables (images or pairs), in shard order."""
    rows = []
    for name, data in data_files(fs, root).items():
        if name.endswith(".parquet"):
            rows += pq.read_table(pa.BufferReader(data), columns=["key", "prompt", "seed", "status"]).to_pylist()
    return rows


def stats(fs, root: str) -> list[dict]:
    return [json.loads(fs.cat_file(path)) for path in sorted(fs.glob(root.rstrip("/") + "/*.stats.json"))]


def png_bytes(array) -> bytes:
    """A (H, W, 3) uint8 array as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def image_rows(output) -> tuple[list[dict], dict[str, bytes]]:
    """Every image row's metadata (from the tars' Parquet, in shard order) and every PNG image by key."""
    rows, images = [], {}
    for tar in sorted(output.glob("**/*.tar")):
        rows += pq.read_table(tar.with_suffix(".parquet")).to_pylist()
        images |= {name[:-4]: data for name, data in tar_members(tar.read_bytes()).items() if name.endswith(".png")}
    return rows, images
