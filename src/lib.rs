//! havirt: high availability for KVM/libvirt hosts.

pub mod config;
pub mod control;
pub mod engine;
pub mod fence;
pub mod hypervisor;
pub mod lab;
pub mod net;
pub mod sim;
pub mod store;
