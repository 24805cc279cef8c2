"""Images that rows name (issue 25): confined to the prompts root and the allowed sources, read within bounds,
never sent the job's credentials nor fsspec's settings; each bad row fails alone naming its value and column, and
an outage of the job's own store, or of every store a unit's rows name, fails the try. One encode job and one
ControlNet generate job, as a user runs them, and unit tests of the store outages, the bounds and the flags."""

import collections
import hashlib
import http.server
import io
import json
import os
import struct
import sys
import threading
import zlib
from types import SimpleNamespace

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from jobs.main import main
from pipeline.plan import WorkUnit
from pipeline.reader import Sample
from pipeline import row_images
from pipeline.row_images import RowImages, StoreOutage
from pipeline.spec import JobSpec

SIZE = ["--height", "64", "--width", "64", "--dtype", "float32", "--device", "cpu", "--num-workers", "1",
        "--no-progress"]
CAP = 100_000  # --max-image-bytes of the encode job: above the good image, below big.bin
TIMEOUT_S = 2.0  # --image-read-timeout of the encode job
SECRET = "Bearer job-secret-token-0123456789"
FSSPEC_SECRET = "Bearer fsspec-setting-token-9876543210"  # in fsspec's HTTP settings, which image hosts must not get


def png(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((64, 64, 3)) * 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def png_raising_syntax_error() -> bytes:
    """A PNG whose first IDAT chunk holds half the data and is followed by a chunk with an invalid name: Pillow
    opens it and raises SyntaxError ("broken PNG file") while decoding."""
    data = png(1)
    start = data.index(b"IDAT")
    half = data[start + 4:start + 4 + struct.unpack(">I", data[start - 4:start])[0] // 2]
    idat = struct.pack(">I", len(half)) + b"IDAT" + half + struct.pack(">I", zlib.crc32(b"IDAT" + half))
    return data[:start - 4] + idat + b"\x00\x00\x00\x10\x01\x02\x03\x04" + bytes(20)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height over an empty image stream: what Image.open reads, lazily, before
    anything is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


class ImageServer(http.server.ThreadingHTTPServer):
    """127.0.0.1: /ok.png, /endless (zeros until the client stops), /hang (never answers), /drip (its answer's
    head a byte every half second, so that no single read waits long), /status/CODE/... (answers CODE),
    /busy-once/... (503 the first time each path is asked, then ok.png's image), /reset (closes the connection
    unanswered), /short (50 bytes of a body announced as 100000); it records each request's headers, and counts requests by path."""

    daemon_threads = True

    def __init__(self, image: bytes):
        self.image, self.headers_seen, self.release = image, [], threading.Event()
        self.asked = collections.Counter()
        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.headers_seen.append(dict(self.headers))
        self.server.asked[self.path] += 1
        if self.path == "/reset":
            self.close_connection = True
            return
        if self.path.startswith("/status/"):
            self.send_response(int(self.path.split("/")[2]))
            self.end_headers()
            return
        if self.path.startswith("/busy-once/"):
            first = self.server.asked[self.path] == 1
            self.send_response(503 if first else 200)
            self.end_headers()
            if not first:
                self.wfile.write(self.server.image)
            return
        if self.path == "/short":  # a body cut short of the length it announced
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(self.server.image[:50])
            self.close_connection = True
            return
        if self.path == "/hang":
            self.server.release.wait(60)
            return
        if self.path == "/drip":
            for byte in b"HTTP/1.1 200 OK\r\nX-Padding: " + b"x" * 100 + b"\r\n\r\n":
                if self.server.release.wait(0.5):
                    return
                try:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                except OSError:
                    return
            return
        self.send_response(200 if self.path in ("/ok.png", "/endless") else 404)
        self.end_headers()
        if self.path == "/ok.png":
            self.wfile.write(self.server.image)
        elif self.path == "/endless":
            try:
                for _ in range(1000):  # 64 MiB at most, far past the cap
                    self.wfile.write(bytes(1 << 16))
            except OSError:
                pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    server = ImageServer(png(0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, server):
    """prompts/ with one Parquet file whose image column names every kind of thing, and a folder beside it."""
    base = tmp_path_factory.mktemp("hostile")
    prompts, outside = base / "prompts", base / "outside"
    (prompts / "photos").mkdir(parents=True)
    outside.mkdir()
    (prompts / "photos" / "ok.png").write_bytes(png(0))
    (prompts / "photos" / "damaged.png").write_bytes(png_raising_syntax_error())
    (prompts / "photos" / "big.bin").write_bytes(bytes(CAP + 1))
    (prompts / "photos" / "bomb.png").write_bytes(png_claiming(5000, 5000))  # under Pillow's own limit
    (outside / "private.png").write_bytes(png(2))
    os.symlink(outside / "private.png", prompts / "photos" / "link-out.png")
    os.symlink(prompts / "photos" / "loop.png", prompts / "photos" / "loop.png")
    os.mkfifo(prompts / "photos" / "fifo")
    values = {
        "good": "photos/ok.png",
        "good, absolute inside": str(prompts / "photos" / "ok.png"),
        "good, over http": f"{server.url}ok.png",
        "good, over http once busy": f"{server.url}busy-once/ok.png",
        "up, existing": "../outside/private.png",
        "up, missing": "../outside/none.png",
        "absolute, existing": str(outside / "private.png"),
        "absolute, missing": str(outside / "none.png"),
        "file url": f"file://{outside / 'private.png'}",
        "link out": "photos/link-out.png",
        "dev zero": "/dev/zero",
        "fifo": "photos/fifo",
        "unknown scheme": "foo://x",
        "through a file": "photos/ok.png/extra",
        "nul": "photos/ok\x00.png",
        "loop": "photos/loop.png",
        "damaged": "photos/damaged.png",
        "too big": "photos/big.bin",
        "too many pixels": "photos/bomb.png",
        "http host down": f"{server.url}status/503/job.png",
        "endless http": f"{server.url}endless",
        "hanging http": f"{server.url}hang",
        "dripping http": f"{server.url}drip",
        "http host not allowed": f"http://localhost:{server.server_address[1]}/ok.png",
    }
    pq.write_table(pa.table({"prompt": list(values), "image": list(values.values())}), prompts / "rows.parquet")
    return SimpleNamespace(prompts=prompts, values=values)


@pytest.fixture(scope="module")
def fsspec_http_settings():
    """fsspec's HTTP settings in the environment, as a user might have them for their own HTTP store, set before
    this module's Ray starts so that its workers, which inherit the environment, read them as fsspec does."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FSSPEC_HTTP_HEADERS", json.dumps({"Authorization": FSSPEC_SECRET}))
        patch.setenv("FSSPEC_HTTP", json.dumps({"cookies": {"session": FSSPEC_SECRET}}))
        yield


@pytest.fixture(scope="module")
def ray_cpus(fsspec_http_settings, ray_cpus):
    """conftest's Ray, started with fsspec_http_settings in the environment."""
    return ray_cpus


@pytest.fixture(scope="module")
def encoded(ray_cpus, tiny_models, hostile, server, tmp_path_factory):
    """The encode job, with storage options that must reach no image host: rows by prompt."""
    output = tmp_path_factory.mktemp("encoded") / "pairs"
    options = {"headers": {"Authorization": SECRET}, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    status = main(["run", "encode", "--prompts", str(hostile.prompts / "rows.parquet"), "--output", str(output), "--model",
                   str(tiny_models["sd15"]), "--allow-image-source", server.url, "--allow-image-source", "/dev/",
                   "--max-image-bytes", str(CAP), "--image-read-timeout", str(TIMEOUT_S),
                   "--storage-options", json.dumps(options), *SIZE])
    assert status == 0  # the shard committed
    rows = [row for path in sorted(output.glob("*.parquet")) for row in pq.read_table(path).to_pylist()]
    return SimpleNamespace(output=output, rows={row["prompt"]: row for row in rows})


def test_good_rows_are_read_and_record_their_digest(encoded, hostile, server):
    digest = hashlib.sha256((hostile.prompts / "photos" / "ok.png").read_bytes()).hexdigest()
    ok = {prompt for prompt, row in encoded.rows.items() if row["status"] == "ok"}
    assert ok == {"good", "good, absolute inside", "good, over http", "good, over http once busy"}
    assert {encoded.rows[prompt]["image_digest"] for prompt in ok} == {digest}
    assert all(row["image_digest"] is None for row in encoded.rows.values() if row["status"] != "ok")
    identity = json.loads((encoded.output / "_job.json").read_text())["spec"]
    assert identity["allow_image_sources"] == sorted(["/dev/", server.url])
    assert identity["max_image_bytes"] == CAP and "image_read_timeout_s" not in identity


def test_every_bad_row_fails_alone_naming_its_value_and_column(encoded, hostile):
    reasons = {
        "up, existing": "outside the prompts folder and every --allow-image-source",
        "up, missing": "outside the prompts folder and every --allow-image-source",
        "absolute, existing": "outside the prompts folder and every --allow-image-source",
        "absolute, missing": "outside the prompts folder and every --allow-image-source",
        "file url": "outside the prompts folder and every --allow-image-source",
        "link out": "outside the prompts folder and every --allow-image-source",
        "unknown scheme": "outside the prompts folder and every --allow-image-source",
        "http host not allowed": "outside the prompts folder and every --allow-image-source",
        "dev zero": "not a regular file",
        "fifo": "not a regular file",
        "through a file": "no such file",
        "nul": "a NUL character in a path",
        "loop": "cannot be read (OSError: [Errno 40]",
        "damaged": "cannot be decoded (SyntaxError: broken PNG file",
        "too big": f"larger than --max-image-bytes ({CAP} bytes)",
        "too many pixels": "5000x5000 is more than the 16777216 pixels an image may have in this job",
        "http host down": "cannot be read (ClientResponseError: 503",
        "endless http": f"larger than --max-image-bytes ({CAP} bytes)",
        "hanging http": "cannot be read (",
        "dripping http": "cannot be read (",  # within --image-read-timeout in all, not per byte
    }
    failed = {prompt: row["error_message"] for prompt, row in encoded.rows.items() if row["status"] == "failed"}
    assert failed.keys() == reasons.keys()
    for prompt, reason in reasons.items():
        row = hostile.values[prompt]
        assert f"row {list(hostile.values).index(prompt)}: image (image): {row!r}: {reason}" in failed[prompt], \
            (prompt, failed[prompt])
    # An outside file that exists and one that does not are refused alike: the errors say nothing of which is
    def why(prompt: str) -> str:
        return failed[prompt].split(repr(hostile.values[prompt]), 1)[1]

    for existing, missing in (("up, existing", "up, missing"), ("absolute, existing", "absolute, missing")):
        assert why(existing) == why(missing)


def test_image_hosts_get_none_of_the_jobs_credentials(encoded, server):
    assert server.headers_seen  # the allowed host was asked
    assert not [headers for headers in server.headers_seen if "Authorization" in headers or "Cookie" in headers or
                any(SECRET in value or FSSPEC_SECRET in value for value in headers.values())]


@pytest.fixture(scope="module")
def controlled(ray_cpus, tiny_models, hostile, server, tmp_path_factory):
    """A ControlNet generate job over the same rows, without --allow-image-source: rows by prompt."""
    folder = tmp_path_factory.mktemp("control")
    table = pq.read_table(hostile.prompts / "rows.parquet")
    keep = ["good", "good, absolute inside", "good, over http", "absolute, existing", "dev zero"]
    indices = [list(hostile.values).index(prompt) for prompt in keep]
    pq.write_table(table.take(indices).rename_columns(["prompt", "control_image"]), hostile.prompts / "c.parquet")
    output = folder / "images"
    requests_before = len(server.headers_seen)
    assert main(["run", "generate", "--prompts", str(hostile.prompts / "c.parquet"), "--output", str(output),
                 "--model", str(tiny_models["instaflow"]), "--controlnet", str(tiny_models["controlnet"]),
                 "--format", "parquet", *SIZE]) == 0
    rows = [row for path in sorted(output.glob("*.parquet")) for row in pq.read_table(path).to_pylist()]
    return SimpleNamespace(rows={row["prompt"]: row for row in rows}, requests=len(server.headers_seen) - requests_before)


def test_controlnet_rows_are_confined_without_the_allow_flag(controlled, hostile):
    rows = controlled.rows
    digest = hashlib.sha256((hostile.prompts / "photos" / "ok.png").read_bytes()).hexdigest()
    assert {prompt for prompt, row in rows.items() if row["status"] == "ok"} == {"good", "good, absolute inside"}
    assert rows["good"]["control_digest"] == digest
    for prompt in ("good, over http", "absolute, existing", "dev zero"):
        assert f"control image (control_image): {hostile.values[prompt]!r}: outside the prompts folder" in \
            rows[prompt]["error_message"]
    assert controlled.requests == 0  # refused before anything was asked


class FlakyFileSystem(MemoryFileSystem):
    """memory:// whose reads of names holding "down" fail as a store outage does."""

    protocol = "flaky"

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("flaky://", "memory://", 1))

    def info(self, path, **kwargs):
        if "down" in path:
            raise ConnectionError("connection reset by peer")
        return super().info(path, **kwargs)


def images_for(prompts: str, allow=(), output: str = "flaky://out/job", size: int = 64) -> tuple[RowImages, WorkUnit]:
    spec = SimpleNamespace(prompts=prompts, output=output, storage_options={}, max_image_bytes=1 << 20,
                           image_read_timeout_s=5.0, allow_image_sources=allow, width=size, height=size)
    fs, _ = fsspec.core.url_to_fs(prompts)
    return RowImages(spec, fs, "image", "image"), WorkUnit(0, prompts, 0, 3, 0)


def read_rows(images: RowImages, unit: WorkUnit, values: list[str]) -> list[Sample]:
    samples = [Sample(key=str(i), prompt="p", seed=0, negative_prompt=None, error=None, row=i,
                      inputs={"image": value}) for i, value in
               enumerate(values)]
    images.read(unit, samples, "pixels", images.pixels)
    images.judge(unit, samples)
    return samples


@pytest.fixture
def flaky_store():
    """flaky://bucket/in/ok.png and flaky://other/x/down.png, in memory:// 's store, removed afterwards."""
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    store = FlakyFileSystem()
    store.pipe({"/bucket/in/ok.png": png(0), "/other/x/down.png": png(0)})
    yield store
    store.rm(["/bucket", "/other"], recursive=True)


def test_an_outage_of_the_jobs_own_store_fails_the_try_not_the_rows(monkeypatch, flaky_store):
    monkeypatch.setattr("pipeline.storage.time.sleep", lambda seconds: None)  # the retries, without their waits
    images, unit = images_for("flaky://bucket/in/p.parquet", allow=("flaky://other/",))
    ok, missing = read_rows(images, unit, ["ok.png", "none.png"])
    assert ok.error is None and ok.inputs["pixels"][1] == hashlib.sha256(png(0)).hexdigest()
    assert missing.error.endswith("image (image): 'none.png': no such file")
    with pytest.raises(StoreOutage, match="ConnectionError"):
        read_rows(images, unit, ["ok.png", "down.png"])
    # Another store's outage is that row's, the data named it, while another image of the unit was read from a store
    other, ok = read_rows(images, unit, ["flaky://other/x/down.png", "ok.png"])
    assert "cannot be read (ConnectionError" in other.error and ok.error is None
    with pytest.raises(StoreOutage, match="each of the 1 images its rows name from a store failed as an outage"):
        read_rows(images, unit, ["flaky://other/x/down.png"])


def test_a_missing_package_for_an_allowed_scheme_fails_the_try(monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as on a machine without it
    images, unit = images_for("memory://in/p.parquet", allow=("gs://",))
    with pytest.raises(ImportError):
        read_rows(images, unit, ["gs://bucket/image.png"])


@pytest.mark.parametrize("flags, message", [
    (["--allow-image-source", "foo://x/"], "--allow-image-source 'foo://x/': fsspec knows no protocol 'foo'"),
    (["--max-image-bytes", "0"], "max_image_bytes must be a positive integer"),
    (["--image-read-timeout", "-1"], "image_read_timeout_s must be a positive number"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, flags, message):
    pq.write_table(pa.table({"prompt": ["a"], "image": ["x.png"]}), tmp_path / "p.parquet")
    assert main(["run", "encode", "--prompts", str(tmp_path / "p.parquet"), "--output", str(tmp_path / "out"),
                 "--model", str(tmp_path / "no-model"), *flags, *SIZE]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0], lines


def test_allowed_sources_are_in_one_spelling_and_in_the_identity_of_jobs_that_read_row_images():
    def spec(**kwargs) -> JobSpec:
        return JobSpec(prompts="p", output="o", tasks=("pairs",), teacher="t", teacher_kind="encode", **kwargs)

    given = spec(allow_image_sources=["https://CDN.example/a/../imgs", "/data/x/../images", "file:///srv/"])
    assert given.allow_image_sources == ("/data/images/", "/srv/", "https://cdn.example/imgs/")
    assert spec(allow_image_sources=["/srv", "https://cdn.example/imgs/", "/data/images/"]).allow_image_sources == \
        given.allow_image_sources
    identity = given.resolve(False).identity()
    assert identity["allow_image_sources"] == list(given.allow_image_sources)
    assert identity != spec().resolve(False).identity()
    assert spec(max_image_bytes=10).resolve(False).identity() != spec().resolve(False).identity()
    assert spec(image_read_timeout_s=1).resolve(False).identity() == spec().resolve(False).identity()
    generate = JobSpec(prompts="p", output="o", model="m").resolve(False).identity()
    assert not {"allow_image_sources", "max_image_bytes", "image_read_timeout_s"} & set(generate)
    with pytest.raises(ValueError, match="needs an encode job or --controlnet"):
        JobSpec(prompts="p", output="o", model="m", allow_image_sources=["/data/"])


def test_a_whole_schemes_allowance_leaves_out_private_hosts(server):
    images, unit = images_for("memory://in/p.parquet", allow=("http://",))
    port = server.server_address[1]
    requests_before = len(server.headers_seen)
    values = [f"http://127.0.0.1:{port}/ok.png", f"http://2130706433:{port}/ok.png", f"http://localhost:{port}/ok.png",
              "http://169.254.169.254/latest/meta-data/", "http://[::1]/x.png", f"http://localhost.:{port}/ok.png",
              f"http://LOCALHOST:{port}/ok.png", f"http://localhost.localdomain:{port}/ok.png",
              f"http://ip6-localhost:{port}/ok.png", f"http://127.0.0.1.:{port}/ok.png", f"http://x.localhost.:{port}/"]
    for sample, value in zip(read_rows(images, unit, values), values):
        assert sample.error.endswith(f"{value!r}: outside the prompts folder and every --allow-image-source")
    assert len(server.headers_seen) == requests_before
    named, _ = images_for("memory://in/p.parquet", allow=(server.url,))
    ok, = read_rows(named, unit, [f"{server.url}ok.png"])  # named, the host is allowed
    assert ok.error is None and ok.inputs["pixels"][0].shape == (64, 64, 3)


def test_relative_paths_resolve_beside_prompts_read_over_http(server):
    """HTTP keeps the scheme and host in its paths: a relative name is joined below them, with the prompts' own
    options (their host is the job's store), and `..` still cannot climb out of the host."""
    images, unit = images_for(f"{server.url}p.parquet")
    ok, struct, up = read_rows(images, unit, ["ok.png", {"bytes": None, "path": "./ok.png"}, "../../ok.png"])
    assert ok.error is None and struct.error is None
    assert up.error.endswith("'../../ok.png': outside the prompts folder and every --allow-image-source")


def test_a_store_that_says_try_again_is_asked_again_and_one_whose_every_image_is_out_fails_the_try(monkeypatch,
                                                                                                   server):
    """Another store's "try again" answers are asked again, a few times; a dead link fails its row alone; a unit
    whose every image named from a store failed as an outage (here: 503, 429, a dropped connection, a refused one)
    fails the try instead of committing its rows as failed."""
    monkeypatch.setattr(row_images, "TRY_AGAIN_DELAY_S", 0.01)
    images, unit = images_for("memory://in/p.parquet", allow=(server.url, "http://127.0.0.1:9/"))
    busy, down, missing, dropped, refused, ok = read_rows(images, unit, [
        f"{server.url}busy-once/unit.png", f"{server.url}status/503/unit", f"{server.url}status/404/unit",
        f"{server.url}reset", "http://127.0.0.1:9/x.png", f"{server.url}ok.png"])
    assert busy.error is None and ok.error is None and server.asked["/busy-once/unit.png"] == 2
    assert "'http://127.0.0.1:9/x.png': cannot be read (ClientConnectorError" in refused.error
    assert "cannot be read (ClientResponseError: 503" in down.error
    assert missing.error.endswith("no such file") and "cannot be read (" in dropped.error
    asked = {path: server.asked[path] for path in ("/status/503/unit", "/status/404/unit")}
    assert asked == {"/status/503/unit": row_images.TRIES_WHEN_TOLD_TO_WAIT, "/status/404/unit": 1}
    assert server.asked["/reset"] <= 2  # aiohttp's own one resend of a dropped request; never asked again here
    with pytest.raises(StoreOutage, match=r"each of the 4 images its rows name from a store failed as an outage"):
        read_rows(images, unit, [f"{server.url}status/503/all", f"{server.url}status/429/all", f"{server.url}reset",
                                 "http://127.0.0.1:9/x.png", png(0)])  # bytes in the row name no store


def test_the_outage_judgement_is_the_units_not_a_batchs(ray_cpus, tiny_models, server, tmp_path):
    """Rows are read a batch at a time; whether every image from a store failed as an outage is judged over the
    whole unit: a first batch whose images are all out fails those rows alone, where later rows' were read."""
    prompts = tmp_path / "rows.parquet"
    out = [f"{server.url}status/503/first-{i}.png" for i in range(2)]
    pq.write_table(pa.table({"prompt": ["out 0", "out 1", "ok 0", "ok 1"],
                             "image": [*out, *[f"{server.url}ok.png"] * 2]}), prompts)
    output = tmp_path / "pairs"
    assert main(["run", "encode", "--prompts", str(prompts), "--output", str(output), "--model",
                 str(tiny_models["sd15"]), "--allow-image-source", server.url, "--batch-size", "2", *SIZE]) == 0
    rows = {row["prompt"]: row for path in sorted(output.glob("*.parquet")) for row in pq.read_table(path).to_pylist()}
    assert [rows[prompt]["status"] for prompt in ("out 0", "out 1", "ok 0", "ok 1")] == ["failed", "failed", "ok", "ok"]
    assert "cannot be read (ClientResponseError: 503" in rows["out 1"]["error_message"]


def test_read_in_parts_a_unit_whose_every_image_from_a_store_is_out_fails_the_try(monkeypatch, server):
    monkeypatch.setattr(row_images, "TRY_AGAIN_DELAY_S", 0.01)
    images, unit = images_for("memory://in/p.parquet", allow=(server.url,))
    samples = [Sample(key=str(i), prompt="p", seed=0, negative_prompt=None, error=None, row=i,
                      inputs={"image": value}) for i, value in
               enumerate([f"{server.url}status/503/a", png(0), f"{server.url}status/429/b", f"{server.url}reset"])]
    for part in (samples[:2], samples[2:]):
        images.read(unit, part, "pixels", images.pixels)
    with pytest.raises(StoreOutage, match=r"each of the 3 images its rows name from a store failed as an outage, "
                                          r"such as memory://in/p.parquet row 0: image \(image\)"):
        images.judge(unit, samples)


def test_a_body_cut_short_fails_its_row_alone_even_as_its_units_only_image_from_a_store(server):
    """A host that announces a length and sends less (aiohttp's ClientPayloadError) fails the row that named it,
    and not the try of the unit's other rows, though it is that unit's only image named from a store."""
    images, unit = images_for("memory://in/p.parquet", allow=(server.url,))
    short, inline = read_rows(images, unit, [f"{server.url}short", png(0)])
    assert "cannot be read (ClientPayloadError" in short.error and inline.error is None


def test_hosts_that_rows_name_get_none_of_fsspecs_http_settings(monkeypatch, server):
    """fsspec fills what a filesystem is not given from its configuration (FSSPEC_HTTP*, ~/.config/fsspec); an
    image host gets none of it."""
    monkeypatch.setitem(fsspec.config.conf, "http", {"headers": {"Authorization": FSSPEC_SECRET},
                                                     "cookies": {"session": FSSPEC_SECRET}})
    images, unit = images_for("memory://in/p.parquet", allow=(server.url,))
    requests_before = len(server.headers_seen)
    ok, = read_rows(images, unit, [f"{server.url}ok.png"])
    assert ok.error is None
    seen, = server.headers_seen[requests_before:]
    assert "Authorization" not in seen and "Cookie" not in seen, seen


def test_an_image_of_more_pixels_than_the_job_allows_fails_before_it_is_decoded():
    """The pixel count is read from the header: a few bytes claiming 5000x5000 fail a 64x64 job's row naming
    the size and the limit; a 1024x1024 job allows 64 times its own pixels, so the same header is decoded (and
    found empty)."""
    small, unit = images_for("memory://in/p.parquet")
    bomb, = read_rows(small, unit, [png_claiming(5000, 5000)])
    assert bomb.error.endswith("5000x5000 is more than the 16777216 pixels an image may have in this job "
                               "(64 times its 64x64, at least 16777216)")
    large, _ = images_for("memory://in/p.parquet", size=1024)
    decoded, = read_rows(large, unit, [png_claiming(5000, 5000)])
    assert "cannot be decoded" in decoded.error
