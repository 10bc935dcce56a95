#!/usr/bin/env bash
# The local base image the three Dockerfiles build FROM on the real node's path (--build-arg BASE_IMAGE): Debian
# bookworm's python3 (3.11) with venv, made from Debian packages by mmdebstrap and committed by buildah as
# localhost/llmmultichat/base:bookworm. The mirrors are this machine's own apt sources. Skips the build when an
# image built from the same package list is there (its label llmmultichat.io/base-hash).
set -euo pipefail
image="${BASE_IMAGE_NAME:-localhost/llmmultichat/base:bookworm}"
# ca-certificates: pip over TLS; passwd: the Dockerfiles' groupadd/useradd; python-is-python3: their `python`.
packages="python3,python3-venv,python-is-python3,ca-certificates,passwd"
# What the image is made of: a change here rebuilds it (not a change of comments or messages).
mmdebstrap_args=(--variant=minbase "--include=$packages" '--aptopt=Acquire::Languages "none"'
  '--dpkgopt=path-exclude=/usr/share/doc/*' '--dpkgopt=path-exclude=/usr/share/man/*'
  '--dpkgopt=path-exclude=/usr/share/locale/*' '--dpkgopt=path-include=/usr/share/locale/locale.alias'
  '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin')
config_args=(--env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 --cmd python3)
hash="$(printf '%s\n' bookworm "${mmdebstrap_args[@]}" "${config_args[@]}" | sha256sum | cut -c1-16)"
if [[ "$(buildah inspect --type image --format '{{index .ImageAnnotations "llmmultichat.io/base-hash"}}' \
        "$image" 2>/dev/null)" == "$hash" ]]; then
  echo "$image is current ($hash)" >&2
  exit 0
fi
for tool in mmdebstrap buildah; do
  command -v "$tool" >/dev/null || { echo "error: $tool is needed (Debian package $tool)" >&2; exit 1; }
done
sources=/etc/apt/sources.list.d/debian.sources
[[ -f $sources ]] || sources=/etc/apt/sources.list
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$SECONDS
mmdebstrap --quiet "${mmdebstrap_args[@]}" bookworm "$work/rootfs.tar" "$sources"
container="$(buildah from scratch)"
trap 'buildah rm "$container" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
buildah add --quiet "$container" "$work/rootfs.tar" / >/dev/null
buildah config "${config_args[@]}" --annotation "llmmultichat.io/base-hash=$hash" "$container"
buildah commit --quiet --rm "$container" "$image" >/dev/null
echo "$image built in $((SECONDS - start))s ($(buildah images --format "{{.Size}}" "$image" \
  2>/dev/null || true))" >&2
