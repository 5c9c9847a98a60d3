//! Pure decision logic: inputs and a timestamp in, actions out. No I/O, no
//! clock reads, no tokio, no libvirt, no unseeded randomness. The simulator
//! and the daemon drive the same `Node`.

pub mod admission;
pub mod config;
pub mod io;
pub mod maintenance;
pub mod master;
mod monitor;
pub mod node;
pub mod peers;
pub mod planner;
mod protect;
mod stop;
mod stopped;
#[cfg(test)]
mod tests;
pub mod time;
pub mod view;
