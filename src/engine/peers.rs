//! What one host knows about another, and the verdict it draws (DESIGN.md §3).
//! Only the observer's own monotonic clock is used; the peer's clock never is.

use super::config::Timings;
use super::io::{BootId, DomainReport, DomainState, Heartbeat, LeaseKey, Slot};
use super::time::Instant;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Heard on the network and its slot advances.
    Alive,
    /// Silent on the network, alive on storage: never fenced, leases stay valid.
    Partitioned,
    /// Partitioned and says (in its slot) that it is isolated.
    Isolated,
    /// Heard on the network but its slot stopped: it self-fences (S4).
    StorageLost,
    /// Silent everywhere: fence it.
    Suspect,
    /// Silent everywhere, but its last slot says its daemon stopped on
    /// purpose and will be back within the grace it gave (a restart, an
    /// upgrade): not fenced until that grace has passed since we read it.
    Restarting,
    /// Our own storage reads are stale: we cannot judge its storage.
    Unknown,
}

#[derive(Clone, Debug, Default)]
pub struct Peer {
    /// Latest authenticated heartbeat and when we received it.
    pub heartbeat: Option<Heartbeat>,
    /// Every release heard over the network from the current boot: each is
    /// a permanent fact, and a heartbeat carries only some of them.
    net_released: BTreeMap<LeaseKey, (u64, bool)>,
    net_released_boot: Option<BootId>,
    pub heard_at: Option<Instant>,
    /// Latest slot read, with its (incarnation, seq) identity.
    pub slot: Option<Slot>,
    slot_key: Option<(BootId, u64, u64)>,
    /// Completion of the first read that showed the current slot key: the
    /// conservative start of silence, used for S3(b).
    pub slot_seen_at: Option<Instant>,
    /// Completion of the read before that one: the write happened after it.
    /// Used only to notice silence quickly (fencing), never for takeover.
    pub slot_changed_after: Option<Instant>,
    /// Boots confirmed powered off (fence agent, operator, `fenced/` record).
    pub fenced_boots: BTreeSet<BootId>,
}

impl Peer {
    /// Record a heartbeat unless it is older than one we already have.
    /// Returns None for a stale one, else whether it taught us a release.
    pub fn observe_heartbeat(&mut self, now: Instant, hb: Heartbeat) -> Option<bool> {
        if let Some(old) = &self.heartbeat
            && old.boot == hb.boot
            && old.incarnation == hb.incarnation
            && hb.seq <= old.seq
        {
            return None;
        }
        if self.net_released_boot != Some(hb.boot) {
            self.net_released.clear();
            self.net_released_boot = Some(hb.boot);
        }
        let mut learned = false;
        for r in &hb.released {
            let known = self.net_released.get(&r.key);
            if known.is_none_or(|(g, _)| r.generation > *g) {
                self.net_released.insert(r.key, (r.generation, r.failed_start));
                learned = true;
            }
        }
        self.heartbeat = Some(hb);
        self.heard_at = Some(now);
        Some(learned)
    }

    /// Record what one storage read showed. `prev_read_done` is when our
    /// previous successful read completed.
    pub fn observe_slot(&mut self, read_done: Instant, prev_read_done: Option<Instant>, slot: Option<&Slot>) {
        let key = slot.map(|s| (s.boot, s.incarnation, s.seq));
        if self.slot_seen_at.is_none() || key != self.slot_key {
            self.slot_key = key;
            self.slot_seen_at = Some(read_done);
            self.slot_changed_after = Some(prev_read_done.unwrap_or(read_done));
        }
        self.slot = slot.cloned();
    }

    pub fn net_fresh(&self, now: Instant, t: &Timings) -> bool {
        self.heard_at.is_some_and(|h| now.since(h) < t.suspect_after)
    }

    /// Slot advanced recently. `last_read_issued`: issue time of our latest
    /// successful read (what it showed was true at or after that instant).
    pub fn storage_fresh(&self, last_read_issued: Instant, t: &Timings) -> bool {
        self.slot_changed_after.is_some_and(|c| last_read_issued.since(c) < t.storage_silent_after)
    }

    /// S3(b): the slot has not advanced for host_dead_timeout, measured from
    /// the first read that showed its current content to the issue of a later
    /// read that still showed it, and not since `all_lost_claimed` (when we
    /// last told the cluster we hear all lost: the peer may have held its
    /// domains on that claim, DESIGN.md §3).
    ///
    /// Never for a slot whose daemon stopped with nothing left to reset its
    /// host (`StopNotice::host_reset` false: systemd's service watchdog
    /// ends with the unit): its silence proves nothing about its domains.
    pub fn dead_by_timeout(&self, last_read_issued: Instant, all_lost_claimed: Option<Instant>, t: &Timings) -> bool {
        !self.unguarded() && self.silent_for_host_dead_timeout(last_read_issued, all_lost_claimed, t)
    }

    /// The timing half of `dead_by_timeout`.
    pub(super) fn silent_for_host_dead_timeout(
        &self,
        last_read_issued: Instant,
        all_lost_claimed: Option<Instant>,
        t: &Timings,
    ) -> bool {
        let Some(seen) = self.slot_seen_at else {
            return false;
        };
        let since = all_lost_claimed.map_or(seen, |c| seen.max(c));
        last_read_issued > since && last_read_issued.since(since) >= t.host_dead_timeout
    }

    pub fn verdict(&self, now: Instant, last_read_issued: Option<Instant>, reads_fresh: bool, t: &Timings) -> Verdict {
        let net = self.net_fresh(now, t);
        let Some(issued) = last_read_issued.filter(|_| reads_fresh) else {
            return if net { Verdict::Alive } else { Verdict::Unknown };
        };
        let storage = self.storage_fresh(issued, t);
        match (net, storage) {
            (true, true) => Verdict::Alive,
            (false, true) if self.slot.as_ref().is_some_and(|s| s.isolated) => Verdict::Isolated,
            (false, true) => Verdict::Partitioned,
            (true, false) => Verdict::StorageLost,
            (false, false) if self.in_restart_grace(now) => Verdict::Restarting,
            (false, false) => Verdict::Suspect,
        }
    }

    /// Its last slot announced a restart whose grace has not passed, on our
    /// clock, since the first read that showed that slot (the write was
    /// earlier, so this errs towards waiting longer, never shorter).
    fn in_restart_grace(&self, now: Instant) -> bool {
        let grace = self.slot.as_ref().and_then(|s| s.stopped).map_or(0, |n| n.grace_ms);
        self.slot_seen_at.is_some_and(|seen| now.since(seen) < super::time::Duration(grace))
    }

    /// Its daemon stopped and said nothing resets its host now.
    pub fn unguarded(&self) -> bool {
        self.slot.as_ref().and_then(|s| s.stopped).is_some_and(|n| !n.host_reset)
    }

    /// The boot this peer runs now, as far as we know.
    /// The newer of what its slot and its heartbeats say.
    pub fn current_boot(&self) -> Option<BootId> {
        match (&self.slot, &self.heartbeat) {
            (Some(s), Some(h)) if s.boot != h.boot && self.heard_at > self.slot_seen_at => Some(h.boot),
            (Some(s), _) => Some(s.boot),
            (None, Some(h)) => Some(h.boot),
            (None, None) => None,
        }
    }

    /// The newest generation of `key` this boot of the peer said it stopped
    /// and released (slot or heartbeat), and whether because its start
    /// failed: S3(c).
    pub fn released(&self, boot: BootId, key: LeaseKey) -> Option<(u64, bool)> {
        let by_net = self.net_released.get(&key).copied().filter(|_| self.net_released_boot == Some(boot));
        let by_slot = self.slot.as_ref().filter(|s| s.boot == boot).and_then(|s| match key {
            LeaseKey::Master => s.released_master.map(|g| (g, false)),
            LeaseKey::Domain(d) => match s.domains.get(&d) {
                Some(DomainReport { state: DomainState::Released { failed_start }, generation }) => {
                    Some((*generation, *failed_start))
                }
                _ => None,
            },
        });
        by_net.max(by_slot)
    }
}

/// Names for logs.
pub fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Alive => "alive",
        Verdict::Partitioned => "partitioned",
        Verdict::Isolated => "isolated",
        Verdict::StorageLost => "storage-lost",
        Verdict::Suspect => "suspect",
        Verdict::Restarting => "restarting",
        Verdict::Unknown => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::{HostId, Profile};
    use crate::engine::time::Duration;

    fn slot(seq: u64) -> Slot {
        Slot {
            host: HostId(2),
            boot: 7,
            incarnation: 1,
            seq,
            isolated: false,
            self_fenced: false,
            maintenance: false,
            released_master: None,
            used_memory_mib: 0,
            used_vcpus: 0,
            domains: Default::default(),
            memory_mib: 0,
            vcpus: 0,
            stopped: None,
        }
    }

    #[test]
    fn s3b_needs_a_full_host_dead_timeout_between_reads() {
        let t = Profile::Default.timings();
        let mut p = Peer::default();
        p.observe_slot(Instant(1000), None, Some(&slot(1)));
        // Same content read 21.9 s later: not yet dead.
        assert!(!p.dead_by_timeout(Instant(1000) + Duration(21_999), None, &t));
        assert!(p.dead_by_timeout(Instant(1000) + t.host_dead_timeout, None, &t));
        // A change restarts the clock.
        p.observe_slot(Instant(30_000), Some(Instant(29_750)), Some(&slot(2)));
        assert!(!p.dead_by_timeout(Instant(40_000), None, &t));
    }

    /// Our own all-lost claim restarts the clock: a peer may have held its
    /// domains on it. Hearing the peer is not needed (one-way loss).
    #[test]
    fn own_all_lost_claim_restarts_the_s3b_clock() {
        let t = Profile::Default.timings();
        let mut p = Peer::default();
        p.observe_slot(Instant(0), None, Some(&slot(1)));
        let claimed = Some(Instant(20_000));
        assert!(p.dead_by_timeout(Instant(30_000), None, &t));
        assert!(!p.dead_by_timeout(Instant(30_000), claimed, &t));
        assert!(!p.dead_by_timeout(Instant(41_999), claimed, &t));
        assert!(p.dead_by_timeout(Instant(42_000), claimed, &t));
    }

    #[test]
    fn partitioned_host_alive_on_storage_is_never_suspect() {
        let t = Profile::Default.timings();
        let mut p = Peer::default();
        p.observe_slot(Instant(9_900), Some(Instant(9_650)), Some(&slot(5)));
        let v = p.verdict(Instant(10_000), Some(Instant(9_900)), true, &t);
        assert_eq!(v, Verdict::Partitioned);
        // Our own reads stale: no storage judgement at all.
        let v = p.verdict(Instant(20_000), Some(Instant(9_900)), false, &t);
        assert_eq!(v, Verdict::Unknown);
    }

    #[test]
    fn replayed_heartbeat_is_ignored() {
        let mut p = Peer::default();
        let hb = Heartbeat {
            host: HostId(2),
            boot: 7,
            incarnation: 1,
            seq: 5,
            storage_lost: false,
            hears_all_lost: false,
            self_fenced: false,
            released: Vec::new(),
        };
        assert!(p.observe_heartbeat(Instant(1), hb.clone()).is_some());
        assert!(p.observe_heartbeat(Instant(2), hb).is_none());
        assert_eq!(p.heard_at, Some(Instant(1)));
    }

    #[test]
    fn releases_heard_in_turns_add_up() {
        use crate::engine::io::Release;
        let mut p = Peer::default();
        let hb = |seq: u64, doms: std::ops::Range<u128>| Heartbeat {
            host: HostId(2),
            boot: 7,
            incarnation: 1,
            seq,
            storage_lost: true,
            hears_all_lost: false,
            self_fenced: true,
            released: doms
                .map(|d| Release {
                    key: LeaseKey::Domain(crate::engine::config::DomainId(d)),
                    generation: 3,
                    failed_start: false,
                })
                .collect(),
        };
        assert_eq!(p.observe_heartbeat(Instant(1), hb(1, 0..10)), Some(true));
        assert_eq!(p.observe_heartbeat(Instant(2), hb(2, 10..20)), Some(true));
        assert_eq!(p.observe_heartbeat(Instant(3), hb(3, 10..20)), Some(false), "nothing new");
        let key = LeaseKey::Domain(crate::engine::config::DomainId(4));
        assert_eq!(p.released(7, key), Some((3, false)), "an earlier heartbeat's release still counts");
        assert_eq!(p.released(8, key), None, "but only for the boot that said it");
    }
}
