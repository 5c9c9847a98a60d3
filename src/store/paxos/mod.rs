//! Lease compare-and-swap on a raw shared LUN with no locks: Disk Paxos
//! (Gafni and Lamport, "Disk Paxos", 2003; the single-disk form sanlock's
//! paxos_lease.c uses), as a pure state machine.
//!
//! Nothing serializes two hosts' writes to a raw LUN (file locks are local to
//! one kernel), so a lease change cannot be "read, compare, write". Here each
//! host writes only its own sector and reads everyone's; per-sector writes are
//! the only atomicity assumed.
//!
//! # On-disk area (one per lease)
//!
//! `max_hosts` consecutive logical sectors (512 or 4096 bytes, [`SectorSize`]);
//! sector `h` belongs to host slot `h` and holds its [`Dblock`] (format in
//! `sector`). A dblock is the host's ballot state for one lease version
//! (`mbal`, `bal`, `inp`, `lver`) *and* its copy of the leader record
//! (`leader`: the newest committed lease it knows). The committed lease is
//! the `leader` of highest generation over all sectors.
//!
//! Why no shared leader sector (sanlock has one): a sector that several hosts
//! write can be rolled back. Host A commits generation g, its write stalls in
//! the SAN; B and C commit g and g+1; A's write lands: the shared sector is
//! back at g, and a host that reads only it thinks the owner of g still owns
//! the lease (an S1 hazard). Each host's own sector moves only forward (the
//! driver rule below), so the highest `leader` over all sectors never goes
//! back. The model test (`model.rs`) checks exactly that.
//!
//! # The algorithm: `cas(expect g, new lease of generation g+1)`
//!
//! 1. **Scan**: read all sectors. Committed lease `L` ≠ g: `Conflict(L)`
//!    (`Done` if `L` is our `new`: a helper committed it for us).
//! 2. **Prepare** (phase 1): ballot `b` = the smallest number above every
//!    `mbal` seen with `(b - 1) mod max_hosts = host` (unique per host); write
//!    own dblock `mbal = b, lver = g+1` (keeping `bal`/`inp` if they are for
//!    g+1), read all. A committed lease newer than g settles it as in 1; a
//!    dblock of `lver > g+1` or of `lver = g+1, mbal > b`: [`Outcome::Retry`].
//!    Value: the `inp` of highest `bal` among dblocks of `lver = g+1`, else
//!    `new`.
//! 3. **Accept** (phase 2): write `mbal = bal = b, inp = value`, read all,
//!    same checks.
//! 4. **Commit**: write own dblock with `leader = value`. `Done(value)` if
//!    `value == new`, else `Conflict(value)`: another host's value was chosen
//!    first and we finished its commit (its writer may have died after
//!    phase 2: a leader that lags a chosen value is caught up this way).
//!
//! A plain lease read ([`Area::read_step`], [`Area::lease`]) is step 1 alone.
//!
//! # I/O cost
//!
//! Every read is one contiguous read of all `max_hosts` sectors (the dblocks
//! are adjacent); every write is one sector. For N host slots, an uncontended
//! CAS is **3 reads of N sectors and 3 writes of 1 sector** (6 I/Os whatever
//! N is); a lease read is 1 read of N sectors; a CAS that finds the lease
//! moved is 1 read. With 512-byte sectors and 64 slots a read is 32 KiB.
//!
//! # The driver's rule
//!
//! **A host never issues a write to its own dblock while an earlier write to
//! it may still be in flight.** A write that timed out may land later and
//! roll the dblock back past a promise (`mbal`) the host has since made;
//! Disk Paxos is then unsafe. Hence:
//!
//! - A [`Proposer`] (one per lease and host) is consumed by [`Proposer::cas`]
//!   and handed back by [`Cas::finish`] only once the CAS is finished, which
//!   is only after the result of its last I/O was fed in. Feed a result when
//!   the I/O has *returned*, not when a timer gave up on it: the driver may
//!   tell the engine "timeout" earlier, but keeps the `Cas` until then and
//!   starts the next CAS on that lease only with the `Proposer` it got back.
//! - A `Cas` dropped unfinished loses its `Proposer`. Make a new one only
//!   where no write of this host to the area can still be in flight (at
//!   daemon start, after waiting out the I/O timeout of a previous process).
//!
//! # Call order
//!
//! `let mut cas = proposer.cas(g, new);` then loop: `cas.poll_io()` gives the
//! next [`Step`] (or `None` while one is outstanding or when finished); do it;
//! `cas.handle_io(result)`. When `cas.outcome()` is `Some`, `cas.finish()`
//! returns the outcome and the `Proposer`. On `Retry`, back off for a random
//! time (dueling proposers otherwise preempt each other forever) and start
//! again with the same `expect_generation`. An error after a write means the
//! lease may or may not have changed: read it again.

mod sector;

use super::block::MAX_BLOCK_HOSTS;
use super::dir::FREE_LEASE;
use super::record::{ClusterId, RecordError};
use crate::engine::config::HostId;
use crate::engine::io::{CasOutcome, Lease, LeaseKey, StorageError};
use serde::{Deserialize, Serialize};

/// The logical sector size of the device: the unit of atomic writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SectorSize {
    B512,
    B4096,
}

impl SectorSize {
    pub fn bytes(self) -> usize {
        match self {
            SectorSize::B512 => 512,
            SectorSize::B4096 => 4096,
        }
    }
}

/// Size and shape of one lease's area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub sector: SectorSize,
    /// Host slots, one sector each; host ids are `0..max_hosts`.
    pub max_hosts: u16,
}

impl Layout {
    pub fn new(sector: SectorSize, max_hosts: u16) -> Result<Layout, PaxosError> {
        if max_hosts == 0 || max_hosts > MAX_BLOCK_HOSTS {
            return Err(PaxosError::MaxHostsOutOfRange { max_hosts });
        }
        Ok(Layout { sector, max_hosts })
    }

    pub fn area_bytes(&self) -> usize {
        self.sector.bytes() * usize::from(self.max_hosts)
    }
}

/// One lease's area: where its records are and whose they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Area {
    pub cluster: ClusterId,
    pub key: LeaseKey,
    pub layout: Layout,
}

/// A host's ballot block. All zeros on disk (never written) reads as
/// [`Dblock::empty`]: no promise, nothing accepted, lease free at 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dblock {
    /// The resource, so that a sector copied to another lease's area is refused.
    pub key: LeaseKey,
    /// The slot's host, so that a sector copied to another slot is refused.
    pub host: HostId,
    /// The highest ballot this host promised (0: none).
    pub mbal: u64,
    /// The ballot `inp` was accepted in (0: nothing accepted).
    pub bal: u64,
    /// The lease version being decided: the generation of `inp`.
    pub lver: u64,
    /// The value accepted in ballot `bal`.
    pub inp: Option<Lease>,
    /// The newest committed lease this host knows (its leader record).
    pub leader: Lease,
}

impl Dblock {
    pub fn empty(key: LeaseKey, host: HostId) -> Dblock {
        Dblock { key, host, mbal: 0, bal: 0, lver: 0, inp: None, leader: FREE_LEASE }
    }

    /// What every dblock this module writes satisfies; anything else on
    /// disk is refused as malformed rather than reasoned about.
    fn check(&self) -> Result<(), String> {
        if self.lver == 0 || self.mbal == 0 {
            return Err(format!("written dblock with lver {} and mbal {}", self.lver, self.mbal));
        }
        if self.bal > self.mbal {
            return Err(format!("bal {} above mbal {}", self.bal, self.mbal));
        }
        match self.inp {
            None if self.bal != 0 => return Err(format!("bal {} with no value", self.bal)),
            Some(_) if self.bal == 0 => return Err("a value with bal 0".into()),
            Some(v) if v.generation != self.lver => {
                return Err(format!("value of generation {} under lver {}", v.generation, self.lver));
            }
            _ => {}
        }
        let g = self.leader.generation;
        if g != self.lver && g.checked_add(1) != Some(self.lver) {
            return Err(format!("leader generation {g} with lver {}", self.lver));
        }
        Ok(())
    }
}

/// Why a CAS or a lease read failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PaxosError {
    #[error("max_hosts {max_hosts} out of range: 1 to {MAX_BLOCK_HOSTS}")]
    MaxHostsOutOfRange { max_hosts: u16 },
    #[error("host {host} has no ballot block: the area has slots for host ids 0 to {max_hosts} (exclusive)")]
    HostOutOfRange { host: HostId, max_hosts: u16 },
    #[error("new lease generation {new} is not expect_generation + 1 (expected {expect} + 1)")]
    NotNextGeneration { expect: u64, new: u64 },
    #[error("{stage} I/O on the lease area failed ({error:?}): the lease may or may not have changed; read it again")]
    Io { stage: &'static str, error: StorageError },
    #[error("read returned {got} bytes, the lease area is {expected} bytes")]
    ShortRead { got: usize, expected: usize },
    #[error("sector {sector} of the lease area (host {sector}'s ballot block) rejected: {source}")]
    Rejected { sector: u16, source: RecordError },
    #[error("hosts {a} and {b} hold different leases as committed at generation {generation}: corrupt area")]
    Disagreement { generation: u64, a: HostId, b: HostId },
    #[error("ballot numbers exhausted (an mbal near 2^64 on disk): corrupt area")]
    BallotOverflow,
    #[error("cannot encode ballot block: {0}")]
    Encode(RecordError),
}

/// How a CAS ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The lease is now `new` (generation `expect + 1`).
    Done(Lease),
    /// The lease is this one (another host's change, committed).
    Conflict(Lease),
    /// A higher ballot preempted ours; back off randomly and start over.
    Retry,
}

impl Outcome {
    /// The engine's view; `None` for `Retry`, which the driver handles.
    pub fn cas_outcome(self) -> Option<CasOutcome> {
        match self {
            Outcome::Done(l) => Some(CasOutcome::Done(l)),
            Outcome::Conflict(l) => Some(CasOutcome::Conflict(l)),
            Outcome::Retry => None,
        }
    }
}

/// One I/O the driver performs for a `Cas`, in sectors relative to the area
/// (an area has at most `MAX_BLOCK_HOSTS` sectors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Read `sectors` sectors from `first_sector` (always the whole area).
    Read { first_sector: u16, sectors: u16 },
    /// Write `bytes` (one sector) at `sector`, on stable storage when done.
    Write { sector: u16, bytes: Vec<u8> },
}

/// A finished I/O's result, fed to [`Cas::handle_io`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Completed {
    Read(Vec<u8>),
    Written,
}

impl Area {
    /// The read of a lease (and of a CAS's every "read all").
    pub fn read_step(&self) -> Step {
        Step::Read { first_sector: 0, sectors: self.layout.max_hosts }
    }

    /// The committed lease in a read of the area (`FREE_LEASE` if none).
    pub fn lease(&self, bytes: &[u8]) -> Result<Lease, PaxosError> {
        committed(&self.dblocks(bytes)?)
    }

    /// Every host's dblock from a read of the whole area.
    pub fn dblocks(&self, bytes: &[u8]) -> Result<Vec<Dblock>, PaxosError> {
        let sector_bytes = self.layout.sector.bytes();
        if bytes.len() != self.layout.area_bytes() {
            return Err(PaxosError::ShortRead { got: bytes.len(), expected: self.layout.area_bytes() });
        }
        (0..self.layout.max_hosts)
            .zip(bytes.chunks_exact(sector_bytes))
            .map(|(h, s)| match sector::decode(self, HostId(h), s) {
                Ok(d) => Ok(d.unwrap_or_else(|| Dblock::empty(self.key, HostId(h)))),
                Err(source) => Err(PaxosError::Rejected { sector: h, source }),
            })
            .collect()
    }

    /// `d` as one sector.
    pub fn encode(&self, d: &Dblock) -> Result<Vec<u8>, PaxosError> {
        sector::encode(self, d).map_err(PaxosError::Encode)
    }

    /// The dblock in one sector of host `host` (an all-zero sector: never
    /// written, [`Dblock::empty`]); the simulator's device uses it to see
    /// what a landed write committed.
    pub fn decode_sector(&self, host: HostId, bytes: &[u8]) -> Result<Dblock, PaxosError> {
        match sector::decode(self, host, bytes) {
            Ok(d) => Ok(d.unwrap_or_else(|| Dblock::empty(self.key, host))),
            Err(source) => Err(PaxosError::Rejected { sector: host.0, source }),
        }
    }
}

/// The committed lease: the `leader` of highest generation. Two different
/// leaders at one generation would mean Paxos agreement failed.
fn committed(blocks: &[Dblock]) -> Result<Lease, PaxosError> {
    let mut best: Option<&Dblock> = None;
    for d in blocks {
        match best {
            Some(b) if b.leader.generation == d.leader.generation && b.leader != d.leader => {
                return Err(PaxosError::Disagreement { generation: d.leader.generation, a: b.host, b: d.host });
            }
            Some(b) if b.leader.generation >= d.leader.generation => {}
            _ => best = Some(d),
        }
    }
    Ok(best.map_or(FREE_LEASE, |d| d.leader))
}

/// The smallest ballot above `above` that belongs to slot `host` of `n`.
pub(crate) fn ballot_above(above: u64, n: u16, host: HostId) -> Result<u64, PaxosError> {
    let (n, h) = (u64::from(n), u64::from(host.0));
    let b = (above / n * n).checked_add(h + 1).ok_or(PaxosError::BallotOverflow)?;
    if b > above { Ok(b) } else { b.checked_add(n).ok_or(PaxosError::BallotOverflow) }
}

/// A deliberate bug, for the model test to prove that its checker bites.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flaw {
    /// Go straight to phase 2 with our own value.
    SkipPrepare,
    /// Run phase 1 but propose our own value whatever was accepted.
    IgnoreAccepted,
}

/// The right of one host to change one lease: at most one `Cas` at a time
/// (see the module doc, "The driver's rule").
#[derive(Debug)]
pub struct Proposer {
    area: Area,
    host: HostId,
    #[cfg(test)]
    flaw: Option<Flaw>,
}

impl Proposer {
    pub fn new(area: Area, host: HostId) -> Result<Proposer, PaxosError> {
        if host.0 >= area.layout.max_hosts {
            return Err(PaxosError::HostOutOfRange { host, max_hosts: area.layout.max_hosts });
        }
        Ok(Proposer {
            area,
            host,
            #[cfg(test)]
            flaw: None,
        })
    }

    #[cfg(test)]
    pub(crate) fn with_flaw(mut self, flaw: Option<Flaw>) -> Proposer {
        self.flaw = flaw;
        self
    }

    pub fn area(&self) -> &Area {
        &self.area
    }

    pub fn host(&self) -> HostId {
        self.host
    }

    /// Starts `compare-and-swap(expect_generation, new)`; `new.generation`
    /// must be `expect_generation + 1` (otherwise the CAS is finished at once
    /// with `NotNextGeneration`).
    pub fn cas(self, expect_generation: u64, new: Lease) -> Cas {
        let mut cas = Cas {
            proposer: self,
            expect: expect_generation,
            new,
            stage: Stage::Scan,
            issued: false,
            ballot: 0,
            base: FREE_LEASE,
            value: new,
            write: Vec::new(),
        };
        if expect_generation.checked_add(1) != Some(new.generation) {
            cas.finish_with(Err(PaxosError::NotNextGeneration { expect: expect_generation, new: new.generation }));
        }
        cas
    }
}

/// Where a CAS is; every stage but `Finished` is one I/O.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Stage {
    Scan,
    Prepare,
    ReadPrepare,
    Accept,
    ReadAccept,
    Commit,
    Finished(Result<Outcome, PaxosError>),
}

impl Stage {
    fn name(&self) -> &'static str {
        match self {
            Stage::Scan => "scan (read)",
            Stage::Prepare => "prepare (write)",
            Stage::ReadPrepare => "prepare (read)",
            Stage::Accept => "accept (write)",
            Stage::ReadAccept => "accept (read)",
            Stage::Commit => "commit (write)",
            Stage::Finished(_) => "finished",
        }
    }
}

/// What a finished CAS hands back.
#[derive(Debug)]
pub struct Finished {
    pub proposer: Proposer,
    pub outcome: Result<Outcome, PaxosError>,
}

/// One compare-and-swap in progress (call order in the module doc).
#[derive(Debug)]
pub struct Cas {
    proposer: Proposer,
    expect: u64,
    new: Lease,
    stage: Stage,
    /// The stage's I/O was handed out and its result is not in yet.
    issued: bool,
    ballot: u64,
    /// The committed lease at `expect`, carried in our dblock's `leader`.
    base: Lease,
    /// The value we accept in phase 2 and commit.
    value: Lease,
    /// The sector a write stage writes.
    write: Vec<u8>,
}

impl Cas {
    /// The next I/O to perform; `None` while one is outstanding or once finished.
    pub fn poll_io(&mut self) -> Option<Step> {
        if self.issued || matches!(self.stage, Stage::Finished(_)) {
            return None;
        }
        self.issued = true;
        Some(match self.stage {
            Stage::Scan | Stage::ReadPrepare | Stage::ReadAccept => self.proposer.area.read_step(),
            _ => Step::Write { sector: self.proposer.host.0, bytes: self.write.clone() },
        })
    }

    /// The result of the I/O `poll_io` gave, once it has returned.
    /// Panics on a driver bug: a result with no I/O outstanding, or a read's
    /// result for a write.
    pub fn handle_io(&mut self, result: Result<Completed, StorageError>) {
        assert!(self.issued, "Cas::handle_io with no I/O outstanding (stage {})", self.stage.name());
        self.issued = false;
        let reading = matches!(self.stage, Stage::Scan | Stage::ReadPrepare | Stage::ReadAccept);
        match result {
            Err(error) => self.finish_with(Err(PaxosError::Io { stage: self.stage.name(), error })),
            Ok(Completed::Read(bytes)) if reading => self.on_read(&bytes),
            Ok(Completed::Written) if !reading => self.on_written(),
            Ok(c) => panic!("Cas::handle_io: {c:?} for the {} stage", self.stage.name()),
        }
    }

    /// `Some` once finished.
    pub fn outcome(&self) -> Option<&Result<Outcome, PaxosError>> {
        match &self.stage {
            Stage::Finished(o) => Some(o),
            _ => None,
        }
    }

    /// The outcome and the `Proposer`, once finished; the `Cas` itself
    /// (boxed: it is large) before.
    pub fn finish(self) -> Result<Finished, Box<Cas>> {
        match self.stage {
            Stage::Finished(outcome) => Ok(Finished { proposer: self.proposer, outcome }),
            _ => Err(Box::new(self)),
        }
    }

    fn finish_with(&mut self, outcome: Result<Outcome, PaxosError>) {
        self.stage = Stage::Finished(outcome);
    }

    fn on_read(&mut self, bytes: &[u8]) {
        let blocks = match self.proposer.area.dblocks(bytes) {
            Ok(b) => b,
            Err(e) => return self.finish_with(Err(e)),
        };
        let step = match self.stage {
            Stage::Scan => self.on_scan(&blocks),
            Stage::ReadPrepare => self.on_prepared(&blocks),
            _ => self.on_accepted(&blocks),
        };
        if let Err(e) = step {
            self.finish_with(Err(e));
        }
    }

    fn on_written(&mut self) {
        match self.stage {
            Stage::Prepare => self.stage = Stage::ReadPrepare,
            Stage::Accept => self.stage = Stage::ReadAccept,
            _ => {
                let done = self.settle(self.value);
                self.finish_with(Ok(done));
            }
        }
    }

    /// `found` is committed at a generation other than `expect`.
    fn settle(&self, found: Lease) -> Outcome {
        if found == self.new { Outcome::Done(found) } else { Outcome::Conflict(found) }
    }

    fn lver(&self) -> u64 {
        self.new.generation
    }

    fn on_scan(&mut self, blocks: &[Dblock]) -> Result<(), PaxosError> {
        let current = committed(blocks)?;
        if current.generation != self.expect {
            self.finish_with(Ok(self.settle(current)));
            return Ok(());
        }
        let top = blocks.iter().map(|d| d.mbal).max().unwrap_or(0);
        self.ballot = ballot_above(top, self.proposer.area.layout.max_hosts, self.proposer.host)?;
        self.base = current;
        let own = blocks[usize::from(self.proposer.host.0)];
        let (bal, inp) = if own.lver == self.lver() { (own.bal, own.inp) } else { (0, None) };
        #[cfg(test)]
        if self.proposer.flaw == Some(Flaw::SkipPrepare) {
            return self.write_stage(Stage::Accept, self.ballot, Some(self.new), self.base);
        }
        self.write_stage(Stage::Prepare, bal, inp, self.base)
    }

    fn on_prepared(&mut self, blocks: &[Dblock]) -> Result<(), PaxosError> {
        if self.preempted(blocks)? {
            return Ok(());
        }
        let accepted = blocks.iter().filter(|d| d.lver == self.lver() && d.bal > 0).max_by_key(|d| d.bal);
        self.value = accepted.and_then(|d| d.inp).unwrap_or(self.new);
        #[cfg(test)]
        if self.proposer.flaw == Some(Flaw::IgnoreAccepted) {
            self.value = self.new;
        }
        self.write_stage(Stage::Accept, self.ballot, Some(self.value), self.base)
    }

    fn on_accepted(&mut self, blocks: &[Dblock]) -> Result<(), PaxosError> {
        if self.preempted(blocks)? {
            return Ok(());
        }
        self.write_stage(Stage::Commit, self.ballot, Some(self.value), self.value)
    }

    /// After a phase's read: finished (the lease moved on, or a higher ballot
    /// is at work) or not.
    fn preempted(&mut self, blocks: &[Dblock]) -> Result<bool, PaxosError> {
        let current = committed(blocks)?;
        if current.generation > self.expect {
            self.finish_with(Ok(self.settle(current)));
            return Ok(true);
        }
        let (lver, b) = (self.lver(), self.ballot);
        if blocks.iter().any(|d| d.lver > lver || (d.lver == lver && d.mbal > b)) {
            self.finish_with(Ok(Outcome::Retry));
            return Ok(true);
        }
        Ok(false)
    }

    /// Moves to a write stage writing our dblock with these fields.
    fn write_stage(&mut self, stage: Stage, bal: u64, inp: Option<Lease>, leader: Lease) -> Result<(), PaxosError> {
        let d = Dblock {
            key: self.proposer.area.key,
            host: self.proposer.host,
            mbal: self.ballot,
            bal,
            lver: self.lver(),
            inp,
            leader,
        };
        self.write = self.proposer.area.encode(&d)?;
        self.stage = stage;
        Ok(())
    }
}

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;
