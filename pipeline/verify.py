"""Checks a finished output without trusting the writer: re-plans the input from its footers, then opens every
committed shard and compares it with its marker and with the plan.

Problems (each makes the output unfit to train on): a planned unit with no committed shard; a marker whose data
is missing, a different size or digest, or not readable; a shard whose rows do not match its unit; a key that
appears twice in ok rows; a commit whose move into place was interrupted; data files anywhere below the output
that a globbing reader would pick up (outside `_` and `.` folders) and no committed marker claims; input files that
changed since the job. Failed rows are listed, not problems: they are recorded outcomes, and their keys may repeat
(a duplicate id fails by design).
"""

from __future__ import annotations

import collections
import hashlib
import io
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from pipeline.commit import _MARKER, Fence, ShardStore
from pipeline.manifest import MANIFEST_NAME, changed_inputs, read_manifest
from pipeline.plan import (InputError, ignored_by_readers, input_fingerprint, list_input_files, plan_units,
                           shard_name)
from pipeline.display import safe_line
from pipeline.storage import OutputError, filesystem, get_bytes, normalize_location, redact_text, with_retries

MAX_LISTED = 20
_THREADS = 8
_DATA_EXTENSIONS = (".parquet", ".tar", ".tgz", ".tar.gz")  # what readers of datasets glob for


@dataclass
class VerifyReport:
    output: str
    planned_units: int = 0
    committed_units: int = 0
    rows: dict[str, int] = field(default_factory=dict)  # task -> rows read from the shards
    failed_rows: list[str] = field(default_factory=list)  # "task key: error"
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        lines = [f"output           {self.output}",
                 f"shards           {self.committed_units} committed of {self.planned_units} planned"]
        lines += [f"rows ({task})".ljust(17) + f"{count}" for task, count in sorted(self.rows.items())]
        lines.append(f"failed rows      {len(self.failed_rows)}")
        lines += [f"  {row}" for row in self.failed_rows[:MAX_LISTED]]
        if len(self.failed_rows) > MAX_LISTED:
            lines.append(f"  ... and {len(self.failed_rows) - MAX_LISTED} more")
        lines.append(f"problems         {len(self.problems)}")
        lines += [f"  PROBLEM {problem}" for problem in self.problems]
        lines.append("verdict          " + ("OK" if self.ok else "NOT OK"))
        return "\n".join(safe_line(line) for line in lines)  # keys, messages and paths are data


def verify_output(output: str, storage_options: dict | None = None, prompts: str | None = None) -> VerifyReport:
    """Raises OutputError if `output` is not an output of this tool, or `prompts` is not its input; else returns
    what it found. `prompts`: the input's URL where _job.json holds it redacted (a password or a signature in
    it), so that the input can be read again."""
    fs, root = filesystem(output, storage_options)
    manifest = read_manifest(fs, root)
    if manifest is None:
        raise OutputError(f"{output} has no {MANIFEST_NAME}: not an output of this tool")
    if not isinstance(manifest, dict):
        raise OutputError(f"{output}/{MANIFEST_NAME} is not a JSON object: not an output of this tool")
    if prompts is not None:
        prompts = normalize_location(prompts)
        if redact_text(prompts) != manifest.get("prompts"):
            raise OutputError(f"--prompts {redact_text(prompts)!r} is not this output's input: its {MANIFEST_NAME} "
                              f"says {manifest.get('prompts')!r}")
        manifest = manifest | {"prompts": prompts}
    report = VerifyReport(output=output)
    store = ShardStore(fs, root)
    # Every marker that counts, its files in place or not: readers see only the first kind; verify names the rest.
    scan = store.scan(Fence.from_manifest(manifest))
    shards = scan.in_place | scan.pending | scan.broken
    report.committed_units = len(shards)
    planned = _plan(manifest, storage_options, report)
    if planned is not None:
        report.planned_units = len(planned)
        missing = sorted(set(planned) - set(shards))
        if missing:
            report.problems.append(f"{len(missing)} planned shards not committed: {_names(missing)}")
        unowned = _unowned_markers(fs, root, planned)
        if unowned:
            report.problems.append(f"{len(unowned)} markers that no planned shard owns (copied or planted): "
                                   f"{', '.join(unowned[:MAX_LISTED])}")
    report.problems += [f"marker {unit_id:05d}.stats.json is damaged and does not count: {why}"
                        for unit_id, why in sorted(scan.damaged.items())]
    _check_staging(store, shards, report)
    _check_orphans(fs, root, shards, report)
    per_row = _samples_per_prompt(manifest, report)
    with ThreadPoolExecutor(_THREADS) as pool:
        checked = list(pool.map(lambda item: _check_shard(fs, root, *item, planned, per_row), sorted(shards.items())))
    keys: dict[str, dict[str, list[str]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for shard_problems, shard_keys, failed in checked:
        report.problems += shard_problems
        report.failed_rows += failed
        for task, (shard, num_rows, ok_keys) in shard_keys.items():
            report.rows[task] = report.rows.get(task, 0) + num_rows
            for key in ok_keys:
                keys[task][key].append(shard)
    for task, where in keys.items():
        duplicates = {key: shards_of for key, shards_of in where.items() if len(shards_of) > 1}
        if duplicates:
            shown = ", ".join(f"{key!r} in {'+'.join(s)}" for key, s in sorted(duplicates.items())[:MAX_LISTED])
            report.problems.append(f"{len(duplicates)} keys appear more than once in {task}: {shown}")
    return report


def _samples_per_prompt(manifest: dict, report: VerifyReport) -> int:
    """Output rows per input row, as _job.json records it; one that is not a positive integer (a damaged or
    planted file) is a problem, and each shard is then checked for one row per input row."""
    spec = manifest.get("spec")
    per_row = spec.get("samples_per_prompt", 1) if isinstance(spec, dict) else 1
    if type(per_row) is int and per_row >= 1:
        return per_row
    report.problems.append(f"{MANIFEST_NAME}: spec.samples_per_prompt is not a positive integer: {per_row!r:.40}")
    return 1


def _plan(manifest: dict, storage_options: dict | None, report: VerifyReport) -> dict | None:
    """The units the job planned, from the input's footers now; None (a problem) if the input cannot be read."""
    prompts, spec = manifest.get("prompts"), manifest.get("spec", {})
    if not prompts or "rows_per_shard" not in spec:
        report.problems.append(f"{MANIFEST_NAME} does not say where the prompts are; cannot re-plan the job")
        return None
    try:
        fs, path = filesystem(prompts, storage_options)
        files = list_input_files(fs, path, spec.get("prompt_column", "prompt"))
    except (InputError, OSError, ValueError) as exc:  # aiohttp's InvalidURL is a ValueError
        hint = " (its URL was stored redacted: pass it as --prompts)" if "***" in prompts else ""
        report.problems.append(f"cannot read the input {prompts} to re-plan the job{hint}: {exc}")
        return None
    changed = changed_inputs(manifest.get("inputs", []), input_fingerprint(files))
    if changed:
        report.problems.append(f"input files changed since the job: {', '.join(changed[:MAX_LISTED])}")
    return {unit.unit_id: unit for unit in plan_units(files, spec["rows_per_shard"])}


def _unowned_markers(fs, root: str, planned: dict) -> list[str]:
    """Marker files at the root that are not a planned unit's own (`00007.stats.json` beyond the plan, or
    `000000.stats.json` beside `00000.stats.json`, which no reader opens): a marker copied there is one."""
    owned = {f"{shard_name(unit_id)}.stats.json" for unit_id in planned}
    fs.invalidate_cache(root)
    names = (posixpath.basename(path) for path in with_retries(fs.ls, root, detail=False, what=f"list {root}"))
    return sorted(name for name in names if _MARKER.fullmatch(name) and name not in owned)


def _check_staging(store: ShardStore, shards: dict[int, dict], report: VerifyReport) -> None:
    staged = store.staged_tries()
    unfinished = sorted(unit_id for unit_id, marker in shards.items() if marker.get("staging") in staged)
    if unfinished:
        report.problems.append(f"{len(unfinished)} commits were not moved into place (a crash); re-running the "
                               f"job finishes them: {_names(unfinished)}")


def _check_orphans(fs, root: str, shards: dict[int, dict], report: VerifyReport) -> None:
    claimed = {name for marker in shards.values() for name in marker.get("files", {})}
    orphans = [name for name in _readable_files(fs, root) if name not in claimed]
    if orphans:
        report.problems.append(f"{len(orphans)} data files that no committed shard claims (a reader that globs "
                               f"the output would read them): {', '.join(orphans[:MAX_LISTED])}")


def _readable_files(fs, root: str) -> list[str]:
    """Data files anywhere below the root, relative to it, that readers globbing the output pick up (`out/*.parquet`,
    `out/**/*.tar`, a folder given to Ray Data): whatever their names, outside `_` and `.` folders."""
    root = root.rstrip("/")
    fs.invalidate_cache()
    found = (path[len(root) + 1:] for path in with_retries(fs.find, root, what=f"list {root}"))
    return sorted(name for name in found if name.endswith(_DATA_EXTENSIONS) and not ignored_by_readers(name))


def _check_shard(
    fs, root: str, unit_id: int, marker: dict, planned: dict | None, per_row: int = 1
) -> tuple[list, dict, list]:
    """(problems, {task: (shard, rows, keys of ok rows)}, failed rows) of one committed shard."""
    shard = f"{unit_id:05d}"
    problems, keys, failed = [], {}, []
    unit = marker.get("unit", {})
    plan = (planned or {}).get(unit_id)  # an unplanned unit's marker: _unowned_markers
    if plan is not None and (unit.get("path"), unit.get("first_row"), unit.get("num_rows")) != (
            redact_text(plan.path), plan.first_row, plan.num_rows):
        problems.append(f"shard {shard} covers {unit.get('path')} rows {unit.get('first_row')}+"
                        f"{unit.get('num_rows')}, but the plan says {redact_text(plan.path)} rows "
                        f"{plan.first_row}+{plan.num_rows}")  # markers hold the path redacted
    contents = {}
    for name, expected in sorted(marker.get("files", {}).items()):
        try:
            data = get_bytes(fs, posixpath.join(root, name))
        except FileNotFoundError:
            problems.append(f"shard {shard}: {name} is missing")
            continue
        if len(data) != expected.get("bytes") or hashlib.sha256(data).hexdigest() != expected.get("sha256"):
            problems.append(f"shard {shard}: {name} is {len(data)} bytes and not what its marker recorded "
                            f"({expected.get('bytes')} bytes)")
            continue
        contents[name] = data
    for name, data in contents.items():
        if not name.endswith(".parquet"):
            continue
        try:
            table = pq.read_table(io.BytesIO(data), columns=["key", "status", "error_message"])
        except Exception as exc:
            problems.append(f"shard {shard}: {name} does not open as Parquet ({exc})")
            continue
        task = _task_of(name, table, contents)
        rows = table.to_pylist()
        if len(rows) != unit.get("num_rows", 0) * per_row:
            problems.append(f"shard {shard}: {name} has {len(rows)} rows, its unit {unit.get('num_rows')}"
                            + (f" x {per_row} samples per prompt" if per_row > 1 else ""))
        keys[task] = (shard, len(rows), [row["key"] for row in rows if row["status"] == "ok"])
        failed += [f"{task} {row['key']}: {row['error_message']}" for row in rows if row["status"] != "ok"]
        tar_name = name[: -len(".parquet")] + ".tar"
        if tar_name in contents:
            problems += _check_tar(shard, tar_name, contents[tar_name], rows)
    return problems, keys, failed


def _task_of(name: str, table, contents: dict) -> str:
    """Pairs shards sit under pairs/ when images were written too; a pairs-only job's are at the root."""
    if name.startswith("pairs/"):
        return "pairs"
    if name.startswith("images/") or name[: -len(".parquet")] + ".tar" in contents:
        return "images"
    return "pairs" if "noise" in pq.read_schema(io.BytesIO(contents[name])).names else "images"


def _check_tar(shard: str, name: str, data: bytes, rows: list[dict]) -> list[str]:
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = {member.name for member in tar.getmembers()}
    except (tarfile.TarError, EOFError) as exc:
        return [f"shard {shard}: {name} does not open as a tar ({exc})"]
    samples = collections.defaultdict(set)  # key -> its members' suffixes, split as webdataset splits them
    for member in members:
        key, _, suffix = member.partition(".")
        samples[key].add(suffix)
    ok = {row["key"] for row in rows if row["status"] == "ok"}
    problems = []
    if set(samples) != ok:
        problems.append(f"shard {shard}: {name} holds samples {len(samples)} but its metadata has {len(ok)} ok rows")
    layouts = collections.Counter(frozenset(suffixes) for suffixes in samples.values())
    usual = layouts.most_common(1)[0][0] if layouts else frozenset()
    incomplete = sorted(key for key, suffixes in samples.items()
                        if not {"txt", "json"} < suffixes or suffixes != usual)  # an image, text and metadata
    if incomplete:
        problems.append(f"shard {shard}: {name} has samples without image, text and metadata (or with other "
                        f"members than the rest): {incomplete[:5]}")
    return problems


def _names(unit_ids: list[int]) -> str:
    shown = ", ".join(f"{unit_id:05d}" for unit_id in unit_ids[:MAX_LISTED])
    return shown + (f", and {len(unit_ids) - MAX_LISTED} more" if len(unit_ids) > MAX_LISTED else "")
