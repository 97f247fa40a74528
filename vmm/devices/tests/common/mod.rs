//! A minimal virtio-mmio "guest driver" for the integration tests: it writes
//! registers, descriptor tables and rings exactly as a driver would.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use vireo_vmm_devices::GuestMemory;
use vireo_vmm_devices::bus::{BusDevice, IrqLine};
use vireo_vmm_devices::virtio::mmio::reg;
use vireo_vmm_devices::virtio::{MmioTransport, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};

pub const MEM_SIZE: usize = 4 << 20;
pub const DATA_BASE: u64 = 0x10_0000;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

#[derive(Default)]
pub struct CountIrq(pub AtomicUsize);

impl IrqLine for CountIrq {
    fn trigger(&self) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

pub fn guest_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
}

/// A temporary file removed on drop.
pub struct TempFile {
    pub path: PathBuf,
}

impl TempFile {
    pub fn new(contents: &[u8]) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "vireo-virtio-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::write(&path, contents).expect("write temp file");
        TempFile { path }
    }
    pub fn open_rw(&self) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .expect("open temp file")
    }
    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).expect("read temp file")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One split virtqueue laid out in guest memory by the "driver".
pub struct VirtQ {
    pub index: u32,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_desc: u16,
    pub avail_idx: u16,
    pub seen_used: u16,
}

impl VirtQ {
    pub fn new(index: u32, size: u16) -> Self {
        let base = 0x1_0000 + u64::from(index) * 0x1_0000;
        VirtQ {
            index,
            size,
            desc: base,
            avail: base + 0x4000,
            used: base + 0x8000,
            next_desc: 0,
            avail_idx: 0,
            seen_used: 0,
        }
    }

    /// Writes one descriptor at `i`.
    pub fn write_desc(
        &self,
        mem: &GuestMemory,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(self.desc + u64::from(i) * 16);
        mem.write_obj(addr.to_le(), at).expect("desc addr");
        mem.write_obj(len.to_le(), GuestAddress(at.0 + 8))
            .expect("desc len");
        mem.write_obj(flags.to_le(), GuestAddress(at.0 + 12))
            .expect("desc flags");
        mem.write_obj(next.to_le(), GuestAddress(at.0 + 14))
            .expect("desc next");
    }

    /// Lays out a chain of `(addr, len, device_writable)` buffers in fresh
    /// descriptors and returns its head (not yet made available).
    pub fn build_chain(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (k, &(addr, len, write)) in bufs.iter().enumerate() {
            let i = (head + k as u16) % self.size;
            let mut flags = if write { F_WRITE } else { 0 };
            let next = (i + 1) % self.size;
            if k + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            self.write_desc(mem, i, addr, len, flags, next);
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        head
    }

    /// Puts `head` in the available ring and publishes the new index.
    pub fn make_available(&mut self, mem: &GuestMemory, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(self.avail + 4 + slot * 2))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2))
            .expect("avail idx");
    }

    pub fn add_chain(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.build_chain(mem, bufs);
        self.make_available(mem, head);
        head
    }

    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj::<u16>(GuestAddress(self.used + 2))
            .expect("used idx")
    }

    /// Used element `i`: (descriptor head id, length).
    pub fn used_elem(&self, mem: &GuestMemory, i: u16) -> (u32, u32) {
        let at = self.used + 4 + u64::from(i % self.size) * 8;
        (
            mem.read_obj::<u32>(GuestAddress(at)).expect("used id"),
            mem.read_obj::<u32>(GuestAddress(at + 4)).expect("used len"),
        )
    }

    /// Next used element not yet seen.
    pub fn pop_used(&mut self, mem: &GuestMemory) -> Option<(u32, u32)> {
        if self.used_idx(mem) == self.seen_used {
            return None;
        }
        let e = self.used_elem(mem, self.seen_used);
        self.seen_used = self.seen_used.wrapping_add(1);
        Some(e)
    }
}

/// A device behind its transport plus the guest memory and interrupt line.
pub struct Harness<D: VirtioDevice> {
    pub t: MmioTransport<D>,
    pub mem: GuestMemory,
    pub irq: Arc<CountIrq>,
}

impl<D: VirtioDevice> Harness<D> {
    pub fn new(device: D) -> Self {
        let mem = guest_memory();
        let irq = Arc::new(CountIrq::default());
        let t = MmioTransport::new(mem.clone(), irq.clone(), device).expect("transport");
        Harness { t, mem, irq }
    }

    pub fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn w32(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    pub fn device_features(&mut self) -> u64 {
        self.w32(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.r32(reg::DEVICE_FEATURES);
        self.w32(reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.r32(reg::DEVICE_FEATURES);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, ack `features`, FEATURES_OK; returns
    /// whether the device kept FEATURES_OK.
    pub fn negotiate(&mut self, features: u64) -> bool {
        self.w32(reg::STATUS, 0);
        self.w32(reg::STATUS, 1);
        self.w32(reg::STATUS, 1 | 2);
        self.w32(reg::DRIVER_FEATURES_SEL, 0);
        self.w32(reg::DRIVER_FEATURES, features as u32);
        self.w32(reg::DRIVER_FEATURES_SEL, 1);
        self.w32(reg::DRIVER_FEATURES, (features >> 32) as u32);
        self.w32(reg::STATUS, 1 | 2 | 8);
        self.r32(reg::STATUS) & 8 != 0
    }

    pub fn setup_queue(&mut self, q: &VirtQ) {
        self.w32(reg::QUEUE_SEL, q.index);
        self.w32(reg::QUEUE_NUM, u32::from(q.size));
        self.w32(reg::QUEUE_DESC_LOW, q.desc as u32);
        self.w32(reg::QUEUE_DESC_HIGH, (q.desc >> 32) as u32);
        self.w32(reg::QUEUE_DRIVER_LOW, q.avail as u32);
        self.w32(reg::QUEUE_DRIVER_HIGH, (q.avail >> 32) as u32);
        self.w32(reg::QUEUE_DEVICE_LOW, q.used as u32);
        self.w32(reg::QUEUE_DEVICE_HIGH, (q.used >> 32) as u32);
        self.w32(reg::QUEUE_READY, 1);
    }

    pub fn driver_ok(&mut self) {
        let s = self.r32(reg::STATUS);
        self.w32(reg::STATUS, s | 4);
    }

    /// Full bring-up with all offered features and `n` queues of `size`.
    pub fn bring_up(&mut self, n: u32, size: u16) -> Vec<VirtQ> {
        let f = self.device_features();
        assert!(self.negotiate(f), "FEATURES_OK refused");
        let qs: Vec<VirtQ> = (0..n).map(|i| VirtQ::new(i, size)).collect();
        for q in &qs {
            self.setup_queue(q);
            self.w32(reg::QUEUE_SEL, q.index);
            assert_eq!(self.r32(reg::QUEUE_READY), 1, "queue {} not ready", q.index);
        }
        self.driver_ok();
        assert!(self.t.is_activated(), "device not activated");
        qs
    }

    pub fn notify(&mut self, q: u32) {
        self.w32(reg::QUEUE_NOTIFY, q);
    }

    pub fn irqs(&self) -> usize {
        self.irq.0.load(Ordering::SeqCst)
    }
}
