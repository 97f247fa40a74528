//! virtio-entropy (virtio-rng): fills device-writable buffers from the
//! kernel's CSPRNG with getrandom(2), so there is nothing to open before the
//! seccomp filter (the filter must allow `getrandom`).

use virtio_queue::{Queue, QueueT};

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
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut used_any = false;
        while let Some((head, walked)) = chain::pop(
            &mut a.queue,
            &a.mem,
            usize::from(QUEUE_SIZE),
            &mut self.log,
            "virtio-rng",
        ) {
            let len = match walked {
                Ok(c) if c.readable.is_empty() => {
                    let want = usize::try_from(c.writable_len())
                        .unwrap_or(MAX_REQUEST)
                        .min(MAX_REQUEST);
                    self.buf.resize(want, 0);
                    match getrandom(&mut self.buf) {
                        Ok(()) => chain::write_bytes(&a.mem, &c.writable, &self.buf) as u32,
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
                Err(_) => 0,
            };
            if !chain::put_used(&mut a.queue, &a.mem, head, len, &mut self.log, "virtio-rng") {
                break;
            }
            used_any = true;
        }
        if used_any {
            chain::notify_used(&mut a.queue, &a.mem, &a.interrupt);
        }
    }
}

impl VirtioDevice for Rng {
    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active.as_ref().map(|a| vec![a.queue.state()])
    }

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
