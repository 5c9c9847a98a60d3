//! havirt: high availability for KVM/libvirt hosts.

pub mod engine;
pub mod sim;
