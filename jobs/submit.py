"""Sends a job to a Ray cluster: the job's module command line as the entrypoint, this project as its working dir.

Local paths in the job are made absolute first (they must exist on the cluster's nodes), the spec's own checks
run here before anything is sent, and no secret travels with the job: a cluster keeps each job's entrypoint and
runtime env in plain text and its dashboard shows them. `--storage-options @FILE` names a file on the cluster's
nodes: it travels as its path and the job's driver reads it there (nothing reads it here).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from jobs.jobfile import Job, parse_job
from jobs.main import DefaultsShown
from jobs.ray_jobs import add_address, connect, follow, jobs_api
from pipeline.settings import MODEL
from pipeline.spec import SETTINGS, JobSpec, split_scale
from pipeline.storage import redact_text, secret_fields

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Never uploaded with a job (gitignore patterns, relative to the project): environments, outputs, caches.
WORKING_DIR_EXCLUDES = ["/.venv/", "/out/", "/.git/", "/.cache/", "/build/", "/dist/",
                        "__pycache__/", ".pytest_cache/", "*.egg-info/"]
LOCAL_PATH_FLAGS = ("prompts", "output")  # paths unless they are URLs
# The settings that name models (pipeline/spec.py declares them): local folders or files if they exist here, else
# hub ids or URLs; those with :SCALE may end with one; a repeated one is a list of SRC[:SCALE].
MODEL_FLAGS = tuple(name for name, declared in SETTINGS.items()
                    if declared.effect == MODEL and not declared.scaled and not declared.repeated)
SCALED_MODEL_FLAGS = tuple(name for name, declared in SETTINGS.items()
                           if declared.effect == MODEL and declared.scaled and not declared.repeated)
REPEATED_MODEL_FLAGS = tuple(name for name, declared in SETTINGS.items()
                             if declared.effect == MODEL and declared.repeated)

CREDENTIALS_HELP = """\
Credentials never travel with a submitted job: a Ray cluster stores each job's entrypoint and runtime
environment in plain text and shows them on its dashboard. Give the cluster's nodes their own access instead,
and keep only settings that are not secret (endpoint_url, region_name, anon) in --storage-options:
  - a role for the nodes: on AWS an instance profile (cluster launcher: IamInstanceProfile in each node type's
    node_config), or IRSA / EKS Pod Identity (KubeRay: serviceAccountName on the head and worker pods);
  - environment variables on every node: a Kubernetes Secret as env on the head and worker pods (see
    infra/kuberay/*.yaml), or `export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...` before `ray start`;
    the job's driver inherits the node's environment and passes AWS_*, FSSPEC_*, GOOGLE_*, GCS* and HF_*
    variables on to its workers;
  - a credentials file on every node (~/.aws/credentials, or AWS_SHARED_CREDENTIALS_FILE /
    GOOGLE_APPLICATION_CREDENTIALS pointing at one);
  - a JSON file on every node, named with --storage-options @/path/on/the/nodes.json: the driver reads it there.
`instaflow-batch run` on one machine may still take keys in --storage-options."""
SECRETS_HINT = ("a cluster shows every job's entrypoint; give its nodes their own access (an instance profile or "
                "IRSA role, a Secret as env, a credentials file) or name a JSON file on the nodes with "
                "--storage-options @FILE (instaflow-batch submit --help says more)")


class _HelpWithCredentials(DefaultsShown, argparse.RawDescriptionHelpFormatter):
    """submit --help: defaults shown, and the credentials notes as written."""


class SubmitError(ValueError):
    """A job or an address that cannot be sent to a cluster; nothing was submitted."""


def submit_options(parser: argparse.ArgumentParser) -> None:
    """submit's own options, beside the job's flags (before or after the job name)."""
    add_address(parser)
    parser.add_argument("--wait", action="store_true",
                        help="follow the logs to the end and exit with the job's own exit status")
    parser.formatter_class = _HelpWithCredentials
    parser.epilog = CREDENTIALS_HELP


def submit_command(argv: list[str], prog: str) -> int:
    job = parse_job(prog, argv, submit_options)
    entrypoint = job_entrypoint(job)
    with jobs_api():
        client = connect(job.args.address)
        submission_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env())
    if not job.args.wait:
        print(submission_id)
        print(f"follow it with: instaflow-batch logs --follow {submission_id}", file=sys.stderr)
        return 0
    print(f"submitted {submission_id}; following its logs", file=sys.stderr)
    return follow(client, submission_id)


def job_entrypoint(job: Job) -> str:
    """The job's module command line, with local paths made absolute; refuses secrets and impossible values."""
    if job.args.ray_address:
        raise SubmitError("--ray-address has no place in a submitted job: it joins the cluster it is submitted "
                          "to; name that cluster's dashboard with --address")
    secrets = secret_fields({name: getattr(job.args, name) for name in
                             ("storage_options", *LOCAL_PATH_FLAGS, *MODEL_FLAGS) if hasattr(job.args, name)})
    if secrets:
        raise SubmitError(f"refusing to submit secrets ({', '.join(secrets)}): {SECRETS_HINT}")
    for name in LOCAL_PATH_FLAGS:
        value = getattr(job.args, name)
        if "://" not in value:
            setattr(job.args, name, _absolute(value))
    for name in (*MODEL_FLAGS, *SCALED_MODEL_FLAGS):
        value = getattr(job.args, name, None)
        if value:
            setattr(job.args, name, _resolved_model(value, scaled=name in SCALED_MODEL_FLAGS))
    for name in REPEATED_MODEL_FLAGS:
        setattr(job.args, name, [_resolved_model(value, scaled=True) for value in getattr(job.args, name, [])])
    options = job.args.storage_options
    if isinstance(options, str):  # @FILE: a file on the nodes; relative to where the command runs, as other paths
        job.args.storage_options = "@" + _absolute(options[1:])
    # The spec's own checks, here, before anything reaches the cluster (an @FILE's settings are the driver's).
    JobSpec(**job.spec_args() | {"storage_options": {} if isinstance(options, str) else options})
    entrypoint = shlex.join(["python", "-m", job.module.__name__, *job.argv()])
    if redact_text(entrypoint) != entrypoint:  # in any other flag: by pattern, or a secret variable's value
        raise SubmitError(f"refusing to submit secrets (in {redact_text(entrypoint)}): {SECRETS_HINT}")
    return entrypoint


def _resolved_model(value: str, scaled: bool) -> str:
    """A model, file or adapter given as a local path here, made absolute (its :SCALE kept); others as given."""
    source, scale = split_scale(value, "model", default=None) if scaled else (value, None)
    if not Path(source).expanduser().exists():
        return value
    resolved = str(Path(source).expanduser().resolve())
    return resolved if scale is None else f"{resolved}:{value.rpartition(':')[2]}"


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def runtime_env() -> dict:
    """This project as the job's working dir when running from a source checkout; else the cluster's install."""
    if not (PROJECT_ROOT / "pyproject.toml").exists():
        return {}
    return {"working_dir": str(PROJECT_ROOT), "excludes": WORKING_DIR_EXCLUDES}


