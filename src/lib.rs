//! havirt: high availability for KVM/libvirt hosts.

pub mod alerts;
pub mod check;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod docs;
pub mod engine;
pub mod failover;
pub mod fence;
pub mod hypervisor;
pub mod lab;
pub mod metrics;
pub mod net;
pub mod sim;
pub mod store;
