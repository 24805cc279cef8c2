"""Storage access shared by the driver and the workers: any fsspec URL, retried I/O, atomic puts."""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

T = TypeVar("T")

# Environment variables that configure storage clients (fsspec, boto, gcsfs, huggingface_hub).
# Ray workers do not inherit the driver's environment, so the driver forwards these.
_ENV_PREFIXES = ("FSSPEC_", "AWS_", "GOOGLE_", "GCS", "HF_")
_ENV_NAMES = ("S3_ENDPOINT_URL",)

_SECRET_WORDS = ("key", "secret", "token", "password", "credentials")

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
    """Filesystem and path for a URL; options not given here come from the environment."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def storage_env() -> dict[str, str]:
    """Storage-related environment variables of this process, to forward to Ray workers."""
    return {
        name: value
        for name, value in sorted(os.environ.items())
        if name.startswith(_ENV_PREFIXES) or name in _ENV_NAMES
    }


def _is_secret_name(name: Any) -> bool:
    return any(word in str(name).lower() for word in _SECRET_WORDS)


def redact(options: Any) -> Any:
    """Copy of storage options with secret-looking values replaced, safe to write to disk."""
    if isinstance(options, dict):
        return {k: "***" if _is_secret_name(k) else redact(v) for k, v in options.items()}
    if isinstance(options, (list, tuple)):
        return [redact(v) for v in options]
    return options


def secret_fields(values: Any, where: str = "") -> list[str]:
    """Dotted names of the secrets in `values`: set entries with secret-looking names (what redact hides) and
    URLs that carry a password (scheme://user:password@host)."""
    if isinstance(values, dict):
        found = []
        for k, v in values.items():
            name = f"{where}.{k}" if where else str(k)
            found += [name] if _is_secret_name(k) and v not in (None, "") else secret_fields(v, name)
        return found
    if isinstance(values, (list, tuple)):
        return [name for i, v in enumerate(values) for name in secret_fields(v, f"{where}[{i}]")]
    if isinstance(values, str) and "://" in values:
        try:
            has_password = urlsplit(values).password is not None
        except ValueError:  # not a URL after all (a bad port, say): nothing to hide in it
            has_password = False
        return [where] if has_password else []
    return []


def is_transient(error: BaseException) -> bool:
    """True for errors that may succeed on retry: network trouble, throttling, server errors."""
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    if isinstance(error, OSError):
        return not isinstance(error, _PERMANENT_OS_ERRORS)
    try:
        from botocore.exceptions import ClientError
    except ImportError:
        return False
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return code in _TRANSIENT_S3_CODES or int(status) >= 500
    return False


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
            time.sleep(delay)
            attempt += 1


def put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write an object so that readers see it complete or not at all."""
    if isinstance(fs, LocalFileSystem):
        with_retries(_put_local, fs._strip_protocol(path), data, what=f"write {path}")
    else:
        # One PUT (or a completed multipart upload): object stores never expose a partial object.
        # fs.open(path, "wb") is not safe here: leaving its block by an exception still commits.
        with_retries(fs.pipe_file, path, data, what=f"write {path}")


def _put_local(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def get_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """Whole object, with retries."""
    return with_retries(fs.cat_file, path, what=f"read {path}")
