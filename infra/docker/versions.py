"""The Docker image's Ray and Python versions, read from pyproject.toml: the one place that sets them.

    python infra/docker/versions.py    # prints RAY_VERSION=... PYTHON_VERSION=... PYTHON_TAG=... (build args)
"""

import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def image_versions(pyproject: Path = PYPROJECT) -> dict[str, str]:
    project = tomllib.loads(pyproject.read_text())
    pins = [re.fullmatch(r"ray(\[[\w,]+\])?==([\w.]+)", dep.replace(" ", "")) for dep in project["project"]["dependencies"]]
    ray_versions = [pin.group(2) for pin in pins if pin]
    if len(ray_versions) != 1:
        raise SystemExit(f"{pyproject}: expected one exact ray pin (ray[default]==X.Y.Z) in [project] dependencies")
    python = project["tool"]["instaflow-batch"]["image"]["python"]
    return {"RAY_VERSION": ray_versions[0], "PYTHON_VERSION": python, "PYTHON_TAG": "py" + python.replace(".", "")}


if __name__ == "__main__":
    print(" ".join(f"{name}={value}" for name, value in image_versions().items()))
