"""`instaflow-batch verify OUTPUT`: is this output complete and intact? (pipeline/verify.py does the checks.)

Exit status: 0 every planned shard is committed and intact; 1 something is missing or corrupt (listed);
2 the output cannot be verified (no such folder, a file, not an output of this tool, bad options).
"""

from jobs.errors import shown
from jobs.main import Parser
from jobs.options import json_object
from pipeline.storage import OutputError, filesystem
from pipeline.verify import verify_output


def verify_command(argv: list[str], prog: str) -> int:
    parser = Parser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the job's output folder URL")
    parser.add_argument("--storage-options", type=json_object, default={},
                        help="JSON passed to fsspec, or @FILE (also used for the input's footers)")
    parser.add_argument("--prompts", metavar="URL",
                        help="the job's input, where its URL held a password or signature (_job.json keeps it "
                             "redacted); it must be the URL the job ran with")
    args = parser.parse_args(argv)
    fs, root = filesystem(args.output, args.storage_options)
    if fs.isfile(root):
        raise OutputError(f"{shown(args.output)} is a file, not an output folder")
    if not fs.isdir(root):
        raise OutputError(f"{shown(args.output)}: no such folder")
    report = verify_output(args.output, args.storage_options, args.prompts)
    print(report.summary())
    return 0 if report.ok else 1
