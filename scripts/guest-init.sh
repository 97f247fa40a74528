#!/bin/sh
# /init of Vireo's test guest: PID 1 of the initramfs that
# scripts/guest-image.sh builds (busybox only). See docs/guest-image.md.
#
# Lines starting with VIREO-GUEST- on the console are for tests to read:
#   VIREO-GUEST-READY                     user space is up (printed first)
#   VIREO-GUEST-KERNEL <uname -r>
#   VIREO-GUEST-CMDLINE <kernel command line>
#   VIREO-GUEST-IP <addr/prefix>|none     eth0 after DHCP or vireo.ip=
#   VIREO-GUEST-DISK ok <dev> <mountpoint> | VIREO-GUEST-DISK fail <dev> <why>
#   VIREO-GUEST-RUN-BEGIN / VIREO-GUEST-RUN-END rc=<n>   around vireo.run
#   VIREO-GUEST-SETUP-DONE                everything above finished
#   VIREO-GUEST-POWEROFF                  about to power off
#   VIREO-GUEST-AGENT started             /bin/vireo-guest-agent runs (if present)
#
# Command line flags (all optional):
#   vireo.mkfs=1|auto     mke2fs every /dev/vd? first (auto: only if it does not mount)
#   vireo.run="CMDS"      run CMDS with sh -c after set-up (use ' inside, not ")
#   vireo.halt=1          power off when set-up and vireo.run are done
#   vireo.net=0           leave eth0 down
#   vireo.ip=ADDR/PREFIX[,GATEWAY]   static address on eth0 instead of DHCP
#   vireo.dhcp_tries=N    DHCP discover packets, one a second (default 5)
#   vireo.timer=0         do not write the boot-timer byte
#   vireo.shell=1         keep a shell on the console afterwards
#   vireo.acpi=0          ignore the ACPI power button (no acpid)
#   vireo.debug=1         trace this script (set -x)

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root
umask 022

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mount -t tmpfs -o mode=0755 tmpfs /dev
[ -c /dev/console ] || mknod -m 600 /dev/console c 5 1
[ -c /dev/null ] || mknod -m 666 /dev/null c 1 3
[ -c /dev/mem ] || mknod -m 640 /dev/mem c 1 1
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm /run /tmp /var/log /var/run /mnt
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs /tmp

# The value of a kernel command line parameter ("" if given without '='),
# with the kernel's double-quote rules; status 1 if it is absent.
param() {
	awk -v key="$1" '
	{
		s = $0; n = length(s); i = 1
		while (i <= n) {
			while (i <= n && substr(s, i, 1) == " ") i++
			if (i > n) break
			tok = ""; q = 0
			while (i <= n) {
				c = substr(s, i, 1)
				if (c == "\"") { q = !q; i++; continue }
				if (c == " " && !q) break
				tok = tok c; i++
			}
			eq = index(tok, "=")
			k = eq ? substr(tok, 1, eq - 1) : tok
			if (k == key) { found = 1; val = eq ? substr(tok, eq + 1) : "" }
		}
	}
	END { if (found) print val; exit !found }' /proc/cmdline
}

[ "$(param vireo.debug)" = 1 ] && set -x

# Boot-timer signal (Firecracker's convention): byte 123 written at physical
# address 0xC0000000. Harmless where nothing listens there.
[ "$(param vireo.timer)" = 0 ] || devmem 0xC0000000 8 123 2>/dev/null

echo "VIREO-GUEST-READY"
echo "VIREO-GUEST-KERNEL $(uname -r)"
echo "VIREO-GUEST-CMDLINE $(cat /proc/cmdline)"

hostname vireo-guest
# Modules (drivers the kernel package has as modules, see /etc/vireo/modules);
# modprobe also applies module options given on the kernel command line.
while read -r m; do
	[ -n "$m" ] && { modprobe "$m" || echo "vireo-init: modprobe $m failed"; }
done </etc/vireo/modules
# virtio-rng feeds the kernel's entropy pool by itself once loaded.

# Guest agent (docs/guest-agent.md), when the image has one: it finds the
# virtio-serial port (or vsock) itself; respawned if it dies.
if [ -x /bin/vireo-guest-agent ]; then
	(while :; do
		/bin/vireo-guest-agent </dev/null >>/var/log/vireo-guest-agent.log 2>&1
		sleep 1
	done) &
	echo "VIREO-GUEST-AGENT started"
fi

# shut_down poweroff|reboot: marker, lease released, disks unmounted, then the
# reboot(2) call itself (busybox poweroff -f / reboot -f).
shut_down() {
	trap '' USR1 USR2 TERM
	if [ "$1" = reboot ]; then echo "VIREO-GUEST-REBOOT"; else echo "VIREO-GUEST-POWEROFF"; fi
	[ -f /run/udhcpc.pid ] && kill "$(cat /run/udhcpc.pid)" 2>/dev/null
	sync
	awk '$2 ~ "^/mnt/" { print $2 }' /proc/mounts | while read -r m; do
		umount "$m" 2>/dev/null || mount -o remount,ro "$m" 2>/dev/null
	done
	"$1" -f
	sleep 5
}
# busybox poweroff/halt (without -f) send USR2/USR1 to init, reboot sends TERM.
trap 'shut_down poweroff' USR1 USR2
trap 'shut_down reboot' TERM
# Ctrl-Alt-Del (how vireo-vmm and Firecracker ask for a graceful stop, on
# the i8042): with ctrl-alt-del at 0 the kernel signals init (SIGINT)
# instead of rebooting at once, and init powers off.
echo 0 >/proc/sys/kernel/ctrl-alt-del 2>/dev/null
trap 'shut_down poweroff' INT

# ACPI power button (QEMU system_powerdown): the kernel's button driver
# reports KEY_POWER on an input device; busybox acpid runs
# /etc/acpi/PWRF/00000080, which signals init to power off.
# vireo.acpi=0: nobody reads the button, so the guest ignores it.
if [ "$(param vireo.acpi)" = 0 ]; then
	echo "vireo-init: vireo.acpi=0, ACPI power button ignored"
elif ls /dev/input/event* >/dev/null 2>&1; then
	acpid -l /var/log/acpid.log
else
	echo "vireo-init: no input device, ACPI power button not watched"
fi

# Network.
ip link set lo up
if [ "$(param vireo.net)" != 0 ]; then
	n=0
	while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 10 ]; do sleep 0.1; n=$((n + 1)); done
fi
if [ "$(param vireo.net)" != 0 ] && [ -e /sys/class/net/eth0 ]; then
	ip link set eth0 up
	static=$(param vireo.ip)
	if [ -n "$static" ]; then
		ip addr add "${static%%,*}" dev eth0
		case "$static" in *,*) ip route add default via "${static#*,}" dev eth0 ;; esac
	else
		tries=$(param vireo.dhcp_tries) || tries=5
		udhcpc -i eth0 -s /etc/udhcpc/default.script -p /run/udhcpc.pid \
			-n -t "$tries" -T 1 -x hostname:vireo-guest >/var/log/udhcpc.log 2>&1 ||
			echo "vireo-init: no DHCP lease on eth0"
	fi
	addr=$(ip -4 -o addr show dev eth0 | awk '{ print $4; exit }')
	echo "VIREO-GUEST-IP ${addr:-none}"
fi

# Disks: every virtio disk /dev/vdX is mounted on /mnt/vdX.
mkfs=$(param vireo.mkfs)
for dev in /dev/vd[a-z]; do
	[ -b "$dev" ] || continue
	name=${dev#/dev/}
	mnt=/mnt/$name
	mkdir -p "$mnt"
	case "$mkfs" in
	1 | yes | on)
		mke2fs -F -q "$dev" >/dev/null 2>/tmp/mkfs.err ||
			{ echo "VIREO-GUEST-DISK fail $name mke2fs: $(cat /tmp/mkfs.err)"; continue; }
		;;
	auto)
		if mount "$dev" "$mnt" 2>/dev/null; then umount "$mnt"; else
			mke2fs -F -q "$dev" >/dev/null 2>/tmp/mkfs.err ||
				{ echo "VIREO-GUEST-DISK fail $name mke2fs: $(cat /tmp/mkfs.err)"; continue; }
		fi
		;;
	esac
	if mount "$dev" "$mnt" 2>/tmp/mount.err; then
		echo "VIREO-GUEST-DISK ok $name $mnt"
	else
		echo "VIREO-GUEST-DISK fail $name mount: $(cat /tmp/mount.err)"
	fi
done

run=$(param vireo.run)
if [ -n "$run" ]; then
	echo "VIREO-GUEST-RUN-BEGIN"
	# In the background so that a power-off signal (poweroff inside it,
	# the power button) interrupts 'wait' instead of waiting for it.
	(cd /root 2>/dev/null || cd /; exec sh -c "$run") </dev/console &
	wait $!
	echo "VIREO-GUEST-RUN-END rc=$?"
fi

echo "VIREO-GUEST-SETUP-DONE"
[ "$(param vireo.halt)" = 1 ] && shut_down poweroff

if [ "$(param vireo.shell)" = 1 ]; then
	while :; do setsid cttyhack sh -l; done &
fi
# Stay PID 1; 'wait' returns at once when a trapped signal arrives.
while :; do
	sleep 3600 &
	wait $!
done
