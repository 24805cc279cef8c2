"""Storage access shared by the driver and the workers: any fsspec URL, retried I/O, atomic puts, and the
conditional writes (create-if-absent, replace-if-unchanged) that the output lock and shard markers are built on."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import posixpath
import random
import re
import time
import urllib.parse
import uuid
from pathlib import Path
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterator, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

T = TypeVar("T")

# Environment variables that configure storage clients (fsspec, boto, gcsfs, huggingface_hub). Workers on a
# cluster use their own node's credentials; only these settings, never a secret, travel in Ray's runtime
# environment, which `ray list actors --detail` and the dashboard display.
_ENV_PREFIXES = ("FSSPEC_", "AWS_", "GOOGLE_", "GCS", "HF_")
_ENV_NAMES = ("S3_ENDPOINT_URL",)
# Never forwarded, whatever the value: secrets, and the settings that carry them (an ABFS account key or
# connection string in FSSPEC_ABFS_*, HTTP headers, session tokens that would override the nodes' roles).
_UNFORWARDED_NAME_PARTS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL", "SESSION", "SIGNATURE",
                           "CONNECTION_STRING", "SAS", "AUTH", "HEADER", "COOKIE")
# Variables anywhere in the environment whose values are secrets, hidden wherever they turn up (redact_text).
_SECRET_ENV_NAME = re.compile("SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|SIGNATURE|CONNECTION_STRING|COOKIE|_KEY",
                              re.IGNORECASE)
# A remembered or environment secret shorter than this is hidden only where a pattern finds it: hiding every
# occurrence of a short value ("testing", "false") would blank ordinary words of messages.
MIN_SECRET_LENGTH = 8

# Keys of storage options whose values are secret (HTTP headers included: they carry Authorization and API keys).
_SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "signature", "connection_string",
                 "auth", "header", "cookie", "sas")
# Secrets inside text; each pattern hides its `secret` group and keeps what comes before it (`keep`).
# A quoted value, not empty (an empty value hides nothing); also with escaped quotes, as JSON inside a string has
_QUOTED_VALUE = r""""(?:[^"\\]|\\.)+"|'(?:[^'\\]|\\.)+'|\\"(?:(?!\\").)+\\"|\\'(?:(?!\\').)+\\'"""
_SECRET_IN_TEXT = [
    # user:password@ in URLs, the user possibly empty (redis://:password@host), and a user alone, which clients
    # send as a credential (https://TOKEN@host/)
    re.compile(r"(?P<keep>://)(?P<secret>[^/\s:@]*:(?P<password>[^/\s@]+)|[^/\s:@]+)(?=@)"),
    # signed-URL (X-Amz-Signature, X-Goog-Signature, X-Goog-Credential, Azure's sig) and token query parameters,
    # and the fields of connection strings (;AccountKey=...)
    re.compile(r"(?i)(?P<keep>[?&;][\w.-]*(?:sig|key|token|secret|passw|pwd|credential|auth)[\w.-]*=)"
               r"(?P<secret>[^&;\s\"'#<>]+)"),
    # name=value anywhere (aws_secret_access_key=..., SharedAccessSignature=..., Password=...), and name: value
    # for names that can only be secrets
    re.compile(r"(?i)(?P<keep>(?<![\w.-])(?:[\w.-]*(?:secret|token(?!iz)|passw|credential|signature|account_?key|"
               r"access_?key|api[_-]?key|private_?key)[\w.-]*|pwd)\s*=\s*)(?P<secret>" + _QUOTED_VALUE +
               r"|[^\s&;,\"'<>)}\]]+)"),
    re.compile(r"(?i)(?P<keep>(?<![\w.-])[\w.-]*(?:secret|passw|account_?key|access_?key|api[_-]?key|"
               r"private_?key)[\w.-]*:[ \t]*)(?P<secret>" + _QUOTED_VALUE + r"|[^\s&;,\"'<>)}\]]+)"),
    # a quoted secret-looking name in a dict repr or JSON: {'secret': 'abc'}, "token": "abc", 'headers': {...};
    # a name, not a quoted file name in a message ('a/monkey.png': outside the prompts root)
    re.compile(r"(?i)(?P<keep>(?P<quote>[\"'])[\w-]*(?:key|secret|token|passw|pwd|credential|signature|auth|"
               r"header|cookie|sas|sig)[\w\\-]*(?P=quote)\s*:\s*)(?P<secret>" + _QUOTED_VALUE +
               r"|\{[^{}]+\}|(?!(?:null|none|true|false)\b)[^\s,{}\]\"']+)"),
    # Authorization headers in text, and bearer tokens anywhere
    re.compile(r"(?i)(?P<keep>\b(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|digest|negotiate|"
               r"token|aws4-hmac-sha256)\s+)?)(?P<secret>[^\s\"',;]+)"),
    re.compile(r"(?i)(?P<keep>\bbearer\s+)(?P<secret>[\w.~+/=-]+)"),
]
# Every pattern but the first needs one of these in the text: most messages are spared the costlier patterns.
_SECRET_HINTS = ("sig", "key", "token", "secret", "passw", "pwd", "credential", "auth", "cookie", "header", "sas",
                 "bearer")
_remembered_secrets: set[str] = set()  # secret values of this process's storage options (remember_secrets)

# OSErrors that retrying cannot fix.
_PERMANENT_OS_ERRORS = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)
_TRANSIENT_S3_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
}


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and path for a URL; options not given here come from the environment. The options' secrets are
    remembered, so that whatever uses them hides them in its messages (redact_text)."""
    remember_secrets(storage_options or {})
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def normalize_location(url: str) -> str:
    """One spelling per location, so a re-run written differently is the same job: local paths absolute with no
    trailing slash, URLs with a lower-case scheme and no trailing slash."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        if scheme.lower() == "file":
            return normalize_location(rest)
        return f"{scheme.lower()}://{rest.rstrip('/') or rest}"
    return os.path.abspath(os.path.expanduser(url))


def normalize_model(model: str) -> str:
    """A model given as a URL or an existing local folder is normalised; a hub id (org/name) stays as it is."""
    if "://" in model or os.path.exists(os.path.expanduser(model)):
        return normalize_location(model)
    return model


def storage_env() -> dict[str, str]:
    """Storage settings of this process that are safe to show (endpoints, regions, offline flags), to forward
    to Ray workers. Secrets never travel this way: workers use their node's own credentials (instance role,
    workload identity, the node's environment), or the spec's storage options, which Ray does not display. A
    setting is left out if its name says it holds or carries a secret, or if its value holds one (by pattern,
    or as the value of a secret variable or storage option)."""
    return {
        name: value
        for name, value in sorted(os.environ.items())
        if (name.startswith(_ENV_PREFIXES) or name in _ENV_NAMES)
        and not any(part in name.upper() for part in _UNFORWARDED_NAME_PARTS)
        and redact_text(value) == value
    }


def _is_secret_name(name: Any) -> bool:
    return any(word in str(name).lower() for word in _SECRET_WORDS)


def redact(options: Any, by_name: bool = True) -> Any:
    """Copy of storage options with secrets replaced, safe to write to disk: values under secret-looking keys,
    and secrets inside any string value (URL passwords, signed-URL parameters, connection strings). With
    `by_name` False, only the strings: for records whose keys this project names (a marker's `first_key_index`
    is no secret, its unit's `path` may hold one)."""
    if isinstance(options, dict):
        return {k: "***" if by_name and _is_secret_name(k) else redact(v, by_name) for k, v in options.items()}
    if isinstance(options, (list, tuple)):
        return [redact(v, by_name) for v in options]
    if isinstance(options, str):
        return redact_text(options)
    return options


def redact_text(text: str | None) -> str | None:
    """A message or value with every secret in it replaced by ***: the values of this process's secret
    variables and remembered storage options wherever they appear, and secrets that patterns find (URL
    passwords, signed-URL parameters, connection strings, Authorization headers, secret-named fields)."""
    if not text:
        return text
    known = _known_secrets()
    if known:
        text = _value_pattern(tuple(sorted(known, key=lambda value: (-len(value), value)))).sub("***", text)
    lowered = text.lower()
    patterns = _SECRET_IN_TEXT if any(hint in lowered for hint in _SECRET_HINTS) else _SECRET_IN_TEXT[:1]
    for pattern in patterns:
        text = pattern.sub(lambda m: m.group("keep") + "***", text)
    return text


def remember_secrets(options: Any) -> None:
    """Remembers the secret values in storage options (under secret-looking keys, or inside their strings), so
    that redact_text hides them wherever they turn up later: inside an error message, a repr, a log line."""
    _remembered_secrets.update(value for value in _secret_values(options) if len(value) >= MIN_SECRET_LENGTH)


def _secret_values(values: Any, secret: bool = False):
    if isinstance(values, dict):
        for k, v in values.items():
            yield from _secret_values(v, secret or _is_secret_name(k))
    elif isinstance(values, (list, tuple)):
        for v in values:
            yield from _secret_values(v, secret)
    elif isinstance(values, str):
        if secret:
            yield values
        for pattern in _SECRET_IN_TEXT:
            for match in pattern.finditer(values):
                yield from (found for name, found in match.groupdict().items()
                            if name in ("secret", "password") and found)
    elif secret and isinstance(values, (int, float)) and not isinstance(values, bool):
        yield str(values)


def _known_secrets() -> set[str]:
    """The remembered secrets and the secret variables' values, each as it may be written: raw, URL-encoded, or
    escaped in JSON or a repr."""
    from_env = {os.environ[name] for name in os.environ if _SECRET_ENV_NAME.search(name)}
    values = _remembered_secrets | {value for value in from_env if len(value) >= MIN_SECRET_LENGTH}
    return {form for value in values
            for form in (value, urllib.parse.quote(value, safe=""), json.dumps(value)[1:-1], repr(value)[1:-1])}


@functools.lru_cache(maxsize=8)
def _value_pattern(values: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(re.escape(value) for value in values))


def raises_redacted(fn: Callable[..., T]) -> Callable[..., T]:
    """Makes `fn` raise its exceptions with any secret in their message hidden (same type where it can be built
    from a message, the same traceback): a Ray actor's errors are kept and shown by Ray (`ray list tasks
    --detail`, `ray list actors --detail`, the dashboard), out of reach of this process's logging."""
    @functools.wraps(fn)
    def calling(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            text = str(error)
            safe = redact_text(text)
            if safe == text:
                raise
            try:
                redacted = type(error)(safe)
                if str(redacted) != safe:
                    raise TypeError(type(error).__name__)
            except Exception:  # a type that is not built from its message
                redacted = RuntimeError(f"{type(error).__name__}: {safe}")
            raise redacted.with_traceback(error.__traceback__) from None

    return calling


def protect_secrets(storage_options: dict | None) -> None:
    """Hides this job's secrets in everything this process logs from now on (the driver and each worker call
    it): remembers the storage options' secret values, and redacts every log record as it is made, whichever
    logger or handler it goes to: its message with its arguments, and its traceback."""
    remember_secrets(storage_options or {})
    previous = logging.getLogRecordFactory()
    if getattr(previous, "redacts_secrets", False):
        return

    def redacting_factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit the format: logging reports it when the record is handled
            return record
        record.msg, record.args = redact_text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return record

    redacting_factory.redacts_secrets = True
    logging.setLogRecordFactory(redacting_factory)


def secret_fields(values: Any, where: str = "") -> list[str]:
    """Dotted names of the secrets in `values`: set entries with secret-looking names (what redact hides) and
    strings that carry one (URL passwords, signed-URL parameters, connection strings)."""
    if isinstance(values, dict):
        found = []
        for k, v in values.items():
            name = f"{where}.{k}" if where else str(k)
            found += [name] if _is_secret_name(k) and v not in (None, "") else secret_fields(v, name)
        return found
    if isinstance(values, (list, tuple)):
        return [name for i, v in enumerate(values) for name in secret_fields(v, f"{where}[{i}]")]
    if isinstance(values, str):
        return [where] if redact_text(values) != values else []
    return []


def is_transient(error: BaseException) -> bool:
    """True for errors that may succeed on retry: network trouble, throttling, server errors. The clients' own
    connection errors count (botocore's EndpointConnectionError and ConnectionClosedError, aiohttp's
    ServerDisconnectedError): they derive from neither OSError nor Python's ConnectionError."""
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    if isinstance(error, OSError):
        return not isinstance(error, _PERMANENT_OS_ERRORS)
    if isinstance(error, _client_connection_errors()):
        return True
    try:
        from botocore.exceptions import ClientError
    except ImportError:
        return False
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return code in _TRANSIENT_S3_CODES or int(status) >= 500
    return False


@functools.cache
def _client_connection_errors() -> tuple[type[BaseException], ...]:
    """The connection-level errors of the storage clients that are installed."""
    errors: list[type[BaseException]] = []
    try:
        from botocore.exceptions import ConnectionError as BotocoreConnectionError
        from botocore.exceptions import HTTPClientError
        errors += [BotocoreConnectionError, HTTPClientError]
    except ImportError:
        pass
    try:
        import aiohttp
        errors += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:
        pass
    return tuple(errors)


retry_listeners: list[Callable[[], None]] = []  # called at each retry (the job's metrics count them)


def with_retries(
    fn: Callable[..., T],
    *args: Any,
    what: str,
    attempts: int = 5,
    base_delay_s: float = 0.5,
    **kwargs: Any,
) -> T:
    """Call fn, retrying transient errors with exponential backoff and jitter."""
    attempt = 1
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if attempt >= attempts or not is_transient(e):
                raise
            delay = base_delay_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
            log.warning("%s failed (attempt %d/%d): %r; retrying in %.1fs", what, attempt, attempts, e, delay)
            for listener in retry_listeners:
                listener()
            time.sleep(delay)
            attempt += 1


class UnsafePathError(ValueError):
    """A name read from a store (a listing, a marker, a record) that would reach outside the folder it belongs to."""


_DRIVE = re.compile(r"[A-Za-z]:")


def join_inside(root: str | Path, relative: str, what: str) -> str | Path:
    """`root/relative` for a name that data gave (a store's listing, a marker, a record): refused, with
    UnsafePathError naming `what` and the name, unless it is a plain relative path that stays inside `root` (no
    leading `/`, `..`, `.` or empty segments, backslashes, drive letters, NUL). A local root is also checked after
    resolving symbolic links, so a link planted inside it cannot lead a write out of it."""
    segments = relative.split("/") if isinstance(relative, str) else []
    if (not segments or any(part in ("", ".", "..") for part in segments) or "\\" in relative or "\0" in relative
            or _DRIVE.match(relative)):
        raise UnsafePathError(f"{what}: {str(relative)[:200]!r} is not a relative path inside its folder")
    if isinstance(root, Path):
        base = os.path.realpath(root)
        if os.path.commonpath([base, os.path.realpath(os.path.join(base, relative))]) != base:
            raise UnsafePathError(f"{what}: {relative[:200]!r} leads outside {root} (through a symbolic link)")
        return root / relative
    return posixpath.join(root.rstrip("/") or root, relative)


def put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write an object so that readers see it complete or not at all."""
    if isinstance(fs, LocalFileSystem):
        with_retries(_put_local, fs._strip_protocol(path), data, what=f"write {path}")
    else:
        # One PUT (or a completed multipart upload): object stores never expose a partial object.
        # fs.open(path, "wb") is not safe here: leaving its block by an exception still commits.
        with_retries(fs.pipe_file, path, data, what=f"write {path}")


def _put_local(path: str, data: bytes) -> None:
    tmp = _synced_copy_beside(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _synced_copy_beside(path: str, data: bytes) -> str:
    """`data` in a new file next to `path`, on disk, so it can be renamed or linked into place; nothing is left
    behind if writing fails."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp


def move(fs: fsspec.AbstractFileSystem, source: str, target: str) -> None:
    """Move an object into place: a rename on a local disk, a server-side copy and delete on object stores.
    Raises FileNotFoundError if the source is gone (moved already, perhaps)."""
    if isinstance(fs, LocalFileSystem):
        target = fs._strip_protocol(target)
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        os.replace(fs._strip_protocol(source), target)
    else:
        with_retries(fs.mv, source, target, what=f"move {source} to {target}")


def get_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """Whole object, with retries."""
    return with_retries(fs.cat_file, path, what=f"read {path}")


class OutputError(RuntimeError):
    """The output location cannot be used by this job."""


GUARD_WAIT_S = 10.0  # the longest a lock's takeover waits for another process's write to it (a write takes ms)


class GuardHeld(TimeoutError):
    """A local compare-and-replace found the path's guard held for longer than any write takes: its writer is
    stopped (SIGSTOP, a suspended VM) or hung in the middle of a write, which it will finish when it wakes, so the
    path cannot be taken from it safely now."""


class PreconditionFailed(Exception):
    """A conditional write found the object absent, present or changed, against its condition."""


def _is_precondition_failure(error: BaseException) -> bool:
    """s3fs turns S3's 412 into FileExistsError (If-None-Match) or OSError(EINVAL) (If-Match); gcsfs keeps 412."""
    if isinstance(error, FileExistsError):
        return True
    cause = error.__cause__ or error.__context__
    response = getattr(cause, "response", None) or getattr(error, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status == 412 or response.get("Error", {}).get("Code") == "PreconditionFailed"
    return getattr(error, "code", None) == 412


class ConditionalStore:
    """Create-if-absent and replace-if-unchanged on one object, with the store's own primitives.

    `version` is whatever the store compares: S3's ETag, GCS's generation, a digest of a local file's bytes.
    Transient errors are retried; a retry whose first try did land answers PreconditionFailed, so callers decide
    by reading the object back (the lock and the markers carry a token that says whose write it was).
    """

    def __init__(self, fs: fsspec.AbstractFileSystem):
        self.fs = fs

    def read(self, path: str) -> tuple[bytes, str]:
        raise NotImplementedError

    def create(self, path: str, data: bytes) -> str:
        raise NotImplementedError

    def replace(self, path: str, data: bytes, version: str, guard_wait_s: float | None = None) -> str:
        raise NotImplementedError

    def guarded(self, path: str, wait_s: float | None = None) -> ContextManager[None]:
        """Holds whatever this store serializes `path`'s replaces with, so that no replace of it lands meanwhile.
        Object stores have nothing to hold: each replace is one conditional request."""
        return nullcontext()

    def check_mutual_exclusion(self, path: str) -> None:
        """Raises OutputError if a lock this store takes around writes would not exclude another process."""

    def stale_version(self, version: str) -> str:
        """A version of the form the store compares that is not `version`: a replace with it must fail its
        precondition (a malformed one would be a bad request, which proves nothing)."""
        raise NotImplementedError

    def _call(self, fn: Callable[..., T], *args: Any, what: str, **kwargs: Any) -> T:
        def attempt():
            try:
                return fn(*args, **kwargs)
            except Exception as error:
                if _is_precondition_failure(error):
                    raise PreconditionFailed(what) from error
                raise

        return with_retries(attempt, what=what)


class S3ConditionalStore(ConditionalStore):
    """S3: `If-None-Match: *` to create, `If-Match: <etag>` to replace (moto 5 enforces both)."""

    def read(self, path: str) -> tuple[bytes, str]:
        # ETag first, then the bytes: if the object changes in between, the ETag is the older one and a
        # replace made with it fails its precondition, which is the safe way round.
        self.fs.invalidate_cache(path)
        etag = with_retries(self.fs.info, path, what=f"stat {path}")["ETag"]
        return get_bytes(self.fs, path), etag

    def create(self, path: str, data: bytes) -> str:
        out = self._call(self.fs.pipe_file, path, data, mode="create", what=f"create {path}")
        return out["ETag"]

    def replace(self, path: str, data: bytes, version: str, guard_wait_s: float | None = None) -> str:
        try:
            out = self._call(self.fs.pipe_file, path, data, IfMatch=version, what=f"replace {path}")
        except FileNotFoundError:  # S3 answers If-Match on a deleted key with 404 NoSuchKey, not 412
            raise PreconditionFailed(f"replace {path}") from None
        return out["ETag"]

    def stale_version(self, version: str) -> str:
        """A well-formed ETag (quoted MD5 hex) that is not the object's."""
        stale = '"' + "0" * 32 + '"'
        return stale if stale != version else '"' + "1" * 32 + '"'


class GCSConditionalStore(ConditionalStore):
    """GCS: generation preconditions (`ifGenerationMatch`, 0 meaning absent), through gcsfs's JSON API calls.

    No GCS emulator installs here: this class is tested against a fake of the two calls it makes.
    """

    def read(self, path: str) -> tuple[bytes, str]:
        self.fs.invalidate_cache(path)
        generation = with_retries(self.fs.info, path, what=f"stat {path}")["generation"]
        return get_bytes(self.fs, path), str(generation)

    def create(self, path: str, data: bytes) -> str:
        return self.replace(path, data, "0")

    def replace(self, path: str, data: bytes, version: str, guard_wait_s: float | None = None) -> str:
        bucket, key, _ = self.fs.split_path(path)
        url = f"{self.fs._location}/upload/storage/v1/b/{bucket}/o"
        out = self._call(self.fs.call, "POST", url, uploadType="media", name=key, ifGenerationMatch=version,
                         data=data, json_out=True, what=f"write {path} if generation {version}")
        self.fs.invalidate_cache(path)
        return str(out["generation"])

    def stale_version(self, version: str) -> str:
        """A generation (an integer) that is not the object's: 1, or 2 for an object at generation 1."""
        return "2" if version == "1" else "1"


class LocalConditionalStore(ConditionalStore):
    """A local or shared disk: an exclusive hard link to create, and a lock file around compare-and-replace."""

    def read(self, path: str) -> tuple[bytes, str]:
        with open(self.fs._strip_protocol(path), "rb") as f:
            data = f.read()
        return data, hashlib.sha256(data).hexdigest()

    def stale_version(self, version: str) -> str:
        """The digest of other bytes than the file's."""
        return hashlib.sha256(b"stale" + version.encode()).hexdigest()

    def check_mutual_exclusion(self, path: str) -> None:
        """flock locks belong to an open file: a second open of the same file must not get the lock while the
        first holds it. Filesystems that make flock a no-op (some network and FUSE mounts) grant both."""
        guard = f"{self.fs._strip_protocol(path)}.guard"
        try:
            with open(guard, "a") as first, open(guard, "a") as second:
                fcntl.flock(first, fcntl.LOCK_EX)
                try:
                    fcntl.flock(second, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return
                raise OutputError(f"{os.path.dirname(guard)}: file locks (flock) are not enforced on this "
                                  "filesystem, so two jobs could both hold the output; use another disk")
        finally:
            if os.path.exists(guard):
                os.remove(guard)

    def create(self, path: str, data: bytes) -> str:
        path = self.fs._strip_protocol(path)
        tmp = _synced_copy_beside(path, data)
        try:
            os.link(tmp, path)  # fails if the path exists; readers never see a partial file
        except FileExistsError:
            raise PreconditionFailed(f"create {path}") from None
        finally:
            os.remove(tmp)
        return hashlib.sha256(data).hexdigest()

    def replace(self, path: str, data: bytes, version: str, guard_wait_s: float | None = None) -> str:
        local = self.fs._strip_protocol(path)
        with self.guarded(path, guard_wait_s):  # every replace of this path, in any process, goes one at a time
            try:
                current = self.read(local)[1]
            except FileNotFoundError:
                current = None
            if current != version:
                raise PreconditionFailed(f"replace {path}")
            _put_local(local, data)
        return hashlib.sha256(data).hexdigest()

    @contextmanager
    def guarded(self, path: str, wait_s: float | None = None) -> Iterator[None]:
        """flock `path`'s guard file, held by every replace of `path` in any process (see _hold_guard)."""
        with open(f"{self.fs._strip_protocol(path)}.guard", "a") as guard:
            _hold_guard(guard, path, wait_s)
            yield


def _hold_guard(guard, path: str, wait_s: float | None) -> None:
    """flock the guard: without end (the writer finishes, and its write must land first), or `wait_s` at most,
    for a caller that would rather refuse than wait on a writer stopped or hung mid-write (GuardHeld)."""
    if wait_s is None:
        fcntl.flock(guard, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise GuardHeld(f"{path}: another process has been in the middle of writing it for over "
                                f"{wait_s:.0f}s (stopped or hung)") from None
            time.sleep(0.02)


def check_conditional_writes(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Refuses (OutputError) an output whose store ignores the preconditions that the lock and the markers rely
    on: several S3-compatible stores accept `If-None-Match` and `If-Match` and then write anyway, and some
    filesystems make `flock` a no-op. Then two jobs would both hold the lock and every try would win. One probe
    object, written three times, once per job."""
    store = conditional_store(fs)
    probe = f"{root.rstrip('/')}/_probe-{uuid.uuid4().hex}"
    where = _describe_store(fs, root)
    try:
        version = store.create(probe, b"first")
    except PreconditionFailed:  # the name is new: our own create landed and its answer was lost
        version = store.read(probe)[1]
    except OSError as exc:
        raise OutputError(f"{where}: cannot create a file there ({type(exc).__name__}: {exc})") from None
    try:
        stale = store.stale_version(version)
        for what, write in (("a create of an object that exists", lambda: store.create(probe, b"second")),
                            ("a replace with a stale version", lambda: store.replace(probe, b"third", stale))):
            try:
                write()
            except PreconditionFailed:
                continue
            raise OutputError(f"{where} does not honour conditional writes ({what} succeeded): two jobs could "
                              "both hold the output and every try would commit; use a store that does")
        store.check_mutual_exclusion(probe)
    finally:
        try:
            with_retries(fs.rm, probe, what=f"delete {probe}")
        except FileNotFoundError:
            pass


def _describe_store(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """The output with the endpoint it is written through, where one is set (credentials left out)."""
    endpoint = (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url") or getattr(fs, "endpoint_url", None)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    name = root if isinstance(fs, LocalFileSystem) else f"{protocol}://{root}"
    return redact_text(f"{name} (endpoint {endpoint})" if endpoint else name)


def conditional_store(fs: fsspec.AbstractFileSystem) -> ConditionalStore:
    """The conditional writes of this filesystem; outputs elsewhere cannot be locked or fenced."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"s3", "s3a"}:
        return S3ConditionalStore(fs)
    if protocols & {"gs", "gcs"}:
        return GCSConditionalStore(fs)
    if isinstance(fs, LocalFileSystem):
        return LocalConditionalStore(fs)
    raise OutputError(
        f"outputs on {sorted(protocols)} are not supported: the output lock and shard commits need conditional "
        "writes, which this engine implements for S3, GCS and local or shared disks"
    )
