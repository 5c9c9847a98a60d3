//! Lease compare-and-swap on the device: the `store::paxos` state machine
//! driven with O_DIRECT sector I/O, with the meaning of the dir backend's CAS
//! under a file lock (`DirStore::cas_lease`): `Done(new)` when the lease was
//! at `expect_generation` and is now `new`, `Conflict(current)` when it was
//! not (or another host's change won), an error when the outcome is unknown.
//!
//! One difference in what a `Conflict` may hide: a ballot of ours that lost
//! a round (`Retry`) may still be finished by another host (Disk Paxos
//! adopts an accepted value), and then be superseded by a later change
//! before our next attempt reads the area. That attempt then answers
//! `Conflict(the lease now)`: the engine learns the current lease, as from
//! a dir CAS, and never believes it holds a lease it does not (`Done` only
//! ever reports a value committed as ours). The race tests in tests/block.rs
//! count such generations ("committed, no `Done`").
//!
//! # Cost and timeout arithmetic
//!
//! One attempt is at most 6 I/Os, in sequence: 3 reads of the whole area
//! (M sectors of S bytes, one contiguous read) and 3 writes of one sector,
//! each followed by fdatasync. A lease read is 1 read. A CAS that finds the
//! lease moved is 1 read. Attempts that lose to a higher ballot (`Retry`)
//! are repeated after a random backoff of up to [`CAS_BACKOFF_MAX`], at
//! most [`MAX_CAS_ATTEMPTS`] times, and no new attempt starts once
//! [`CAS_BUDGET`] has passed since the call began. So a call issues at most
//! `6 × MAX_CAS_ATTEMPTS` = 18 I/Os and takes at most
//! `CAS_BUDGET + 6 × t_io + CAS_BACKOFF_MAX`, t_io being one I/O's latency;
//! uncontended, a CAS is 6 × t_io, so the engine's io_timeout on the call
//! (2 s by default, 1 s fast) fires only when the device is slower than
//! io_timeout / 6 per I/O, which is what a timeout should mean. Under
//! contention the retries may outlast io_timeout (CAS_BUDGET is 1 s): the
//! engine then sees `Timeout`, the same answer `Contended` gives, and the
//! call's thread finishes its last attempt as below.
//! A CAS on a domain not yet in the registry first adds it there
//! (`block::registry`): one registry change more.
//!
//! # A CAS that timed out
//!
//! The daemon gives up waiting after io_timeout and tells the engine
//! `Timeout`, but the worker thread goes on until its I/O returns: a write
//! that timed out may land later. The `Proposer` of the lease (its ballot
//! state) stays with that thread until its last I/O has returned, and only
//! then goes back to [`Proposers`]. A second CAS on the same lease in the
//! meantime waits for it (up to `CAS_BUDGET`), then fails with
//! `CasInFlight` (reported as `Timeout`): it never starts a second ballot
//! next to a write of ours that may still land (paxos module doc, "The
//! driver's rule"). A process's writes cannot outlive it: a process in
//! synchronous O_DIRECT I/O does not exit before the I/O returns, so a new
//! daemon may start with fresh proposers.

use super::{AreaIndex, BlockError, BlockStore};
use crate::engine::io::{CasOutcome, Lease, LeaseKey};
use crate::store::direct::AlignedBuf;
use crate::store::paxos::{Area, Completed, Outcome, PaxosError, Proposer, Step};
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// Attempts of one CAS call that lose to a higher ballot.
pub const MAX_CAS_ATTEMPTS: u32 = 3;
/// No attempt starts after this (the dir backend's lock wait, for the same
/// reason: a fraction of the default io_timeout).
pub const CAS_BUDGET: Duration = Duration::from_millis(1000);
/// The longest random backoff between two attempts: dueling proposers
/// otherwise preempt each other forever.
pub const CAS_BACKOFF_MAX: Duration = Duration::from_millis(50);
/// How often a CAS waiting for the proposer of its lease looks again.
const PROPOSER_POLL: Duration = Duration::from_millis(2);

/// Each lease's `Proposer`: `Some` when free, `None` while a CAS holds it
/// (absent: never used by this process).
#[derive(Debug, Default)]
pub(super) struct Proposers {
    slots: Mutex<BTreeMap<AreaIndex, Option<Proposer>>>,
}

impl Proposers {
    /// The proposer of `index`, made on first use; `None` when a CAS of
    /// this process still holds it.
    fn take(
        &self,
        index: AreaIndex,
        make: impl FnOnce() -> Result<Proposer, PaxosError>,
    ) -> Option<Result<Proposer, PaxosError>> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        match slots.get_mut(&index) {
            Some(slot) => slot.take().map(Ok),
            None => {
                slots.insert(index, None);
                Some(make())
            }
        }
    }

    fn put_back(&self, index: AreaIndex, p: Proposer) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = slots.entry(index).or_default();
        assert!(slot.is_none(), "two proposers for lease area {index:?}");
        *slot = Some(p);
    }

    /// A proposer that failed to be made: the next take makes it again.
    fn forget(&self, index: AreaIndex) {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner).remove(&index);
    }
}

#[allow(clippy::disallowed_methods, reason = "an adapter's own retry budget, not engine time")]
fn now() -> std::time::Instant {
    std::time::Instant::now()
}

/// A random duration in 1 ms ..= `max` (no seed to replay: this is the
/// adapter's backoff, not a decision).
fn random_backoff(max: Duration) -> Duration {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(u64::from(std::process::id()));
    let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(1 + h.finish() % max_ms)
}

/// Leases.
impl BlockStore {
    /// The lease of `key`; `FREE_LEASE` for a domain not in the registry
    /// (as a lease file never written in a dir datastore). One read of the
    /// area (plus the registry's version when the domain's index is not
    /// known yet).
    pub fn read_lease(&self, key: LeaseKey) -> Result<Lease, BlockError> {
        let Some((index, area)) = self.lease_area(key, false)? else {
            return Ok(crate::store::dir::FREE_LEASE);
        };
        self.read_area(index, &area)
    }

    /// Writes `new` only if the lease is at `expect_generation` (see the
    /// module doc for the meaning, cost and bounds). `new.generation` must
    /// be `expect_generation + 1`, as every change the engine makes.
    pub fn cas_lease(&self, key: LeaseKey, expect_generation: u64, new: Lease) -> Result<CasOutcome, BlockError> {
        self.me()?;
        let Some((index, area)) = self.lease_area(key, expect_generation == 0)? else {
            return Ok(CasOutcome::Conflict(crate::store::dir::FREE_LEASE));
        };
        self.cas_area(key, index, area, expect_generation, new)
    }

    /// `cas_lease` on a known area: the attempts and their bounds.
    pub(super) fn cas_area(
        &self,
        key: LeaseKey,
        index: AreaIndex,
        area: Area,
        expect_generation: u64,
        new: Lease,
    ) -> Result<CasOutcome, BlockError> {
        let me = self.me()?;
        let began = now();
        for attempt in 1..=MAX_CAS_ATTEMPTS {
            let proposer = self.wait_for_proposer(key, index, || Proposer::new(area, me), began)?;
            let (proposer, outcome) = self.run_cas(index, proposer, expect_generation, new);
            self.proposers.put_back(index, proposer);
            match outcome.map_err(|source| self.lease_error(index, source))? {
                Outcome::Done(l) => return Ok(CasOutcome::Done(l)),
                Outcome::Conflict(l) => return Ok(CasOutcome::Conflict(l)),
                Outcome::Retry if attempt == MAX_CAS_ATTEMPTS || began.elapsed() >= CAS_BUDGET => {
                    let budget_ms = CAS_BUDGET.as_millis();
                    return Err(BlockError::Contended { path: self.path.clone(), key, attempts: attempt, budget_ms });
                }
                Outcome::Retry => std::thread::sleep(random_backoff(CAS_BACKOFF_MAX)),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// The area of `key`, its index found through the registry (and added
    /// there if `add` and it is missing); `None`: not in the registry.
    fn lease_area(&self, key: LeaseKey, add: bool) -> Result<Option<(AreaIndex, Area)>, BlockError> {
        let index = match key {
            LeaseKey::Master => AreaIndex::Master,
            LeaseKey::Domain(d) => match self.domain_index(d, add)? {
                Some(i) => AreaIndex::Domain(i),
                None => return Ok(None),
            },
        };
        Ok(Some((index, self.area(index, key))))
    }

    pub(super) fn area(&self, _index: AreaIndex, key: LeaseKey) -> Area {
        Area { cluster: self.cluster, key, layout: self.layout.paxos() }
    }

    pub(super) fn read_area(&self, index: AreaIndex, area: &Area) -> Result<Lease, BlockError> {
        let bytes = self.read_area_bytes(index)?;
        area.lease(bytes.as_slice()).map_err(|source| self.lease_error(index, source))
    }

    fn read_area_bytes(&self, index: AreaIndex) -> Result<AlignedBuf, BlockError> {
        let offset = self.layout.area_offset(index)?;
        self.read_at(offset, self.layout.paxos().area_bytes())
    }

    /// A rejected ballot sector is counted, and the lease is unreadable (it
    /// may hide a promise): never read as free, never overwritten.
    fn lease_error(&self, area: AreaIndex, source: PaxosError) -> BlockError {
        if let PaxosError::Rejected { source: r, .. } = &source {
            self.count_reject(r);
        }
        BlockError::Lease { path: self.path.clone(), area, source }
    }

    fn wait_for_proposer(
        &self,
        key: LeaseKey,
        index: AreaIndex,
        make: impl Fn() -> Result<Proposer, PaxosError>,
        began: std::time::Instant,
    ) -> Result<Proposer, BlockError> {
        loop {
            match self.proposers.take(index, &make) {
                Some(Ok(p)) => return Ok(p),
                Some(Err(e)) => {
                    self.proposers.forget(index);
                    return Err(self.lease_error(index, e));
                }
                None if began.elapsed() >= CAS_BUDGET => {
                    return Err(BlockError::CasInFlight { path: self.path.clone(), key });
                }
                None => std::thread::sleep(PROPOSER_POLL),
            }
        }
    }

    /// One attempt, I/O by I/O; the proposer comes back only once the last
    /// I/O has returned. An I/O error is kept to be reported (the state
    /// machine only learns "it failed").
    pub(super) fn run_cas(
        &self,
        index: AreaIndex,
        proposer: Proposer,
        expect: u64,
        new: Lease,
    ) -> (Proposer, Result<Outcome, PaxosError>) {
        let mut cas = proposer.cas(expect, new);
        let mut last_error = None;
        while let Some(step) = cas.poll_io() {
            let result = self.do_step(index, &step).map_err(|e| {
                let kind = e.storage_error();
                last_error = Some(e);
                kind
            });
            cas.handle_io(result);
        }
        let finished = match cas.finish() {
            Ok(f) => f,
            Err(_) => panic!("a CAS driven synchronously is finished once it asks for no I/O"),
        };
        if let (Err(PaxosError::Io { stage, .. }), Some(e)) = (&finished.outcome, &last_error) {
            tracing::warn!("lease CAS, {stage}: {e}");
        }
        (finished.proposer, finished.outcome)
    }

    fn do_step(&self, index: AreaIndex, step: &Step) -> Result<Completed, BlockError> {
        let base = self.layout.area_offset(index)?;
        let sector = self.layout.sector.bytes() as u64;
        match step {
            Step::Read { first_sector, sectors } => {
                let len = usize::from(*sectors) * self.layout.sector.bytes();
                let at = base + u64::from(*first_sector) * sector;
                let buf = self.read_at(at, len)?;
                Ok(Completed::Read(buf.as_slice().to_vec()))
            }
            Step::Write { sector: s, bytes } => {
                let at = base + u64::from(*s) * sector;
                self.write_at(at, &AlignedBuf::from_slice(bytes))?;
                Ok(Completed::Written)
            }
        }
    }
}
