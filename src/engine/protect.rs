//! Runtime protect and unprotect: the set of protected domains (the
//! datastore registry `domains/*.xml`) changes while the node runs.
//!
//! Safety first. An added domain is acted on by the master only after it has
//! read the domain's lease (an unread lease is never free). A removed domain
//! is forgotten without destroying it and without touching its lease: a
//! freed lease could be placed elsewhere by a node whose registry is stale,
//! while the domain still runs here.

use super::config::{DomainId, DomainSpec};
use super::node::Node;
use super::time::Instant;
use std::collections::BTreeMap;
use std::sync::Arc;

impl Node {
    /// `Input::ProtectedDomains`: replace the protected set.
    pub(super) fn handle_protected_domains(
        &mut self,
        now: Instant,
        domains: BTreeMap<DomainId, DomainSpec>,
        read_issued: Instant,
    ) {
        self.registry_read_issued = self.registry_read_issued.max(read_issued.min(now));
        #[cfg(test)]
        let domains = if self.broken_ignore_unprotect {
            let mut all = self.cfg.spec.domains.clone();
            all.extend(domains);
            all
        } else {
            domains
        };
        if self.cfg.spec.domains == domains {
            return;
        }
        let old = &self.cfg.spec.domains;
        let added: Vec<DomainId> = domains.keys().filter(|d| !old.contains_key(d)).copied().collect();
        let removed: Vec<DomainId> = old.keys().filter(|d| !domains.contains_key(d)).copied().collect();
        for d in removed {
            // Named while the old spec still knows it.
            self.emit(now, "node", format!("{} unprotected: no longer managed", self.domain_name(d)));
            self.forget_domain(d);
        }
        let mut spec = (*self.cfg.spec).clone();
        spec.domains = domains;
        self.cfg.spec = Arc::new(spec);
        for d in added {
            self.emit(now, "node", format!("{} protected", self.domain_name(d)));
            if let Some(m) = self.master.as_mut() {
                m.learn(d);
            }
        }
        self.master_load(now);
        // The last local domain may have gone in the middle of a self-fence.
        self.check_fence_done(now);
    }

    /// Drop every trace of a domain, and nothing else: qemu keeps running
    /// (if it does) and the lease stays as it is. Answers still in flight
    /// (a renew CAS, a lease read, a start) find nothing and are ignored.
    fn forget_domain(&mut self, d: DomainId) {
        self.local.remove(&d);
        self.released.remove(&d);
        self.assignments_seen.remove(&d);
        self.intent.forget(d);
        self.watch.forget(d);
        if let Some(m) = self.master.as_mut() {
            m.forget(d);
        }
    }
}
