#!/usr/bin/env bash
# Builds Vireo's test guest: a Debian cloud kernel (vmlinuz) and a busybox
# initramfs (initrd.img) whose /init is scripts/guest-init.sh. Debian
# packages only, fetched with `apt-get download` (never installed) and
# unpacked with dpkg-deb; the initramfs is written by the packaged static
# busybox's own cpio, so the host needs neither cpio nor a kernel.
#
#   scripts/guest-image.sh [OUTDIR]
#
# The result is cached in ${VIREO_GUEST_CACHE:-$HOME/.cache/vireo-guest}/KEY,
# KEY hashing these scripts and the package versions; OUTDIR (default: that
# cache directory) receives vmlinuz, initrd.img and MANIFEST. Progress goes
# to stderr; the last line on stdout is the output directory:
#
#   dir=$(scripts/guest-image.sh | tail -1)
#
# Environment: VIREO_GUEST_CACHE (cache root), VIREO_GUEST_KERNEL_PKG
# (default linux-image-cloud-amd64). See docs/guest-image.md.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
init_script=$here/guest-init.sh
cache_root=${VIREO_GUEST_CACHE:-${HOME:-/root}/.cache/vireo-guest}
kernel_meta=${VIREO_GUEST_KERNEL_PKG:-linux-image-cloud-amd64}
busybox_pkg=busybox-static
outdir=${1:-}

# Drivers the guest needs. Those the kernel has built in are skipped; the
# others are copied with the modules they depend on (read from each
# module's modinfo), and /init loads them in this order.
want_modules=(
  virtio_mmio virtio_pci          # transports: microvm (virtio-mmio), q35/pc (PCI)
  virtio_blk virtio_net virtio_rng virtio_console
  virtio_balloon                  # memory given back and taken on `setmem` (balloon)
  crc16 mbcache jbd2 crc32c_generic ext4   # ext4 (also mounts ext2)
  af_packet                       # udhcpc's raw socket (CONFIG_PACKET)
  button evdev                    # ACPI power button -> input event -> acpid
  pvpanic_mmio                    # a kernel panic reaches QEMU's pvpanic device (state crashed)
  vmw_vsock_virtio_transport      # virtio-vsock: the guest agent's other transport (docs/guest-agent.md)
)

log() { echo "guest-image: $*" >&2; }
die() { log "error: $*"; exit 1; }

sudo_cmd=()
[ "$(id -u)" -eq 0 ] || { command -v sudo >/dev/null 2>&1 && sudo_cmd=(sudo -n); }

apt_update() {
  log "apt-get update"
  "${sudo_cmd[@]}" apt-get update -qq >&2 || die "apt-get update failed"
}

# candidate_field PKG FIELD: a field of the version apt would install.
candidate_field() {
  apt-cache show --no-all-versions "$1" 2>/dev/null | sed -n "s/^$2: //p" | head -1
}

kernel_pkg="" kernel_ver="" busybox_ver=""
resolve_versions() {
  local deps
  deps=$(candidate_field "$kernel_meta" Depends)
  kernel_pkg=$(printf '%s\n' "$deps" | tr ',' '\n' | sed -n 's/^ *\(linux-image-[0-9][^ ]*\).*/\1/p' | head -1)
  [ -n "$kernel_pkg" ] || return 1
  kernel_ver=$(candidate_field "$kernel_pkg" Version)
  busybox_ver=$(candidate_field "$busybox_pkg" Version)
  [ -n "$kernel_ver" ] && [ -n "$busybox_ver" ]
}

command -v apt-get >/dev/null 2>&1 || die "needs apt-get and dpkg-deb (a Debian or Ubuntu host)"
command -v dpkg-deb >/dev/null 2>&1 || die "needs dpkg-deb"
[ -r "$init_script" ] || die "missing $init_script"

if ! resolve_versions; then
  apt_update
  resolve_versions || die "apt knows no $kernel_meta/$busybox_pkg candidate (Debian main in sources.list?)"
fi

key_of() {
  {
    cat "$0" "$init_script"
    echo "$kernel_pkg=$kernel_ver $busybox_pkg=$busybox_ver"
  } | sha256sum | cut -c1-16
}

publish() { # the built or cached directory -> OUTDIR; last stdout line
  local dir=$1
  if [ -n "$outdir" ]; then
    mkdir -p "$outdir"
    outdir=$(cd "$outdir" && pwd)
    if [ "$outdir" != "$dir" ]; then
      cp -f "$dir/vmlinuz" "$dir/initrd.img" "$dir/MANIFEST" "$outdir/"
      dir=$outdir
    fi
  fi
  echo "$dir"
}

key=$(key_of)
if [ -s "$cache_root/$key/MANIFEST" ]; then
  log "cached: $cache_root/$key"
  publish "$cache_root/$key"
  exit 0
fi

mkdir -p "$cache_root/debs"
work=$(mktemp -d "$cache_root/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# download PKG VERSION: into the deb cache (kept across keys); prints the path.
download() {
  local pkg=$1 ver=$2 f
  f=$(find "$cache_root/debs" -maxdepth 1 -name "${pkg}_*.deb" -print | while read -r d; do
    if [ "$(dpkg-deb -f "$d" Version)" = "$ver" ]; then echo "$d"; fi
  done | head -1)
  if [ -z "$f" ]; then
    log "apt-get download $pkg=$ver"
    mkdir -p "$work/dl"
    chmod 0777 "$work/dl" # lets apt's _apt user write there (no sandbox warning)
    (cd "$work/dl" && apt-get download -q "$pkg=$ver") >"$work/apt.log" 2>&1 || return 1
    f=$(find "$work/dl" -maxdepth 1 -name "${pkg}_*.deb" -print | head -1)
    [ -n "$f" ] || return 1
    mv "$f" "$cache_root/debs/"
    f=$cache_root/debs/$(basename "$f")
  fi
  echo "$f"
}

fetch_all() {
  kernel_deb=$(download "$kernel_pkg" "$kernel_ver") &&
    busybox_deb=$(download "$busybox_pkg" "$busybox_ver")
}
if ! fetch_all; then
  # Package lists older than the mirror: refresh, re-resolve, try again.
  sed 's/^/  apt: /' "$work/apt.log" >&2 || true
  apt_update
  resolve_versions || die "cannot resolve package versions after apt-get update"
  key=$(key_of)
  if [ -s "$cache_root/$key/MANIFEST" ]; then publish "$cache_root/$key"; exit 0; fi
  fetch_all || { sed 's/^/  apt: /' "$work/apt.log" >&2; die "apt-get download failed"; }
fi

log "unpacking $kernel_pkg $kernel_ver and $busybox_pkg $busybox_ver"
dpkg-deb -x "$busybox_deb" "$work/bb"
bb=$work/bb/bin/busybox
[ -x "$bb" ] || die "no bin/busybox in $busybox_deb"
dpkg-deb -x "$kernel_deb" "$work/k"
kver=$(find "$work/k/boot" -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' | sed 's/^vmlinuz-//' | head -1)
[ -n "$kver" ] || die "no boot/vmlinuz-* in $kernel_deb"
moddir=$work/k/lib/modules/$kver
[ -d "$moddir" ] || moddir=$work/k/usr/lib/modules/$kver # merged /usr (trixie)
[ -d "$moddir" ] || die "no modules for $kver in $kernel_deb"

root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/udhcpc,etc/vireo,etc/acpi/PWRF,dev,proc,sys,tmp,run,mnt,root,var/log,var/run}
cp "$bb" "$root/bin/busybox"
"$bb" --list-full | while read -r applet; do
  [ "$applet" = bin/busybox ] || [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
install -m 0755 "$init_script" "$root/init"

cat >"$root/etc/udhcpc/default.script" <<'EOF'
#!/bin/sh
# udhcpc hook (busybox): sets eth0's address, default route and resolver.
case "$1" in
deconfig)
	ip -4 addr flush dev "$interface"
	ip link set "$interface" up
	;;
bound | renew)
	[ "$1" = bound ] && ip -4 addr flush dev "$interface"
	ip addr replace "$ip/${mask:-24}" ${broadcast:+broadcast "$broadcast"} dev "$interface"
	if [ -n "$router" ]; then
		ip route del default dev "$interface" 2>/dev/null
		for r in $router; do ip route add default via "$r" dev "$interface" && break; done
	fi
	: >/etc/resolv.conf
	for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
	;;
esac
exit 0
EOF
chmod 0755 "$root/etc/udhcpc/default.script"

cat >"$root/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
# ACPI power button (busybox acpid): ask init (PID 1) to power off.
kill -USR2 1
EOF
chmod 0755 "$root/etc/acpi/PWRF/00000080"

echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"
printf '127.0.0.1 localhost\n127.0.1.1 vireo-guest\n' >"$root/etc/hosts"

# Modules: builtin ones skipped; the rest copied with their dependencies.
norm() { echo "${1//-/_}"; }
builtin_names=" $(sed 's#.*/##; s#\.ko.*##; s#-#_#g' "$moddir/modules.builtin" | tr '\n' ' ') "
declare -A ko_path=()
while IFS= read -r f; do
  n=$(basename "$f"); n=${n%%.ko*}
  ko_path[$(norm "$n")]=$f
done < <(cd "$moddir" && find kernel -name '*.ko*')
declare -A loaded=()
load_order=() builtin_list=() missing_list=()
add_module() { # depth-first: dependencies first
  local m; m=$(norm "$1")
  [ -n "${loaded[$m]:-}" ] && return 0
  loaded[$m]=1
  if [[ $builtin_names == *" $m "* ]]; then builtin_list+=("$m"); return 0; fi
  local f=${ko_path[$m]:-}
  if [ -z "$f" ]; then missing_list+=("$m"); return 0; fi
  local deps d
  deps=$(tr '\0' '\n' <"$moddir/$f" | sed -n 's/^depends=//p' | head -1)
  for d in ${deps//,/ }; do add_module "$d"; done
  mkdir -p "$root/lib/modules/$kver/$(dirname "$f")"
  cp "$moddir/$f" "$root/lib/modules/$kver/$f"
  load_order+=("$m")
}
for m in "${want_modules[@]}"; do add_module "$m"; done
[ ${#missing_list[@]} -eq 0 ] || die "modules neither built in nor in $kernel_pkg: ${missing_list[*]}"
cp "$moddir/modules.builtin" "$moddir/modules.order" "$root/lib/modules/$kver/"
[ -f "$moddir/modules.builtin.modinfo" ] && cp "$moddir/modules.builtin.modinfo" "$root/lib/modules/$kver/"
"$bb" depmod -b "$root" "$kver" || die "busybox depmod failed"
printf '%s\n' "${load_order[@]}" >"$root/etc/vireo/modules"

cat >"$root/etc/vireo/image" <<EOF
kernel=$kernel_pkg $kernel_ver ($kver)
busybox=$busybox_pkg $busybox_ver
key=$key
EOF

log "writing initrd.img (busybox cpio, newc, gzip)"
find "$root" -exec touch -h -d @0 {} + # fixed mtimes (busybox cpio still records inode numbers)
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | "$bb" cpio -o -H newc -R 0:0 2>/dev/null) |
  "$bb" gzip -9 >"$work/out.initrd"

out=$work/out
mkdir -p "$out"
cp "$work/k/boot/vmlinuz-$kver" "$out/vmlinuz"
mv "$work/out.initrd" "$out/initrd.img"
cp "$work/k/boot/config-$kver" "$out/config"
{
  echo "# Vireo guest image, built by scripts/guest-image.sh"
  echo "key $key"
  echo "kernel-package $kernel_pkg $kernel_ver"
  echo "kernel-meta-package $kernel_meta"
  echo "kernel-release $kver"
  echo "busybox-package $busybox_pkg $busybox_ver"
  echo "modules ${load_order[*]}"
  echo "builtin ${builtin_list[*]}"
  echo "vmlinuz sha256 $(sha256sum "$out/vmlinuz" | cut -d' ' -f1) $(stat -c %s "$out/vmlinuz")"
  echo "initrd.img sha256 $(sha256sum "$out/initrd.img" | cut -d' ' -f1) $(stat -c %s "$out/initrd.img")"
} >"$out/MANIFEST"

# Atomic publish: a concurrent build of the same key may have won.
if mv -T "$out" "$cache_root/$key" 2>/dev/null; then
  log "built $cache_root/$key"
else
  [ -s "$cache_root/$key/MANIFEST" ] || die "cannot publish $cache_root/$key"
fi
# Keep the three newest images, and only the .debs this build used.
find "$cache_root" -mindepth 1 -maxdepth 1 -type d -regextype posix-extended -regex '.*/[0-9a-f]{16}' -printf '%T@ %p\n' |
  sort -rn | tail -n +4 | cut -d' ' -f2- | while read -r old; do rm -rf "$old"; done
find "$cache_root/debs" -maxdepth 1 -name '*.deb' ! -path "$kernel_deb" ! -path "$busybox_deb" -delete
publish "$cache_root/$key"
