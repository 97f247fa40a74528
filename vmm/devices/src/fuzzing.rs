//! The device fuzzing harness, shared by the cargo-fuzz target
//! (`fuzz/fuzz_targets/virtio_queue_devices.rs`, nightly, libFuzzer and
//! ASan) and the stable-Rust run (`tests/fuzz_stable.rs`, a fixed count in
//! CI, longer on demand): one input is a device choice, a sequence of
//! driver operations (register reads/writes, notifies, guest-memory
//! writes, tap frames, resets) and the initial contents of guest memory.
//! The block device runs on a memfd, the net device on a datagram socket
//! pair standing in for the tap, the entropy device on getrandom(2), the
//! balloon on the guest memory itself (its inflated pages are dropped with
//! MADV_DONTNEED), vsock on a listener in the abstract socket namespace
//! with one host client waiting (`CONNECT 52`; its guest-initiated
//! connections go nowhere and get RST). Any panic is a finding; under the
//! fuzzer's ASan, so is any host access outside guest memory.
//! Not used by the VMM itself.

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::GuestMemory;
use crate::bus::{BusDevice, IrqLine};
use crate::virtio::mmio::reg;
use crate::virtio::{Balloon, Block, MmioTransport, Net, Rng, VirtioDevice, Vsock};
use vm_memory::{Bytes, GuestAddress};

/// Two adjacent regions, so buffers may straddle a region boundary.
const REGION: usize = 0x8000;
const DISK_SIZE: i64 = 64 * 1024;

/// Queue i: descriptor table at 0x1000 + i*0x3000, avail +0x1000, used +0x2000.
fn queue_addrs(i: u32) -> (u64, u64, u64) {
    let base = 0x1000 + u64::from(i) * 0x3000;
    (base, base + 0x1000, base + 0x2000)
}

struct Irq(AtomicUsize);
impl IrqLine for Irq {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

struct Input<'a> {
    data: &'a [u8],
}

impl Input<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes([
            self.u8()?,
            self.u8()?,
            self.u8()?,
            self.u8()?,
        ]))
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a
    }
}

fn disk() -> Option<File> {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is ours.
    let fd = unsafe { libc::memfd_create(c"fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(DISK_SIZE as u64).ok()?;
    Some(file)
}

fn run<D: VirtioDevice>(
    mut t: MmioTransport<D>,
    mem: &GuestMemory,
    ops: &mut Input,
    peer: Option<&UnixDatagram>,
) {
    let mut avail_idx = [0u16; 2];
    let mut steps = 0;
    while let Some(op) = ops.u8() {
        steps += 1;
        if steps > 256 {
            break;
        }
        match op % 9 {
            0 | 1 => {
                let Some(raw) = ops.u16() else { break };
                let off = u64::from(raw & 0x1ff);
                let width = [4usize, 1, 2, 8][usize::from((raw >> 12) & 3)];
                if op % 9 == 0 {
                    let Some(v) = ops.u32() else { break };
                    let mut b = [0u8; 8];
                    b[..4].copy_from_slice(&v.to_le_bytes());
                    b[4..].copy_from_slice(&v.to_le_bytes());
                    t.write(off, &b[..width]);
                } else {
                    let mut b = [0u8; 8];
                    t.read(off, &mut b[..width]);
                }
            }
            2 => {
                let Some(q) = ops.u8() else { break };
                t.write(reg::QUEUE_NOTIFY, &u32::from(q % 4).to_le_bytes());
            }
            3 => {
                // The usual bring-up, so the fuzzer reaches the devices fast.
                let Some(flags) = ops.u8() else { break };
                let size = 1u32 << (flags % 9);
                let w = |t: &mut MmioTransport<D>, off: u64, v: u32| t.write(off, &v.to_le_bytes());
                w(&mut t, reg::STATUS, 0);
                w(&mut t, reg::STATUS, 1);
                w(&mut t, reg::STATUS, 3);
                for sel in 0..2u32 {
                    w(&mut t, reg::DEVICE_FEATURES_SEL, sel);
                    let mut b = [0u8; 4];
                    t.read(reg::DEVICE_FEATURES, &mut b);
                    let mut f = u32::from_le_bytes(b);
                    if flags & 0x80 != 0 {
                        f ^= 1 << (flags & 31);
                    }
                    w(&mut t, reg::DRIVER_FEATURES_SEL, sel);
                    w(&mut t, reg::DRIVER_FEATURES, f);
                }
                w(&mut t, reg::STATUS, 0xb);
                for q in 0..2u32 {
                    let (d, a, u) = queue_addrs(q);
                    w(&mut t, reg::QUEUE_SEL, q);
                    w(&mut t, reg::QUEUE_NUM, size);
                    w(&mut t, reg::QUEUE_DESC_LOW, d as u32);
                    w(&mut t, reg::QUEUE_DRIVER_LOW, a as u32);
                    w(&mut t, reg::QUEUE_DEVICE_LOW, u as u32);
                    w(&mut t, reg::QUEUE_READY, 1);
                }
                w(&mut t, reg::STATUS, 0xf);
                avail_idx = [0; 2];
            }
            4 => {
                let (Some(addr), Some(len)) = (ops.u16(), ops.u8()) else {
                    break;
                };
                let bytes = ops.bytes(usize::from(len)).to_vec();
                let _ = mem.write_slice(&bytes, GuestAddress(u64::from(addr)));
            }
            5 => {
                for fd in t.event_fds() {
                    t.handle_event(fd);
                }
            }
            6 => {
                let Some(len) = ops.u16() else { break };
                let frame = ops.bytes(usize::from(len % 2048)).to_vec();
                if let Some(p) = peer {
                    let _ = p.send(&frame);
                }
            }
            7 => t.reset(),
            _ => {
                // Make descriptor `head` available on queue `q` and notify.
                let (Some(q), Some(head)) = (ops.u8(), ops.u16()) else {
                    break;
                };
                let q = usize::from(q % 2);
                let (_, avail, _) = queue_addrs(q as u32);
                let i = avail_idx[q];
                let _ = mem.write_obj(head, GuestAddress(avail + 4 + u64::from(i % 256) * 2));
                avail_idx[q] = i.wrapping_add(1);
                let _ = mem.write_obj(avail_idx[q], GuestAddress(avail + 2));
                t.write(reg::QUEUE_NOTIFY, &(q as u32).to_le_bytes());
            }
        }
    }
}

/// The device one input drives, from its first byte.
pub fn device_of(sel: u8) -> &'static str {
    match sel % 4 {
        0 => "block",
        1 => "net",
        2 if sel & 0x40 != 0 => "vsock",
        3 => "balloon",
        _ => "rng",
    }
}

/// One execution: the first byte picks the device ([`device_of`]), the
/// next two the length of the operations, the rest is guest memory.
pub fn run_one(data: &[u8]) {
    let mut input = Input { data };
    let (Some(sel), Some(ops_len)) = (input.u8(), input.u16()) else {
        return;
    };
    let ops = input.bytes(usize::from(ops_len)).to_vec();
    let image = input.data;

    let Ok(mem) = GuestMemory::from_ranges(&[
        (GuestAddress(0), REGION),
        (GuestAddress(REGION as u64), REGION),
    ]) else {
        return;
    };
    let n = image.len().min(2 * REGION);
    let _ = mem.write_slice(&image[..n], GuestAddress(0));
    let irq: Arc<dyn IrqLine> = Arc::new(Irq(AtomicUsize::new(0)));
    let mut ops = Input { data: &ops };

    match sel % 4 {
        0 => {
            let Some(file) = disk() else { return };
            let Ok(dev) = Block::new(file, sel & 0x80 != 0) else {
                return;
            };
            if let Ok(t) = MmioTransport::new(mem.clone(), irq, dev) {
                run(t, &mem, &mut ops, None);
            }
        }
        1 => {
            let Ok((host, dev)) = UnixDatagram::pair() else {
                return;
            };
            let _ = host.set_nonblocking(true);
            let Ok(dev) = Net::new(File::from(OwnedFd::from(dev)), [2, 0, 0, 0, 0, 1]) else {
                return;
            };
            if let Ok(t) = MmioTransport::new(mem.clone(), irq, dev) {
                run(t, &mem, &mut ops, Some(&host));
            }
            let mut buf = [0u8; 128];
            while host.recv(&mut buf).is_ok() {}
        }
        2 if sel & 0x40 != 0 => {
            let name = format!("vireo-fuzz-vsock-{}", std::process::id());
            let Ok(addr) = SocketAddr::from_abstract_name(name.as_bytes()) else {
                return;
            };
            let Ok(listener) = UnixListener::bind_addr(&addr) else {
                return;
            };
            let client = UnixStream::connect_addr(&addr).ok();
            if let Some(mut c) = client.as_ref() {
                let _ = c.write_all(b"CONNECT 52\nhello");
            }
            let Ok(dev) = Vsock::new(3, listener, Path::new("/nonexistent/vireo-fuzz-vsock"))
            else {
                return;
            };
            if let Ok(t) = MmioTransport::new(mem.clone(), irq, dev) {
                run(t, &mem, &mut ops, None);
            }
            drop(client);
        }
        3 => {
            if let Ok(t) = MmioTransport::new(mem.clone(), irq, Balloon::new(u32::from(sel >> 2))) {
                run(t, &mem, &mut ops, None);
            }
        }
        _ => {
            if let Ok(t) = MmioTransport::new(mem.clone(), irq, Rng::new()) {
                run(t, &mem, &mut ops, None);
            }
        }
    }
    let _ = std::io::stdout().flush();
}
