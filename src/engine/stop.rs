//! A daemon that stops on purpose (DESIGN.md §3, "A daemon that stops"):
//! one last slot write tells the peers how long to hold off fencing (a
//! restart's grace) and whether anything still resets this host once no
//! daemon pets it. Then the node does nothing more and answers
//! `Action::Stopped`; the daemon exits.
//!
//! The domains keep running: a restarted daemon adopts them (their leases
//! are this boot's). What keeps that safe is unchanged: a watchdog that
//! outlives the daemon resets the host within watchdog_timeout of its last
//! pet, so S3(b) holds; where nothing does (systemd's service watchdog ends
//! with a clean stop), the notice says so and no peer takes a lease by
//! S3(b) from that slot (`Peer::dead_by_timeout`).

use super::io::{Action, OpId, StopNotice, StorageError};
use super::node::{Node, OpKind, TICK};
use super::time::Instant;

/// Where a stop is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Stopping {
    pub notice: StopNotice,
    since: Instant,
    /// The slot write that carries the notice, once issued.
    op: Option<OpId>,
    done: bool,
}

impl Node {
    pub(super) fn handle_stop(&mut self, now: Instant, notice: StopNotice) {
        if self.stopping.is_some() {
            return;
        }
        // Stop acting as master first: the same write then says that this
        // generation is given up (S3(c)), and a peer takes over at once.
        self.release_master(now);
        if let Some(l) = self.master_lease
            && l.owner == Some(self.me())
        {
            self.give_up_master(l.generation);
        }
        self.stopping = Some(Stopping { notice, since: now, op: None, done: false });
        let guard = if notice.host_reset {
            "the watchdog stays armed"
        } else {
            "nothing resets this host meanwhile: peers take no lease of it by host_dead_timeout"
        };
        let domains = self.local.len();
        self.emit(
            now,
            "node",
            format!(
                "stopping on purpose ({domains} domain(s) keep running; fencing held off for {} ms; {guard})",
                notice.grace_ms
            ),
        );
        self.write_stop_notice(now);
    }

    /// While stopping, only the notice's write matters (`poll_timeout`
    /// then asks for this tick alone).
    pub(super) fn stop_tick(&mut self, now: Instant) {
        self.next_tick = now + TICK;
        let Some(s) = self.stopping else {
            return;
        };
        if s.done {
            return;
        }
        match s.op {
            // Past io_timeout: the write counts as failed (it may still land).
            Some(op) if self.ops.get(&op).is_none_or(|p| p.expired) => self.stop_done(now, false),
            Some(_) => {}
            // An earlier write has not answered within io_timeout.
            None if now.since(s.since) >= self.t.io_timeout => self.stop_done(now, false),
            None => self.write_stop_notice(now),
        }
    }

    /// A slot write answered while stopping.
    pub(super) fn stop_slot_written(&mut self, now: Instant, op: OpId, result: Result<(), StorageError>) {
        let live = self.finish_op(now, op).is_some();
        let Some(s) = self.stopping else {
            return;
        };
        if s.done {
            return;
        }
        if s.op == Some(op) {
            self.stop_done(now, live && result.is_ok());
        } else {
            // An earlier write finished: ours may go now.
            self.write_stop_notice(now);
        }
    }

    /// Only once no earlier slot write is outstanding, expired ones
    /// included: one that landed after the notice would hide it, and peers
    /// would then apply S3(b) to an unguarded host.
    fn write_stop_notice(&mut self, now: Instant) {
        let Some(s) = self.stopping else {
            return;
        };
        if s.op.is_some() || s.done || self.ops.values().any(|p| p.kind == OpKind::SlotWrite) {
            return;
        }
        let op = self.issue_slot_write(now);
        if let Some(st) = self.stopping.as_mut() {
            st.op = Some(op);
        }
    }

    fn stop_done(&mut self, now: Instant, written: bool) {
        if let Some(s) = self.stopping.as_mut() {
            s.done = true;
        }
        let text = if written { "stop notice written; exiting" } else { "stop notice NOT written (storage)" };
        self.emit(now, "node", text.into());
        self.actions.push_back(Action::Stopped { written });
    }
}
