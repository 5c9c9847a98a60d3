//! Tooling for havirt's tests and its multi-host lab (LAB-NOTES.md): not
//! part of the daemon's decisions.

pub mod faultfs;
