#!/usr/bin/env bash
# Fetches libvirt's own test XML (the tests/*xml2*xml*/ directories of the
# libvirt source package of this machine's Debian release) and prints the
# directory that holds it. Cached in ~/.cache/vireo-libvirt-testdata/<key>,
# <key> being the Debian suite and the source version, so a second run
# prints the cached directory without touching the network.
#
# The machine's apt sources carry no deb-src lines; this script does not
# change them. It runs apt with a private configuration under the cache
# (a deb-src entry for the machine's own Debian mirror and suite, its own
# lists and archives directories), so the host's apt state is untouched.
#
# libvirt's test data is LGPL-2.1-or-later; it is read from the cache and
# never stored in this repository.
set -euo pipefail

root="${VIREO_LIBVIRT_TESTDATA:-$HOME/.cache/vireo-libvirt-testdata}"
# shellcheck disable=SC1091
suite="$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")"
mirror="${VIREO_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

# A cached tree for this suite: done.
for done_marker in "$root"/"$suite"-*/.complete; do
  if [ -e "$done_marker" ]; then
    dirname "$done_marker"
    exit 0
  fi
done

work="$root/apt-$suite"
mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/etc"
cat >"$work/etc/sources.list" <<EOF
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main
EOF
apt_opts=(
  -o "Dir::Etc::SourceList=$work/etc/sources.list"
  -o "Dir::Etc::SourceParts=/nonexistent"
  -o "Dir::State::Lists=$work/lists"
  -o "Dir::Cache=$work/cache"
  -o "Dir::Cache::Archives=$work/archives"
  -o "APT::Sandbox::User=root"
  -o "Debug::NoLocking=true"
)
mkdir -p "$work/cache"
echo "libvirt-testdata: apt-get update (deb-src $suite main, private lists)" >&2
apt-get "${apt_opts[@]}" update -qq >&2
version="$(apt-cache "${apt_opts[@]}" showsrc libvirt | sed -n 's/^Version: //p' | sort -V | tail -1)"
[ -n "$version" ] || { echo "libvirt-testdata: no libvirt source in $suite" >&2; exit 1; }
dest="$root/$suite-$version"
dl="$work/src"
mkdir -p "$dl"
echo "libvirt-testdata: apt-get source --download-only libvirt=$version" >&2
(cd "$dl" && apt-get "${apt_opts[@]}" source --download-only -qq "libvirt=$version" >&2)
origs=("$dl"/libvirt_*.orig.tar.?z)
orig="${origs[0]}"
rm -rf "$dest.tmp"
mkdir -p "$dest.tmp"
tar -xf "$orig" -C "$dest.tmp" --strip-components=1 --wildcards \
  '*/tests/*xml2*xml*/*.xml' '*/COPYING.LESSER' 2>/dev/null || true
# Many qemuxml2xmloutdata files are links into qemuxml2argvdata: take the
# files they point to as well (and only those).
top="$( (tar -tf "$orig" || true) | head -1 | cut -d/ -f1)"
(cd "$dest.tmp" && find tests -xtype l -print0 | while IFS= read -r -d '' link; do
  target="$(realpath -m --relative-to=. "$(dirname "$link")/$(readlink "$link")")"
  echo "$top/$target"
done | sort -u >"$work/links")
if [ -s "$work/links" ]; then
  tar -xf "$orig" -C "$dest.tmp" --strip-components=1 -T "$work/links"
fi
count="$(find "$dest.tmp/tests" -name '*.xml' | wc -l)"
[ "$count" -gt 0 ] || { echo "libvirt-testdata: no test XML in $orig" >&2; exit 1; }
echo "libvirt $version ($suite), tests/*xml2*xml*/ from $(basename "$orig"); LGPL-2.1-or-later (COPYING.LESSER)" >"$dest.tmp/SOURCE"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
touch "$dest/.complete"
rm -rf "$dl"
echo "libvirt-testdata: $count files in $dest" >&2
echo "$dest"
