//! virtio-entropy (virtio-rng): fills device-writable buffers from the
//! kernel's CSPRNG with getrandom(2), so there is nothing to open before the
//! seccomp filter (the filter must allow `getrandom`).

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::chain;
use super::{Error, Interrupt, LogLimiter, TYPE_RNG, VIRTIO_F_VERSION_1, VirtioDevice, guest_warn};
use crate::GuestMemory;

pub const QUEUE_SIZE: u16 = 256;
/// Most bytes served per request (Linux asks for at most a page or so).
pub const MAX_REQUEST: usize = 64 * 1024;

struct Active {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Interrupt,
}

/// The entropy device.
pub struct Rng {
    active: Option<Active>,
    log: LogLimiter,
    queue_sizes: [u16; 1],
    buf: Vec<u8>,
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writes at most `buf.len() - done` bytes into `buf` from
        // `done` on.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl Rng {
    pub fn new() -> Self {
        Rng {
            active: None,
            log: LogLimiter::default(),
            queue_sizes: [QUEUE_SIZE],
            buf: Vec::new(),
        }
    }

    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut used_any = false;
        loop {
            let head = match active.queue.iter(&active.mem) {
                Ok(mut it) => it.next().map(|c| c.head_index()),
                Err(e) => {
                    guest_warn!(self.log, error = %e, "virtio-rng: available ring unusable");
                    None
                }
            };
            let Some(head) = head else { break };
            let walked = chain::walk(
                &active.mem,
                GuestAddress(active.queue.desc_table()),
                active.queue.size(),
                head,
                usize::from(QUEUE_SIZE),
            );
            let len = match walked {
                Ok(c) if c.readable.is_empty() => {
                    let want = usize::try_from(c.writable_len())
                        .unwrap_or(MAX_REQUEST)
                        .min(MAX_REQUEST);
                    self.buf.resize(want, 0);
                    match getrandom(&mut self.buf) {
                        Ok(()) => {
                            let mut written = 0;
                            for b in chain::slice_bufs(&c.writable, 0, want as u64) {
                                let n = b.len as usize;
                                if active
                                    .mem
                                    .write_slice(&self.buf[written..written + n], b.addr)
                                    .is_err()
                                {
                                    break;
                                }
                                written += n;
                            }
                            written as u32
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "virtio-rng: getrandom failed");
                            0
                        }
                    }
                }
                Ok(_) => {
                    guest_warn!(
                        self.log,
                        head,
                        "virtio-rng: chain has device-readable buffers; refused"
                    );
                    0
                }
                Err(e) => {
                    guest_warn!(self.log, error = %e, head, "virtio-rng: malformed descriptor chain refused");
                    0
                }
            };
            if let Err(e) = active.queue.add_used(&active.mem, head, len) {
                guest_warn!(self.log, error = %e, "virtio-rng: used ring write failed");
                break;
            }
            used_any = true;
        }
        if used_any && !matches!(active.queue.needs_notification(&active.mem), Ok(false)) {
            active.interrupt.signal_used_queue();
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        _acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), Error> {
        let got = queues.len();
        let Some(queue) = queues.into_iter().next() else {
            return Err(Error::QueueCount { expected: 1, got });
        };
        if !queue.ready() {
            return Err(Error::QueueNotReady(0));
        }
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn queue_notify(&mut self, queue: usize) {
        if queue == 0 {
            self.process_queue();
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.buf = Vec::new();
    }
}
