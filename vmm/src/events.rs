//! What vCPU threads and devices tell the VMM's event loop: power-off,
//! reset, crash. Queued here; an eventfd wakes the loop.

use std::collections::VecDeque;
use std::sync::Mutex;
use vireo_vmm_devices::legacy::power::{GuestRequest, RequestSink};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Something the machine did that the VMM must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MachineEvent {
    PowerOff(String),
    Reset(String),
    Crash(String),
    /// The guest ejected this vCPU through the CPU hot-plug controller.
    EjectCpu(u32),
}

/// The queue and its wake-up descriptor.
pub struct EventQueue {
    queue: Mutex<VecDeque<MachineEvent>>,
    efd: EventFd,
}

impl EventQueue {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            queue: Mutex::new(VecDeque::new()),
            efd: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    pub fn push(&self, e: MachineEvent) {
        crate::bus::lock(&self.queue).push_back(e);
        if let Err(err) = self.efd.write(1) {
            tracing::error!(error = %err, "cannot wake the event loop");
        }
    }

    /// Everything queued so far (and clears the wake-up).
    pub fn drain(&self) -> Vec<MachineEvent> {
        let _ = self.efd.read();
        crate::bus::lock(&self.queue).drain(..).collect()
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.efd.as_raw_fd()
    }
}

impl RequestSink for EventQueue {
    fn request(&self, request: GuestRequest) {
        self.push(match request {
            GuestRequest::PowerOff => {
                MachineEvent::PowerOff("guest wrote S5 to the power register".into())
            }
            GuestRequest::Reset => MachineEvent::Reset("guest requested a reset".into()),
            GuestRequest::EjectCpu(index) => MachineEvent::EjectCpu(index),
            GuestRequest::Panic => {
                MachineEvent::Crash("the guest reported a kernel panic (pvpanic)".into())
            }
        });
    }
}
