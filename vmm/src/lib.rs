//! vireo-vmm's library part: a micro-VMM on /dev/kvm built from rust-vmm
//! crates. The layout follows the machine's life:
//!
//! * [`config`]: what to run and the files opened before the sandbox closes;
//! * [`builder`]: VM construction (KVM VM, irqchip, PIT, [`memory`], devices
//!   on the [`bus`]es, [`boot`] images and tables, [`vcpu`]s);
//! * [`vmm`]: the running VMM — the [`jail`], vCPU threads, [`seccomp`], the event loop
//!   serving the control [`api`], the [`console`] socket and machine
//!   [`events`];
//! * [`snapshot`]: the snapshot file (save and restore of a running machine);
//! * [`migration`]: a VMM waiting for an incoming live migration's stream;
//! * [`exit`]: the exit file.
//!
//! Device models live in the `vireo-vmm-devices` crate, which never sees KVM.

pub mod api;
pub mod boot;
pub mod builder;
pub mod bus;
pub mod config;
pub mod console;
pub mod events;
pub mod exit;
pub mod jail;
pub mod memory;
pub mod migration;
pub mod probe;
pub mod seccomp;
pub mod snapshot;
pub mod vcpu;
pub mod vmm;
