//! Helpers shared by integration tests (each test file includes what it
//! uses with `mod common;`).

#![allow(dead_code, reason = "each test binary uses a different part")]

pub mod libvirtd;
