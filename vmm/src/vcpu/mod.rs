//! vCPUs: their configuration, the thread each runs on, and how the VMM
//! parks, resets and stops them.
//!
//! The VMM steers vCPU threads through a [`VcpuControl`]: it sets what it
//! wants (run, pause, exit), then kicks the threads out of `KVM_RUN` with a
//! real-time signal whose handler sets `immediate_exit` in the thread's
//! `kvm_run` (so a kick that lands just before `KVM_RUN` is not lost). A reset
//! happens while every vCPU is parked: each thread resets its own registers
//! when it sees the control's generation change.

pub mod cpuid;
pub mod regs;
pub mod state;

use crate::boot::Entry;
use crate::bus::{Buses, lock};
use crate::events::{EventQueue, MachineEvent};
use kvm_bindings::{CpuId, kvm_lapic_state, kvm_mp_state, kvm_run};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::cell::Cell;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

/// The kick signal: SIGRTMIN + this.
const KICK_SIGNAL_OFFSET: i32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error("spawning the vCPU thread: {0}")]
    Spawn(std::io::Error),
    #[error("installing the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("vCPU threads did not {0} within {1:?}")]
    Timeout(&'static str, Duration),
    #[error("vCPU state: {0}")]
    State(String),
}

/// What the VMM wants of its vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Run,
    Pause,
    Exit,
}

/// Shared between the VMM and every vCPU thread.
pub struct ControlState {
    pub want: Want,
    /// vCPU threads parked in `Pause`.
    pub parked: u32,
    /// vCPU threads that have left their loop.
    pub exited: u32,
    /// Bumped by a reset; each vCPU resets itself when it sees a new value.
    pub generation: u64,
    /// vCPUs that have reset for the current generation.
    pub reset_acks: u32,
    /// Where the boot vCPU starts after a reset.
    pub entry: Entry,
    /// vCPUs the guest ejected (CPU hot-unplug): parked until plugged again.
    pub unplugged: Vec<bool>,
    /// vCPUs plugged in again since they were ejected, until each has reset
    /// itself: a latch, so a vCPU that had not parked yet when it came back
    /// still starts over as at power-on.
    pub replugged: Vec<bool>,
    /// Bumped to ask every parked vCPU for its state (a snapshot).
    pub save_seq: u64,
    /// What each vCPU answered for the current `save_seq`.
    pub saved: Vec<Option<Result<state::VcpuState, String>>>,
}

impl ControlState {
    fn is_unplugged(&self, index: u32) -> bool {
        self.unplugged.get(index as usize).copied().unwrap_or(false)
    }

    /// Whether vCPU `index` came back since it was ejected; clears the latch.
    fn take_replugged(&mut self, index: u32) -> bool {
        self.replugged
            .get_mut(index as usize)
            .map(std::mem::take)
            .unwrap_or(false)
    }
}

pub struct VcpuControl {
    pub state: Mutex<ControlState>,
    pub cv: Condvar,
}

impl VcpuControl {
    pub fn new(entry: Entry) -> Self {
        Self {
            state: Mutex::new(ControlState {
                want: Want::Run,
                parked: 0,
                exited: 0,
                generation: 0,
                reset_acks: 0,
                entry,
                unplugged: Vec::new(),
                replugged: Vec::new(),
                save_seq: 0,
                saved: Vec::new(),
            }),
            cv: Condvar::new(),
        }
    }
}

thread_local! {
    // The kvm_run page of the vCPU this thread runs, for the kick handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(
    _num: libc::c_int,
    _info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: `run` was set by this thread from its own VcpuFd's
            // kvm_run mapping and is cleared before that VcpuFd is dropped,
            // so it points at live memory. A volatile byte store is
            // async-signal-safe, and KVM reads the field on the next entry.
            unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
        }
    });
}

/// Installs the kick handler (once per process, before any vCPU runs).
pub fn register_kick_signal() -> Result<(), VcpuError> {
    register_signal_handler(SIGRTMIN() + KICK_SIGNAL_OFFSET, kick_handler)
        .map_err(VcpuError::Signal)
}

/// One vCPU before its thread starts.
pub struct Vcpu {
    pub index: u32,
    fd: VcpuFd,
    /// The MSRs a snapshot reads (the host's list).
    msr_list: Arc<Vec<u32>>,
    save_seq: u64,
    lapic: kvm_lapic_state,
    buses: Arc<Buses>,
    control: Arc<VcpuControl>,
    events: Arc<EventQueue>,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { what, source }
}

/// What a vCPU thread reports once it runs.
pub struct VcpuThreadInfo {
    pub index: u32,
    /// The thread's CPU-time clock (`pthread_getcpuclockid`).
    pub cpu_clock: Option<libc::clockid_t>,
}

enum Flow {
    Continue,
    /// Something the VMM must handle; wait until it changes the control.
    Stop,
}

impl Vcpu {
    /// Configures a freshly created vCPU.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        index: u32,
        fd: VcpuFd,
        cpuid: &CpuId,
        entry: Entry,
        buses: Arc<Buses>,
        control: Arc<VcpuControl>,
        events: Arc<EventQueue>,
        msr_list: Arc<Vec<u32>>,
    ) -> Result<Self, VcpuError> {
        fd.set_cpuid2(cpuid).map_err(kvm("set CPUID"))?;
        regs::setup_common(&fd)?;
        let lapic = regs::setup_lapic(&fd)?;
        if index == 0 {
            regs::setup_boot_vcpu(&fd, entry)?;
        }
        Ok(Self {
            index,
            fd,
            msr_list,
            save_seq: 0,
            lapic,
            buses,
            control,
            events,
        })
    }

    /// Loads a snapshot's state into this vCPU (before its thread starts).
    pub fn restore_state(&self, s: &state::VcpuState) -> Result<(), VcpuError> {
        state::restore(&self.fd, s)
            .map_err(|e| VcpuError::State(format!("vCPU {}: {e}", self.index)))
    }

    /// Reads this (parked) vCPU's state, after completing the I/O its last
    /// exit left pending: a `KVM_RUN` with `immediate_exit` set finishes
    /// the instruction's emulation and returns without entering the guest.
    fn save_state(&mut self) -> Result<state::VcpuState, String> {
        self.fd.set_kvm_immediate_exit(1);
        let flushed = self.fd.run().map(|_| ()).map_err(|e| e.errno());
        self.fd.set_kvm_immediate_exit(0);
        match flushed {
            Err(libc::EINTR) | Err(libc::EAGAIN) | Ok(()) => {}
            Err(errno) => {
                return Err(format!(
                    "vCPU {}: completing pending I/O: errno {errno}",
                    self.index
                ));
            }
        }
        state::save(&self.fd, self.index, &self.msr_list)
            .map_err(|e| format!("vCPU {}: {e}", self.index))
    }

    /// Back to power-on state for a machine reset.
    fn reset(&mut self, entry: Entry) -> Result<(), VcpuError> {
        self.fd.set_lapic(&self.lapic).map_err(kvm("set LAPIC"))?;
        regs::setup_common(&self.fd)?;
        let mp_state = if self.index == 0 {
            regs::setup_boot_vcpu(&self.fd, entry)?;
            kvm_bindings::KVM_MP_STATE_RUNNABLE
        } else {
            // Application processors wait for INIT/SIPI again.
            kvm_bindings::KVM_MP_STATE_UNINITIALIZED
        };
        self.fd
            .set_mp_state(kvm_mp_state { mp_state })
            .map_err(kvm("set MP state"))?;
        Ok(())
    }

    /// Starts the vCPU's thread. `filter` is installed on the thread before
    /// the guest runs; `info` receives the thread's CPU clock.
    pub fn spawn(
        self,
        filter: Option<Arc<seccompiler::BpfProgram>>,
        info: Sender<VcpuThreadInfo>,
    ) -> Result<JoinHandle<()>, VcpuError> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || self.thread_main(filter, info))
            .map_err(VcpuError::Spawn)
    }

    fn thread_main(
        mut self,
        filter: Option<Arc<seccompiler::BpfProgram>>,
        info: Sender<VcpuThreadInfo>,
    ) {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: pthread_self() is always valid for the calling thread and
        // `clock` is a valid out-pointer.
        let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
        let _ = info.send(VcpuThreadInfo {
            index: self.index,
            cpu_clock: (rc == 0).then_some(clock),
        });
        KVM_RUN.with(|p| p.set(self.fd.get_kvm_run() as *mut kvm_run));
        if let Some(f) = filter
            && let Err(e) = seccompiler::apply_filter(&f)
        {
            self.events.push(MachineEvent::Crash(format!(
                "vCPU {}: installing the seccomp filter: {e}",
                self.index
            )));
            self.finish();
            return;
        }
        self.run_loop();
        self.finish();
    }

    fn finish(&mut self) {
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        // Where the guest was: the first thing to know about a stuck guest.
        if let Ok(r) = self.fd.get_regs() {
            tracing::info!(
                vcpu = self.index,
                rip = format_args!("{:#x}", r.rip),
                "vCPU stopped"
            );
        }
        let mut st = lock(&self.control.state);
        st.exited += 1;
        self.control.cv.notify_all();
    }

    /// Obeys the control: parks, resets, or says to leave.
    fn obey(&mut self, generation: &mut u64) -> bool {
        let control = self.control.clone();
        let mut st = lock(&control.state);
        loop {
            if st.save_seq != self.save_seq {
                self.save_seq = st.save_seq;
                let answer = self.save_state();
                if let Some(slot) = st.saved.get_mut(self.index as usize) {
                    *slot = Some(answer);
                }
                control.cv.notify_all();
            }
            if st.generation != *generation {
                *generation = st.generation;
                // The reset below also covers a vCPU plugged in again
                // (a reset can reach a re-plugged vCPU before it ran).
                if st.take_replugged(self.index) {
                    tracing::info!(
                        vcpu = self.index,
                        "vCPU plugged in again (reset with the machine)"
                    );
                }
                let entry = st.entry;
                if let Err(e) = self.reset(entry) {
                    self.events.push(MachineEvent::Crash(format!(
                        "vCPU {}: reset failed: {e}",
                        self.index
                    )));
                }
                st.reset_acks += 1;
                control.cv.notify_all();
            }
            let unplugged = st.is_unplugged(self.index);
            if !unplugged && st.take_replugged(self.index) {
                // Plugged again: back to an application processor waiting
                // for INIT/SIPI, as at power-on.
                let entry = st.entry;
                if let Err(e) = self.reset(entry) {
                    self.events.push(MachineEvent::Crash(format!(
                        "vCPU {}: reset after hot-plug failed: {e}",
                        self.index
                    )));
                }
                tracing::info!(vcpu = self.index, "vCPU plugged in again");
            }
            match st.want {
                Want::Run if !unplugged => return true,
                Want::Exit => return false,
                Want::Run | Want::Pause => {
                    st.parked += 1;
                    control.cv.notify_all();
                    while st.want != Want::Exit
                        && (st.want == Want::Pause || st.is_unplugged(self.index))
                        && st.generation == *generation
                        && st.save_seq == self.save_seq
                    {
                        st = control.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                    st.parked -= 1;
                }
            }
        }
    }

    /// After reporting an event, waits for the VMM to change the control.
    fn wait_for_control(&self, generation: u64) {
        let mut st = lock(&self.control.state);
        while st.want == Want::Run && st.generation == generation {
            st = self.control.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn run_loop(&mut self) {
        let mut generation = lock(&self.control.state).generation;
        while self.obey(&mut generation) {
            match self.run_once() {
                Flow::Continue => {}
                Flow::Stop => self.wait_for_control(generation),
            }
        }
    }

    fn run_once(&mut self) -> Flow {
        let index = self.index;
        let event = match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    self.buses.pio.read(u64::from(port), data);
                    None
                }
                VcpuExit::IoOut(port, data) => {
                    self.buses.pio.write(u64::from(port), data);
                    None
                }
                VcpuExit::MmioRead(addr, data) => {
                    self.buses.mmio.read(addr, data);
                    None
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.buses.mmio.write(addr, data);
                    None
                }
                VcpuExit::Intr | VcpuExit::IrqWindowOpen | VcpuExit::IoapicEoi(_) => None,
                VcpuExit::Hlt => {
                    // The in-kernel irqchip handles HLT; seeing one means the
                    // guest halted with nothing to wake it.
                    Some(MachineEvent::Crash(format!(
                        "vCPU {index} halted with no irqchip to wake it"
                    )))
                }
                VcpuExit::Shutdown => Some(MachineEvent::Reset(format!(
                    "vCPU {index}: triple fault (shutdown exit)"
                ))),
                VcpuExit::SystemEvent(kind, _) => Some(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                        MachineEvent::PowerOff(format!("vCPU {index}: KVM system event shutdown"))
                    }
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                        MachineEvent::Reset(format!("vCPU {index}: KVM system event reset"))
                    }
                    other => MachineEvent::Crash(format!("vCPU {index}: KVM system event {other}")),
                }),
                VcpuExit::InternalError => Some(MachineEvent::Crash(String::new())),
                VcpuExit::FailEntry(reason, cpu) => Some(MachineEvent::Crash(format!(
                    "vCPU {index}: KVM entry failed (hardware reason {reason:#x} on host CPU {cpu})"
                ))),
                other => Some(MachineEvent::Crash(format!(
                    "vCPU {index}: unexpected KVM exit {other:?}"
                ))),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(MachineEvent::Crash(format!(
                "vCPU {index}: KVM_RUN failed: {e}"
            ))),
        };
        match event {
            None => Flow::Continue,
            Some(MachineEvent::Crash(detail)) if detail.is_empty() => {
                let detail = self.internal_error_detail();
                self.events.push(MachineEvent::Crash(detail));
                Flow::Stop
            }
            Some(e) => {
                self.events.push(e);
                Flow::Stop
            }
        }
    }

    fn internal_error_detail(&mut self) -> String {
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or_default();
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, for which KVM
        // fills the `internal` member of the exit union; reading plain
        // integers from it is sound.
        let (suberror, ndata) = unsafe {
            let i = run.__bindgen_anon_1.internal;
            (i.suberror, i.ndata)
        };
        let what = match suberror {
            1 => "emulation failure",
            2 => "simultaneous exceptions",
            3 => "delivery event",
            4 => "unexpected exit reason",
            _ => "unknown",
        };
        format!(
            "vCPU {}: KVM_EXIT_INTERNAL_ERROR suberror {suberror} ({what}), {ndata} data words, guest rip {rip:#x}",
            self.index
        )
    }
}

/// The running vCPU threads.
pub struct VcpuSet {
    pub control: Arc<VcpuControl>,
    pub handles: Vec<JoinHandle<()>>,
}

const KICK_INTERVAL: Duration = Duration::from_millis(20);

impl VcpuSet {
    fn count(&self) -> u32 {
        self.handles.len() as u32
    }

    fn kick(&self) {
        for h in &self.handles {
            // A thread that has already exited cannot be signalled; that is fine.
            let _ = h.kill(SIGRTMIN() + KICK_SIGNAL_OFFSET);
        }
    }

    /// Waits (kicking every so often) until `done` holds or `timeout` passes.
    fn wait_until(
        &self,
        timeout: Duration,
        what: &'static str,
        done: impl Fn(&ControlState) -> bool,
    ) -> Result<(), VcpuError> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.control.state);
        loop {
            if done(&st) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VcpuError::Timeout(what, timeout));
            }
            drop(st);
            self.kick();
            st = lock(&self.control.state);
            let wait = KICK_INTERVAL.min(deadline - now);
            st = match self.control.cv.wait_timeout(st, wait) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// Parks every vCPU out of KVM_RUN.
    pub fn pause(&self) -> Result<(), VcpuError> {
        lock(&self.control.state).want = Want::Pause;
        self.control.cv.notify_all();
        let n = self.count();
        self.wait_until(Duration::from_secs(5), "pause", |st| {
            st.parked + st.exited >= n
        })
    }

    /// Parks vCPU `index` (the guest ejected it) or lets it run again.
    pub fn set_unplugged(&self, index: u32, unplugged: bool) {
        {
            let mut st = lock(&self.control.state);
            let i = index as usize;
            if st.unplugged.len() <= i {
                st.unplugged.resize(i + 1, false);
                st.replugged.resize(i + 1, false);
            }
            if st.unplugged[i] && !unplugged {
                st.replugged[i] = true;
            }
            st.unplugged[i] = unplugged;
        }
        self.control.cv.notify_all();
        if unplugged && let Some(h) = self.handles.get(index as usize) {
            let _ = h.kill(SIGRTMIN() + KICK_SIGNAL_OFFSET);
        }
    }

    /// With every vCPU parked: each reads its own state (on its thread).
    pub fn save_states(&self) -> Result<Vec<state::VcpuState>, VcpuError> {
        let n = self.count();
        {
            let mut st = lock(&self.control.state);
            st.saved = (0..n).map(|_| None).collect();
            st.save_seq += 1;
        }
        self.control.cv.notify_all();
        self.wait_until(Duration::from_secs(5), "save their state", |st| {
            st.exited > 0 || st.saved.iter().all(|s| s.is_some())
        })?;
        let mut st = lock(&self.control.state);
        if st.exited > 0 {
            return Err(VcpuError::State("a vCPU thread has exited".into()));
        }
        std::mem::take(&mut st.saved)
            .into_iter()
            .map(|s| match s {
                Some(Ok(v)) => Ok(v),
                Some(Err(e)) => Err(VcpuError::State(e)),
                None => Err(VcpuError::State("a vCPU did not answer".into())),
            })
            .collect()
    }

    /// Parks the vCPUs before they ever run (a restore that stays paused).
    pub fn start_paused(control: &VcpuControl) {
        lock(&control.state).want = Want::Pause;
    }

    pub fn resume(&self) {
        lock(&self.control.state).want = Want::Run;
        self.control.cv.notify_all();
    }

    /// With every vCPU parked: each resets itself for `entry`.
    pub fn reset(&self, entry: Entry) -> Result<(), VcpuError> {
        {
            let mut st = lock(&self.control.state);
            st.generation += 1;
            st.reset_acks = 0;
            st.entry = entry;
        }
        self.control.cv.notify_all();
        let n = self.count();
        self.wait_until(Duration::from_secs(5), "reset", |st| {
            st.reset_acks + st.exited >= n
        })
    }

    /// Stops every vCPU thread (bounded wait; the process exits anyway).
    pub fn stop(self) {
        lock(&self.control.state).want = Want::Exit;
        self.control.cv.notify_all();
        let n = self.count();
        if let Err(e) = self.wait_until(Duration::from_secs(2), "exit", |st| st.exited >= n) {
            tracing::warn!(error = %e, "leaving vCPU threads behind");
            return;
        }
        for h in self.handles {
            let _ = h.join();
        }
    }
}
