#!/usr/bin/env bash
# Builds kube-apiserver, kubectl, kubelet, kube-scheduler,
# kube-controller-manager, etcd and helm from the Go modules pinned in
# e2e/tools/{kube,etcd,helm}, and the pause image (pause.c from the pinned
# k8s.io/kubernetes module, gcc -static, a one-layer OCI archive tagged
# registry.k8s.io/pause:<its TAG>), into a content-addressed cache directory:
#
#   ${VIREO_E2E_CACHE:-$HOME/.cache/vireo-e2e}/<key>/bin/
#   ${VIREO_E2E_CACHE:-$HOME/.cache/vireo-e2e}/<key>/images/pause.tar
#
# <key> is a hash of the three modules' go.mod and go.sum (plus their Go
# sources, the Go version and this script's recipe version), so an unchanged
# pin reuses the binaries and a changed one rebuilds. Progress goes to stderr;
# the LAST line of stdout is the bin directory:
#
#   bin=$(e2e/build-tools.sh | tail -1)
#
# Environment:
#   VIREO_E2E_CACHE  cache root (default $HOME/.cache/vireo-e2e)
#   VIREO_E2E_JOBS   go build -p (default 2)
set -euo pipefail

# Bump when the way the binaries are built changes (flags, ldflags, names).
RECIPE=2

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tools=$here/tools
cache_root=${VIREO_E2E_CACHE:-$HOME/.cache/vireo-e2e}
jobs=${VIREO_E2E_JOBS:-2}

log() { printf '[build-tools] %s\n' "$*" >&2; }

command -v go >/dev/null || { log "go is not on PATH"; exit 1; }
command -v gcc >/dev/null || { log "gcc is not on PATH (scripts/setup installs it; needed for the pause image)"; exit 1; }

# Inputs of the key: every file that decides what gets built, in a fixed order.
key_files=(
  kube/go.mod kube/go.sum kube/tools.go
  etcd/go.mod etcd/go.sum etcd/main.go
  helm/go.mod helm/go.sum helm/tools.go
  ../nodes/mkimage.sh
)
key=$(
  {
    echo "recipe $RECIPE"
    go env GOVERSION GOOS GOARCH
    gcc --version 2>/dev/null | head -n 1
    for f in "${key_files[@]}"; do
      echo "== $f"
      cat "$tools/$f"
    done
  } | sha256sum | cut -c1-16
)
dest=$cache_root/$key
bin=$dest/bin
want=(kube-apiserver kubectl kubelet kube-scheduler kube-controller-manager etcd helm pause)

complete() {
  [[ -f $dest/.complete ]] || return 1
  local b
  for b in "${want[@]}"; do [[ -x $bin/$b ]] || return 1; done
  [[ -f $dest/images/pause.tar ]]
}

mkdir -p "$cache_root"
# One build at a time per cache root (a second caller waits, then reuses).
exec 9>"$cache_root/.lock"
flock 9

if complete; then
  log "reusing cached tools for key $key (pins unchanged): $bin"
  echo "$bin"
  exit 0
fi

# A clean environment for go: module mode, no vendor, no VCS stamping, static
# binaries, and the committed go.sum as the only source of truth.
export GO111MODULE=on GOFLAGS=-buildvcs=false CGO_ENABLED=0 GOWORK=off

modver() { (cd "$tools/$1" && go list -mod=readonly -m -f '{{.Version}}' "$2"); }

kube_ver=$(modver kube k8s.io/kubernetes)
etcd_ver=$(modver etcd go.etcd.io/etcd/server/v3)
helm_ver=$(modver helm helm.sh/helm/v4)
log "building key $key: kubernetes $kube_ver, etcd $etcd_ver, helm $helm_ver ($(go env GOVERSION), -p $jobs)"

tmp=$(mktemp -d "$cache_root/.build-$key.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"
mkdir -p "$tmp/bin" "$tmp/images"

gobuild() { go build -mod=readonly -trimpath -p "$jobs" "$@"; }

# Kubernetes stamps its version with ldflags (hack/lib/version.sh); without
# them the binaries report v0.0.0-master and kubectl warns about version skew.
major=${kube_ver#v}; major=${major%%.*}
minor=${kube_ver#v"$major".}; minor=${minor%%.*}
kube_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kube_ldflags+=" -X $pkg.gitVersion=$kube_ver -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  kube_ldflags+=" -X $pkg.gitTreeState=clean"
done

start=$SECONDS
log "[1/4] kube-apiserver + kubectl ($kube_ver)"
(cd "$tools/kube" && gobuild -ldflags "$kube_ldflags" -o "$tmp/bin/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl)
log "      done after $((SECONDS - start))s"

log "[2/4] kubelet + kube-scheduler + kube-controller-manager ($kube_ver)"
(cd "$tools/kube" && gobuild -ldflags "$kube_ldflags" -o "$tmp/bin/" \
  k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kube-controller-manager)
log "      done after $((SECONDS - start))s"

# pause: the pod sandbox's init process, from the same Kubernetes release.
# Tagged as upstream tags it (build/pause/Makefile's TAG); e2e/nodes.sh reads
# images/pause.ref and configures it as containerd's sandbox image.
pause_dir=$(cd "$tools/kube" && go list -mod=readonly -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause
pause_src=$pause_dir/linux/pause.c
pause_ref=registry.k8s.io/pause:$(sed -n 's/^TAG ?= *//p' "$pause_dir/Makefile")
[[ $pause_ref != *: ]] || { log "no TAG in $pause_dir/Makefile"; exit 1; }
log "      pause image $pause_ref from $pause_src"
gcc -Os -static -Wall -Werror -DVERSION="$kube_ver" -o "$tmp/bin/pause" "$pause_src"
strip "$tmp/bin/pause" 2>/dev/null || true
mkdir -p "$tmp/pause-rootfs"
cp "$tmp/bin/pause" "$tmp/pause-rootfs/pause"
"$here/nodes/mkimage.sh" "$tmp/pause-rootfs" "$pause_ref" "$tmp/images/pause.tar" /pause >/dev/null
rm -rf "$tmp/pause-rootfs"
echo "$pause_ref" >"$tmp/images/pause.ref"

log "[3/4] etcd ($etcd_ver)"
(cd "$tools/etcd" && gobuild -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$etcd_ver" \
  -o "$tmp/bin/etcd" .)
log "      done after $((SECONDS - start))s"

log "[4/4] helm ($helm_ver)"
(cd "$tools/helm" && gobuild -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$helm_ver -X helm.sh/helm/v4/internal/version.gitTreeState=clean" \
  -o "$tmp/bin/helm" helm.sh/helm/v4/cmd/helm)
log "      done after $((SECONDS - start))s"

# Smoke test before publishing into the cache.
"$tmp/bin/kube-apiserver" --version >&2
"$tmp/bin/kubectl" version --client >&2
"$tmp/bin/kubelet" --version >&2
"$tmp/bin/kube-scheduler" --version >&2
"$tmp/bin/kube-controller-manager" --version >&2
"$tmp/bin/etcd" --version >&2
"$tmp/bin/helm" version >&2

{
  echo "kubernetes $kube_ver"
  echo "etcd $etcd_ver"
  echo "helm $helm_ver"
  echo "pause $pause_ref"
  go env GOVERSION
} >"$tmp/VERSIONS"
touch "$tmp/.complete"

rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
log "built in $((SECONDS - start))s: $bin"
echo "$bin"
