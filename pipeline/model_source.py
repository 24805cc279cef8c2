"""Where a job's models come from, pinned by the driver before any worker starts.

A model is a local folder (pinned by a digest of its files), a Hugging Face hub repo (pinned to the commit the
driver resolved, so 64 workers load the same revision), or a folder at any fsspec URL (pinned by its files'
sizes and ETags, and copied once per node into a local cache). A weights file (a LoRA) is pinned the same way:
a local file or a URL by its sha256, `HUB_ID/FILE` by the repo's commit. The driver's check is also the one clear error
for a model that does not exist, before the output is touched. The driver also pins the sha256 of each file of a
local or URL model, and a worker loads only files with those digests: a node whose folder differs, or a copy
that arrived different, is a ModelLoadError naming the file, never a job made with other weights.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from instaflow.loading import (
    HUB_ID,
    REQUIRED_COMPONENTS,
    UNET_CONFIG,
    VAE_CONFIG,
    WEIGHT_COMPONENTS,
    XL_COMPONENTS,
    LatentGeometry,
    ModelLoadError,
    file_sha256,
    hub_hint,
    hub_patterns,
    pipeline_geometry,
    resolve_model_dir,
)
from pipeline.storage import UnsafePathError, filesystem, join_inside, put_atomic, redact_text, with_retries

log = logging.getLogger(__name__)

CACHE_ENV = "INSTAFLOW_MODEL_CACHE"  # where URL models are copied on each node, and local files' digests kept
DIGESTS_FILE = "local-file-digests.json"
_HASH_THREADS = 4
NAME_MAX = 255  # bytes in one name on Linux's file systems (ext4, XFS, btrfs) and macOS's
REVISION_LENGTH = 64  # a URL model's revision (its copy's folder name in the cache): a sha256 in hex
_digests: dict[str, str] = {}  # a file's path and stat (see _stat_key) -> its sha256; loaded from the cache folder


@dataclass(frozen=True)
class ModelSource:
    model: str  # as given, normalised (spec.normalize_model)
    kind: str  # "local", "hub" or "url"
    revision: str  # a digest of the files, or the hub commit
    variant: str | None = None  # "fp16": the repo's fp16 weights, downloaded instead of the full ones
    layout: str = "pipeline"  # "pipeline": a diffusers model folder; "xl": an SDXL (refiner) pipeline folder;
    # "module": one model (a tiny decoder, a scorer, a ControlNet); "file": one weights file (a LoRA)
    files: tuple[tuple[str, str], ...] = ()  # (relative path, sha256) of a local or URL model's files

    def identity(self) -> dict:
        """What the model is, for the job's identity: another spelling or location of the same files is equal."""
        name = redact_text(posixpath.basename(self.model.rstrip("/")) if self.kind == "local" else self.model)
        return {"kind": self.kind, "name": name, "revision": self.revision, "variant": self.variant}

    def local_dir(self, storage_options: dict | None = None) -> str:
        """A local folder holding the model, on the node that asks (a worker), with the files the driver pinned."""
        if self.layout == "file":
            raise ValueError(f"{self.model!r} is a file: use local_file()")
        if self.kind == "local":
            _check_pinned(self, _file_digests(Path(self.model)))
            return self.model
        if self.kind == "hub":
            return str(resolve_model_dir(self.model, self.revision, self.variant, self.layout))
        return str(_cached_copy(self, storage_options or {}))


    def local_file(self, storage_options: dict | None = None) -> str:
        """The weights file (layout "file") on the node that asks, with the contents the driver pinned."""
        if self.layout != "file":
            raise ValueError(f"{self.model!r} is a folder: use local_dir()")
        if self.kind == "local":
            path = Path(self.model).expanduser()
            _check_pinned(self, {path.name: local_file_digests([path])[0]} if path.is_file() else {})
            return str(path)
        if self.kind == "hub":
            repo, filename = _hub_file(self.model)
            return _hub_download(self.model, repo, filename, revision=self.revision)
        [(name, _)] = self.files
        return str(_inside_copy(self, _cached_copy(self, storage_options or {}), name))

    @contextlib.contextmanager
    def config_files(self, names: list[str], storage_options: dict | None = None):
        """A local folder holding the model's files `names` (configs, on a driver that needs only those)."""
        if self.kind == "local":
            yield Path(self.model).expanduser()
        elif self.kind == "hub":
            paths = [_hub_download(self.model, self.model, name, revision=self.revision) for name in names]
            yield Path(paths[0][: -len(names[0])]) if paths else None
        else:
            fs, root = filesystem(self.model, storage_options or {})
            with tempfile.TemporaryDirectory(prefix="configs-") as tmp:
                for name in names:
                    local = Path(tmp) / name
                    local.parent.mkdir(parents=True, exist_ok=True)
                    path = posixpath.join(root, name)
                    try:
                        with_retries(fs.get_file, path, str(local), what=f"read {path}")
                    except FileNotFoundError:
                        raise ModelLoadError(f"model {self.model!r}: it has no {name}") from None
                yield Path(tmp)

    def latent_geometry(self, flag: str, storage_options: dict | None = None) -> LatentGeometry:
        """The latents of this pipeline folder's VAE, read from its configs (on a driver, which loads no weights);
        a ModelLoadError naming `flag` and the model when they do not fit its UNet."""
        with self.config_files([VAE_CONFIG, UNET_CONFIG], storage_options) as folder:
            return pipeline_geometry(folder, f"{flag} {redact_text(self.model)!r}")


def model_folders(sources: dict[str, ModelSource]) -> dict[str, str]:
    """The job's models that are folders on a disk or in a store, by their key in the identity."""
    return {key: source.model for key, source in sources.items()
            if source.kind in ("local", "url") and source.layout != "file"}


def job_identity(spec, sources: dict[str, ModelSource]) -> dict:
    """The spec's identity with each model replaced by what it is, wherever it was read from, and the columns
    the job's stages add to its outputs (a stage's new column is another schema: shards of both never mix)."""
    from pipeline.stages import added_fields  # the stages pin their models here

    columns = {output: [[field.name, str(field.type)] for field in fields]
               for output, fields in added_fields(spec).items()}
    return (spec.identity() | {key: source.identity() for key, source in sources.items()}
            | ({"added_columns": columns} if columns else {}))


def resolve_model_source(model: str, dtype: str, storage_options: dict | None = None,
                         layout: str = "pipeline") -> ModelSource:
    """Pins `model`; raises ModelLoadError naming it if it cannot be found."""
    if layout == "file":
        return _file_source(model, storage_options or {})
    if "://" in model:
        return _url_source(model, storage_options or {}, layout)
    path = Path(model).expanduser()
    if path.is_dir():
        _check_layout(model, {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}, layout)
        files = _file_digests(path)
        return ModelSource(model, "local", _digest_of(files), layout=layout, files=tuple(files.items()))
    if path.exists() or not HUB_ID.match(model):
        raise ModelLoadError(f"model {model!r}: no such folder, and not a Hugging Face hub id (org/name)")
    return _hub_source(model, dtype, layout)


def _file_source(model: str, storage_options: dict) -> ModelSource:
    """One weights file: a local path, an fsspec URL, or HUB_ID/FILE in a hub repo."""
    if "://" in model:
        fs, path = filesystem(model, storage_options)
        files, digest, _ = _url_listing(fs, path, model, "file")
        return ModelSource(model, "url", digest, layout="file",
                           files=tuple(_url_file_digests(fs, posixpath.dirname(path), files).items()))
    path = Path(model).expanduser()
    if path.is_file():
        [content] = local_file_digests([path])
        return ModelSource(model, "local", content, layout="file", files=((path.name, content),))
    if path.exists():
        raise ModelLoadError(f"{model!r} is a folder, not a weights file")
    repo, filename = _hub_file(model)
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo)
        if filename not in {sibling.rfilename for sibling in info.siblings or []}:
            raise ModelLoadError(f"{model!r}: the hub repo {repo} has no file {filename}")
        return ModelSource(model, "hub", info.sha, layout="file")
    except ModelLoadError:
        raise
    except Exception:  # offline, or the hub unreachable: what the local cache holds
        cached = Path(_hub_download(model, repo, filename, local_files_only=True))
        return ModelSource(model, "hub", cached.parents[len(Path(filename).parts) - 1].name, layout="file")


def _hub_file(model: str) -> tuple[str, str]:
    """(repo, file) of `HUB_ID/FILE`; raises ModelLoadError for a name that is neither a local file nor that."""
    parts = model.split("/")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    if len(parts) < 3 or not HUB_ID.match(repo) or not all(parts[2:]):
        raise ModelLoadError(f"{model!r}: no such file, and not a file in a Hugging Face hub repo (org/name/FILE)")
    return repo, filename


def _hub_download(model: str, repo: str, filename: str, **options) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename, **options)
    except Exception as exc:  # the hub raises a dozen types; the user needs one message naming the file
        raise ModelLoadError(f"{model!r}: cannot load {filename} from the Hugging Face hub ({hub_hint()}): "
                             f"{exc}") from None


def _check_layout(model: str, files: set[str], layout: str) -> None:
    """A diffusers model folder has its component folders (an SDXL refiner, layout "xl", its own); a lone module
    has its config at the top."""
    if layout == "module":
        if "config.json" not in files:
            raise ModelLoadError(f"model {model!r}: not a diffusers model (no config.json)")
        return
    folders = {name.split("/")[0] for name in files if "/" in name}
    missing = [name for name in (XL_COMPONENTS if layout == "xl" else REQUIRED_COMPONENTS) if name not in folders]
    if missing:
        raise ModelLoadError(f"model {model!r}: not a diffusers model folder (missing {', '.join(missing)})")


def _file_digests(folder: Path) -> dict[str, str]:
    """The sha256 of each file of the folder, by relative path, in the order the model's digest takes them
    (local_file_digests: a re-run, or the check of each worker on a node, reads none of them again)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(file.relative_to(folder)): content for file, content in zip(files, local_file_digests(files))}


def _digest_of(files: dict[str, str]) -> str:
    """The model's digest: sha256 over its files' names and digests."""
    digest = hashlib.sha256()
    for rel, content in files.items():
        digest.update(f"{rel}:{content}\n".encode())
    return digest.hexdigest()


def _check_pinned(source: ModelSource, found: dict[str, str]) -> None:
    """Raises ModelLoadError naming the first file of this node's model that is not what the driver pinned."""
    pinned = dict(source.files)
    for rel in sorted(pinned.keys() | found.keys()):
        if found.get(rel) != pinned.get(rel):
            how = ("is missing" if rel not in found else "is not in the driver's copy" if rel not in pinned
                   else f"has other contents (sha256 {found[rel][:12]}, pinned {pinned[rel][:12]})")
            raise ModelLoadError(f"model {source.model!r}: {rel} {how} on this node: the driver pinned the model "
                                 "by its files' digests, and every node must have the same files")


def local_file_digests(files: list[Path]) -> list[str]:
    """sha256 of each local file (a model's, or prompts), remembered in this process and in the cache folder under
    its path, inode, size, mtime and ctime: any write changes the ctime, so a changed file is read again, while a
    re-run on a large local model (4 GB for SD-1.5) or 1,000 prompt files reads none of them again. Files not
    known yet are read on a few threads (hashlib releases the GIL)."""
    if not _digests:
        _digests.update(_load_digests())
    keys = [_stat_key(file) for file in files]
    found = {key: _digests[key] for key in keys if key in _digests}
    unknown = [(file, key) for file, key in zip(files, keys) if key not in found]
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        for (file, key), content in zip(unknown, pool.map(lambda item: file_sha256(item[0]), unknown)):
            found[key] = content
            if _stat_key(file) == key:  # not written while it was read
                _digests[key] = content
    if unknown:
        _save_digests()
    return [found[key] for key in keys]


def _stat_key(file: Path) -> str:
    stat = file.stat()
    return f"{file.resolve()}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"


def _load_digests() -> dict[str, str]:
    try:
        known = json.loads((model_cache_dir() / DIGESTS_FILE).read_text())
    except (OSError, ValueError):  # none yet, unreadable or damaged: digests are computed again
        return {}
    return known if isinstance(known, dict) else {}


def _save_digests() -> None:
    """Atomically, keeping only local files that still exist (and URLs' files, by their version tags); a cache
    that cannot be written costs only time."""
    kept = {key: value for key, value in _digests.items()
            if "://" in key.split("|", 1)[0] or os.path.exists(key.split("|", 1)[0])}
    path = model_cache_dir() / DIGESTS_FILE
    try:
        put_atomic(LocalFileSystem(), str(path), json.dumps(kept).encode())
    except OSError as exc:
        log.info("could not keep local file digests in %s: %s", path, exc)


def model_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "instaflow-batch" / "models")


def _hub_source(model: str, dtype: str, layout: str) -> ModelSource:
    """The hub's current commit and file list; offline, what the local cache holds."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        info = HfApi().model_info(model)
        files = {sibling.rfilename for sibling in info.siblings or []}
        revision = info.sha
    except Exception:  # offline, or the hub unreachable: fall back on the cache
        try:
            patterns = hub_patterns(None, layout)[0] + hub_patterns("fp16", layout)[0]
            cached = Path(snapshot_download(model, local_files_only=True, allow_patterns=patterns))
        except Exception as exc:
            raise ModelLoadError(f"model {model!r}: cannot load from the Hugging Face hub ({hub_hint()}): "
                                 f"{exc}") from None
        files = {str(p.relative_to(cached)) for p in cached.rglob("*") if p.is_file()}
        revision = cached.name
    _check_layout(model, files, layout)
    folders = {"pipeline": WEIGHT_COMPONENTS, "xl": ("unet", "vae", "text_encoder_2")}.get(layout, ("",))
    has_fp16 = all(any(f.startswith(f"{c}/" if c else "") and f.endswith(".fp16.safetensors") for f in files)
                   for c in folders)
    return ModelSource(model, "hub", revision, "fp16" if dtype == "float16" and has_fp16 else None, layout)


def _url_source(model: str, storage_options: dict, layout: str) -> ModelSource:
    fs, root = filesystem(model, storage_options)
    files, digest, _ = _url_listing(fs, root, model, layout)
    _check_layout(model, set(files), layout)
    return ModelSource(model, "url", digest, layout=layout, files=tuple(_url_file_digests(fs, root, files).items()))


def _url_listing(fs, root: str, model: str, layout: str) -> tuple[dict[str, dict], str, str]:
    """The model's files by path relative to the folder that holds them (the model's root; a file's own folder),
    a digest of their names, sizes and ETags (or mtimes), and that folder."""
    if layout == "file":
        try:
            info = with_retries(fs.info, root, what=f"read {model}")
        except FileNotFoundError:
            raise ModelLoadError(f"{model!r}: no such file") from None
        if info.get("type") != "file":
            raise ModelLoadError(f"{model!r} is a folder, not a weights file")
        found, base = {root: info}, posixpath.dirname(root)
    else:
        try:
            found = with_retries(fs.find, root, detail=True, what=f"list {model}")
        except FileNotFoundError:
            found = {}
        if not found:
            raise ModelLoadError(f"model {model!r}: no files there")
        base = root
    files = {_listed_name(model, base, path): info for path, info in sorted(found.items())}
    _check_no_file_is_a_folder(model, base, files)
    digest = hashlib.sha256()
    for rel, info in files.items():
        digest.update(f"{rel}:{info.get('size')}:{_version_tag(info)}\n".encode())
    return files, digest.hexdigest(), base


def _listed_name(model: str, base: str, path: str) -> str:
    """A listed file's path relative to the model's folder, as the store spells it (never normalised: `a/../b`
    is not `b`); a key that is not a plain relative path inside the folder is refused, since it would be copied
    to that path under each node's cache."""
    prefix = base.rstrip("/") + "/"
    relative = path[len(prefix):]
    try:
        if not path.startswith(prefix):
            raise UnsafePathError(path)
        join_inside(base, relative, f"model {model!r}")
    except UnsafePathError:
        raise ModelLoadError(f"model {model!r}: its store lists {path!r}, which is not a file inside the model's "
                             "folder (a '..', absolute or empty part): refused, it would be written outside the "
                             "model cache") from None
    path_max = _local_path_max()
    if (any(len(os.fsencode(part)) > NAME_MAX for part in relative.split("/"))
            or len(os.fsencode(_temporary_copy(model_cache_dir(), REVISION_LENGTH * "0") / relative)) >= path_max):
        raise ModelLoadError(f"model {model!r}: its store lists {path!r}, a name longer than a local disk takes "
                             f"({NAME_MAX} bytes a part, {path_max} a path in the model cache): refused, no node "
                             "could copy it")
    return relative


def _check_no_file_is_a_folder(model: str, base: str, files: dict) -> None:
    """A key that is a file and also the folder of other keys (`unet` beside `unet/config.json`) cannot be copied to
    a disk, where a name is one or the other: refused on the driver rather than on every worker."""
    folders = {"/".join(parts[:end]) for parts in (name.split("/") for name in files) for end in range(1, len(parts))}
    both = sorted(set(files) & folders)
    if both:
        raise ModelLoadError(f"model {model!r}: its store lists {posixpath.join(base, both[0])!r} as a file and as "
                             "the folder of other keys: refused, a copy on disk cannot hold both")


def _local_path_max() -> int:
    """The longest path this node's file system takes, in bytes with its final NUL (Linux's PATH_MAX)."""
    try:
        return os.pathconf("/", "PC_PATH_MAX")
    except (OSError, ValueError):
        return 4096


def _version_tag(info: dict) -> str:
    return str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime") or "")


def _url_file_digests(fs, root: str, files: dict[str, dict]) -> dict[str, str]:
    """The sha256 of each file of a URL model, read by the driver once per version of the file: remembered in
    the cache folder under its URL, size and version tag (ETag, MD5 hash or mtime), like local files."""
    if not _digests:
        _digests.update(_load_digests())
    known = len(_digests)
    found = {}
    for rel, info in files.items():
        path = posixpath.join(root, rel)
        tag = _version_tag(info)
        key = f"{fs.unstrip_protocol(path)}|{info.get('size')}|{tag}" if tag else None  # no tag: read each time
        content = _digests.get(key) if key else None
        if content is None:
            content = with_retries(_stream_sha256, fs, path, what=f"read {path}")
            if key:
                _digests[key] = content
        found[rel] = content
    if len(_digests) > known:
        _save_digests()
    return found


def _stream_sha256(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached_copy(source: ModelSource, storage_options: dict) -> Path:
    """The URL model in this node's cache, copied by the first worker that needs it while the others wait.
    Each file of a copy is checked once, against the sha256 the driver pinned; its `.complete` marker keeps
    those digests, and a copy whose marker has other ones (or none: an older copy) is made again."""
    cache = model_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / source.revision
    pinned = dict(source.files)
    with open(cache / f"{source.revision}.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if _copy_digests(target) == pinned:
            return target
        fs, root = filesystem(source.model, storage_options)
        files, digest, root = _url_listing(fs, root, source.model, source.layout)
        if digest != source.revision:
            raise ModelLoadError(f"model {source.model!r}: its files changed since the job started")
        tmp = _temporary_copy(cache, source.revision)
        try:
            for rel, info in files.items():
                local = _inside_copy(source, tmp, rel)
                local.parent.mkdir(parents=True, exist_ok=True)
                path = posixpath.join(root, rel)
                with_retries(fs.get_file, path, str(local), what=f"copy {path}")
                if local.stat().st_size != info.get("size"):
                    raise ModelLoadError(f"model {source.model!r}: {path} changed while it was copied")
                _check_pinned(source, {**pinned, rel: file_sha256(local)})
            (tmp / ".complete").write_text(json.dumps({"model": redact_text(source.model),
                                                       "revision": source.revision, "files": pinned}))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("copied model %s to %s", source.model, target)
        return target


def _temporary_copy(cache: Path, revision: str) -> Path:
    """The folder a copy is made in before it takes its revision's name (the longest path a copied file has)."""
    return cache / f"{revision}.tmp-{uuid.uuid4().hex}"


def _inside_copy(source: ModelSource, copy: Path, rel: str) -> Path:
    """Where a listed file goes in the copy: inside it, symbolic links resolved, or a ModelLoadError."""
    try:
        return join_inside(copy, rel, f"model {source.model!r}")
    except UnsafePathError as exc:
        raise ModelLoadError(f"{exc}: not copied") from None


def _copy_digests(copy: Path) -> dict | None:
    """The file digests a complete copy was checked against; None for no copy or one made before they were."""
    try:
        return json.loads((copy / ".complete").read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
