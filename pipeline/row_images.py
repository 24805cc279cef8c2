"""Each row's image from an input column, read and checked on the host: ControlNet's control images, encode's images.

The column holds, per row, encoded image bytes, a Hugging Face image struct ({"bytes", "path"}, as image Parquet
stores images) or a path or URL, relative to the Parquet file's folder unless absolute. Datasets come from
strangers, so what a row names is confined (ImageSources): inside the prompts root (after `..` and symbolic
links), or below a source the user allowed (--allow-image-source); the job's storage options go only to the job's
own stores, and no fsspec setting reaches a host that rows name; each read is bounded in bytes and time and
takes regular files only, each decode in pixels. Each image is decoded to RGB and resized to the job's size with
Lanczos (as diffusers' image processors resize). A row whose image is refused, missing, unreadable, undecodable,
too large or of another aspect ratio (which resizing would distort) fails alone, naming the file, row, column and
value; an outage of the job's own store fails the try instead, and so does a unit whose every image named from a
store failed as an outage (no answer, a timeout, throttling, a 5xx). Rows are read in parallel: reading is I/O,
and Pillow decodes without the GIL.
"""

from __future__ import annotations

import functools
import hashlib
import io
import ipaddress
import os
import posixpath
import re
import socket
import stat
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from pipeline.plan import WorkUnit, prompts_root
from pipeline.reader import Sample
from pipeline.storage import filesystem, is_transient, redact_text, with_retries

MAX_ASPECT_DIFFERENCE = 0.01  # relative: more is another shape, which resizing would distort
# Pixels one row's image may decode to: this many times the job's own (a source up to 8 times its size on each
# side, downscaled), and never less than a 4096x4096 photo's. A PNG of 140 KB can hold 12000x12000 grey pixels
# (430 MB as RGB), which Pillow's own limit only warns of.
MAX_PIXELS_PER_JOB_PIXEL = 64
MIN_MAX_PIXELS = 4096 * 4096
READ_THREADS = 8
DEFAULT_MAX_IMAGE_BYTES = 64 << 20  # far above any training image; a bound on what one row can make a worker hold
DEFAULT_IMAGE_READ_TIMEOUT_S = 60.0
READ_CHUNK = 1 << 20
HTTP_SCHEMES = ("http", "https")
# Answers in which a store says "try again" (throttling, a server's passing trouble): a store other than the
# job's own is asked TRIES_WHEN_TOLD_TO_WAIT times in all, waiting TRY_AGAIN_DELAY_S, then twice that, within
# --image-read-timeout. Anything else, a refused connection or an unknown host included, is not asked again.
TRY_AGAIN_STATUSES = frozenset({429, 500, 502, 503, 504})
TRIES_WHEN_TOLD_TO_WAIT = 3
TRY_AGAIN_DELAY_S = 0.5
# Host names that mean this machine, as /etc/hosts commonly spells them, besides `localhost` and `*.localhost`.
_LOCAL_HOST_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
# Percent-encoded dots, slashes and backslashes, which a server may decode into a path that leaves an allowed prefix.
_ENCODED_PATH_CHARS = re.compile(r"%2e|%2f|%5c|\\", re.IGNORECASE)
_SHOWN_LENGTH = 120


class RowImageError(ValueError):
    """A row's image that cannot be used; the message says why. `outage`: the store it names failed in a way that
    says nothing of the file (no answer, a timeout, throttling, a 5xx): the row's alone unless every image the
    unit's rows name from a store failed so (RowImages.read)."""

    def __init__(self, message: str, outage: bool = False):
        super().__init__(message)
        self.outage = outage


def allowed_image_sources(sources) -> tuple[str, ...]:
    """--allow-image-source values, checked and in one spelling (sorted, so the identity is the same however
    ordered): local folders absolute with a trailing slash (`file://` too), URLs as `scheme://` (any host or
    bucket of a scheme fsspec knows) or `scheme://host-or-bucket/prefix/`. Raises ValueError naming the value."""
    if isinstance(sources, str):
        raise ValueError(f"allow_image_sources must be a list of prefixes, got {sources!r}")
    found = set()
    for source in sources:
        if not isinstance(source, str) or not source or "\x00" in source:
            raise ValueError(f"--allow-image-source {source!r}: a folder, or a URL prefix such as https://host/")
        scheme, separator, rest = source.partition("://")
        if separator and scheme.lower() != "file":
            scheme = scheme.lower()
            if scheme not in fsspec.available_protocols():
                raise ValueError(f"--allow-image-source {source!r}: fsspec knows no protocol {scheme!r}")
            found.add(f"{scheme}://" if not rest.strip("/") else _normalized_url(scheme, rest).rstrip("/") + "/")
        else:
            folder = os.path.normpath(os.path.abspath(os.path.expanduser(rest if separator else source)))
            found.add(folder.rstrip("/") + "/")
    return tuple(sorted(found))


def _normalized_url(scheme: str, rest: str) -> str:
    """`scheme://rest` with its host or bucket in lower case and `.`/`..` taken out of its path (query kept)."""
    parts = urllib.parse.urlsplit(f"{scheme}://{rest}")
    path = posixpath.normpath(parts.path) if parts.path else ""
    path = "" if path in (".", "/.") else path
    if parts.path.endswith("/") and not path.endswith("/"):
        path += "/"
    return urllib.parse.urlunsplit((scheme, parts.netloc.lower(), path, parts.query, parts.fragment))


def _store(url: str) -> tuple[str, str]:
    """A URL's store: its protocol and bucket or host; local paths are ("file", "")."""
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.lower() == "file":
        return "file", ""
    return scheme.lower(), urllib.parse.urlsplit(url).netloc.lower()


def _is_private_host(netloc: str) -> bool:
    """A loopback, link-local or private address (or a name of this machine), as written, in any case and with or
    without the root's trailing dot: reachable only from inside, where metadata services and admin ports live. A
    scheme-wide allowance does not cover these; naming the host does. A name that resolves to such an address is
    not looked up here."""
    host = (urllib.parse.urlsplit(f"//{netloc}").hostname or "").rstrip(".")
    if host in _LOCAL_HOST_NAMES or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:  # the forms inet_aton takes, which resolvers accept too: 127.1, 0x7f000001, 2130706433
            address = ipaddress.ip_address(socket.inet_aton(host))
        except OSError:
            return False
    return address.is_loopback or address.is_link_local or address.is_private or address.is_unspecified


def shown(value: str) -> str:
    """A row's value for a message: escaped (control characters cannot garble a log), cut short, secrets hidden."""
    text = repr(value)
    if len(text) > _SHOWN_LENGTH:
        text = f"{text[:_SHOWN_LENGTH]}... ({len(value)} characters)"
    return redact_text(text)


class StoreOutage(Exception):
    """Reading from the job's own store, or from every store a unit's rows name, failed in a way that is no row's
    fault; the try fails and is retried."""


class ImageSources:
    """Where a row's image may be read from, and the read itself, bounded.

    Allowed: the prompts root (`..` and symbolic links resolved first: a link inside that points outside is
    outside), and what --allow-image-source names. Anything else is refused before it is touched, with one
    message whether or not it exists. The job's storage options go only to its own stores (the prompts' and the
    output's protocol and bucket or host); any other store is opened with none (HTTP anonymously, past fsspec's
    configuration too; buckets with the machine's own credentials and fsspec's FSSPEC_* settings). HTTP redirects
    are not followed.
    """

    def __init__(self, spec, input_fs):
        self.input_fs = input_fs
        self.prompts = spec.prompts
        self.storage_options = spec.storage_options
        self.max_bytes = spec.max_image_bytes
        self.timeout_s = spec.image_read_timeout_s
        prompts_url = input_fs.unstrip_protocol(input_fs._strip_protocol(spec.prompts))  # as its paths are spelled
        self.own_stores = {_store(prompts_url), _store(spec.prompts), _store(spec.output)}
        allowed = spec.allow_image_sources
        self.allowed_urls = tuple(source for source in allowed if "://" in source)
        self.allowed_folders = tuple(source for source in allowed if "://" not in source)
        self.local_input = isinstance(input_fs, LocalFileSystem)

    def read(self, unit: WorkUnit, value: str) -> bytes:
        """The bytes of the file `value` names, for a row of `unit`; RowImageError for a row's problem,
        StoreOutage for the job's own store's."""
        if "\x00" in value:
            raise RowImageError("a NUL character in a path")
        root = prompts_root(self.input_fs._strip_protocol(self.prompts), self.input_fs._strip_protocol(unit.path))
        scheme, separator, rest = value.partition("://")
        if separator and scheme.lower() != "file":
            try:
                url = _normalized_url(scheme.lower(), rest)
            except ValueError:  # urllib's: an unbalanced [ in the host, a port that is no number
                raise RowImageError("not a URL") from None
            return self._read_url(url, root)
        if separator or value.startswith("/"):
            return self._read_local(rest if separator else value, root if self.local_input else None)
        file = self.input_fs._strip_protocol(unit.path)
        file_scheme, in_url, file_path = file.partition("://")  # HTTP's paths keep their scheme and host
        path = posixpath.normpath(posixpath.join(posixpath.dirname(file_path if in_url else file), value))
        path = f"{file_scheme}://{path}" if in_url else path
        if self.local_input:
            return self._read_local(path, root)
        if not _inside(path, root):
            raise self._refused()
        return self._read_url(self.input_fs.unstrip_protocol(path), root)

    def names_a_store(self, value: str) -> bool:
        """Whether read(value) reads from a store (a URL, or a relative name beside prompts in one), not from
        this machine's disk."""
        scheme, separator, _ = value.partition("://")
        return scheme.lower() != "file" if separator else not (value.startswith("/") or self.local_input)

    def _refused(self) -> RowImageError:
        return RowImageError("outside the prompts folder and every --allow-image-source")

    def _read_local(self, path: str, root: str | None) -> bytes:
        """A file on this machine (`root`: the prompts root when the prompts are local): allowed by its path as
        written, before anything is touched, and again by its real path; a regular file only, opened without
        waiting (a FIFO or a device is refused, never read)."""
        folders = [*self.allowed_folders, *([(root or "/").rstrip("/") + "/"] if root is not None else [])]
        real_folders = [_real_folder(folder) for folder in folders]
        if not path.startswith("/") or not any(_inside(os.path.normpath(path), folder)
                                               for folder in (*folders, *real_folders)):
            raise self._refused()
        real = os.path.realpath(path)
        if not any(_inside(real, folder) for folder in real_folders):
            raise self._refused()
        try:
            if not stat.S_ISREG(os.stat(real).st_mode):
                raise RowImageError("not a regular file")
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
            with open(fd, "rb", buffering=0) as file:
                if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since the check
                    raise RowImageError("not a regular file")
                return self._bounded(file, time.monotonic() + self.timeout_s)
        except (FileNotFoundError, NotADirectoryError):
            raise RowImageError("no such file") from None
        except (OSError, TimeoutError) as exc:
            raise RowImageError(f"cannot be read ({_reason(exc)})") from None

    def _read_url(self, url: str, root: str) -> bytes:
        """A file of an fsspec store: the job's own store with its storage options and retries (an outage fails
        the try); any other with none, asked again only when it says "try again" (a failure is the row's, marked
        as an outage when it is one)."""
        store = _store(url)
        inside_prompts = not self.local_input and _inside(url, self.input_fs.unstrip_protocol(root).rstrip("/") + "/")
        if _ENCODED_PATH_CHARS.search(urllib.parse.urlsplit(url).path) or not (
                inside_prompts or self._allowed_url(url, store)):
            raise self._refused()
        own = store in self.own_stores
        options = _with_timeouts(store[0], self.storage_options if own else {}, self.timeout_s)

        def read(deadline: float) -> bytes:
            fs, path = (_anonymous_http()(**options), url) if store[0] in HTTP_SCHEMES and not own else \
                filesystem(url, options)
            if store[0] in HTTP_SCHEMES:  # streamed: bounded however long the body, whatever the server says;
                # a size given skips fsspec's HEAD request, which reports every failure as FileNotFoundError
                import aiohttp

                left = aiohttp.ClientTimeout(total=max(deadline - time.monotonic(), 0.001))
                with fs.open(path, "rb", block_size=0, size=self.max_bytes + 1, timeout=left) as file:
                    return self._bounded(file, deadline)
            info = fs.info(path)
            if info.get("type") != "file":
                raise RowImageError("not a file")
            if (info.get("size") or 0) > self.max_bytes:
                raise RowImageError(self._too_large())
            with fs.open(path, "rb") as file:
                return self._bounded(file, deadline)

        try:
            if own:
                return with_retries(lambda: read(time.monotonic() + self.timeout_s), what=f"read {redact_text(url)}")
            return _asked_again_when_told_to_wait(read, time.monotonic() + self.timeout_s)
        except (RowImageError, ImportError):  # ImportError: a package this machine lacks, which fails the try
            raise
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise RowImageError("no such file") from None
        except Exception as exc:
            if own and _is_outage(exc):
                raise StoreOutage(f"reading {redact_text(url)}: {_reason(exc)}") from None
            raise RowImageError(f"cannot be read ({_reason(exc)})", outage=_is_outage(exc)) from None

    def _allowed_url(self, url: str, store: tuple[str, str]) -> bool:
        """Below an allowed URL prefix; a whole scheme's allowance (`https://`) leaves out private hosts."""
        return any(store[0] == prefix[:-3] and not _is_private_host(store[1]) if prefix.endswith("://")
                   else _inside(url, prefix) for prefix in self.allowed_urls)

    def _bounded(self, file, deadline: float) -> bytes:
        """The file's bytes, read in chunks: at most max_bytes, by `deadline` (TimeoutError past it)."""
        chunks, size = [], 0
        while chunk := file.read(min(READ_CHUNK, self.max_bytes + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_bytes:
                raise RowImageError(self._too_large())
            if time.monotonic() > deadline:
                raise TimeoutError(f"not read within --image-read-timeout ({self.timeout_s:g} s)")
        return b"".join(chunks)

    def _too_large(self) -> str:
        return f"larger than --max-image-bytes ({self.max_bytes} bytes)"


def _inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or below it (`folder` ends with a slash; `path` is normalised)."""
    return path.startswith(folder) or path + "/" == folder


@functools.lru_cache(maxsize=64)
def _real_folder(folder: str) -> str:
    real = os.path.realpath(folder)
    return real if real.endswith("/") else real + "/"


def _with_timeouts(protocol: str, options: dict, timeout_s: float) -> dict:
    """Storage options with per-request timeouts (a host that never answers) and, for HTTP, no redirects (a
    redirect could lead anywhere, past the allowed prefixes); the user's own settings win."""
    if protocol in HTTP_SCHEMES:
        import aiohttp

        client = {"timeout": aiohttp.ClientTimeout(total=timeout_s, sock_connect=timeout_s, sock_read=timeout_s)}
        return {"allow_redirects": False, **options, "client_kwargs": client | options.get("client_kwargs", {})}
    if protocol in ("s3", "s3a"):
        config = {"connect_timeout": timeout_s, "read_timeout": timeout_s}
        return {**options, "config_kwargs": config | options.get("config_kwargs", {})}
    return options


@functools.cache
def _anonymous_http() -> type:
    """fsspec's HTTP store under a protocol name of its own: fsspec applies its configuration (FSSPEC_HTTP,
    FSSPEC_HTTP_HEADERS, ~/.config/fsspec) by protocol, so a host that rows name gets none of its headers,
    cookies or client settings."""
    from fsspec.implementations.http import HTTPFileSystem

    class AnonymousHTTPFileSystem(HTTPFileSystem):
        protocol = ("instaflow-row-image-http",)

    return AnonymousHTTPFileSystem


def _asked_again_when_told_to_wait(read: Callable[[float], bytes], deadline: float) -> bytes:
    """read(deadline), asked again (after a short wait, within the deadline) while the store answers that it is
    busy or in passing trouble."""
    attempt = 1
    while True:
        try:
            return read(deadline)
        except Exception as exc:
            delay = TRY_AGAIN_DELAY_S * 2 ** (attempt - 1)
            if attempt == TRIES_WHEN_TOLD_TO_WAIT or _answer_status(exc) not in TRY_AGAIN_STATUSES or \
                    time.monotonic() + delay >= deadline:
                raise
            time.sleep(delay)
            attempt += 1


def _answer_status(error: BaseException | None) -> int | None:
    """The HTTP status a store answered with, if the error carries one: aiohttp's, or botocore's under the
    OSError that s3fs raises for it (SlowDown is a 503)."""
    while error is not None:
        status = getattr(error, "status", None)
        if isinstance(status, int):
            return status
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) or None
        error = error.__cause__
    return None


def _is_outage(error: BaseException) -> bool:
    """A store's trouble, not the file's: network errors (the clients' lost connections too), timeouts,
    throttling and 5xx answers. A body cut short of its announced length is the file's: any host a row names can
    send one on purpose, and it must not fail the other rows' try."""
    from aiohttp import ClientPayloadError

    if isinstance(error, ClientPayloadError):
        return False
    status = _answer_status(error)
    return is_transient(error) or (status is not None and (status >= 500 or status == 429))


def _reason(error: BaseException) -> str:
    return redact_text(f"{type(error).__name__}: {error}"[:300])


def given(value) -> bytes | str:
    """What a row's value gives: image bytes, or the path or URL of a file (RowImageError: neither)."""
    if isinstance(value, dict):  # a Hugging Face image: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes):
        if not value:
            raise RowImageError("empty")
        return value
    if not isinstance(value, str) or not value:
        kind = type(value).__name__
        raise RowImageError("missing" if value is None else f"not image bytes or a path ({kind})")
    return value


class RowImages:
    """The images of one input column (`column`, called `what` in errors) for a job of `spec`'s size; `input_fs`
    holds the input files, against whose folders relative paths are read."""

    def __init__(self, spec, input_fs, column: str, what: str):
        self.spec = spec
        self.sources = ImageSources(spec, input_fs)
        self.column = column
        self.what = what
        self.pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="row-images")
        self.max_pixels = max(MAX_PIXELS_PER_JOB_PIXEL * spec.width * spec.height, MIN_MAX_PIXELS)

    def read(self, unit: WorkUnit, samples: list[Sample], name: str, prepare: Callable[[bytes], Any]) -> None:
        """Each sample's (`prepare(its image's bytes)`, the sha256 of those bytes) into its `inputs[name]`, or the
        sample's error naming the file, row and column (`prepare` raises RowImageError for an image it cannot
        use). The samples of one input row (--samples-per-prompt) share their row's image. An outage of the job's
        own store raises StoreOutage: the try fails, no row does. `samples` may be any part of a unit's; each
        records in `outages` whether an image it named from a store failed as an outage, for `judge`."""
        by_row: dict[int, list[Sample]] = {}
        for sample in samples:
            by_row.setdefault(sample.row, []).append(sample)
        rows = list(by_row.values())
        results = list(self.pool.map(lambda group: self._prepared(unit, group[0], prepare), rows))
        for group, prepared in zip(rows, results):
            from_store = self._names_a_store(group[0])
            for sample in group:
                if from_store:
                    sample.outages[self.column] = isinstance(prepared, RowImageError) and prepared.outage
                if isinstance(prepared, RowImageError):
                    sample.error = f"{unit.path} row {sample.row}: {self.what} ({self.column}): {prepared}"
                else:
                    sample.inputs[name] = prepared

    def judge(self, unit: WorkUnit, samples: list[Sample]) -> None:
        """Once `read` has seen every row of the unit: raises StoreOutage if each image its rows name from a store
        failed as an outage (those rows failed, and the try fails), which a dead link of one row cannot look like."""
        from_stores = {sample.row: sample for sample in samples if self.column in sample.outages}  # one per row
        if from_stores and all(sample.outages[self.column] for sample in from_stores.values()):
            first = next(iter(from_stores.values()))
            raise StoreOutage(f"{unit.path}: each of the {len(from_stores)} images its rows name from a store failed "
                              f"as an outage, such as {first.error}")

    def _names_a_store(self, sample: Sample) -> bool:
        try:
            value = given(sample.inputs.get(self.column))
        except RowImageError:
            return False
        return isinstance(value, str) and self.sources.names_a_store(value)

    def _prepared(self, unit: WorkUnit, sample: Sample, prepare: Callable[[bytes], Any]) -> Any:
        value = sample.inputs.get(self.column)
        try:
            value = given(value)
            data = value if isinstance(value, bytes) else self.sources.read(unit, value)
            return prepare(data), hashlib.sha256(data).hexdigest()
        except RowImageError as exc:
            return RowImageError(f"{shown(value)}: {exc}", exc.outage) if isinstance(value, str) else exc

    def pixels(self, data: bytes) -> np.ndarray:
        """(H, W, 3) uint8 RGB at the job's size: its pixel count checked from its header before it is decoded (a
        decompression bomb), decoded, its aspect ratio checked, resized with Lanczos; whatever decoding damaged
        bytes raises is the row's error."""
        spec = self.spec
        try:
            with Image.open(io.BytesIO(data)) as opened:  # lazy: the header only, until convert
                if opened.width * opened.height > self.max_pixels:
                    raise RowImageError(
                        f"{opened.width}x{opened.height} is more than the {self.max_pixels} pixels an image "
                        f"may have in this job ({MAX_PIXELS_PER_JOB_PIXEL} times its {spec.width}x{spec.height}, "
                        f"at least {MIN_MAX_PIXELS})")
                image = opened.convert("RGB")
        except RowImageError:
            raise
        except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
            raise RowImageError(f"cannot be decoded ({type(exc).__name__}: {exc})") from None
        aspect = spec.width / spec.height
        if abs(image.width / image.height - aspect) > MAX_ASPECT_DIFFERENCE * aspect:
            raise RowImageError(f"{image.width}x{image.height} has another aspect ratio than the job's "
                                f"{spec.width}x{spec.height}")
        if image.size != (spec.width, spec.height):
            image = image.resize((spec.width, spec.height), Image.LANCZOS)
        return np.asarray(image)
