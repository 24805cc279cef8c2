#!/usr/bin/env bash
# Builds the image with the Ray and Python that pyproject.toml sets (the one place for them):
#   bash infra/docker/build.sh -t <registry>/instaflow-batch:0.1.0 [more docker build options]
set -euo pipefail
cd "$(dirname "$0")/../.."
args=()
for pair in $(python3 infra/docker/versions.py); do args+=(--build-arg "$pair"); done
exec docker build -f infra/docker/Dockerfile "${args[@]}" "$@" .
