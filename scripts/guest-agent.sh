#!/usr/bin/env bash
# Builds vireo-guest-agent fully static (glibc's libc.a, crt-static) and
# packs it for guests: OUTDIR/vireo-guest-agent, OUTDIR/agent.cpio (newc,
# one file bin/vireo-guest-agent) and OUTDIR/agent.cpio.gz (the same,
# gzipped). Appending either to an initramfs adds the agent to it; the
# test guest's /init (scripts/guest-init.sh) starts it when present.
#
#   scripts/guest-agent.sh [OUTDIR]
#
# Cached in ${VIREO_GUEST_CACHE:-$HOME/.cache/vireo-guest}/agent-KEY, KEY
# hashing the crate's sources, Cargo.lock, the workspace manifest and this
# script; OUTDIR (default: that directory) receives the three files and
# MANIFEST. Progress goes to stderr; the last stdout line is the directory:
#
#   dir=$(scripts/guest-agent.sh | tail -1)
#
# The build honours CARGO_TARGET_DIR. See docs/guest-agent.md.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cache_root=${VIREO_GUEST_CACHE:-${HOME:-/root}/.cache/vireo-guest}
target=x86_64-unknown-linux-gnu
outdir=${1:-}

log() { echo "guest-agent: $*" >&2; }
die() { log "error: $*"; exit 1; }

key=$(
  cd "$repo"
  {
    find guest-agent -path guest-agent/target -prune -o -type f -print | LC_ALL=C sort |
      while read -r f; do echo "$f $(sha256sum <"$f" | cut -d' ' -f1)"; done
    sha256sum <Cargo.lock
    sha256sum <Cargo.toml
    sha256sum <"$here/guest-agent.sh"
    rustc --version 2>/dev/null || true
  } | sha256sum | cut -c1-16
)
dir=$cache_root/agent-$key

publish() {
  local d=$1
  if [ -n "$outdir" ]; then
    mkdir -p "$outdir"
    outdir=$(cd "$outdir" && pwd)
    if [ "$outdir" != "$d" ]; then
      cp -f "$d/vireo-guest-agent" "$d/agent.cpio" "$d/agent.cpio.gz" "$d/MANIFEST" "$outdir/"
      d=$outdir
    fi
  fi
  echo "$d"
}

if [ -s "$dir/MANIFEST" ]; then
  log "cached: $dir"
  publish "$dir"
  exit 0
fi

log "cargo build --release -p vireo-guest-agent --target $target (crt-static)"
# With an explicit --target, RUSTFLAGS apply to the target's crates only
# (build scripts and proc macros are built for the host without them), so
# the rest of the workspace's build is untouched. Symbols are stripped;
# the profile's line tables would only make the guest's copy bigger.
(
  cd "$repo"
  RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_PROFILE_RELEASE_DEBUG=false \
    cargo build --release --locked -p vireo-guest-agent --target "$target" >&2
)
target_dir=${CARGO_TARGET_DIR:-$repo/target}
bin=$target_dir/$target/release/vireo-guest-agent
[ -x "$bin" ] || die "no binary at $bin"

# Static: no program interpreter (PT_INTERP) and no dynamic section.
if readelf -lW "$bin" | grep -q 'INTERP'; then
  die "$bin has a program interpreter: not static"
fi
if readelf -dW "$bin" 2>/dev/null | grep -q 'NEEDED'; then
  die "$bin needs shared libraries: not static"
fi

mkdir -p "$cache_root"
work=$(mktemp -d "$cache_root/.agent.XXXXXX")
trap 'rm -rf "$work"' EXIT
cp "$bin" "$work/vireo-guest-agent"
chmod 0755 "$work/vireo-guest-agent"

# newc cpio: the directory bin and bin/vireo-guest-agent, owned by root,
# fixed mtime 0, then the trailer. Written by python3: the format is a
# fixed ASCII header (13 hex fields), the NUL-terminated name and the data,
# each padded to 4 bytes.
python3 - "$work/vireo-guest-agent" "$work/agent.cpio" <<'EOF'
import sys

src, dst = sys.argv[1], sys.argv[2]
data = open(src, "rb").read()
out = bytearray()

def pad4():
    out.extend(b"\0" * (-len(out) % 4))

def entry(ino, name, mode, body, nlink):
    fields = [ino, mode, 0, 0, nlink, 0, len(body), 0, 0, 0, 0, len(name) + 1, 0]
    out.extend(b"070701" + "".join("%08X" % f for f in fields).encode())
    out.extend(name.encode() + b"\0")
    pad4()
    out.extend(body)
    pad4()

entry(1, "bin", 0o040755, b"", 2)
entry(2, "bin/vireo-guest-agent", 0o100755, data, 1)
entry(0, "TRAILER!!!", 0, b"", 1)
open(dst, "wb").write(bytes(out))
EOF
gzip -9 -n -c "$work/agent.cpio" >"$work/agent.cpio.gz"

size=$(stat -c %s "$work/vireo-guest-agent")
{
  echo "# vireo-guest-agent, built by scripts/guest-agent.sh"
  echo "key $key"
  echo "target $target crt-static"
  echo "rustc $(rustc --version 2>/dev/null || echo unknown)"
  for f in vireo-guest-agent agent.cpio agent.cpio.gz; do
    echo "$f sha256 $(sha256sum "$work/$f" | cut -d' ' -f1) $(stat -c %s "$work/$f")"
  done
} >"$work/MANIFEST"
log "static binary: $size bytes"

if mv -T "$work" "$dir" 2>/dev/null; then
  trap - EXIT
  log "built $dir"
else
  [ -s "$dir/MANIFEST" ] || die "cannot publish $dir"
fi
# Keep the three newest agent builds.
find "$cache_root" -mindepth 1 -maxdepth 1 -type d -name 'agent-*' -printf '%T@ %p\n' |
  sort -rn | tail -n +4 | cut -d' ' -f2- | while read -r old; do rm -rf "$old"; done
publish "$dir"
