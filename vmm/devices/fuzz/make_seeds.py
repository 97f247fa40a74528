#!/usr/bin/env python3
"""Writes seed inputs for the virtio_queue_devices fuzz target into seeds/:
bring-up plus valid requests for block, net, rng, balloon and vsock (format: see the target)."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
NEXT, WRITE = 1, 2


def qaddrs(i):
    base = 0x1000 + i * 0x3000
    return base, base + 0x1000, base + 0x2000


def memw(addr, data):
    out = b""
    while data:
        chunk, data = data[:255], data[255:]
        out += bytes([4]) + struct.pack("<HB", addr, len(chunk)) + chunk
        addr += len(chunk)
    return out


def desc(q, i, addr, length, flags, nxt):
    d, _, _ = qaddrs(q)
    return memw(d + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))


def bring_up(size_log2):
    return bytes([3, size_log2])


def avail(q, head):
    return bytes([8, q]) + struct.pack("<H", head)


def seed(sel, ops, image=b""):
    return bytes([sel]) + struct.pack("<H", len(ops)) + ops + image


def block(ro):
    ops = bring_up(4)
    # IN sector 0 into 0x7200, status at 0x7100.
    ops += memw(0x7000, struct.pack("<IIQ", 0, 0, 0))
    ops += desc(0, 0, 0x7000, 16, NEXT, 1) + desc(0, 1, 0x7200, 512, WRITE | NEXT, 2)
    ops += desc(0, 2, 0x7100, 1, WRITE, 0) + avail(0, 0)
    # OUT sector 1 from 0x7400 (straddling into the second region at 0x8000
    # would be 0x7f00; keep one there too).
    ops += memw(0x7010, struct.pack("<IIQ", 1, 0, 1))
    ops += desc(0, 3, 0x7010, 16, NEXT, 4) + desc(0, 4, 0x7f00, 512, NEXT, 5)
    ops += desc(0, 5, 0x7101, 1, WRITE, 0) + avail(0, 3)
    # FLUSH and GET_ID.
    ops += memw(0x7020, struct.pack("<IIQ", 4, 0, 0))
    ops += desc(0, 6, 0x7020, 16, NEXT, 7) + desc(0, 7, 0x7102, 1, WRITE, 0) + avail(0, 6)
    ops += memw(0x7030, struct.pack("<IIQ", 8, 0, 0))
    ops += desc(0, 8, 0x7030, 16, NEXT, 9) + desc(0, 9, 0x7300, 20, WRITE | NEXT, 10)
    ops += desc(0, 10, 0x7103, 1, WRITE, 0) + avail(0, 8)
    return seed(0x80 if ro else 0, ops)


def net():
    ops = bring_up(4)
    ops += desc(0, 0, 0x9000, 2048, WRITE, 0) + avail(0, 0)
    frame = bytes(12) + bytes(range(60))
    ops += bytes([6]) + struct.pack("<H", len(frame)) + frame + bytes([5])
    ops += memw(0xA000, bytes(12)) + memw(0xA100, bytes(range(60)))
    ops += desc(1, 0, 0xA000, 12, NEXT, 1) + desc(1, 1, 0xA100, 60, 0, 0) + avail(1, 0)
    return seed(1, ops)


def rng():
    ops = bring_up(3) + desc(0, 0, 0x7000, 64, WRITE, 1) + avail(0, 0)
    return seed(2, ops)


def balloon():
    # Target 8 pages (selector 3 | 8 << 2); inflate PFNs 7 and 8 (consecutive
    # in the guest, in two regions), 0x10 and 0x10000 (past RAM); deflate 7.
    ops = bring_up(3)
    ops += memw(0x7000, struct.pack("<IIII", 7, 8, 0x10, 0x10000))
    ops += desc(0, 0, 0x7000, 16, 0, 0) + avail(0, 0)
    ops += memw(0x7100, struct.pack("<I", 7))
    ops += desc(1, 0, 0x7100, 4, 0, 0) + avail(1, 0)
    # The driver writes `actual` (config offset 4).
    ops += bytes([0]) + struct.pack("<H", 0x104) + struct.pack("<I", 2)
    return seed(3 | (8 << 2), ops)


def vsock():
    # Selector 2 | 0x40. One RX buffer; a REQUEST from CID 3 port 1000 to
    # host port 52 (nothing listens: RST), an RW for no connection (RST),
    # then the host client's CONNECT 52 through the event fd.
    def hdr(op, length=0):
        return struct.pack("<QQIIIHHIII", 3, 2, 1000, 52, length, 1, op, 0, 65536, 0)
    ops = bring_up(4)
    ops += desc(0, 0, 0xA000, 512, WRITE, 0) + desc(0, 1, 0xA200, 512, WRITE, 0)
    ops += avail(0, 0) + avail(0, 1)
    ops += memw(0xB000, hdr(1)) + desc(1, 0, 0xB000, 44, 0, 0) + avail(1, 0)
    ops += memw(0xB100, hdr(5, 4) + b"data") + desc(1, 1, 0xB100, 48, 0, 0) + avail(1, 1)
    ops += bytes([5])
    return seed(2 | 0x40, ops)


os.makedirs(os.path.join(HERE, "seeds"), exist_ok=True)
for name, data in [("block", block(False)), ("block-ro", block(True)), ("net", net()),
                   ("rng", rng()), ("balloon", balloon()), ("vsock", vsock())]:
    with open(os.path.join(HERE, "seeds", name), "wb") as f:
        f.write(data)
