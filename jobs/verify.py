"""`instaflow-batch verify OUTPUT`: is this output complete and intact? (pipeline/verify.py does the checks.)

Exit status: 0 every planned shard is committed and intact; 1 something is missing or corrupt (listed);
2 the output cannot be verified (not an output of this tool, bad options).
"""

import argparse
import sys

from jobs.cli import json_object
from jobs.main import DefaultsShown
from pipeline.storage import OutputError, redact_text
from pipeline.verify import verify_output


def verify_command(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0], formatter_class=DefaultsShown)
    parser.add_argument("output", help="the job's output folder URL")
    parser.add_argument("--storage-options", type=json_object, default={},
                        help="JSON passed to fsspec, or @FILE (also used for the input's footers)")
    args = parser.parse_args(argv)
    try:
        report = verify_output(args.output, args.storage_options)
    except OutputError as exc:
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.ok else 1
