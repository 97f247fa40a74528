#!/usr/bin/env bash
# Writes a one-layer OCI image archive (an OCI image layout in a tar) from a
# directory, with nothing but tar, sha256sum and coreutils: no registry, no
# daemon. `ctr -n k8s.io images import` (e2e/nodes.sh import) loads it.
#
#   e2e/nodes/mkimage.sh ROOTFS_DIR NAME:TAG OUT.tar [ENTRYPOINT [ARG...]]
#
# NAME:TAG is written as the `io.containerd.image.name` annotation, fully
# qualified the way containerd's CRI looks images up: `vireo:0.1.0` becomes
# `docker.io/library/vireo:0.1.0`, `me/x:1` becomes `docker.io/me/x:1`, and a
# name whose first component has a dot or colon (`registry.k8s.io/pause:3.10`)
# stays as it is. A pod then refers to it by the short name
# (`image: vireo:0.1.0`) with `imagePullPolicy: Never` or `IfNotPresent`.
#
# The layer is reproducible: files sorted, owned by 0:0, mtime 0. The
# ENTRYPOINT (optional) goes into the image config; WORKDIR is /, PATH is the
# usual one.
set -euo pipefail

[[ $# -ge 3 ]] || { echo "usage: $0 ROOTFS_DIR NAME:TAG OUT.tar [ENTRYPOINT [ARG...]]" >&2; exit 2; }
rootfs=$1 ref=$2 out=$3
shift 3
[[ -d $rootfs ]] || { echo "$0: $rootfs is not a directory" >&2; exit 1; }

# Normalize like containerd's reference.ParseDockerRef.
name=${ref%%@*}
first=${name%%/*}
if [[ $name != */* ]]; then
  name=docker.io/library/$name
elif [[ $first != *.* && $first != *:* && $first != localhost ]]; then
  name=docker.io/$name
fi
last=${name##*/}
[[ $last == *:* ]] || name=$name:latest
tag=${name##*:}

json_str() { # a JSON string literal (no control characters expected)
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/oci/blobs/sha256"
blobs=$work/oci/blobs/sha256

# add_blob FILE: moves FILE into blobs/, prints "DIGEST SIZE".
add_blob() {
  local d s
  d=$(sha256sum "$1" | cut -d' ' -f1)
  s=$(stat -c %s "$1")
  mv "$1" "$blobs/$d"
  echo "$d $s"
}

tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 --format=posix \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
  -C "$rootfs" -cf "$work/layer.tar" .
read -r layer_digest layer_size < <(add_blob "$work/layer.tar")

entry=""
if [[ $# -gt 0 ]]; then
  entry=',"Entrypoint":['
  sep=""
  for a in "$@"; do entry+="$sep$(json_str "$a")"; sep=,; done
  entry+=']'
fi
printf '{"architecture":"amd64","os":"linux","created":"1970-01-01T00:00:00Z","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"WorkingDir":"/"%s},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created":"1970-01-01T00:00:00Z","created_by":"e2e/nodes/mkimage.sh"}]}' \
  "$entry" "$layer_digest" >"$work/config.json"
read -r config_digest config_size < <(add_blob "$work/config.json")

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
  "$config_digest" "$config_size" "$layer_digest" "$layer_size" >"$work/manifest.json"
read -r manifest_digest manifest_size < <(add_blob "$work/manifest.json")

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":%s,"org.opencontainers.image.ref.name":%s}}]}' \
  "$manifest_digest" "$manifest_size" "$(json_str "$name")" "$(json_str "$tag")" >"$work/oci/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' >"$work/oci/oci-layout"

tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$work/oci" -cf "$work/image.tar" .
mv "$work/image.tar" "$out"
echo "$name"
