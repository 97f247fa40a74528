#!/usr/bin/env python3
"""Check the Vireo test guest under QEMU (-M microvm) and, optionally, the
64-bit ELF entry under /dev/kvm with kvm-run64.

    vmm/guest/tools/qemu-test.py [--accel tcg,kvm] [--out DIR] [--no-kvm-run64]

Builds the guest with vmm/guest/build.sh, runs each scenario, prints the
guest's console lines and one PASS/FAIL line per check, and exits non-zero
if any check failed. Needs qemu-system-x86_64 and python3 only.
"""
import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST = os.path.dirname(HERE)

results = []


def check(name, ok, detail=""):
    results.append((name, ok))
    print("%s %s%s" % ("PASS" if ok else "FAIL", name, (": " + detail) if detail else ""), flush=True)


def qemu_cmd(elf, accel, append, extra):
    return [
        "qemu-system-x86_64",
        "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off,pit=on,pic=on,acpi=off,"
              "ioapic2=off,auto-kernel-cmdline=off",
        "-accel", accel, "-nodefaults", "-no-user-config", "-nographic",
        "-serial", "stdio", "-m", "32",
        # QEMU's virtio-mmio is legacy (version 1) unless told otherwise
        "-global", "virtio-mmio.force-legacy=false",
        "-kernel", elf, "-append", append,
    ] + extra


class Qemu:
    """QEMU in the background; console output collected line by line."""

    def __init__(self, cmd):
        print("$ " + " ".join(("'%s'" % c) if " " in c else c for c in cmd), flush=True)
        self.p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        self.lines = []
        self.cv = threading.Condition()
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self):
        for raw in self.p.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with self.cv:
                self.lines.append(line)
                self.cv.notify_all()
        with self.cv:
            self.cv.notify_all()

    def wait_for(self, text, timeout):
        end = time.time() + timeout
        with self.cv:
            while True:
                if any(text in l for l in self.lines):
                    return True
                left = end - time.time()
                if left <= 0 or (self.p.poll() is not None and not self.t.is_alive()):
                    return any(text in l for l in self.lines)
                self.cv.wait(min(left, 0.2))

    def cpu_seconds(self):
        with open("/proc/%d/stat" % self.p.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.t.join(2)
        for l in self.lines:
            if l.strip():
                print("    | " + l)


def monitor_sendkey(path, key):
    s = socket.socket(socket.AF_UNIX)
    for _ in range(50):
        try:
            s.connect(path)
            break
        except OSError:
            time.sleep(0.1)
    time.sleep(0.3)
    s.recv(65536)
    s.sendall(("sendkey %s\n" % key).encode())
    time.sleep(0.5)
    s.close()


def pattern():
    p = bytearray(i & 0xFF for i in range(512))
    p[0:17] = b"VIREO-TEST-SECTOR"
    return bytes(p)


def scenario_devices(elf, accel, tmp):
    disk = os.path.join(tmp, "disk.raw")
    rodisk = os.path.join(tmp, "disk-ro.raw")
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    with open(rodisk, "wb") as f:
        f.write(b"read-only disk".ljust(512, b"\0"))
        f.truncate(64 << 10)
    q = Qemu(qemu_cmd(elf, accel, "console=ttyS0 vireo.test=devices", [
        "-device", "virtio-blk-device,drive=d0",
        "-drive", "if=none,id=d0,file=%s,format=raw" % disk,
        "-device", "virtio-blk-device,drive=d1",
        "-drive", "if=none,id=d1,file=%s,format=raw,readonly=on" % rodisk,
        "-device", "virtio-rng-device",
        "-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0",
    ]))
    q.wait_for("VIREO-TEST idle:", 60)
    q.stop()
    out = "\n".join(q.lines)
    want = [
        "VIREO-TEST-GUEST-READY",
        "VIREO-TEST cmdline: console=ttyS0 vireo.test=devices",
        "VIREO-TEST memory: 32383 KiB in ",
        "VIREO-TEST entry: pvh",
        "VIREO-TEST net0: mac=52:54:00:12:34:56 tx=ok",
        "VIREO-TEST rng0: read=64 nonzero=yes",
        # QEMU fills slots from the top: the last -device gets the lowest slot
        "VIREO-TEST blk1: capacity=2048 write=ok read=ok verify=ok flush=ok",
        "VIREO-TEST blk0: capacity=128 readonly write=refused read=ok",
        "VIREO-TEST-GUEST-DONE devices=4",
    ]
    missing = [w for w in want if w not in out]
    check("%s devices" % accel, not missing, "missing %r" % missing if missing else "")
    with open(disk, "rb") as f:
        f.seek(512)
        got = f.read(512)
    check("%s disk pattern at offset 512" % accel, got == pattern())


def scenario_cad(elf, accel, tmp, tick):
    sock = os.path.join(tmp, "mon-%s-%d.sock" % (accel, tick))
    append = "vireo.tick=1" if tick else "console=ttyS0"
    q = Qemu(qemu_cmd(elf, accel, append, [
        "-device", "i8042", "-monitor", "unix:%s,server,nowait" % sock]))
    ok = q.wait_for("VIREO-TEST idle:", 60)
    time.sleep(1)
    c0 = q.cpu_seconds()
    time.sleep(4)
    c1 = q.cpu_seconds()
    monitor_sendkey(sock, "ctrl-alt-delete")
    ok = q.wait_for("VIREO-TEST ctrl-alt-del: powering off", 10) and ok
    q.stop()
    mode = "pic+pit" if tick else "ioapic"
    check("%s idle irq=%s" % (accel, mode), any(("irq=" + mode) in l for l in q.lines))
    busy = (c1 - c0) / 4 * 100
    check("%s idle CPU (%s)" % (accel, mode), busy < 20, "%.1f%% of a core over 4 s" % busy)
    check("%s ctrl-alt-del (%s)" % (accel, mode), ok)


def scenario_echo(elf, accel, n=2000, window=32):
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    port_peer = rx.getsockname()[1]
    tmp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tmp.bind(("127.0.0.1", 0))
    port_qemu = tmp.getsockname()[1]
    tmp.close()
    q = Qemu(qemu_cmd(elf, accel, "vireo.echo=1", [
        "-netdev", "socket,id=n0,udp=127.0.0.1:%d,localaddr=127.0.0.1:%d" % (port_peer, port_qemu),
        "-device", "virtio-net-device,netdev=n0"]))
    rx.settimeout(60)
    ok = True
    detail = ""
    try:
        first, _ = rx.recvfrom(4096)
        first_ok = (first[0:6] == b"\xff" * 6 and first[12:14] == b"\x88\xb5"
                    and first[14:30] == b"VIREO-TEST-FRAME")
        check("%s broadcast frame 0x88b5 VIREO-TEST-FRAME" % accel, first_ok)
        gmac = first[6:12]
        me = bytes.fromhex("020000000001")
        q.wait_for("VIREO-TEST idle:", 30)
        rx.settimeout(2)
        sent = got = good = 0
        t0 = time.time()
        while got < n:
            while sent < n and sent - got < window:
                frame = gmac + me + b"\x88\xb5" + b"%08d" % sent + bytes(1000)
                rx.sendto(frame, ("127.0.0.1", port_qemu))
                sent += 1
            try:
                r, _ = rx.recvfrom(4096)
            except socket.timeout:
                break
            got += 1
            if r[0:6] == me and r[6:12] == gmac and r[12:14] == b"\x88\xb5":
                good += 1
        dt = time.time() - t0
        ok = good == n
        detail = "%d/%d frames echoed with MACs swapped, %.0f frames/s (window %d, 1014-byte frames)" % (
            good, n, got / dt if dt else 0, window)
    except socket.timeout:
        ok = False
        detail = "no frame from the guest"
    q.stop()
    rx_lines = [l for l in q.lines if "rx len=" in l]
    check("%s rx lines (first 8 only)" % accel, len(rx_lines) == 8, "%d lines" % len(rx_lines))
    check("%s echo" % accel, ok, detail)


def scenario_netbench(elf, accel, n=200, size=60):
    """vireo.netbench=N,SIZE: N frames of SIZE bytes, numbered 0..N-1, then the netbench line."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    rx.bind(("127.0.0.1", 0))
    port_peer = rx.getsockname()[1]
    q = Qemu(qemu_cmd(elf, accel, "vireo.netbench=%d,%d" % (n, size), [
        "-netdev", "socket,id=n0,udp=127.0.0.1:%d,localaddr=127.0.0.1:0" % port_peer,
        "-device", "virtio-net-device,netdev=n0"]))
    rx.settimeout(60)
    seqs = []
    bad = 0
    try:
        while len(seqs) < n:
            f, _ = rx.recvfrom(4096)
            rx.settimeout(5)
            if f[12:14] != b"\x88\xb5" or f[14:28] != b"VIREO-NETBENCH":
                continue  # the greeting frame
            if len(f) != size or f[0:6] != b"\xff" * 6:
                bad += 1
            seqs.append(int.from_bytes(f[28:32], "big"))
    except socket.timeout:
        pass
    line_ok = q.wait_for("VIREO-TEST netbench sent=%d cycles=" % n, 30)
    done_ok = q.wait_for("VIREO-TEST-GUEST-DONE", 10)
    q.stop()
    fail = [l for l in q.lines if "netbench" in l and "FAIL" in l]
    check("%s netbench line" % accel, line_ok and done_ok and not fail, "; ".join(fail))
    check("%s netbench frames" % accel, seqs == list(range(n)) and bad == 0,
          "%d frames, %d of the wrong size or destination, in order: %s" % (
              len(seqs), bad, seqs == sorted(seqs)))


def scenario_debugexit(elf, accel):
    cmd = qemu_cmd(elf, accel, "vireo.debugexit=1",
                   ["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
    print("$ " + " ".join(cmd), flush=True)
    times = []
    rc = None
    for _ in range(5):
        t0 = time.time()
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        times.append((time.time() - t0) * 1000)
        rc = r.returncode
    check("%s debugexit (QEMU exit status 1)" % accel, rc == 1,
          "wall time of the whole QEMU run: min %.0f ms, max %.0f ms over 5 runs" % (min(times), max(times)))


def scenario_kvm_run64(elf, out):
    exe = os.path.join(out, "kvm-run64")
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", exe,
                    os.path.join(HERE, "kvm-run64.c")], check=True)
    for cmdline, extra, want in [
        ("vireo.poweroff=1", [], "VIREO-TEST-GUEST-DONE devices=0"),
        ("console=ttyS0", ["--ctrl-alt-del", "1"], "VIREO-TEST ctrl-alt-del: powering off"),
        ("vireo.kbdtrace=1", ["--ctrl-alt-del", "1", "--set1", "1"], "VIREO-TEST ctrl-alt-del: powering off"),
        ("vireo.poweroff=1", ["--pvh", "1"], "VIREO-TEST-GUEST-DONE devices=0"),
        ("console=ttyS0", ["--pvh", "1", "--ctrl-alt-del", "1"], "VIREO-TEST ctrl-alt-del: powering off"),
    ]:
        cmd = [exe, elf, cmdline] + extra
        print("$ " + " ".join("'%s'" % c if " " in c else c for c in cmd), flush=True)
        r = subprocess.run(cmd, capture_output=True, timeout=60)
        for l in (r.stdout.decode() + r.stderr.decode()).splitlines():
            if l.strip():
                print("    | " + l)
        kind = "pvh" if "--pvh" in extra else "linux64"
        check("kvm-run64 %s entry '%s'%s" % (kind, cmdline, " (set 1)" if "--set1" in extra else ""),
              r.returncode == 0 and want in r.stdout.decode() and ("entry: " + kind) in r.stdout.decode())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--accel", default="tcg,kvm")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-kvm-run64", action="store_true")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="vireo-guest-")
    r = subprocess.run([os.path.join(GUEST, "build.sh"), out], capture_output=True, text=True, check=True)
    elf = r.stdout.strip().splitlines()[-1]
    print("guest: %s (%d bytes)" % (elf, os.path.getsize(elf)))
    kvm_ok = os.access("/dev/kvm", os.R_OK | os.W_OK)
    with tempfile.TemporaryDirectory(prefix="vireo-guest-run-") as tmp:
        for accel in args.accel.split(","):
            if accel == "kvm" and not kvm_ok:
                print("SKIP kvm: /dev/kvm not usable")
                continue
            scenario_devices(elf, accel, tmp)
            scenario_cad(elf, accel, tmp, tick=False)
            scenario_cad(elf, accel, tmp, tick=True)
            scenario_echo(elf, accel)
            scenario_netbench(elf, accel)
            scenario_debugexit(elf, accel)
        if kvm_ok and not args.no_kvm_run64:
            scenario_kvm_run64(elf, out)
        elif not kvm_ok:
            print("SKIP kvm-run64: /dev/kvm not usable")
    failed = [n for n, ok in results if not ok]
    print("%d checks, %d failed%s" % (len(results), len(failed), (": " + ", ".join(failed)) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
