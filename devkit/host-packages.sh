#!/usr/bin/env bash
# The Debian packages the local cluster and the tests use, installed when missing (as root; otherwise it names them
# and stops). One list, used by `make demo`, `make cluster-up` and CI (.ci/run):
#   the real node (docs/local-cluster.md): runc, the CNI plugins, iptables; its images: buildah, mmdebstrap;
#   the chat history tests: PostgreSQL; the web page's browser test: Chromium and its WebDriver;
#   and, on a bare machine, Go and Python's venv.
set -euo pipefail
need=()
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need+=(postgresql)
command -v go >/dev/null 2>&1 || need+=(golang-go)
command -v python3 >/dev/null 2>&1 || need+=(python3 python3-venv)
for tool in runc buildah mmdebstrap iptables; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
[[ -x /usr/lib/cni/bridge ]] || need+=(containernetworking-plugins)
{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || need+=(chromium chromium-driver)
((${#need[@]})) || exit 0
if [[ $(id -u) != 0 ]]; then
  echo "error: these Debian packages are missing: ${need[*]} (apt-get install them as root)" >&2
  exit 1
fi
echo "== installing Debian packages: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
