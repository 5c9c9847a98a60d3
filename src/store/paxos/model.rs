//! Adversarial model test: several hosts run CAS attempts concurrently on one
//! in-memory lease area, with no locks, their steps interleaved at random.
//!
//! The world: a sector array whose only atomic unit is one sector write.
//! Writes land some time after they are issued (sometimes much later: a SAN
//! stall) and complete after they land; a read samples each sector at its own
//! random moment between issue and completion, so it can return a sector's
//! value before a write in flight. I/Os fail (a failed write has landed or
//! not, at random); hosts crash mid-CAS and restart with a fresh `Proposer`
//! once their write in flight has landed or been dropped (the driver's rule).
//! One seed sets everything (splitmix64, below).
//!
//! The checker watches every landed write and every outcome: per generation
//! at most one value is ever `Done`, every value committed to a leader record
//! equals every other committed at that generation and the `Done` one, and
//! the committed generation never goes down.

use super::{Area, Completed, Flaw, Layout, Outcome, PaxosError, Proposer, SectorSize, Step};
use crate::engine::config::HostId;
use crate::engine::io::{Lease, LeaseKey, LeaseReason, Owner, StorageError};
use crate::store::record::ClusterId;
use std::collections::BTreeMap;
use std::rc::Rc;

/// One sector's bytes; shared, so that sampling a read copies nothing.
type Sector = Rc<[u8]>;

/// splitmix64: tiny, seeded, and good enough to drive a schedule.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `0..len`, to pick from a slice.
    fn index(&mut self, len: usize) -> usize {
        usize::try_from(self.below(len as u64)).expect("below len fits usize")
    }

    /// Uniform in `0..n`, for small counts.
    fn small(&mut self, n: u16) -> u16 {
        u16::try_from(self.below(u64::from(n))).expect("below n fits n's type")
    }

    fn per_mille(&mut self, p: u64) -> bool {
        self.below(1000) < p
    }
}

/// What one seed runs; drawn from the seed by `Shape::draw`.
#[derive(Clone, Copy, Debug)]
struct Shape {
    hosts: u16,
    max_hosts: u16,
    sector: SectorSize,
    /// `Done` results each host must reach.
    goal: u32,
    delay_ticks_max: u64,
    stall_per_mille: u64,
    error_per_mille: u64,
    crash_per_mille: u64,
}

const STALL_TICKS_MAX: u64 = 300;
/// The first backoff window is about one uncontended CAS (6 I/Os).
const BACKOFF_TICKS_MIN: u64 = 24;
const BACKOFF_TICKS_MAX: u64 = 1500;
/// A run that has not reached every host's goal by then failed liveness.
const RUN_TICKS_MAX: u64 = 400_000;

impl Shape {
    fn draw(rng: &mut Rng, faults: bool) -> Shape {
        let hosts = 2 + rng.small(4);
        let sector = if rng.below(2) == 0 { SectorSize::B512 } else { SectorSize::B4096 };
        let f = |rng: &mut Rng, max: u64| if faults { rng.below(max + 1) } else { 0 };
        Shape {
            hosts,
            max_hosts: hosts + rng.small(3),
            sector,
            goal: 2 + u32::from(rng.small(3)),
            delay_ticks_max: 1 + rng.below(12),
            stall_per_mille: f(rng, 80),
            error_per_mille: f(rng, 40),
            crash_per_mille: f(rng, 15),
        }
    }
}

/// One I/O in flight.
struct Pending {
    step: Step,
    land_at: u64,
    complete_at: u64,
    /// A write has reached the sector array (or was dropped by a failure).
    settled: bool,
    fail: bool,
    /// A read's sectors, each sampled at its own moment.
    samples: Vec<Option<Sector>>,
}

enum State {
    Idle { until: u64 },
    Busy { cas: Box<super::Cas>, io: Option<Pending> },
    Crashed { until: u64 },
}

struct Host {
    id: HostId,
    proposer: Option<Proposer>,
    state: State,
    /// The generation this host believes current (its next `expect`).
    known: u64,
    /// Makes every proposed value unique (stored as the owner's boot).
    attempt: u64,
    retries_in_row: u32,
    done: u32,
    /// CAS attempts started.
    attempts: u64,
}

/// The invariants, checked as the run goes.
#[derive(Default)]
struct Checker {
    done: BTreeMap<u64, Lease>,
    committed: BTreeMap<u64, Lease>,
    view: u64,
    violations: Vec<String>,
}

impl Checker {
    fn observe(&mut self, area: &Area, disk: &[Sector], t: u64) {
        let mut view = 0;
        for (h, s) in (0u16..).zip(disk) {
            let d = match super::sector::decode(area, HostId(h), s) {
                Ok(d) => d.unwrap_or_else(|| super::Dblock::empty(area.key, HostId(h))),
                Err(e) => return self.violations.push(format!("t={t}: sector {h} unreadable: {e}")),
            };
            let g = d.leader.generation;
            view = view.max(g);
            if g == 0 {
                continue;
            }
            let first = *self.committed.entry(g).or_insert(d.leader);
            if first != d.leader {
                self.violations.push(format!("t={t}: generation {g} committed as {first:?} and as {:?}", d.leader));
            }
            if self.done.get(&g).is_some_and(|v| *v != d.leader) {
                self.violations
                    .push(format!("t={t}: generation {g} Done as {:?}, committed {:?}", self.done[&g], d.leader));
            }
        }
        if view < self.view {
            self.violations.push(format!("t={t}: committed generation went back from {} to {view}", self.view));
        }
        self.view = view;
    }

    fn on_done(&mut self, v: Lease, t: u64) {
        let g = v.generation;
        if let Some(prev) = self.done.insert(g, v).filter(|p| *p != v) {
            self.violations.push(format!("t={t}: generation {g} Done twice: {prev:?} and {v:?}"));
        }
        if self.committed.get(&g) != Some(&v) {
            self.violations.push(format!("t={t}: Done {v:?} but committed {:?}", self.committed.get(&g)));
        }
    }
}

/// The result of one seed.
struct Run {
    checker: Checker,
    /// Every host reached its goal within `RUN_TICKS_MAX`.
    live: bool,
    /// Errors other than an injected I/O failure (a correct build has none).
    odd_errors: Vec<PaxosError>,
    /// CAS attempts started, over all hosts.
    attempts: u64,
    ticks: u64,
    events: Events,
}

struct World {
    rng: Rng,
    shape: Shape,
    area: Area,
    disk: Vec<Sector>,
    hosts: Vec<Host>,
    flaw: Option<Flaw>,
    checker: Checker,
    odd_errors: Vec<PaxosError>,
    events: Events,
    t: u64,
}

/// How often the adversary's moves happened, so a sweep proves it ran them.
#[derive(Clone, Copy, Debug, Default)]
struct Events {
    retries: u64,
    io_errors: u64,
    crashes: u64,
    stalls: u64,
}

fn area(layout: Layout) -> Area {
    Area { cluster: ClusterId::from_name("model"), key: LeaseKey::Master, layout }
}

impl World {
    fn new(seed: u64, faults: bool, flaw: Option<Flaw>) -> World {
        let mut rng = Rng(seed);
        let shape = Shape::draw(&mut rng, faults);
        let layout = Layout::new(shape.sector, shape.max_hosts).expect("valid layout");
        let area = area(layout);
        let hosts = (0..shape.hosts).map(|h| World::fresh_host(area, HostId(h), flaw)).collect();
        let zero: Sector = vec![0u8; shape.sector.bytes()].into();
        let disk = vec![zero; usize::from(shape.max_hosts)];
        World {
            rng,
            shape,
            area,
            disk,
            hosts,
            flaw,
            checker: Checker::default(),
            odd_errors: Vec::new(),
            events: Events::default(),
            t: 0,
        }
    }

    fn fresh_host(area: Area, id: HostId, flaw: Option<Flaw>) -> Host {
        let proposer = Proposer::new(area, id).expect("host in range").with_flaw(flaw);
        Host {
            id,
            proposer: Some(proposer),
            state: State::Idle { until: 0 },
            known: 0,
            attempt: 0,
            retries_in_row: 0,
            done: 0,
            attempts: 0,
        }
    }

    fn run(mut self) -> Run {
        while self.t < RUN_TICKS_MAX && !self.all_done() {
            // Nothing happens between events: jump to the next one.
            self.t = self.t.max(self.next_event().min(RUN_TICKS_MAX));
            self.settle_writes();
            self.sample_reads();
            // One of the hosts that can act now, at random.
            let ready: Vec<usize> =
                (0..self.hosts.len()).filter(|h| self.wakes_at(&self.hosts[*h]) <= self.t).collect();
            if !ready.is_empty() {
                let h = ready[self.rng.index(ready.len())];
                self.step_host(h);
            }
            self.t += 1;
        }
        let attempts = self.hosts.iter().map(|h| h.attempts).sum();
        let live = self.all_done();
        Run { live, checker: self.checker, odd_errors: self.odd_errors, attempts, ticks: self.t, events: self.events }
    }

    /// The earliest tick at which some host can act or some write lands.
    fn next_event(&self) -> u64 {
        let lands = |h: &Host| match &h.state {
            State::Busy { io: Some(p), .. } if !p.settled => p.land_at,
            _ => u64::MAX,
        };
        self.hosts.iter().map(|h| self.wakes_at(h).min(lands(h))).min().unwrap_or(self.t)
    }

    /// When `h` can next take a step.
    fn wakes_at(&self, h: &Host) -> u64 {
        match &h.state {
            State::Idle { .. } if h.done >= self.shape.goal => u64::MAX,
            State::Idle { until } | State::Crashed { until } => *until,
            State::Busy { io: None, .. } => self.t,
            State::Busy { io: Some(p), .. } => p.complete_at,
        }
    }

    fn all_done(&self) -> bool {
        self.hosts.iter().all(|h| h.done >= self.shape.goal && matches!(h.state, State::Idle { .. }))
    }

    /// Lands every write whose time has come (a failed write: land or drop).
    fn settle_writes(&mut self) {
        for i in 0..self.hosts.len() {
            let land = match &mut self.hosts[i].state {
                State::Busy { io: Some(p), .. } if !p.settled && p.land_at <= self.t => {
                    p.settled = true;
                    match &p.step {
                        Step::Write { sector, bytes } => Some((*sector, bytes.clone(), p.fail)),
                        Step::Read { .. } => None,
                    }
                }
                _ => None,
            };
            if let Some((sector, bytes, fail)) = land {
                let lands = !fail || self.rng.below(2) == 0;
                self.land(sector, bytes, lands);
            }
        }
    }

    fn land(&mut self, sector: u16, bytes: Vec<u8>, lands: bool) {
        if lands {
            self.disk[usize::from(sector)] = bytes.into();
            self.checker.observe(&self.area, &self.disk, self.t);
        }
    }

    /// Each unsampled sector of each read in flight is read now with p = 1/3.
    fn sample_reads(&mut self) {
        for i in 0..self.hosts.len() {
            if let State::Busy { io: Some(p), .. } = &mut self.hosts[i].state {
                for (s, slot) in p.samples.iter_mut().enumerate() {
                    if slot.is_none() && self.rng.below(3) == 0 {
                        *slot = Some(Rc::clone(&self.disk[s]));
                    }
                }
            }
        }
    }

    fn step_host(&mut self, h: usize) {
        let t = self.t;
        if matches!(self.hosts[h].state, State::Busy { .. }) && self.rng.per_mille(self.shape.crash_per_mille) {
            return self.crash(h);
        }
        match &self.hosts[h].state {
            State::Idle { until } if *until <= t && self.hosts[h].done < self.shape.goal => self.start(h),
            State::Crashed { until } if *until <= t => self.restart(h),
            State::Busy { io: None, .. } => self.issue(h),
            State::Busy { io: Some(p), .. } if p.complete_at <= t => self.complete(h),
            _ => {}
        }
    }

    fn start(&mut self, h: usize) {
        let host = &mut self.hosts[h];
        let proposer = host.proposer.take().expect("an idle host holds its proposer");
        host.attempt += 1;
        host.attempts += 1;
        let owner = Owner { host: host.id, boot: host.attempt };
        let new = Lease { owner: Some(owner), generation: host.known + 1, reason: LeaseReason::Acquired };
        host.state = State::Busy { cas: Box::new(proposer.cas(host.known, new)), io: None };
    }

    fn issue(&mut self, h: usize) {
        let t = self.t;
        let shape = self.shape;
        let State::Busy { cas, io } = &mut self.hosts[h].state else { unreachable!("issue on a busy host") };
        let Some(step) = cas.poll_io() else { return self.finish(h) };
        let mut delay = 1 + self.rng.below(shape.delay_ticks_max);
        if self.rng.per_mille(shape.stall_per_mille) {
            delay += self.rng.below(STALL_TICKS_MAX);
            self.events.stalls += 1;
        }
        let land_at = t + self.rng.below(delay + 1);
        let samples = match &step {
            Step::Read { sectors, .. } => vec![None; usize::from(*sectors)],
            Step::Write { .. } => Vec::new(),
        };
        let fail = self.rng.per_mille(shape.error_per_mille);
        *io = Some(Pending { step, land_at, complete_at: t + delay, settled: false, fail, samples });
    }

    /// Delivers the result of the host's I/O (its write has landed by now).
    fn complete(&mut self, h: usize) {
        let State::Busy { cas, io } = &mut self.hosts[h].state else { unreachable!("complete on a busy host") };
        let p = io.take().expect("an I/O in flight");
        let result = match (p.fail, p.step) {
            (true, _) => Err(StorageError::Io),
            (false, Step::Write { .. }) => Ok(Completed::Written),
            (false, Step::Read { .. }) => {
                let disk = &self.disk;
                let mut bytes = Vec::with_capacity(disk.len() * disk[0].len());
                for (s, v) in p.samples.into_iter().enumerate() {
                    bytes.extend_from_slice(&v.unwrap_or_else(|| Rc::clone(&disk[s])));
                }
                Ok(Completed::Read(bytes))
            }
        };
        cas.handle_io(result);
        if cas.outcome().is_some() {
            self.finish(h);
        }
    }

    fn finish(&mut self, h: usize) {
        let t = self.t;
        let State::Busy { cas, .. } = std::mem::replace(&mut self.hosts[h].state, State::Idle { until: t }) else {
            unreachable!("finish on a busy host")
        };
        let finished = cas.finish().unwrap_or_else(|_| panic!("finish before the outcome"));
        self.hosts[h].proposer = Some(finished.proposer);
        match finished.outcome {
            Ok(Outcome::Done(v)) => {
                self.checker.on_done(v, t);
                self.after(h, v.generation, true);
            }
            Ok(Outcome::Conflict(v)) => self.after(h, v.generation, false),
            Ok(Outcome::Retry) => {
                self.events.retries += 1;
                self.back_off(h);
            }
            Err(PaxosError::Io { .. }) => {
                self.events.io_errors += 1;
                self.back_off(h);
            }
            Err(e) => {
                self.odd_errors.push(e);
                self.back_off(h);
            }
        }
    }

    fn after(&mut self, h: usize, generation: u64, done: bool) {
        let pause = 1 + self.rng.below(8);
        let host = &mut self.hosts[h];
        host.known = generation;
        host.retries_in_row = 0;
        host.done += u32::from(done);
        host.state = State::Idle { until: self.t + pause };
    }

    /// Random exponential backoff, as the driver does after `Retry`.
    fn back_off(&mut self, h: usize) {
        let host = &mut self.hosts[h];
        host.retries_in_row = (host.retries_in_row + 1).min(8);
        let window = (BACKOFF_TICKS_MIN << host.retries_in_row).min(BACKOFF_TICKS_MAX);
        let pause = 1 + self.rng.below(window);
        self.hosts[h].state = State::Idle { until: self.t + pause };
    }

    /// The host dies mid-CAS. Its write in flight lands or is lost before it
    /// restarts (the driver's rule); it forgets what it knew.
    fn crash(&mut self, h: usize) {
        self.events.crashes += 1;
        let until = self.t + 1 + self.rng.below(50);
        let old = std::mem::replace(&mut self.hosts[h].state, State::Crashed { until });
        if let State::Busy { io: Some(p), .. } = old
            && let (false, Step::Write { sector, bytes }) = (p.settled, p.step)
        {
            let lands = self.rng.below(2) == 0;
            self.land(sector, bytes, lands);
        }
    }

    fn restart(&mut self, h: usize) {
        let (id, done, attempt, attempts) = {
            let x = &self.hosts[h];
            (x.id, x.done, x.attempt, x.attempts)
        };
        let mut host = World::fresh_host(self.area, id, self.flaw);
        (host.done, host.attempt, host.attempts) = (done, attempt, attempts);
        self.hosts[h] = host;
    }
}

/// Runs `seeds` and returns the first seed whose checker failed, if any.
fn sweep(seeds: std::ops::Range<u64>, faults: bool, flaw: Option<Flaw>) -> (Option<(u64, Vec<String>)>, Stats) {
    let mut stats = Stats::default();
    for seed in seeds {
        let run = World::new(seed, faults, flaw).run();
        stats.seeds += 1;
        stats.ticks += run.ticks;
        stats.attempts += run.attempts;
        stats.dones += run.checker.done.len() as u64;
        stats.retries += run.events.retries;
        stats.io_errors += run.events.io_errors;
        stats.crashes += run.events.crashes;
        stats.stalls += run.events.stalls;
        if flaw.is_none() {
            assert!(run.live, "SEED={seed}: not every host reached its goal in {RUN_TICKS_MAX} ticks");
            assert!(run.odd_errors.is_empty(), "SEED={seed}: unexpected errors {:?}", run.odd_errors);
        }
        if !run.checker.violations.is_empty() {
            return (Some((seed, run.checker.violations)), stats);
        }
    }
    (None, stats)
}

#[derive(Debug, Default)]
struct Stats {
    seeds: u64,
    ticks: u64,
    attempts: u64,
    dones: u64,
    retries: u64,
    io_errors: u64,
    crashes: u64,
    stalls: u64,
}

const SEEDS: u64 = 3000;

#[test]
fn model_holds_under_faults() {
    let (failed, stats) = sweep(0..SEEDS, true, None);
    eprintln!("paxos model, faults: {stats:?}");
    assert!(failed.is_none(), "SEED={:?}", failed);
    let moves = [stats.retries, stats.io_errors, stats.crashes, stats.stalls];
    assert!(moves.iter().all(|n| *n > 100), "every adversary move was made often: {stats:?}");
}

#[test]
fn model_holds_and_progresses_without_faults() {
    let (failed, stats) = sweep(10_000..10_000 + SEEDS / 2, false, None);
    eprintln!("paxos model, contention only: {stats:?}");
    assert!(failed.is_none(), "SEED={:?}", failed);
}

#[test]
fn checker_catches_a_cas_that_skips_phase_1() {
    let (failed, stats) = sweep(0..SEEDS, true, Some(Flaw::SkipPrepare));
    let (seed, violations) = failed.expect("skipping phase 1 must break agreement on some seed");
    eprintln!("SkipPrepare caught at SEED={seed} after {} seeds: {}", stats.seeds, violations[0]);
}

#[test]
fn checker_catches_a_cas_that_ignores_accepted_values() {
    let (failed, stats) = sweep(0..SEEDS, true, Some(Flaw::IgnoreAccepted));
    let (seed, violations) = failed.expect("ignoring accepted values must break agreement on some seed");
    eprintln!("IgnoreAccepted caught at SEED={seed} after {} seeds: {}", stats.seeds, violations[0]);
}

/// One host at a time: every CAS is `Done` at its first attempt, in exactly
/// 3 reads of the whole area and 3 one-sector writes.
#[test]
fn uncontended_cas_is_done_first_time_in_six_ios() {
    for max_hosts in [1u16, 3, 16] {
        let area = area(Layout::new(SectorSize::B512, max_hosts).expect("valid"));
        let mut disk = vec![vec![0u8; 512]; usize::from(max_hosts)];
        let mut known = 0;
        for round in 0..20u64 {
            let host = HostId(u16::try_from(round % u64::from(max_hosts)).expect("below max_hosts"));
            let new = Lease {
                owner: Some(Owner { host, boot: round }),
                generation: known + 1,
                reason: LeaseReason::Acquired,
            };
            let cas = Proposer::new(area, host).expect("in range").cas(known, new);
            let (outcome, reads, writes) = drive(cas, &mut disk);
            assert_eq!(outcome, Outcome::Done(new));
            assert_eq!((reads, writes), (vec![max_hosts; 3], 3));
            known = new.generation;
        }
    }
}

/// Runs a CAS alone against `disk`: outcome, sectors per read, writes.
fn drive(mut cas: super::Cas, disk: &mut [Vec<u8>]) -> (Outcome, Vec<u16>, u32) {
    let (mut reads, mut writes) = (Vec::new(), 0);
    for _ in 0..16 {
        match cas.poll_io() {
            Some(Step::Read { first_sector, sectors }) => {
                reads.push(sectors);
                let range = usize::from(first_sector)..usize::from(first_sector + sectors);
                cas.handle_io(Ok(Completed::Read(disk[range].concat())));
            }
            Some(Step::Write { sector, bytes }) => {
                writes += 1;
                disk[usize::from(sector)] = bytes;
                cas.handle_io(Ok(Completed::Written));
            }
            None => break,
        }
    }
    let outcome = cas.finish().unwrap_or_else(|_| panic!("a lone CAS finishes within 16 steps")).outcome;
    (outcome.expect("no error"), reads, writes)
}
