//! The snapshot parser fuzzed on stable Rust (issue 18 item 2, beside
//! `vmm/devices/tests/fuzz_stable.rs`): a valid snapshot is built without
//! KVM (a 16 MiB machine with a virtio-rng the test activates through its
//! registers), then mutated deterministically — bit flips, random bytes,
//! inserted and deleted ranges, interesting 32-bit values, digits changed
//! inside the JSON state — with the header's length and checksum fixed up
//! for most inputs so that mutations reach the state and the memory runs.
//! Every input goes through `snapshot::parse`; what parses is restored into
//! fresh device models (serial, i8042, CPU hot-plug, the virtio transport,
//! which is then notified so a restored queue is served) and its memory
//! loaded. 10,000 executions by default, more with
//! `VIREO_FUZZ_EXECS=1000000`; a panic fails the test and writes the input
//! to `$TMPDIR/vireo-fuzz-crash-snapshot-<n>`.

use std::io::Cursor;
use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::{kvm_irqchip, kvm_pit_state2};
use vireo_vmm::snapshot::{
    self, DeviceStates, HEADER_LEN, MachineConfig, Prepared, SnapshotState, VmState,
};
use vireo_vmm::vcpu::state::{Fpu, VcpuState};
use vireo_vmm_devices::GuestMemory;
use vireo_vmm_devices::bus::{BusDevice, IrqLine};
use vireo_vmm_devices::legacy::cpu_hotplug::CpuHotplug;
use vireo_vmm_devices::legacy::i8042::I8042;
use vireo_vmm_devices::legacy::power::{GuestRequest, RequestSink};
use vireo_vmm_devices::legacy::serial::SerialDevice;
use vireo_vmm_devices::virtio::mmio::reg;
use vireo_vmm_devices::virtio::{MmioTransport, Rng as RngDevice, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};

struct NoIrq;
impl IrqLine for NoIrq {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}
struct NoSink;
impl RequestSink for NoSink {
    fn request(&self, _r: GuestRequest) {}
}

/// xorshift64*: reproducible inputs without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn transport(mem: &GuestMemory) -> MmioTransport<Box<dyn VirtioDevice>> {
    let dev: Box<dyn VirtioDevice> = Box::new(RngDevice::new());
    MmioTransport::new(mem.clone(), Arc::new(NoIrq), dev).unwrap()
}

fn w(t: &mut MmioTransport<Box<dyn VirtioDevice>>, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

/// A valid snapshot of a 16 MiB machine whose virtio-rng is active.
fn seed(mem: &GuestMemory) -> Vec<u8> {
    let mut t = transport(mem);
    w(&mut t, reg::STATUS, 1);
    w(&mut t, reg::STATUS, 3);
    w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
    w(&mut t, reg::DRIVER_FEATURES, 1);
    w(&mut t, reg::STATUS, 11);
    w(&mut t, reg::QUEUE_SEL, 0);
    w(&mut t, reg::QUEUE_NUM, 16);
    w(&mut t, reg::QUEUE_DESC_LOW, 0x10000);
    w(&mut t, reg::QUEUE_DRIVER_LOW, 0x11000);
    w(&mut t, reg::QUEUE_DEVICE_LOW, 0x12000);
    w(&mut t, reg::QUEUE_READY, 1);
    w(&mut t, reg::STATUS, 15);
    let ts = t.save_state();
    assert!(ts.activated, "the seed's device is active");
    mem.write_obj(0x1234_5678u32, GuestAddress(0x5000)).unwrap();
    mem.write_obj(0xdead_beefu32, GuestAddress(0x7000)).unwrap();
    let serial = SerialDevice::new(Arc::new(NoIrq), Vec::new());
    let state = SnapshotState {
        config: MachineConfig {
            memory_bytes: 16 << 20,
            vcpus: 1,
            devices: vec!["virtio-rng".into()],
        },
        vcpus: vec![VcpuState {
            index: 0,
            regs: Default::default(),
            sregs: Default::default(),
            fpu: Fpu::default(),
            xsave: None,
            xcrs: Some(Default::default()),
            debugregs: None,
            lapic: Default::default(),
            mp_state: Default::default(),
            vcpu_events: None,
            msrs: vec![Default::default(); 2],
            missing: vec!["xsave".into()],
        }],
        vm: VmState {
            irqchips: vec![kvm_irqchip::default(); 3],
            pit: kvm_pit_state2::default(),
            clock: None,
        },
        devices: DeviceStates {
            serial: serial.save_state().unwrap(),
            i8042: I8042::new(Arc::new(NoSink), Arc::new(NoIrq)).save_state(),
            cpu_hotplug: CpuHotplug::new(1, Arc::new(NoSink), Arc::new(NoIrq)).save_state(),
            virtio: vec![ts],
            boot_time_us: Some(7),
        },
    };
    let mut out = Vec::new();
    Prepared::new(&state, mem)
        .unwrap()
        .write_to(&mut out)
        .unwrap();
    out
}

/// Recomputes the header's body length and CRC-32 (zlib's).
fn fix_header(v: &mut [u8]) {
    if v.len() < HEADER_LEN as usize {
        return;
    }
    let body = &v[HEADER_LEN as usize..];
    let mut crc = snapshot::crc32::Crc32::new();
    crc.update(body);
    let len = body.len() as u64;
    let crc = crc.finish();
    v[16..24].copy_from_slice(&len.to_le_bytes());
    v[24..28].copy_from_slice(&crc.to_le_bytes());
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(6) {
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(v.len() + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(i..i, bytes);
            }
            3 if v.len() > 4 => {
                let i = rng.below(v.len());
                let n = rng.below((v.len() - i).min(64));
                v.drain(i..i + n);
            }
            4 | 5 => {
                // A digit of the JSON state changed: still JSON, other values.
                let digits: Vec<usize> = (0..v.len().min(1 << 16))
                    .filter(|&i| v[i].is_ascii_digit())
                    .collect();
                if !digits.is_empty() {
                    let i = digits[rng.below(digits.len())];
                    v[i] = b'0' + rng.below(10) as u8;
                    if rng.below(4) == 0 {
                        v.insert(i, b'0' + rng.below(10) as u8);
                    }
                }
            }
            _ => {
                let vals = [0u32, 1, 0xff, 0xffff, 0x7fff_ffff, 0xffff_ffff, 0x1000, 256];
                let x = vals[rng.below(vals.len())].to_le_bytes();
                if v.len() >= 4 {
                    let i = rng.below(v.len() - 3);
                    v[i..i + 4].copy_from_slice(&x);
                }
            }
        }
    }
    if rng.below(4) != 0 {
        fix_header(&mut v);
    }
    v
}

/// Parses `input` and restores what parses into fresh devices.
fn run_one(input: &[u8], mem: &GuestMemory) -> bool {
    let mut r = Cursor::new(input);
    let Ok(parsed) = snapshot::parse(&mut r, 0) else {
        return false;
    };
    let st = &parsed.state;
    let _ = SerialDevice::new(Arc::new(NoIrq), Vec::new()).restore_state(&st.devices.serial);
    let _ = I8042::new(Arc::new(NoSink), Arc::new(NoIrq)).restore_state(&st.devices.i8042);
    let _ = CpuHotplug::new(st.config.vcpus, Arc::new(NoSink), Arc::new(NoIrq))
        .restore_state(&st.devices.cpu_hotplug);
    if st.config.memory_bytes == 16 << 20 {
        snapshot::load_memory(&mut r, &parsed, mem).unwrap();
    }
    for ts in &st.devices.virtio {
        let mut t = transport(mem);
        if t.restore_state(ts).is_ok() {
            // Served with whatever indices the file gave.
            w(&mut t, reg::QUEUE_NOTIFY, 0);
            let mut b = [0u8; 4];
            t.read(reg::STATUS, &mut b);
        }
    }
    true
}

#[test]
fn the_snapshot_parser_survives_its_fuzz_inputs() {
    let execs: usize = std::env::var("VIREO_FUZZ_EXECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mem = vireo_vmm::memory::create(16 << 20).unwrap();
    let good = seed(&mem);
    assert!(run_one(&good, &mem), "the seed itself parses");
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut rng = Rng(0x5EED_5A45_0000_0001);
    let mut findings = Vec::new();
    let mut parsed = 0usize;
    let started = Instant::now();
    for n in 0..execs {
        let input = mutate(&mut rng, &good);
        match std::panic::catch_unwind(|| run_one(&input, &mem)) {
            Ok(true) => parsed += 1,
            Ok(false) => {}
            Err(_) => {
                let path = std::env::temp_dir().join(format!("vireo-fuzz-crash-snapshot-{n}"));
                let _ = std::fs::write(&path, &input);
                findings.push(format!("panic on input {n}, written to {}", path.display()));
            }
        }
    }
    std::panic::set_hook(hook);
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "[fuzz] snapshot: {execs} executions in {secs:.1} s ({:.0}/s), {parsed} parsed",
        execs as f64 / secs.max(1e-9)
    );
    assert!(findings.is_empty(), "{}", findings.join("\n"));
}
