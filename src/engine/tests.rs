//! Unit tests of one `Node`, driven directly on a virtual clock in the manner
//! of quinn-proto's `Pair`: `step()` jumps to the node's next wakeup and
//! `drive_bounded()` stops after `MAX_STEPS`. The harness plays the rest of
//! the world with zero latency: storage (a lease table with real
//! compare-and-swap), two peers (network heartbeats and slots, each
//! switchable), the hypervisor and the fence agent. `src/sim` is the N-host
//! version; these tests pin single-node rules of DESIGN.md §1.

use super::config::{ClusterSpec, DomainId, DomainPolicy, DomainSpec, HostId, HostSpec, Profile, S3B_MARGIN, Timings};
use super::io::*;
use super::node::{Node, NodeConfig, SelfFence, TICK};
use super::peers::Verdict;
use super::time::{Duration, Instant};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Steps one `drive_bounded` call may take: 60 simulated seconds need about
/// 1100 (ticks, heartbeats, slot writes and reads), so this only catches a
/// node that stops moving time forward.
const MAX_STEPS: usize = 5_000;
/// Actions one step may produce, answers included: more means the node and
/// the harness feed each other in a loop.
const MAX_ACTIONS_PER_STEP: usize = 1_000;

/// The node under test; the lowest id, so it takes a free master lease first.
const ME: HostId = HostId(1);
const H2: HostId = HostId(2);
const H3: HostId = HostId(3);
/// Leased by ME, H2 and H3 respectively unless a test says otherwise.
const D1: DomainId = DomainId(1);
const D2: DomainId = DomainId(2);
const D3: DomainId = DomainId(3);

fn boot_of(h: HostId) -> BootId {
    1000 + u64::from(h.0)
}

fn owner(h: HostId) -> Owner {
    Owner { host: h, boot: boot_of(h) }
}

fn lease(h: HostId, generation: u64) -> Lease {
    Lease { owner: Some(owner(h)), generation, reason: LeaseReason::Acquired }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn spec() -> ClusterSpec {
    let hosts = [ME, H2, H3]
        .into_iter()
        .map(|id| HostSpec {
            id,
            name: id.to_string(),
            fence_agents: vec!["ipmi".into()],
            watchdog: true,
            fault_domain: None,
            memory_mib: 16_384,
            vcpus: 8,
            max_concurrent_starts: 4,
        })
        .collect();
    let domains = [D1, D2, D3]
        .into_iter()
        .map(|id| {
            let name = format!("vm{}", id.0);
            (id, DomainSpec { id, name, memory_mib: 1024, vcpus: 1, policy: DomainPolicy::default() })
        })
        .collect();
    ClusterSpec {
        name: "unit".into(),
        timings: Profile::Default.timings(),
        hosts,
        domains,
        memory_overcommit: 1.0,
        vcpu_overcommit: 4.0,
        admission: crate::engine::config::AdmissionPolicy::default(),
    }
}

/// Which requests the harness holds back instead of answering.
type Hold = Box<dyn FnMut(&Action) -> bool>;

/// A peer as the node sees it: network heartbeats and a storage slot.
struct FakePeer {
    /// Sends network heartbeats.
    net: bool,
    /// Writes its slot (the seq advances every write interval).
    storage: bool,
    /// What its heartbeats say about its own storage.
    storage_lost: bool,
    /// Its heartbeats claim it hears every member lost (false: it does not
    /// hear us, a one-way loss).
    hears_all: bool,
    hb_seq: u64,
    slot: Slot,
}

struct Harness {
    node: Node,
    t: Timings,
    now: Instant,
    /// Every storage request of the node succeeds (else: `StorageError::Io`).
    storage_ok: bool,
    /// `DestroyDomain` is answered with `DomainEvent::Stopped`.
    stop_works: bool,
    /// How `Action::Fence` is answered (None: never).
    fence_outcome: Option<FenceOutcome>,
    /// Shared storage: absent keys are free leases at generation 0.
    leases: BTreeMap<LeaseKey, Lease>,
    fenced: BTreeMap<HostId, FencedRecord>,
    my_assignments: Assignments,
    peers: BTreeMap<HostId, FakePeer>,
    next_peer_hb: Instant,
    next_peer_write: Instant,
    /// Issue time of the node's last slot write answered Ok (the S4 anchor).
    last_good_write: Option<Instant>,
    log: Vec<(Instant, Action)>,
    /// Requests it matches are not answered but kept in `held` (a slow or
    /// hung storage request), until `answer_held`.
    hold: Option<Hold>,
    held: Vec<Action>,
}

impl Harness {
    /// Three healthy hosts; the master lease belongs to H2 (alive), so ME
    /// is not master unless a test frees it.
    fn new() -> Harness {
        let spec = Arc::new(spec());
        let t = spec.timings;
        let cfg = NodeConfig {
            host: ME,
            boot: boot_of(ME),
            incarnation: 1,
            spec,
            rng_seed: 7,
            maintenance: false,
            broken_skip_s3: false,
        };
        let mut leases = BTreeMap::new();
        leases.insert(LeaseKey::Master, lease(H2, 1));
        for (d, h) in [(D1, ME), (D2, H2), (D3, H3)] {
            leases.insert(LeaseKey::Domain(d), lease(h, 1));
        }
        let peers = [H2, H3].into_iter().map(|h| (h, fake_peer(h))).collect();
        let mut h = Harness {
            node: Node::new(cfg, Instant::ZERO),
            t,
            now: Instant::ZERO,
            storage_ok: true,
            stop_works: true,
            fence_outcome: None,
            leases,
            fenced: BTreeMap::new(),
            my_assignments: Assignments::default(),
            peers,
            next_peer_hb: Instant::ZERO,
            next_peer_write: Instant::ZERO,
            last_good_write: None,
            log: Vec::new(),
            hold: None,
            held: Vec::new(),
        };
        h.drain();
        h
    }

    fn peer(&mut self, h: HostId) -> &mut FakePeer {
        self.peers.get_mut(&h).expect("a configured peer")
    }

    fn input(&mut self, input: Input) {
        self.node.handle_input(self.now, input);
        self.drain();
    }

    /// Jump to the node's next wakeup; the peers act first.
    fn step(&mut self) {
        self.now = self.node.poll_timeout().max(self.now);
        self.peers_act();
        self.node.handle_timeout(self.now);
        self.drain();
    }

    /// Answer every held request now (late), in the order asked.
    fn answer_held(&mut self) {
        for a in std::mem::take(&mut self.held) {
            if let Some(answer) = self.answer(&a) {
                self.node.handle_input(self.now, answer);
            }
        }
        self.drain();
    }

    fn drive_bounded(&mut self, until: Instant) {
        let mut steps = 0;
        while self.now < until {
            steps += 1;
            assert!(steps <= MAX_STEPS, "node did not reach {until} in {MAX_STEPS} steps (at {})", self.now);
            self.step();
        }
    }

    /// Execute every action the node asks for, feeding back the answers.
    fn drain(&mut self) {
        let mut n = 0;
        while let Some(a) = self.node.poll_action() {
            n += 1;
            assert!(n <= MAX_ACTIONS_PER_STEP, "action loop at {}:\n{}", self.now, self.events());
            if self.hold.as_mut().is_some_and(|f| f(&a)) {
                self.held.push(a.clone());
            } else if let Some(answer) = self.answer(&a) {
                self.node.handle_input(self.now, answer);
            }
            self.log.push((self.now, a));
        }
    }

    fn answer(&mut self, a: &Action) -> Option<Input> {
        let ok = self.storage_ok;
        let fail = StorageError::Io;
        let input = match a.clone() {
            Action::WriteSlot { op, .. } => {
                if ok {
                    self.last_good_write = Some(self.now);
                }
                Input::SlotWritten { op, result: if ok { Ok(()) } else { Err(fail) } }
            }
            Action::ReadStorage { op } => {
                Input::StorageRead { op, result: if ok { Ok(self.snapshot()) } else { Err(fail) } }
            }
            Action::ReadLease { op, key } => {
                Input::LeaseRead { op, key, result: if ok { Ok(self.lease(key)) } else { Err(fail) } }
            }
            Action::CasLease { op, key, expect_generation, new } => {
                let result = if ok { Ok(self.cas(key, expect_generation, new)) } else { Err(fail) };
                Input::LeaseCas { op, key, result }
            }
            Action::WriteFenced { op, record } => {
                if ok {
                    self.fenced.insert(record.host, record);
                }
                Input::RecordWritten { op, result: if ok { Ok(()) } else { Err(fail) } }
            }
            Action::WriteAssignments { op, host, assignments } => {
                if ok && host == ME {
                    self.my_assignments = assignments;
                }
                Input::RecordWritten { op, result: if ok { Ok(()) } else { Err(fail) } }
            }
            Action::StartDomain { domain } => Input::Domain { domain, event: DomainEvent::Started },
            Action::DestroyDomain { domain, .. } if self.stop_works => {
                Input::Domain { domain, event: DomainEvent::Stopped }
            }
            Action::Fence { op, target, .. } => Input::Fence { op, target, outcome: self.fence_outcome? },
            Action::ProbeIsolation => Input::IsolationProbe { reachable: true },
            _ => return None,
        };
        Some(input)
    }

    fn lease(&self, key: LeaseKey) -> Lease {
        let free = Lease { owner: None, generation: 0, reason: LeaseReason::Acquired };
        self.leases.get(&key).copied().unwrap_or(free)
    }

    /// Compare-and-swap as the storage backend does it under its file lock.
    fn cas(&mut self, key: LeaseKey, expect_generation: u64, new: Lease) -> CasOutcome {
        let current = self.lease(key);
        if current.generation != expect_generation {
            return CasOutcome::Conflict(current);
        }
        self.leases.insert(key, new);
        CasOutcome::Done(new)
    }

    fn snapshot(&self) -> StorageSnapshot {
        StorageSnapshot {
            slots: self.peers.iter().map(|(h, p)| (*h, p.slot.clone())).collect(),
            fenced: self.fenced.clone(),
            assignments: self.my_assignments.clone(),
            poison: None,
            rejected_records: 0,
        }
    }

    /// Peers write their slots (reporting the domains they own) and send
    /// heartbeats, each every interval, while they are able to.
    fn peers_act(&mut self) {
        if self.now >= self.next_peer_write {
            self.next_peer_write = self.now + self.t.storage_write_interval;
            for (h, p) in self.peers.iter_mut().filter(|(_, p)| p.storage) {
                p.slot.seq += 1;
                p.slot.domains = self
                    .leases
                    .iter()
                    .filter_map(|(k, l)| match k {
                        LeaseKey::Domain(d) if l.owner == Some(owner(*h)) => Some((*d, running(l.generation))),
                        _ => None,
                    })
                    .collect();
            }
        }
        if self.now >= self.next_peer_hb {
            self.next_peer_hb = self.now + self.t.net_heartbeat_interval;
            let mut hbs = Vec::new();
            for (h, p) in self.peers.iter_mut().filter(|(_, p)| p.net) {
                p.hb_seq += 1;
                hbs.push(peer_heartbeat(*h, p));
            }
            for hb in hbs {
                self.node.handle_input(self.now, Input::Net(NetMessage::Heartbeat(hb)));
            }
        }
    }

    /// When the node asked for each action that matches.
    fn times(&self, f: impl Fn(&Action) -> bool) -> Vec<Instant> {
        self.log.iter().filter(|(_, a)| f(a)).map(|(at, _)| *at).collect()
    }

    fn destroys(&self, d: DomainId) -> Vec<Instant> {
        self.times(|a| matches!(a, Action::DestroyDomain { domain, .. } if *domain == d))
    }

    fn pets(&self) -> Vec<Instant> {
        self.times(|a| matches!(a, Action::PetWatchdog))
    }

    /// The node's event log, for assertion messages.
    fn events(&self) -> String {
        let lines = self.log.iter().filter_map(|(_, a)| match a {
            Action::Emit(e) => Some(format!("{:>9} {}/{} {}", e.at.to_string(), e.host, e.role, e.text)),
            _ => None,
        });
        lines.collect::<Vec<_>>().join("\n")
    }
}

fn fake_peer(h: HostId) -> FakePeer {
    let slot = Slot {
        host: h,
        boot: boot_of(h),
        incarnation: 1,
        seq: 0,
        isolated: false,
        self_fenced: false,
        maintenance: false,
        released_master: None,
        used_memory_mib: 0,
        used_vcpus: 0,
        domains: BTreeMap::new(),
        memory_mib: 16_384,
        vcpus: 8,
        stopped: None,
    };
    FakePeer { net: true, storage: true, storage_lost: false, hears_all: true, hb_seq: 0, slot }
}

fn peer_heartbeat(h: HostId, p: &FakePeer) -> Heartbeat {
    Heartbeat {
        host: h,
        boot: boot_of(h),
        incarnation: 1,
        seq: p.hb_seq,
        storage_lost: p.storage_lost,
        hears_all_lost: p.storage_lost && p.hears_all,
        self_fenced: false,
        released: Vec::new(),
    }
}

fn running(generation: u64) -> DomainReport {
    DomainReport { state: DomainState::Running, generation }
}

/// ME runs D1 (adopted at start, lease ours), storage fine for 5 s, then
/// every storage request fails. Returns the S4 anchor: the start of the
/// last slot write that succeeded.
fn run_d1_then_lose_storage(h: &mut Harness) -> Instant {
    h.input(Input::DomainsAtStart(vec![D1]));
    h.drive_bounded(Instant(5_000));
    assert!(h.destroys(D1).is_empty(), "destroyed while storage worked:\n{}", h.events());
    assert!(h.node.local_domains().contains_key(&D1), "D1 was not adopted:\n{}", h.events());
    h.storage_ok = false;
    h.last_good_write.expect("slot writes succeeded during the first 5 s")
}

/// S4: with every slot write failing, D1 is destroyed no earlier than
/// renew_timeout after the start of the last good write (so in particular
/// not at renew_timeout - TICK, nor counted from its completion), and no
/// later than one tick after it.
#[test]
fn s4_destroys_after_renew_timeout_from_last_good_write_start() {
    let mut h = Harness::new();
    let anchor = run_d1_then_lose_storage(&mut h);
    let renew = h.t.renew_timeout;
    h.drive_bounded(anchor + renew + ms(1_000));
    let destroys = h.destroys(D1);
    let first = *destroys.first().unwrap_or_else(|| panic!("no self-fence by renew_timeout + 1 s:\n{}", h.events()));
    assert!(first >= anchor + renew, "destroyed at {first}, before {anchor} + renew_timeout:\n{}", h.events());
    assert!(first <= anchor + renew + TICK, "destroyed at {first}, later than renew_timeout + TICK");
    assert!(!matches!(h.node.self_fence_state(), SelfFence::Healthy));
}

/// S4 watchdog: pets arrive every heartbeat interval while healthy; once
/// the self-fence starts and D1 is never confirmed stopped, the node kills
/// qemu after io_timeout and stops petting by 2 x io_timeout after the
/// fence, so the watchdog resets the host.
#[test]
fn s4_watchdog_stops_being_petted_when_destroy_is_never_confirmed() {
    let mut h = Harness::new();
    h.stop_works = false;
    let anchor = run_d1_then_lose_storage(&mut h);
    let (io, watchdog) = (h.t.io_timeout, h.t.watchdog_timeout);
    h.drive_bounded(anchor + h.t.renew_timeout + io + io + watchdog);
    let pets = h.pets();
    let healthy: Vec<Instant> = pets.iter().copied().filter(|p| *p <= anchor).collect();
    assert!(healthy.len() >= 8, "too few pets while healthy: {healthy:?}");
    for w in healthy.windows(2) {
        assert!(w[1].since(w[0]) <= h.t.net_heartbeat_interval, "pet gap {w:?} while healthy");
    }
    let fence = h.destroys(D1)[0];
    let kills = h.times(|a| matches!(a, Action::DestroyDomain { domain: D1, kill: true }));
    assert!(kills.first().is_some_and(|k| *k >= fence + io && *k <= fence + io + TICK), "kill {kills:?}");
    assert!(pets.iter().all(|p| *p < fence + io + io), "petted at or after fence + 2 io: {pets:?}");
    assert!(matches!(h.node.self_fence_state(), SelfFence::Fencing { .. }), "{:?}", h.node.self_fence_state());
}

/// DESIGN.md §1: S3(b) is safe only if the watchdog resets a host that
/// could not stop its domains within renew_timeout + io_timeout +
/// watchdog_timeout of its last good write start, which is what
/// `Timings::validate` checks against host_dead_timeout (with S3B_MARGIN).
/// Here: the reset (last pet + watchdog_timeout) plus the margin must come
/// before a taker's S3(b) clock (started no earlier than the anchor) runs out.
#[test]
fn s4_watchdog_reset_lands_within_the_s3b_budget() {
    let mut h = Harness::new();
    h.stop_works = false;
    let anchor = run_d1_then_lose_storage(&mut h);
    h.drive_bounded(anchor + h.t.host_dead_timeout);
    let last_pet = *h.pets().last().expect("pets");
    let reset = last_pet + h.t.watchdog_timeout;
    assert!(
        reset + S3B_MARGIN <= anchor + h.t.host_dead_timeout,
        "last pet {last_pet}, reset {reset} + margin {S3B_MARGIN} is past anchor {anchor} + host_dead_timeout"
    );
}

/// DESIGN.md §3: when every member lost storage but all still hear each
/// other, nobody self-fences (and the watchdog keeps being petted); once one
/// peer reports its storage back, S4 applies within a heartbeat and a tick.
#[test]
fn all_hosts_lost_storage_exempts_from_s4_until_one_peer_recovers() {
    let mut h = Harness::new();
    let anchor = run_d1_then_lose_storage(&mut h);
    for p in [H2, H3] {
        h.peer(p).storage_lost = true;
        h.peer(p).storage = false;
    }
    let recovered_at = anchor + h.t.renew_timeout + ms(10_000);
    h.drive_bounded(recovered_at);
    assert!(h.destroys(D1).is_empty(), "self-fenced although every member lost storage:\n{}", h.events());
    let late_pets = h.pets().into_iter().filter(|p| *p >= anchor + h.t.renew_timeout + TICK).count();
    assert!(late_pets >= 10, "watchdog not petted during the exemption ({late_pets} pets)");
    h.peer(H3).storage_lost = false;
    h.drive_bounded(recovered_at + ms(2_000));
    let first = *h.destroys(D1).first().unwrap_or_else(|| panic!("no self-fence after H3 recovered:\n{}", h.events()));
    assert!(first >= recovered_at, "destroyed at {first} before H3 recovered");
    let promptly = recovered_at + h.t.net_heartbeat_interval + TICK;
    assert!(first <= promptly, "destroyed at {first}, later than {promptly}");
}

/// DESIGN.md §3 under one-way loss: we hear every member say its storage
/// is lost, but H3 does not hear us (its heartbeats do not claim it hears
/// all): no exemption, S4 at renew_timeout as usual.
#[test]
fn all_lost_heard_one_way_does_not_exempt() {
    let mut h = Harness::new();
    let anchor = run_d1_then_lose_storage(&mut h);
    for p in [H2, H3] {
        h.peer(p).storage_lost = true;
        h.peer(p).storage = false;
    }
    h.peer(H3).hears_all = false;
    h.drive_bounded(anchor + h.t.renew_timeout + ms(1_000));
    let first = *h.destroys(D1).first().unwrap_or_else(|| panic!("no self-fence under one-way loss:\n{}", h.events()));
    assert!(first >= anchor + h.t.renew_timeout, "destroyed at {first}, before renew_timeout");
    assert!(first <= anchor + h.t.renew_timeout + TICK, "destroyed at {first}, later than renew_timeout + TICK");
}

/// S5 at daemon start: a running domain whose lease names another host (D2)
/// or another boot of this host (D3) is destroyed as soon as the lease read
/// answers; the one whose lease is ours (D1) is adopted and left alone.
#[test]
fn s5_domains_found_at_start_without_our_lease_are_destroyed() {
    let mut h = Harness::new();
    let old_boot = Owner { host: ME, boot: boot_of(ME) - 1 };
    h.leases
        .insert(LeaseKey::Domain(D3), Lease { owner: Some(old_boot), generation: 4, reason: LeaseReason::Acquired });
    h.input(Input::DomainsAtStart(vec![D1, D2, D3]));
    assert_eq!(h.destroys(D2), vec![Instant::ZERO], "D2 (lease of H2):\n{}", h.events());
    assert_eq!(h.destroys(D3), vec![Instant::ZERO], "D3 (lease of our old boot):\n{}", h.events());
    h.drive_bounded(Instant(10_000));
    assert!(h.destroys(D1).is_empty(), "D1 has our lease:\n{}", h.events());
    assert!(h.times(|a| matches!(a, Action::StartDomain { .. })).is_empty(), "nothing may start");
    assert!(h.node.local_domains().contains_key(&D1) && h.node.local_domains().len() == 1);
}

/// Give ME an assignment of D1 at `generation` once storage is healthy.
fn assign_d1(h: &mut Harness, generation: u64) {
    h.drive_bounded(Instant(3_000));
    h.input(Input::Net(NetMessage::Assign { from: H2, domains: vec![(D1, generation)] }));
    h.drive_bounded(Instant(30_000));
}

/// S2: an assignment at generation g leads to our own CAS g -> g + 1 naming
/// this host and boot, and StartDomain only after that CAS succeeded.
#[test]
fn s2_assignment_is_renewed_by_cas_before_the_start() {
    let mut h = Harness::new();
    h.leases.insert(LeaseKey::Domain(D1), Lease { reason: LeaseReason::FenceConfirmed, ..lease(ME, 5) });
    assign_d1(&mut h, 5);
    let renew = h.log.iter().position(|(_, a)| {
        matches!(a, Action::CasLease { key: LeaseKey::Domain(D1), expect_generation: 5, new, .. }
            if new.generation == 6 && new.owner == Some(owner(ME)))
    });
    let start = h.log.iter().position(|(_, a)| matches!(a, Action::StartDomain { domain: D1 }));
    let (Some(renew), Some(start)) = (renew, start) else {
        panic!("renew {renew:?}, start {start:?}:\n{}", h.events());
    };
    assert!(renew < start, "StartDomain before the lease CAS");
    assert_eq!(h.lease(LeaseKey::Domain(D1)).owner, Some(owner(ME)));
    assert_eq!(h.times(|a| matches!(a, Action::StartDomain { .. })).len(), 1, "started more than once");
}

/// S2: if the renew CAS finds the lease moved on to another host, the
/// domain is never started here.
#[test]
fn s2_assignment_whose_cas_conflicts_is_never_started() {
    let mut h = Harness::new();
    h.leases.insert(LeaseKey::Domain(D1), lease(H3, 6));
    assign_d1(&mut h, 5);
    let cas = h.times(|a| matches!(a, Action::CasLease { key: LeaseKey::Domain(D1), expect_generation: 5, .. }));
    assert_eq!(cas.len(), 1, "expected one renew attempt:\n{}", h.events());
    assert!(h.times(|a| matches!(a, Action::StartDomain { .. })).is_empty(), "started:\n{}", h.events());
    assert_eq!(h.lease(LeaseKey::Domain(D1)), lease(H3, 6), "lease changed");
    assert!(h.node.local_domains().is_empty());
}

/// ME becomes master (free master lease), runs D1; H2 owns D2 and is
/// silent on the network from the start while its slot keeps advancing.
/// `prepare` adjusts the world before the node starts acting.
fn master_with_partitioned_h2(prepare: impl FnOnce(&mut Harness)) -> Harness {
    let mut h = Harness::new();
    h.leases.remove(&LeaseKey::Master);
    h.fence_outcome = Some(FenceOutcome::Confirmed);
    h.peer(H2).net = false;
    prepare(&mut h);
    h.input(Input::DomainsAtStart(vec![D1]));
    h.drive_bounded(Instant(5_000));
    assert!(h.node.is_master(), "ME did not become master:\n{}", h.events());
    h
}

fn fences(h: &Harness, target: HostId) -> Vec<Instant> {
    h.times(|a| matches!(a, Action::Fence { target: t, .. } if *t == target))
}

/// L2: a peer silent on the network but alive on storage is never fenced
/// by the master; a peer silent on both (H3 from 20 s) is fenced once it
/// has been silent for suspect_after, not before.
#[test]
fn l2_master_fences_the_silent_host_never_the_partitioned_one() {
    let mut h = master_with_partitioned_h2(|_| {});
    let dies_at = Instant(20_000);
    h.drive_bounded(dies_at);
    assert!(fences(&h, H3).is_empty(), "H3 fenced while alive:\n{}", h.events());
    h.peer(H3).net = false;
    h.peer(H3).storage = false;
    h.drive_bounded(Instant(60_000));
    assert!(h.node.is_master(), "lost the master role:\n{}", h.events());
    assert!(fences(&h, H2).is_empty(), "partitioned H2 fenced:\n{}", h.events());
    assert_eq!(h.node.verdicts.get(&H2), Some(&Verdict::Partitioned), "H2 not seen as partitioned");
    let f = fences(&h, H3);
    let first = *f.first().unwrap_or_else(|| panic!("silent H3 never fenced:\n{}", h.events()));
    let silent = h.t.suspect_after.max(h.t.storage_silent_after);
    assert!(first >= dies_at + silent, "H3 fenced at {first}, before {silent} of silence");
    assert!(first <= dies_at + silent + ms(1_000), "H3 fenced late, at {first}");
}

/// S3: over 60 s the master never moves the lease of D2 away from H2, which
/// is only partitioned (net silent, slot advancing). Control: the lease of
/// D3, whose owner H3 is dead from the start and fenced, does move.
#[test]
fn s3_master_never_takes_a_lease_from_a_partitioned_host() {
    let mut h = master_with_partitioned_h2(|h| {
        let h3 = h.peer(H3);
        h3.net = false;
        h3.storage = false;
        h3.slot.domains.insert(D3, running(1));
    });
    h.drive_bounded(Instant(60_000));
    assert!(h.node.is_master(), "ME is not master:\n{}", h.events());
    let moved_d2 = h.times(|a| matches!(a, Action::CasLease { key: LeaseKey::Domain(D2), .. }));
    assert!(moved_d2.is_empty(), "CAS on partitioned H2's lease at {moved_d2:?}:\n{}", h.events());
    assert_eq!(h.lease(LeaseKey::Domain(D2)), lease(H2, 1));
    let took_d3 = h.times(|a| {
        matches!(a, Action::CasLease { key: LeaseKey::Domain(D3), expect_generation: 1, new, .. }
            if new.reason == LeaseReason::FenceConfirmed && new.owner.is_some_and(|o| o.host != H3))
    });
    assert_eq!(took_d3.len(), 1, "dead, fenced H3's lease not moved once:\n{}", h.events());
    assert!(h.lease(LeaseKey::Domain(D3)).owner.is_some_and(|o| o.host != H3));
}

/// ME is master (free master lease) and runs D1; H3, owner of D3, is dead
/// from the start (silent everywhere) and its fence agent confirms.
/// `prepare` adjusts the world before the node starts acting.
fn master_with_dead_h3(prepare: impl FnOnce(&mut Harness)) -> Harness {
    let mut h = Harness::new();
    h.leases.remove(&LeaseKey::Master);
    h.fence_outcome = Some(FenceOutcome::Confirmed);
    let h3 = h.peer(H3);
    h3.net = false;
    h3.storage = false;
    h3.slot.domains.insert(D3, running(1));
    prepare(&mut h);
    h.input(Input::DomainsAtStart(vec![D1]));
    h
}

/// S3(b) needs a fresh registry (Input::ProtectedDomains): H3 is dead and
/// its fence fails, so only host_dead_timeout can free D3's lease. While the
/// registry reads keep coming the master takes D3 by S3(b) (at ~22 s); when
/// the only read is the one at start (reads failing while slot I/O works),
/// the registry is older than host_dead_timeout by then, so it holds back
/// (D3 could have been unprotected meanwhile and no longer be self-fenced by
/// H3), says so once, and takes D3 after the next read.
#[test]
fn s3b_takes_a_lease_only_with_a_fresh_registry() {
    for fresh in [true, false] {
        let mut h = master_with_dead_h3(|h| h.fence_outcome = Some(FenceOutcome::Failed));
        let mut next_read = Instant(0);
        let stop_reading = if fresh { Instant(60_000) } else { Instant(0) };
        while h.now < Instant(60_000) {
            if h.now >= next_read && h.now <= stop_reading {
                h.input(Input::ProtectedDomains { domains: protected(&[], &[]), read_issued: h.now });
                next_read = h.now + Duration::from_millis(2_000);
            }
            let until = if next_read <= stop_reading { next_read.min(Instant(60_000)) } else { Instant(60_000) };
            h.drive_bounded(until);
        }
        let taken = h.times(|a| {
            matches!(a, Action::CasLease { key: LeaseKey::Domain(D3), new, .. } if new.reason == LeaseReason::HostDeadTimeout)
        });
        let held = emitted(&h, "by host_dead_timeout: the protected-domain registry was last read");
        if fresh {
            assert_eq!(taken.len(), 1, "D3 not taken by S3(b) with a fresh registry:\n{}", h.events());
            assert!(taken[0] >= Instant(22_000), "taken at {} before host_dead_timeout", taken[0]);
            assert!(held.is_empty(), "held back with a fresh registry: {held:?}");
        } else {
            assert!(taken.is_empty(), "D3 taken at {taken:?} with a registry read last at 0 s:\n{}", h.events());
            assert_eq!(held.len(), 1, "the hold-back is said once:\n{}", h.events());
            h.input(Input::ProtectedDomains { domains: protected(&[], &[]), read_issued: h.now });
            h.drive_bounded(Instant(65_000));
            let taken = h.times(|a| matches!(a, Action::CasLease { key: LeaseKey::Domain(D3), new, .. } if new.reason == LeaseReason::HostDeadTimeout));
            assert_eq!(taken.len(), 1, "D3 not taken after a fresh read:\n{}", h.events());
            assert!(taken[0] >= Instant(60_000));
        }
    }
}

/// DESIGN.md §4: the master plans with the size a host's slot reports (each
/// daemon knows its own host; other hosts' sizes in its spec may be 0), and
/// with its spec's size when the slot says 0. ME and H2 each run one domain;
/// the roomier host gets D3, the lower id on a tie.
#[test]
fn master_plans_with_the_host_size_in_the_slot() {
    for (h2_memory_mib, expected) in [(65_536, H2), (0, ME)] {
        let mut h = master_with_dead_h3(|h| h.peer(H2).slot.memory_mib = h2_memory_mib);
        h.drive_bounded(Instant(30_000));
        assert!(h.node.is_master(), "ME is not master:\n{}", h.events());
        let to = h.lease(LeaseKey::Domain(D3)).owner.map(|o| o.host);
        assert_eq!(to, Some(expected), "H2 reports {h2_memory_mib} MiB:\n{}", h.events());
    }
}

/// A new master's lease load read that times out is read again: the late
/// answer is ignored and the master does not wait for it forever (it then
/// never planned again). D3's first load read hangs until 10 s; D3 (its
/// owner H3 dead and fenced) is still restarted.
#[test]
fn a_master_load_read_that_times_out_is_read_again() {
    let mut first = true;
    let mut h = master_with_dead_h3(|h| {
        h.hold = Some(Box::new(move |a| {
            let hold = first && matches!(a, Action::ReadLease { key: LeaseKey::Domain(D3), .. });
            first &= !hold;
            hold
        }));
    });
    h.drive_bounded(Instant(10_000));
    assert_eq!(h.held.len(), 1, "the first read of D3 was not held:\n{}", h.events());
    h.answer_held();
    h.drive_bounded(Instant(30_000));
    let reads = h.times(|a| matches!(a, Action::ReadLease { key: LeaseKey::Domain(D3), .. }));
    assert!(reads.len() >= 2, "D3's lease was not read again: {reads:?}");
    assert!(reads[1] < reads[0] + h.t.io_timeout + TICK + TICK, "read again late: {reads:?}");
    let owner = h.lease(LeaseKey::Domain(D3)).owner;
    assert!(owner.is_some_and(|o| o.host != H3), "D3 not restarted ({owner:?}):\n{}", h.events());
}

/// `Node::view`: what the master knows, for `havirt status`.
#[test]
fn view_shows_hosts_domains_and_the_master() {
    let mut h = master_with_partitioned_h2(|_| {});
    h.drive_bounded(Instant(40_000));
    let v = h.node.view(h.now);
    assert_eq!((v.host, v.boot, v.is_master, v.master), (ME, boot_of(ME), true, Some(ME)));
    assert_eq!((v.self_fence.as_str(), v.isolated, v.storage_healthy), ("healthy", false, true));
    assert!(v.last_good_write_age.is_some_and(|a| a <= h.t.storage_write_interval), "{v:?}");
    let verdicts: Vec<(HostId, &str)> = v.hosts.iter().map(|x| (x.id, x.verdict.as_str())).collect();
    assert_eq!(verdicts, [(ME, "self"), (H2, "partitioned"), (H3, "alive")]);
    let [me, h2, h3] = &v.hosts[..] else { panic!("three hosts: {v:?}") };
    assert_eq!((me.used_memory_mib, me.used_vcpus, me.memory_mib, me.vcpus), (1024, 1, 16_384, 8));
    assert_eq!((me.net_age, me.slot_age, me.boot), (None, None, Some(boot_of(ME))));
    assert_eq!(h2.net_age, None, "H2 was never heard on the network");
    assert!(h3.net_age.is_some_and(|a| a <= h.t.net_heartbeat_interval), "{h3:?}");
    for x in [h2, h3] {
        assert!(x.slot_age.is_some_and(|a| a < h.t.storage_silent_after), "{x:?}");
        assert_eq!((x.boot, x.memory_mib, x.vcpus), (Some(boot_of(x.id)), 16_384, 8));
    }
    let domains: Vec<_> = v.domains.iter().map(|d| (d.id, d.host, d.state, d.generation, d.local.as_deref())).collect();
    let run = Some(DomainState::Running);
    assert_eq!(
        domains,
        [
            (D1, Some(ME), run, Some(1), Some("running")),
            (D2, Some(H2), run, Some(1), None),
            (D3, Some(H3), run, Some(1), None)
        ]
    );
    assert!(v.tolerance.is_some(), "the master computes the admission figure: {v:?}");
}

/// A non-master's view: the master is whoever holds the lease; a domain no
/// slot reports has no host, and no generation without a master's cache.
#[test]
fn view_of_a_non_master() {
    let mut h = Harness::new();
    h.drive_bounded(Instant(10_000));
    let v = h.node.view(h.now);
    assert_eq!((v.is_master, v.master, v.tolerance), (false, Some(H2), None));
    let d1 = &v.domains[0];
    assert_eq!((d1.id, d1.host, d1.state, d1.generation, d1.local.clone()), (D1, None, None, None, None));
    assert_eq!(v.domains[1].host, Some(H2));
}

/// The spec's protected domains without `gone`, plus `extra`.
fn protected(gone: &[DomainId], extra: &[DomainSpec]) -> BTreeMap<DomainId, DomainSpec> {
    let mut all = spec().domains;
    all.retain(|d, _| !gone.contains(d));
    all.extend(extra.iter().map(|d| (d.id, d.clone())));
    all
}

fn emitted(h: &Harness, text: &str) -> Vec<Instant> {
    h.times(|a| matches!(a, Action::Emit(e) if e.text.contains(text)))
}

/// Unprotect: D1 is forgotten, neither destroyed nor released; its lease
/// stays ours untouched, even when storage is lost later (S4 covers
/// protected domains only).
#[test]
fn unprotect_forgets_a_domain_without_destroying_it_or_touching_its_lease() {
    let mut h = Harness::new();
    h.input(Input::DomainsAtStart(vec![D1]));
    h.drive_bounded(Instant(5_000));
    assert!(h.node.local_domains().contains_key(&D1), "D1 not adopted:\n{}", h.events());
    h.input(Input::ProtectedDomains { domains: protected(&[D1], &[]), read_issued: h.now });
    assert_eq!(emitted(&h, "vm1 unprotected: no longer managed"), [Instant(5_000)], "{}", h.events());
    assert!(h.node.local_domains().is_empty());
    assert!(h.node.view(h.now).domains.iter().all(|d| d.id != D1));
    h.drive_bounded(Instant(20_000));
    h.storage_ok = false;
    h.drive_bounded(Instant(40_000));
    assert!(h.destroys(D1).is_empty(), "D1 destroyed:\n{}", h.events());
    let touched = h.times(|a| matches!(a, Action::CasLease { key: LeaseKey::Domain(D1), .. }));
    assert!(touched.is_empty(), "D1's lease CAS at {touched:?}");
    assert!(h.times(|a| matches!(a, Action::StartDomain { .. })).is_empty());
    assert_eq!(h.lease(LeaseKey::Domain(D1)), lease(ME, 1));
}

/// Unprotect while the master moves the lease of an orphan: the CAS in
/// flight lands, but nobody is asked to start the domain (no Assign, no
/// assignment record, no local start) and its lease is not touched again.
#[test]
fn unprotect_while_the_master_places_it_starts_it_nowhere() {
    let mut h = master_with_dead_h3(|h| {
        h.hold = Some(Box::new(|a| {
            matches!(a, Action::CasLease { key: LeaseKey::Domain(D3), new, .. }
                if new.owner.is_some_and(|o| o.host != H3))
        }));
    });
    while h.held.is_empty() {
        assert!(h.now < Instant(30_000), "D3 never placed:\n{}", h.events());
        h.step();
    }
    let placing = h.now;
    h.input(Input::ProtectedDomains { domains: protected(&[D3], &[]), read_issued: h.now });
    h.answer_held();
    assert!(h.lease(LeaseKey::Domain(D3)).owner.is_some_and(|o| o.host != H3), "the CAS did land");
    h.drive_bounded(placing + ms(30_000));
    let after = |a: &Action| match a {
        Action::StartDomain { domain } => *domain == D3,
        Action::Send { msg: NetMessage::Assign { domains, .. }, .. } => domains.iter().any(|(d, _)| *d == D3),
        Action::WriteAssignments { assignments, .. } => assignments.domains.contains_key(&D3),
        Action::CasLease { key, .. } => *key == LeaseKey::Domain(D3),
        _ => false,
    };
    let late: Vec<Instant> = h.times(after).into_iter().filter(|t| *t > placing).collect();
    assert!(late.is_empty(), "D3 acted on after its unprotect at {late:?}:\n{}", h.events());
    assert!(!h.node.local_domains().contains_key(&D3));
}

/// Protect, as the daemon does it: the lease moves to the host that runs
/// the domain, then the registry, then DomainsAtStart there. The domain is
/// adopted (not started, not destroyed), and the master reads its lease.
#[test]
fn protect_adopts_the_running_domain_and_the_master_reads_its_lease() {
    let mut h = master_with_partitioned_h2(|_| {});
    h.input(Input::ProtectedDomains { domains: protected(&[D1], &[]), read_issued: h.now });
    h.drive_bounded(Instant(10_000));
    assert!(h.node.local_domains().is_empty());
    let at = h.now;
    h.leases.insert(LeaseKey::Domain(D1), lease(ME, 2));
    h.input(Input::ProtectedDomains { domains: protected(&[], &[]), read_issued: h.now });
    h.input(Input::DomainsAtStart(vec![D1]));
    h.drive_bounded(Instant(30_000));
    assert_eq!(emitted(&h, "vm1 protected"), [at], "{}", h.events());
    assert_eq!(emitted(&h, "adopted running domain vm1").last(), Some(&at), "{}", h.events());
    let local = h.node.local_domains().get(&D1).cloned();
    assert!(local.is_some_and(|l| l.generation == Some(2)), "D1 not adopted at generation 2:\n{}", h.events());
    assert!(h.destroys(D1).is_empty() && h.times(|a| matches!(a, Action::StartDomain { .. })).is_empty());
    let reads = h.times(|a| matches!(a, Action::ReadLease { key: LeaseKey::Domain(D1), .. }));
    assert!(reads.iter().filter(|t| **t == at).count() >= 2, "verify and master load at {at}: {reads:?}");
    // A second DomainsAtStart for a domain we already run changes nothing.
    h.input(Input::DomainsAtStart(vec![D1]));
    assert_eq!(h.node.local_domains().get(&D1).map(|l| l.state), Some(super::node::LocalState::Running));
}

/// A newly protected domain is never placed on an unread lease: D4's lease
/// is free, but while its read hangs the master does not touch it (and the
/// rest of the master goes on); once the read answers, D4 is started.
#[test]
fn a_newly_protected_domain_is_not_placed_before_its_lease_is_read() {
    let d4 = DomainId(4);
    let spec4 = DomainSpec { id: d4, name: "vm4".into(), memory_mib: 1024, vcpus: 1, policy: DomainPolicy::default() };
    let mut h = master_with_dead_h3(|h| {
        h.hold = Some(Box::new(move |a| matches!(a, Action::ReadLease { key: LeaseKey::Domain(d), .. } if *d == d4)));
    });
    h.drive_bounded(Instant(10_000));
    h.input(Input::ProtectedDomains { domains: protected(&[], &[spec4]), read_issued: h.now });
    h.drive_bounded(Instant(30_000));
    assert!(h.held.len() >= 2, "D4's read was not retried after io_timeout: {:?}", h.held);
    let cas = |h: &Harness| h.times(|a| matches!(a, Action::CasLease { key: LeaseKey::Domain(d), .. } if *d == d4));
    assert!(cas(&h).is_empty(), "D4 placed on an unread lease:\n{}", h.events());
    let d3 = h.lease(LeaseKey::Domain(D3)).owner;
    assert!(d3.is_some_and(|o| o.host != H3), "other restarts stopped ({d3:?}):\n{}", h.events());
    h.hold = None;
    h.answer_held();
    h.drive_bounded(Instant(40_000));
    assert_eq!(cas(&h).len(), 1, "D4 not placed once its lease was read:\n{}", h.events());
}

/// S4 for a domain protected while the host self-fences: it is destroyed
/// at once instead of being adopted.
#[test]
fn a_domain_protected_during_a_self_fence_is_destroyed() {
    let mut h = Harness::new();
    let anchor = run_d1_then_lose_storage(&mut h);
    h.drive_bounded(anchor + h.t.renew_timeout + ms(2_000));
    assert!(matches!(h.node.self_fence_state(), SelfFence::Fenced { .. }), "{}", h.events());
    h.input(Input::DomainsAtStart(vec![D2]));
    assert_eq!(h.destroys(D2), [h.now], "{}", h.events());
    assert!(h.node.local_domains().is_empty(), "D2 still local");
    assert!(matches!(h.node.self_fence_state(), SelfFence::Fenced { .. }));
}

/// S5: a domain started behind havirt's back after we released its lease
/// is a zombie, even while the lease still names us (the master may be
/// moving it right now).
#[test]
fn a_domain_we_released_is_not_adopted_again() {
    let mut h = Harness::new();
    h.input(Input::DomainsAtStart(vec![D1]));
    h.drive_bounded(Instant(5_000));
    for _ in 0..=DomainPolicy::default().max_restarts {
        h.input(Input::Domain { domain: D1, event: DomainEvent::Crashed });
        let until = h.now + h.t.restart_backoff_max;
        h.drive_bounded(until);
    }
    assert!(emitted(&h, "local restarts exhausted").len() == 1, "{}", h.events());
    assert_eq!(h.lease(LeaseKey::Domain(D1)).owner, Some(owner(ME)), "nobody moved it yet");
    h.input(Input::DomainsAtStart(vec![D1]));
    assert_eq!(h.destroys(D1), [h.now], "{}", h.events());
}

/// A slot must always fit its 4 KiB record: a host that released many
/// domains lists only the newest releases, up to the per-host cap.
#[test]
fn slot_lists_at_most_the_per_host_cap_of_domains_newest_releases_first() {
    use super::planner::MAX_DOMAINS_PER_HOST;
    let h = Harness::new();
    let mut node = h.node;
    let cap = MAX_DOMAINS_PER_HOST as u128;
    for i in 0..cap + 50 {
        let at = Instant(1000 + u64::try_from(i).expect("small"));
        node.released.insert(DomainId(1000 + i), (1, false, at));
    }
    let slot = node.build_slot(Instant(10_000));
    assert_eq!(slot.domains.len(), MAX_DOMAINS_PER_HOST as usize);
    assert!(slot.domains.contains_key(&DomainId(1000 + cap + 49)), "the newest release is listed");
    assert!(!slot.domains.contains_key(&DomainId(1000)), "the oldest release gave way");
    let encoded = crate::store::record::encode(
        crate::store::record::RecordKind::Slot,
        crate::store::record::ClusterId::from_name("unit"),
        &slot,
    );
    assert!(encoded.is_ok(), "{encoded:?}");
}
