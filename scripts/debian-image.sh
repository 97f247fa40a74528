#!/usr/bin/env bash
# Builds Vireo's Debian 12 (bookworm) disk guest: a qcow2 disk with a GPT, a
# BIOS boot path (GRUB i386-pc core.img in a BIOS-boot partition, boot.img in
# the MBR) and an EFI path (\EFI\BOOT\BOOTX64.EFI), holding the cloud kernel,
# systemd, cloud-init (NoCloud), openssh-server and qemu-guest-agent. Debian
# packages from the apt mirror only; no loop devices and no mounts of the
# image: mmdebstrap into a directory, `mkfs.ext4 -d`, an ESP by mkfs.vfat and
# mtools, the GPT by sfdisk, partitions placed with dd, `qemu-img convert`.
#
#   scripts/debian-image.sh [DEST]
#
# The result is cached in ${VIREO_GUEST_CACHE:-$HOME/.cache/vireo-guest}/debian-KEY/
# (debian.qcow2, MANIFEST), KEY hashing this script (the recipe), the package
# list and the mirror lines; an unchanged input returns at once. With DEST (a
# directory, or a file name ending in .qcow2) the image is copied there.
# Progress goes to stderr; the last line on stdout is the cache directory, or
# DEST:
#
#   dir=$(scripts/debian-image.sh | tail -1)    # $dir/debian.qcow2
#
# On the guest's serial console (ttyS0): GRUB, the kernel, then
#   VIREO-DEBIAN-READY <IPv4 of eth0>     (multi-user.target reached, DHCP done)
# and a getty's `login:`. /etc/vireo-image-release holds the key.
#
# Environment: VIREO_GUEST_CACHE (cache root), VIREO_DEBIAN_MIRROR (default
# http://deb.debian.org/debian), VIREO_DEBIAN_SECURITY (default
# http://deb.debian.org/debian-security; "none" leaves it out),
# VIREO_DEBIAN_DISK_SIZE (virtual size, default 3G). See docs/guests.md.
set -euo pipefail

cache_root=${VIREO_GUEST_CACHE:-${HOME:-/root}/.cache/vireo-guest}
mirror=${VIREO_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${VIREO_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
disk_size=${VIREO_DEBIAN_DISK_SIZE:-3G}
suite=bookworm
dest=${1:-}

packages=(
  linux-image-cloud-amd64 systemd systemd-sysv systemd-resolved udev dbus
  cloud-init cloud-guest-utils openssh-server qemu-guest-agent
  iproute2 netbase ca-certificates sudo less procps efibootmgr e2fsprogs dosfstools
)
mirror_lines=("deb $mirror $suite main" "deb $mirror $suite-updates main")
[ "$security" = none ] || mirror_lines+=("deb $security $suite-security main")

# Tools on the host (package: command).
declare -A tools=(
  [mmdebstrap]=mmdebstrap [grub-pc-bin]=/usr/lib/grub/i386-pc/boot.img
  [grub-efi-amd64-bin]=/usr/lib/grub/x86_64-efi/linux.mod [grub-common]=grub-mkimage
  [mtools]=mcopy [dosfstools]=mkfs.vfat [e2fsprogs]=mkfs.ext4 [fdisk]=sfdisk
  [qemu-utils]=qemu-img [util-linux]=flock
)

log() { echo "debian-image: $*" >&2; }
die() { log "error: $*"; exit 1; }

sudo_cmd=()
[ "$(id -u)" -eq 0 ] || { command -v sudo >/dev/null 2>&1 && sudo_cmd=(sudo -n); }
as_root() { "${sudo_cmd[@]}" "$@"; }

publish() { # the cache directory -> DEST; the last stdout line
  local dir=$1
  if [ -n "$dest" ]; then
    if [[ $dest == *.qcow2 ]]; then
      mkdir -p "$(dirname "$dest")"
      cp -f "$dir/debian.qcow2" "$dest"
    else
      mkdir -p "$dest"
      cp -f "$dir/debian.qcow2" "$dir/MANIFEST" "$dest/"
    fi
    dir=$(cd "$(dirname "$dest")" && pwd)/$(basename "$dest")
  fi
  echo "$dir"
}

key=$({
  cat "$0"
  printf 'package %s\n' "${packages[@]}"
  printf 'mirror %s\n' "${mirror_lines[@]}"
  echo "size $disk_size"
} | sha256sum | cut -c1-16)
out=$cache_root/debian-$key
if [ -s "$out/MANIFEST" ] && [ -s "$out/debian.qcow2" ]; then
  log "cached: $out"
  publish "$out"
  exit 0
fi

missing=()
for p in "${!tools[@]}"; do
  t=${tools[$p]}
  if [[ $t == /* ]]; then [ -e "$t" ] || missing+=("$p"); else
    command -v "$t" >/dev/null 2>&1 || [ -x "/usr/sbin/$t" ] || [ -x "/sbin/$t" ] || missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  as_root apt-get update -qq >&2 || die "apt-get update failed"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 ||
    die "cannot install ${missing[*]}"
fi
export PATH=$PATH:/usr/sbin:/sbin

mkdir -p "$cache_root"
exec 9>"$cache_root/.debian.lock"
if ! flock -n 9; then
  log "waiting for another build (lock $cache_root/.debian.lock)"
  flock 9
fi
if [ -s "$out/MANIFEST" ] && [ -s "$out/debian.qcow2" ]; then # built while we waited
  log "cached: $out"
  publish "$out"
  exit 0
fi

start=$(date +%s)
work=$(mktemp -d "$cache_root/.debian-build.XXXXXX")
cleanup() { as_root rm -rf "$work"; }
trap cleanup EXIT
rootdir=$work/root

# Stable identities derived from the key: the same inputs give the same
# filesystem UUIDs (tests and fstab can name them; each VM's overlay keeps them).
hex=$(printf 'vireo-debian-%s' "$key" | sha256sum | cut -c1-40)
root_uuid=${hex:0:8}-${hex:8:4}-4${hex:13:3}-8${hex:17:3}-${hex:20:12}
esp_id=${hex:32:8} # FAT volume id, shown as XXXX-XXXX
esp_uuid=${esp_id:0:4}-${esp_id:4:4}
esp_uuid=${esp_uuid^^}
cmdline="root=UUID=$root_uuid ro console=tty0 console=ttyS0,115200n8 net.ifnames=0"

# --- 1. The root filesystem (mmdebstrap, root mode, into a directory) ---------
log "mmdebstrap $suite (${#packages[@]} packages and their dependencies)"
pkgs=$(IFS=,; echo "${packages[*]}")
# The configuration that is the image's, written by a customize hook in the chroot.
cat >"$work/customize.sh" <<'HOOK'
#!/bin/sh
# mmdebstrap customize hook: $1 is the root directory.
set -eu
r=$1
echo debian >"$r/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$r/etc/hosts"
mkdir -p "$r/boot/efi" "$r/boot/grub"

# cloud-init: NoCloud only (None is the no-seed fallback, so a VM without a
# seed still boots cleanly and gets SSH host keys); C.UTF-8 is the only
# locale generated; /etc/hosts follows the hostname (sudo resolves it).
cat >"$r/etc/cloud/cloud.cfg.d/90_vireo.cfg" <<'EOF'
# Vireo (scripts/debian-image.sh)
datasource_list: [ NoCloud, None ]
locale: C.UTF-8
manage_etc_hosts: true
EOF
echo 'LANG=C.UTF-8' >"$r/etc/default/locale"

# DHCP on the first NIC (eth0: classic names, net.ifnames=0 on the cmdline).
mkdir -p "$r/etc/systemd/network"
cat >"$r/etc/systemd/network/90-vireo-eth0.network" <<'EOF'
# Vireo: DHCP on the first NIC (scripts/debian-image.sh).
[Match]
Name=eth0

[Network]
DHCP=yes
EOF
chroot "$r" systemctl enable systemd-networkd.service systemd-resolved.service >/dev/null 2>&1
# A VM without a NIC, or whose network gives no address, boots on after
# 30 s instead of waiting on systemd-networkd-wait-online for minutes.
mkdir -p "$r/etc/systemd/system/systemd-networkd-wait-online.service.d"
cat >"$r/etc/systemd/system/systemd-networkd-wait-online.service.d/90-vireo.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=30
EOF
chroot "$r" systemctl enable serial-getty@ttyS0.service >/dev/null 2>&1
ln -sf ../run/systemd/resolve/stub-resolv.conf "$r/etc/resolv.conf"

# SSH host keys, should cloud-init not make them (it does on its first boot).
cat >"$r/etc/systemd/system/vireo-ssh-keygen.service" <<'EOF'
[Unit]
Description=Vireo: SSH host keys if none exist
After=cloud-init.service
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=ssh.service
EOF
chroot "$r" systemctl enable vireo-ssh-keygen.service >/dev/null 2>&1

# The marker tests wait for on the serial console.
cat >"$r/usr/local/sbin/vireo-ready" <<'EOF'
#!/bin/sh
# Prints "VIREO-DEBIAN-READY <IPv4 of eth0>" on ttyS0 once multi-user.target
# is reached and eth0 has its DHCP address (or "VIREO-DEBIAN-NO-ADDRESS eth0"
# after 120 s without one). Booted by EFI, it first counts the boots in the
# non-volatile EFI variable VireoTest (vireo-efivar-test) and prints
# "VIREO-EFI-BOOTS previous=<count before|none> now=<count>": the variable
# lives in the Domain's NVRAM file, so a stop and start keeps counting.
# scripts/debian-image.sh
if [ -d /sys/firmware/efi/efivars ]; then
  prev=$(/usr/local/sbin/vireo-efivar-test get 2>/dev/null || echo none)
  case $prev in '' | *[!0-9]*) n=1 ;; *) n=$((prev + 1)) ;; esac
  /usr/local/sbin/vireo-efivar-test set "$n" 2>/dev/null || n=unwritable
  echo "VIREO-EFI-BOOTS previous=${prev:-none} now=$n" >/dev/ttyS0 2>/dev/null || true
fi
i=0
while :; do
  ip=$(ip -4 -o addr show dev eth0 scope global 2>/dev/null | awk '{ sub("/.*", "", $4); print $4; exit }')
  [ -n "$ip" ] && break
  i=$((i + 1))
  if [ "$i" -ge 240 ]; then
    echo "VIREO-DEBIAN-NO-ADDRESS eth0" | tee /dev/kmsg >/dev/ttyS0 2>/dev/null
    exit 0
  fi
  sleep 0.5
done
echo "VIREO-DEBIAN-READY $ip" >/dev/ttyS0 2>/dev/null || true
echo "VIREO-DEBIAN-READY $ip"
EOF
chmod 0755 "$r/usr/local/sbin/vireo-ready"
cat >"$r/etc/systemd/system/vireo-ready.service" <<'EOF'
[Unit]
Description=Vireo: READY marker on ttyS0
DefaultDependencies=no
After=multi-user.target
Wants=network.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/vireo-ready
StandardOutput=journal

[Install]
WantedBy=multi-user.target
EOF
chroot "$r" systemctl enable vireo-ready.service >/dev/null 2>&1

# A test helper: sets and reads an EFI variable of Vireo's own vendor GUID
# through efivarfs (/sys/firmware/efi/efivars).
cat >"$r/usr/local/sbin/vireo-efivar-test" <<'EOF'
#!/bin/sh
# vireo-efivar-test set VALUE | get | delete
# A non-volatile EFI variable VireoTest-<Vireo GUID>; "get" prints its value
# (exit 1 if it is not set). Needs EFI firmware (OVMF) and efivarfs.
set -eu
d=/sys/firmware/efi/efivars
v=$d/VireoTest-5c0e1c2a-7d1e-4c56-9b8e-7669726f0001
[ -d "$d" ] || { echo "vireo-efivar-test: no $d (not booted by EFI?)" >&2; exit 2; }
case "${1:-}" in
set)
  [ -e "$v" ] && chattr -i "$v" 2>/dev/null || true
  t=$(mktemp)
  # attributes NON_VOLATILE|BOOTSERVICE_ACCESS|RUNTIME_ACCESS (0x7, LE), then the value
  printf '\007\000\000\000%s' "${2:?value}" >"$t"
  dd if="$t" of="$v" bs="$(stat -c %s "$t")" count=1 status=none # one write()
  rm -f "$t" ;;
get)
  [ -e "$v" ] || exit 1
  cat "$v" | tail -c +5; echo ;; # efivarfs files cannot seek
delete)
  [ -e "$v" ] || exit 0
  chattr -i "$v" 2>/dev/null || true
  rm -f "$v" ;;
*) echo "usage: vireo-efivar-test set VALUE | get | delete" >&2; exit 2 ;;
esac
EOF
chmod 0755 "$r/usr/local/sbin/vireo-efivar-test"

# Every VM makes its own identity.
rm -f "$r"/etc/ssh/ssh_host_*
: >"$r/etc/machine-id"
rm -f "$r/var/lib/dbus/machine-id"
rm -rf "$r/var/lib/cloud"/* "$r/var/log/cloud-init"*
HOOK
chmod 0755 "$work/customize.sh"

# /etc/fstab goes in before the packages (a setup hook), as an installer
# writes it. The initramfs still carries no fsck (its hook cannot resolve the
# root in a chroot): systemd-fsck-root checks the root, mounted read-only.
cat >"$work/fstab" <<EOF
# <file system>  <mount point>  <type>  <options>  <dump>  <pass>
UUID=$root_uuid  /          ext4  errors=remount-ro  0  1
UUID=$esp_uuid   /boot/efi  vfat  umask=0077,nofail  0  2
EOF
as_root mmdebstrap --mode=root --variant=apt --format=directory --components=main \
  --include="$pkgs" --aptopt='Acquire::Retries "3"' \
  --setup-hook="mkdir -p \"\$1/etc\" && cp $work/fstab \"\$1/etc/fstab\"" \
  --customize-hook="$work/customize.sh \"\$1\"" \
  "$suite" "$rootdir" "${mirror_lines[@]}" >"$work/mmdebstrap.log" 2>&1 || {
  tail -30 "$work/mmdebstrap.log" | sed 's/^/  mmdebstrap: /' >&2
  die "mmdebstrap failed"
}
log "root filesystem: $(as_root du -sm "$rootdir" | cut -f1) MiB, $(as_root chroot "$rootdir" dpkg-query -f '.\n' -W | wc -l) packages ($(($(date +%s) - start)) s)"

kver=$(find "$rootdir/boot" -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' | sed 's/^vmlinuz-//' | sort -V | tail -1)
[ -n "$kver" ] || die "no /boot/vmlinuz-* in the root filesystem"
[ -e "$rootdir/vmlinuz" ] || as_root ln -sf "boot/vmlinuz-$kver" "$rootdir/vmlinuz"
[ -e "$rootdir/initrd.img" ] || as_root ln -sf "boot/initrd.img-$kver" "$rootdir/initrd.img"
[ -e "$rootdir/boot/initrd.img-$kver" ] || die "no /boot/initrd.img-$kver in the root filesystem"

# GRUB's menu, read by both boot paths from the root filesystem. It boots the
# /vmlinuz and /initrd.img links, which Debian's kernel packages update, so a
# kernel upgrade inside the guest keeps booting.
as_root tee "$rootdir/boot/grub/grub.cfg" >/dev/null <<EOF
# Vireo Debian guest (scripts/debian-image.sh); both the BIOS and the EFI GRUB read this.
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
set default=0
menuentry 'Debian GNU/Linux 12' {
	search --no-floppy --fs-uuid --set=root $root_uuid
	echo 'Loading Linux ...'
	linux /vmlinuz $cmdline
	initrd /initrd.img
}
EOF
{
  echo "key=$key"
  echo "built-by=scripts/debian-image.sh"
  echo "suite=$suite"
  echo "kernel=$kver"
  echo "root-uuid=$root_uuid"
} | as_root tee "$rootdir/etc/vireo-image-release" >/dev/null

# --- 2. Boot loaders ----------------------------------------------------------
log "grub-mkimage (i386-pc core.img, x86_64-efi BOOTX64.EFI)"
cat >"$work/embedded.cfg" <<EOF
search --no-floppy --fs-uuid --set=root $root_uuid
set prefix=(\$root)/boot/grub
EOF
grub_mods=(part_gpt part_msdos ext2 fat search search_fs_uuid configfile normal linux
  serial terminal echo test gzio minicmd)
grub-mkimage -O i386-pc -o "$work/core.img" -c "$work/embedded.cfg" -p /boot/grub \
  "${grub_mods[@]}" biosdisk
grub-mkimage -O x86_64-efi -o "$work/BOOTX64.EFI" -c "$work/embedded.cfg" -p /boot/grub \
  "${grub_mods[@]}" efi_gop efi_uga
core_size=$(stat -c %s "$work/core.img")
((core_size <= 1024 * 1024 - 512)) || die "core.img is $core_size bytes, larger than the BIOS-boot partition"

# --- 3. Filesystems into files -------------------------------------------------
# Layout (512-byte sectors): 1 MiB GPT gap, BIOS boot 1 MiB, ESP 126 MiB, root to the end.
size_bytes=$(numfmt --from=iec "${disk_size%B}")
bios_start=2048 bios_sectors=2048
esp_start=4096 esp_sectors=$((126 * 2048))
root_start=$((128 * 2048))
root_sectors=$((size_bytes / 512 - root_start - 34)) # the backup GPT's 33 sectors
root_sectors=$((root_sectors / 2048 * 2048))

log "mkfs.vfat ESP, mtools"
mkfs.vfat -F 32 -n EFI -i "$esp_id" -C "$work/esp.img" $((esp_sectors / 2)) >/dev/null
mmd -i "$work/esp.img" ::/EFI ::/EFI/BOOT
mcopy -i "$work/esp.img" "$work/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI

log "mkfs.ext4 -d (root, $((root_sectors / 2048)) MiB)"
# GRUB 2.06 cannot read metadata_csum_seed or orphan_file (newer e2fsprogs'
# defaults); e2fsprogs older than 1.47 does not know orphan_file.
truncate -s $((root_sectors * 512)) "$work/root.img"
mkroot() {
  as_root mkfs.ext4 -q -F -L root -U "$root_uuid" "$@" -E root_owner=0:0 -d "$rootdir" "$work/root.img"
}
mkroot -O ^metadata_csum_seed,^orphan_file 2>/dev/null || mkroot -O ^metadata_csum_seed || die "mkfs.ext4 -d failed"

# --- 4. The disk: GPT, MBR boot code, partitions at their offsets -------------
log "sfdisk GPT, boot.img, dd"
truncate -s "$size_bytes" "$work/disk.raw"
sfdisk -q --no-reread --no-tell-kernel "$work/disk.raw" >/dev/null <<EOF
label: gpt
start=$bios_start, size=$bios_sectors, type=21686148-6449-6E6F-744E-656564454649, name="bios"
start=$esp_start, size=$esp_sectors, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="esp"
start=$root_start, size=$root_sectors, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name="root"
EOF
dd if="$work/esp.img" of="$work/disk.raw" bs=1M seek=$((esp_start / 2048)) conv=notrunc,sparse status=none
dd if="$work/root.img" of="$work/disk.raw" bs=1M seek=$((root_start / 2048)) conv=notrunc,sparse status=none
rm -f "$work/esp.img" "$work/root.img"

# BIOS: what grub-bios-setup would do on a block device. core.img into the
# BIOS-boot partition with its first blocklist pointing at its own second
# sector (grub-mkimage wrote its length); boot.img's 440 bytes of code into the MBR (the partition table
# stays), with core.img's sector at 0x5c and the jump taken for floppies
# (0x66) replaced by two NOPs, as grub-bios-setup does for hard disks.
le64() { local v=$1 i; for i in 0 1 2 3 4 5 6 7; do printf "\\x$(printf %02x $(((v >> (8 * i)) & 255)))"; done; }
cp "$work/core.img" "$work/core.patched"
le64 $((bios_start + 1)) | dd of="$work/core.patched" bs=1 seek=500 conv=notrunc status=none
dd if="$work/core.patched" of="$work/disk.raw" bs=512 seek=$bios_start conv=notrunc status=none
cp /usr/lib/grub/i386-pc/boot.img "$work/boot.img"
le64 $bios_start | dd of="$work/boot.img" bs=1 seek=$((0x5c)) conv=notrunc status=none
printf '\x90\x90' | dd of="$work/boot.img" bs=1 seek=$((0x66)) conv=notrunc status=none
dd if="$work/boot.img" of="$work/disk.raw" bs=440 count=1 conv=notrunc status=none

log "qemu-img convert -O qcow2 (zstd)"
mkdir -p "$work/out"
qemu-img convert -f raw -O qcow2 -c -o compression_type=zstd "$work/disk.raw" "$work/out/debian.qcow2"
rm -f "$work/disk.raw"

{
  echo "# Vireo Debian guest disk, built by scripts/debian-image.sh"
  echo "key $key"
  echo "suite $suite"
  printf 'mirror %s\n' "${mirror_lines[@]}"
  echo "packages ${packages[*]}"
  echo "kernel $kver"
  echo "cmdline $cmdline"
  echo "root-uuid $root_uuid"
  echo "esp-uuid $esp_uuid"
  echo "layout gpt: bios-boot ${bios_start}s+${bios_sectors}s, esp ${esp_start}s+${esp_sectors}s, root ${root_start}s+${root_sectors}s"
  echo "virtual-size $size_bytes"
  echo "debian.qcow2 sha256 $(sha256sum "$work/out/debian.qcow2" | cut -d' ' -f1) $(stat -c %s "$work/out/debian.qcow2")"
  echo "build-seconds $(($(date +%s) - start))"
  echo "installed:"
  as_root chroot "$rootdir" dpkg-query -W -f '  ${Package} ${Version}\n'
} >"$work/out/MANIFEST"

# Atomic publish; keep the two newest Debian images.
mv -T "$work/out" "$out" || die "cannot publish $out"
log "built $out in $(($(date +%s) - start)) s"
find "$cache_root" -mindepth 1 -maxdepth 1 -type d -name 'debian-*' -printf '%T@ %p\n' |
  sort -rn | tail -n +3 | cut -d' ' -f2- | while read -r old; do rm -rf "$old"; done
publish "$out"
