//! Deterministic cluster simulator: one seed, one exact run.

pub mod faults;

use crate::engine::config::{ClusterSpec, DomainId, HostId};
use std::collections::BTreeMap;

/// The starting point of a simulated run.
#[derive(Clone, Debug)]
pub struct SimSetup {
    pub spec: ClusterSpec,
    /// Where each protected domain runs (and holds its lease) at time zero.
    pub initial: BTreeMap<DomainId, HostId>,
    pub seed: u64,
}
