//! Network heartbeats: wire format and UDP loop.

pub mod udp;
pub mod wire;
