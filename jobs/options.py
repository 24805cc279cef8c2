"""Argument types and checks that several commands share: counts, JSON objects (inline or `@FILE`) and output
folders.

Light to import (no Ray, no torch), so that `verify` and `preview` start quickly.
"""

import argparse
import json

from jobs.errors import shown
from pipeline.storage import OutputError, filesystem

MAX_JSON_BYTES = 1 << 20  # storage options are a few settings; anything larger is not one


def positive_int(text: str) -> int:
    """A count of at least one. Refused here rather than by the job spec, so that the message names the flag."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {shown(text)}")
    return value


def json_object(text: str) -> dict:
    """JSON given inline, or `@PATH` to read it from a file (keeps secrets out of command lines and Ray's
    job entrypoints: put the file on the nodes, e.g. a mounted Kubernetes secret)."""
    where = ""
    if text.startswith("@"):
        where = f"{shown(text[1:])}: "
        try:
            with open(text[1:], encoding="utf-8") as f:
                text = f.read(MAX_JSON_BYTES + 1)
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"{where}cannot read it ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise argparse.ArgumentTypeError(f"{where}not UTF-8 text") from None
    if len(text) > MAX_JSON_BYTES:
        raise argparse.ArgumentTypeError(f"{where}longer than {MAX_JSON_BYTES} characters")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{where}not valid JSON: {exc.msg} at line {exc.lineno} column "
                                         f"{exc.colno}") from None
    except RecursionError:
        raise argparse.ArgumentTypeError(f"{where}JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{where}must be a JSON object, got {type(value).__name__}")
    return value


def storage_options_flag(text: str) -> dict | str:
    """A job's --storage-options: inline JSON is checked now; `@FILE` stays a reference, read by the job's
    driver (jobs.cli.run), so that a submitted job reads the file on the cluster's nodes, not where it was sent."""
    return text if text.startswith("@") else json_object(text)


def check_output_folder(output: str, storage_options: dict) -> None:
    """An output must be a folder, or not exist yet: an existing file there is refused before anything runs."""
    fs, root = filesystem(output, storage_options)
    if fs.isfile(root):
        raise OutputError(f"output {shown(output)} is a file, not a folder: name a folder (new or an output of "
                          "this tool)")
