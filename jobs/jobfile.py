"""A job from the command line and a YAML job file, checked against the job's own argparse parser.

A job file's keys are the job's flag names (`batch-size` or `batch_size`), plus an optional `job:`. The allowed
keys and their types are read from the parser, so a flag added to a job works in job files without edits here;
the job spec then rejects what no type can (a height of 0, images without a model). Flags override the file.
Job files are read as YAML 1.2 reads them (`yes`, `no`, `on` and `off` are strings, so no flag takes them for a
boolean), and a key given twice or an alias (`*name`, which can expand a small file to gigabytes) is refused.
A job always ends as the argv of its module (`python -m jobs.generate ...`), so that `run` and `submit` behave
exactly as the module entry points do.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import yaml

from jobs import encode, generate, reflow_pairs
from jobs.cli import Repeatable
from jobs.errors import shown
from jobs.main import Parser

JOBS: dict[str, ModuleType] = {"generate": generate, "reflow-pairs": reflow_pairs, "encode": encode}
DEFAULT_JOB = "generate"
_KINDS = {int: "an integer", float: "a number", None: "a string"}
MAX_JOB_FILE_BYTES = 1 << 20  # a job file is a few dozen settings


class JobFileError(ValueError):
    """A job file that cannot be used; the message names the file and the key."""


class JobFileLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans (only true and false), no aliases or merge keys, and no key
    twice."""

    def __init__(self, stream):
        super().__init__(stream)
        self.key_path = ""  # where the node being composed sits: `storage_options.client_kwargs`, `l1[0]`

    def compose_node(self, parent, index):
        outer = self.key_path
        if isinstance(index, yaml.ScalarNode):  # a mapping's value, under its key
            self.key_path = f"{outer}.{index.value}" if outer else index.value
        elif isinstance(index, int):  # a sequence's item
            self.key_path = f"{outer}[{index}]"
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            where = (f"key {shown(self.key_path)}" if index is not None
                     else f"a key of {shown(outer)}" if outer else "a key")
            raise yaml.MarkedYAMLError(None, None, f"{where}: a YAML alias (*{event.anchor}) is not allowed in a job "
                                       "file: write the value out", event.start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self.key_path = outer

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:  # another mapping's keys copied in: as an alias, it can hide a value
                raise yaml.MarkedYAMLError(None, None, "a YAML merge key (<<) is not allowed in a job file: write "
                                           "the keys out", key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):
                continue  # unhashable: PyYAML's own error says so
            if key in seen:
                raise yaml.MarkedYAMLError(None, None, f"{shown(key)} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_BOOLEAN_TAG = "tag:yaml.org,2002:bool"
_MERGE_TAG = "tag:yaml.org,2002:merge"
JobFileLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _BOOLEAN_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
JobFileLoader.add_implicit_resolver(_BOOLEAN_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


@dataclass
class Job:
    name: str  # a key of JOBS
    args: argparse.Namespace  # the job's flags, file and command line merged, plus the command's own options

    @property
    def module(self) -> ModuleType:
        return JOBS[self.name]

    def spec_args(self) -> dict:
        return self.module.spec_args(self.args)

    def argv(self) -> list[str]:
        """The job's flags as its module's command line: only what differs from the flags' defaults."""
        argv = []
        for action in job_flags(self.module.parser()).values():
            value = getattr(self.args, action.dest)
            if value == action.default and not action.required:
                continue
            flag = action.option_strings[0]
            if isinstance(action, Repeatable):
                for item in value:
                    argv += [flag, _as_text(item)]
            elif isinstance(action, argparse.BooleanOptionalAction):
                argv.append(flag if value else f"--no-{flag[2:]}")
            elif action.nargs == 0:
                argv.append(flag)
            else:
                argv += [flag, _as_text(value)]
        return argv


def job_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's flags by job-file key (the flag's name with underscores): what a job file may set."""
    flags = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        supported = action.nargs is None or (action.nargs == 0 and _is_boolean(action))
        if not action.option_strings or not supported:
            raise TypeError(f"job flag {action.dest!r}: only single-value flags and switches work in job files")
        flags[action.option_strings[0].lstrip("-").replace("-", "_")] = action
    return flags


def run_command(argv: list[str], prog: str) -> int:
    """`instaflow-batch run`: the job's own module entry point, in this process, with the merged flags."""
    job = parse_job(prog, argv, add_options=lambda parser: None)
    return job.module.main(job.argv())


def parse_job(prog: str, argv: list[str], add_options: Callable[[argparse.ArgumentParser], None]) -> Job:
    """`[JOB] [--config FILE] [job flags]` for the command `prog`; `add_options` adds the command's own options.

    Raises JobFileError for a bad job file; bad flags exit with status 2, as argparse does.
    """
    name, rest = _split_job_name(argv, add_options)
    config = _config_path(prog, rest)
    values = read_job_file(config) if config else {}
    file_job = values.pop("job", None)
    if file_job is not None:
        file_job = str(file_job).replace("_", "-")
        if file_job not in JOBS:
            raise JobFileError(f"{config}: job: {shown(file_job)} is not one of {', '.join(JOBS)}")
        if name and name != file_job:
            raise JobFileError(f"{config} is a {file_job} job, but the command line names {name}")
    name = name or file_job or DEFAULT_JOB
    parser = JOBS[name].parser(prog=f"{prog} {name}")
    parser.description = (
        f"{parser.description} Runs as `python -m {JOBS[name].__name__}` with the same flags. "
        f"The job ({' or '.join(JOBS)}, default {DEFAULT_JOB}) comes first, or from the job file's `job:` key."
    )
    for action, value in _checked_values(config, values, job_flags(parser)):
        action.default = value
        action.required = False
    parser.add_argument("--config", metavar="FILE", help="YAML job file: keys are the flag names; flags override it")
    add_options(parser)
    return Job(name, parser.parse_args(rest))


def read_job_file(path: str) -> dict:
    values = _parse_yaml(path, _read_text(path))
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise JobFileError(f"job file {path}: must be a mapping of flag names to values, got {type(values).__name__}")
    normalised = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in normalised:
            raise JobFileError(f"job file {path}: {shown(key)} is given twice (with - and with _)")
        normalised[name] = value
    return normalised


def _read_text(path: str) -> str:
    """The file as UTF-8 text (a UTF-8 byte-order mark allowed); any other encoding is refused by name."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JOB_FILE_BYTES + 1)
    except OSError as exc:
        raise JobFileError(f"job file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_JOB_FILE_BYTES:
        raise JobFileError(f"job file {path}: larger than {MAX_JOB_FILE_BYTES // 1024} KiB, which no job file is")
    for bom, encoding in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                          (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")):
        if data.startswith(bom):
            raise JobFileError(f"job file {path}: is {encoding} text; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise JobFileError(f"job file {path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                           "save it as UTF-8") from None


def _parse_yaml(path: str, text: str) -> Any:
    try:
        return yaml.load(text, Loader=JobFileLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise JobFileError(f"job file {path}: {where}{exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise JobFileError(f"job file {path}: not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise JobFileError(f"job file {path}: nested too deeply") from None


def _split_job_name(argv: list[str], add_options: Callable[[argparse.ArgumentParser], None]) -> \
        tuple[str | None, list[str]]:
    """The job name, if any, and the rest. It is the first word that is not an option: the command's own options
    (`submit --address URL --wait`) may come before it or after it, as may the job's flags."""
    command = Parser(add_help=False)
    add_options(command)
    takes_value = {flag: action.nargs != 0 for action in command._actions for flag in action.option_strings}
    position = 0
    while position < len(argv) and argv[position].startswith("-"):
        flag, equals, _ = argv[position].partition("=")
        if flag not in takes_value:  # a job flag: the job name comes before those
            return None, argv
        position += 2 if takes_value[flag] and not equals else 1
    if position >= len(argv):
        return None, argv
    name = argv[position].replace("_", "-")
    if name not in JOBS:
        raise JobFileError(f"unknown job {shown(argv[position])}: choose {' or '.join(JOBS)}")
    return name, argv[:position] + argv[position + 1:]


def _config_path(prog: str, argv: list[str]) -> str | None:
    pre = Parser(prog=prog, add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    return known.config


def _checked_values(path: str, values: dict, flags: dict[str, argparse.Action]):
    """(action, value) for each key of the file, its type checked as the flag's parser would check it."""
    for key, value in values.items():
        if key not in flags:
            close = difflib.get_close_matches(key, flags, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(sorted(flags))}"
            raise JobFileError(f"job file {path}: unknown key {shown(key)}{hint}")
        action = flags[key]
        if value is None and action.default is None:
            continue
        yield action, _checked_value(path, key, value, action)


def _checked_value(path: str, key: str, value: Any, action: argparse.Action) -> Any:
    where = f"job file {path}: {key}"
    if isinstance(action, Repeatable):  # a list of values, or one value
        items = value if isinstance(value, list) else [value]
        return [_checked_value(path, f"{key}[{index}]" if isinstance(value, list) else key, item,
                               _OneOf(action)) for index, item in enumerate(items)]
    if _is_boolean(action):
        if not isinstance(value, bool):
            raise JobFileError(f"{where}: expected true or false, got {shown(value)}")
        return value
    try:
        # The flag's own type function, fed the text a command line would give it: what it returns must be the
        # file's value (so "64" is no integer and 64 no string), and its errors name what is wrong.
        converted = action.type(_as_text(value)) if action.type else _as_text(value)
    except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
        raise JobFileError(f"{where}: {_expected(action)}, got {shown(value)} ({exc})") from None
    if converted != value:
        raise JobFileError(f"{where}: {_expected(action)}, got {shown(value)}")
    if action.choices is not None and converted not in action.choices:
        raise JobFileError(f"{where}: {shown(value)} is not one of {', '.join(map(str, action.choices))}")
    return converted


class _OneOf(argparse.Action):
    """One value of a Repeatable flag, checked as a single-value flag of the same type."""

    def __init__(self, repeatable: argparse.Action):
        super().__init__(repeatable.option_strings, repeatable.dest, type=repeatable.type, choices=repeatable.choices)


def _expected(action: argparse.Action) -> str:
    return "expected " + _KINDS.get(action.type, f"a value for {action.option_strings[0]}")


def _is_boolean(action: argparse.Action) -> bool:
    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction))


def _as_text(value: Any) -> str:
    """A value as a command line spells it: JSON for objects, lists and booleans."""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, bool)) or value is None:
        return json.dumps(value, sort_keys=True)
    return str(value)
