"""infra/: every YAML parses and asks for what the jobs need; the image's versions come from pyproject alone."""

import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from infra.docker.versions import image_versions
from jobs.jobfile import JOBS
from pipeline.spec import JobSpec

INFRA = Path(__file__).resolve().parents[1] / "infra"
# The README and the reference pages beside the code: every job command in them must parse.
DOCUMENTATION = [INFRA.parent / page for page in ("README.md", "jobs/README.md", "pipeline/README.md",
                                                  "pipeline/training/README.md", "jobs/toy/README.md",
                                                  "instaflow/README.md")]
KUBERAY = {path.name: yaml.safe_load(path.read_text()) for path in sorted((INFRA / "kuberay").glob("*.yaml"))}
LAUNCHER = yaml.safe_load((INFRA / "cluster" / "aws.yaml").read_text())
IMAGE = LAUNCHER["docker"]["image"]


def cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def check_entrypoint(command: str) -> None:
    """A job command line as the README and manifests give it: `python -m jobs.X` with flags the job accepts."""
    words = shlex.split(command)
    assert words[:2] == ["python", "-m"], command
    module = next(m for m in JOBS.values() if m.__name__ == words[2])
    JobSpec(**module.spec_args(module.parser().parse_args(words[3:])))


def test_image_versions_come_from_pyproject():
    versions = image_versions()
    assert versions["RAY_VERSION"] == ray.__version__  # what pyproject installs is what the image runs
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu" in dockerfile
    assert re.search(r"^ARG RAY_VERSION$", dockerfile, re.M) and re.search(r"^ARG PYTHON_TAG$", dockerfile, re.M)
    assert not re.search(r"rayproject/ray:\d", dockerfile) and "ray.__version__ == '${RAY_VERSION}'" in dockerfile
    assert versions["PYTHON_TAG"] == "py" + versions["PYTHON_VERSION"].replace(".", "")
    for manifest in KUBERAY.values():
        assert cluster_spec(manifest)["rayVersion"] == versions["RAY_VERSION"]


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_kuberay_manifests(name):
    manifest = KUBERAY[name]
    spec = cluster_spec(manifest)
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"  # the driver's node runs no model
    images = [c["image"] for c in head["template"]["spec"]["containers"]]
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in group["template"]["spec"]["containers"]:
            images.append(container["image"])
            resources = container["resources"]
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert set(images) == {IMAGE}
    if manifest["kind"] == "RayJob":
        check_entrypoint(manifest["spec"]["entrypoint"])
        assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # the operator polls it: see the manifest
    else:
        assert spec["enableInTreeAutoscaling"] is True
        assert [group["minReplicas"] for group in spec["workerGroupSpecs"]] == [0]  # starts with no GPU
        assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"


CRD_SCHEMAS = Path(__file__).resolve().parent / "data" / "kuberay-v1.6.2-crd-schemas.json.gz"


def crd_validator(kind: str):
    """A validator of KubeRay's own CRD schema for `kind` (openAPIV3Schema, a JSON Schema subset; the
    x-kubernetes-* extensions are annotations that validators ignore), from the KubeRay release the project is
    tested against (the file names it and where it came from)."""
    import gzip
    import json

    import jsonschema

    crds = json.loads(gzip.decompress(CRD_SCHEMAS.read_bytes()))
    assert crds["kuberay_version"] == "v1.6.2" and "github.com/ray-project/kuberay" in crds["source"]
    return jsonschema.Draft7Validator(crds["schemas"][kind])


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not declare, as the API server's strict field validation (kubectl apply
    --validate=strict) refuses them: a typo that a plain schema check lets through, and the server would drop."""
    if isinstance(value, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        found = []
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{path}/{key}")
            else:
                found += unknown_fields(item, schema["properties"][key], f"{path}/{key}")
        return found
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return [f for key, item in value.items() for f in unknown_fields(item, schema["additionalProperties"],
                                                                          f"{path}/{key}")]
    if isinstance(value, list) and "items" in schema:
        return [f for i, item in enumerate(value) for f in unknown_fields(item, schema["items"], f"{path}/{i}")]
    return []


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_kuberay_manifests_follow_the_crd_schema(name):
    manifest = KUBERAY[name]
    validator = crd_validator(manifest["kind"])
    errors = [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(manifest)]
    assert not errors, errors
    assert unknown_fields(manifest, validator.schema) == []
    typo = yaml.safe_load(yaml.safe_dump(manifest))
    cluster_spec(typo)["headGroupSpec"]["rayStartParam"] = {}
    assert unknown_fields(typo, validator.schema)[0].endswith("headGroupSpec/rayStartParam")
    broken = yaml.safe_load(yaml.safe_dump(manifest))  # the validator can fail: a list where the schema has one
    cluster_spec(broken)["headGroupSpec"]["template"]["spec"]["containers"] = {"name": "head"}
    cluster_spec(broken)["workerGroupSpecs"][0]["replicas"] = "two"
    assert len(list(validator.iter_errors(broken))) >= 2


def test_launcher_config():
    nodes = LAUNCHER["available_node_types"]
    head = nodes[LAUNCHER["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = nodes["gpu_worker"]
    assert gpu["resources"]["GPU"] == 1 and gpu["min_workers"] == 0
    assert 0 < gpu["max_workers"] <= LAUNCHER["max_workers"]
    start = " ".join(LAUNCHER["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "--autoscaling-config" in start


def test_commands_in_comments_and_readmes_are_jobs_that_parse():
    sources = [INFRA / "kuberay" / "raycluster.yaml", INFRA / "cluster" / "aws.yaml", INFRA / "README.md",
               *DOCUMENTATION]  # rayjob.yaml's entrypoint is checked with the manifest
    commands = 0
    for path in sources:
        text = re.sub(r"\\\n[#\s]*", " ", path.read_text())  # join continued lines, in comments too
        pattern = r"^[#\s]*((?:instaflow-batch (?:run|submit)|python -m jobs\.\w+)[^\n`]*)"
        for match in re.finditer(pattern, text, re.M):  # command lines in code blocks and comments
            words = shlex.split(match.group(1).split("#")[0])
            if words[0] == "instaflow-batch":
                words = [w for w in words[2:] if w not in ("--wait",)]
                words = words[2:] if words and words[0] == "--address" else words
                job = words.pop(0) if words and words[0] in JOBS else "generate"
                words = ["python", "-m", JOBS[job].__name__, *words]
            if "..." in words or "--config" in words or any(w.startswith("<") for w in words):
                continue  # an elided example, or one whose job file is the reader's
            check_entrypoint(shlex.join(words))
            commands += 1
    assert commands >= 6


def test_job_file_reference_lists_every_key():
    from jobs.jobfile import job_flags

    text = (INFRA.parent / "jobs" / "README.md").read_text()
    documented = set(re.findall(r"^\| `(\w+)` \|", text, re.M))
    keys = {"job"} | {key for module in JOBS.values() for key in job_flags(module.parser())}
    assert documented == keys
