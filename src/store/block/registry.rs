//! Variable-size data on the device: the registry of protected domains
//! (each domain's lease index and XML definition) and each host's
//! inventory, in per-host *copy areas*.
//!
//! # Copy areas
//!
//! Host h owns two copy areas per kind (`CopyArea`), G (or V) blocks each,
//! and is their only writer. A copy is a header record (kind `Blob`: kind of
//! area, host, version, body length, body crc32c) in its first block and the
//! raw body in the blocks after it. A writer writes the body, then the
//! header; a reader reads the header, then exactly the body's blocks, and
//! checks the crc32c (a copy being rewritten fails it and is rejected,
//! counted, and read again later).
//!
//! # The registry
//!
//! The registry is versioned by a Disk Paxos area of its own (keyed by the
//! nil UUID, which no libvirt domain has): its committed "lease" names the
//! version (generation g), the host whose copy holds it (owner.host) and the
//! body's length and crc32c (owner.boot = len << 32 | crc). A change (protect,
//! a new definition, unprotect) reads version g, writes version g+1 into one
//! of its author's own copies, and commits it with a CAS g → g+1 on that area;
//! a conflict (another host's change won) starts over from the new version,
//! at most [`MAX_REGISTRY_ATTEMPTS`] times. No two hosts ever write the same
//! block, so no lock is needed, and the version agreed by Paxos is the
//! registry every host reads.
//!
//! A writer never overwrites the copy of the committed version, nor one of
//! its own proposals of the next version that may still be chosen (Paxos may
//! commit a value after its proposer gave up): when both of its copies are
//! such, it first re-proposes that pending one.
//!
//! A domain's table index is given once, when its lease is first taken,
//! and never reused (its lease area keeps its generations, as a dir
//! datastore keeps a lease file after unprotect). Unprotect removes the
//! definition only.

use super::{AreaIndex, BlockError, BlockStore, CopyArea};
use crate::engine::config::{DomainId, HostId};
use crate::engine::io::{CasOutcome, Lease, LeaseKey, LeaseReason, Owner};
use crate::store::direct::AlignedBuf;
use crate::store::record::{BLOCK_BYTES, RecordError, RecordKind, decode_for, encode};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

/// The nil UUID keys the registry's Paxos area.
pub const REGISTRY_KEY_DOMAIN: DomainId = DomainId(0);
const REGISTRY_KEY: LeaseKey = LeaseKey::Domain(REGISTRY_KEY_DOMAIN);
/// Registry changes that lose to another host's before one is committed.
pub const MAX_REGISTRY_ATTEMPTS: u32 = 4;

/// The registry as stored (postcard, in a copy's body).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    pub domains: BTreeMap<DomainId, RegistryEntry>,
    /// The next unused domain table index.
    pub next_index: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryEntry {
    /// The domain's lease area (`AreaIndex::Domain`).
    pub lease_index: u32,
    /// Its definition; `None`: not protected (only its lease is kept).
    pub xml: Option<String>,
}

/// A copy's first block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct CopyHeader {
    /// 0 registry, 1 inventory.
    area: u8,
    host: HostId,
    version: u64,
    len: u32,
    crc: u32,
}

impl CopyHeader {
    fn tag(&self) -> u64 {
        (u64::from(self.len) << 32) | u64::from(self.crc)
    }
}

fn area_tag(which: CopyArea) -> u8 {
    match which {
        CopyArea::Registry => 0,
        CopyArea::Inventory => 1,
    }
}

/// The registry last read, with the version it was read at; a change made
/// by this process at a time.
#[derive(Debug, Default)]
pub(super) struct RegistryState {
    cached: Mutex<Option<(Lease, Registry)>>,
    changing: Mutex<()>,
    /// Every domain's table index seen: an index, once given, never
    /// changes, so a lease operation on a known domain reads no registry.
    indexes: Mutex<BTreeMap<DomainId, u32>>,
}

/// Copy areas.
impl BlockStore {
    /// Both copies' headers; `None`: never written, or rejected (counted).
    fn copy_headers(&self, which: CopyArea, host: HostId) -> Result<[Option<CopyHeader>; 2], BlockError> {
        let mut out = [None, None];
        for (c, slot) in (0u8..).zip(out.iter_mut()) {
            let block = self.layout.copy_block(which, host, c)?;
            let data = self.read_block_at(block)?;
            let subject = |h: &CopyHeader| (h.area, h.host);
            let header = decode_for(RecordKind::Blob, self.cluster, data.as_slice(), subject, (area_tag(which), host));
            // A rejected header (being rewritten as we read it, or corrupt)
            // is counted and read as no copy: the other copy may be the one
            // wanted, and a reader never fails on a copy it does not need.
            *slot = header.unwrap_or_else(|source| {
                self.rejected(block, source);
                None
            });
        }
        Ok(out)
    }

    fn rejected(&self, block: u64, source: RecordError) -> BlockError {
        self.count_reject(&source);
        BlockError::Rejected { path: self.path.clone(), block, source }
    }

    fn read_copy_body(&self, which: CopyArea, host: HostId, c: u8, h: &CopyHeader) -> Result<Vec<u8>, BlockError> {
        let block = self.layout.copy_block(which, host, c)?;
        let len = h.len as usize;
        let max = self.copy_capacity(which);
        if len > max {
            return Err(self.rejected(block, RecordError::PayloadTooLarge { len, max }));
        }
        let blocks = len.div_ceil(BLOCK_BYTES).max(1);
        let buf = self.read_at((block + 1) * BLOCK_BYTES as u64, blocks * BLOCK_BYTES)?;
        let body = &buf.as_slice()[..len];
        let computed = crc32c::crc32c(body);
        if computed != h.crc {
            return Err(self.rejected(block, RecordError::BadChecksum { stored: h.crc, computed }));
        }
        Ok(body.to_vec())
    }

    fn copy_capacity(&self, which: CopyArea) -> usize {
        usize::try_from(self.layout.copy_blocks(which) - 1).unwrap_or(0) * BLOCK_BYTES
    }

    /// Writes `body` as version `version` into this host's copy `c`: the
    /// body first, the header last.
    fn write_copy(&self, which: CopyArea, c: u8, version: u64, body: &[u8]) -> Result<CopyHeader, BlockError> {
        let me = self.me()?;
        let max = self.copy_capacity(which);
        let what = if which == CopyArea::Registry { "the registry" } else { "the inventory" };
        let Ok(len) = u32::try_from(body.len()) else {
            return Err(BlockError::CopyTooLarge { path: self.path.clone(), what, len: body.len(), max });
        };
        if body.len() > max {
            return Err(BlockError::CopyTooLarge { path: self.path.clone(), what, len: body.len(), max });
        }
        let block = self.layout.copy_block(which, me, c)?;
        let mut buf = AlignedBuf::zeroed(body.len().div_ceil(BLOCK_BYTES).max(1) * BLOCK_BYTES);
        buf.as_mut_slice()[..body.len()].copy_from_slice(body);
        self.write_at((block + 1) * BLOCK_BYTES as u64, &buf)?;
        let header = CopyHeader { area: area_tag(which), host: me, version, len, crc: crc32c::crc32c(body) };
        let rec = encode(RecordKind::Blob, self.cluster, &header).map_err(BlockError::Encode)?;
        self.write_block_at(block, &rec)?;
        Ok(header)
    }
}

/// The registry.
impl BlockStore {
    /// The committed registry version (generation 0: never written).
    fn registry_version(&self) -> Result<Lease, BlockError> {
        self.read_area(AreaIndex::Registry, &self.area(AreaIndex::Registry, REGISTRY_KEY))
    }

    /// The registry as committed: one read of its Paxos area, and of the
    /// author's copy when the version changed since the last read.
    pub fn read_registry(&self) -> Result<Registry, BlockError> {
        for _ in 0..MAX_REGISTRY_ATTEMPTS {
            let v = self.registry_version()?;
            if let Some(r) = self.registry_at(&v)? {
                return Ok(r);
            }
        }
        Err(BlockError::RegistryBusy { path: self.path.clone(), attempts: MAX_REGISTRY_ATTEMPTS })
    }

    /// The registry at version `v`; `None`: its copy was rewritten since
    /// (the registry moved on: read the version again).
    fn registry_at(&self, v: &Lease) -> Result<Option<Registry>, BlockError> {
        let Some(author) = v.owner.filter(|_| v.generation > 0) else { return Ok(Some(Registry::default())) };
        if let Some((at, r)) = self.registry.cached.lock().unwrap_or_else(PoisonError::into_inner).as_ref()
            && at == v
        {
            return Ok(Some(r.clone()));
        }
        let headers = self.copy_headers(CopyArea::Registry, author.host)?;
        let found =
            (0u8..).zip(headers).find(|(_, h)| h.is_some_and(|h| h.version == v.generation && h.tag() == author.boot));
        let Some((c, Some(h))) = found else { return Ok(None) };
        let body = self.read_copy_body(CopyArea::Registry, author.host, c, &h)?;
        let block = self.layout.copy_block(CopyArea::Registry, author.host, c)?;
        let r: Registry =
            postcard::from_bytes(&body).map_err(|e| self.rejected(block, RecordError::Malformed(e.to_string())))?;
        self.cache_registry(*v, &r);
        Ok(Some(r))
    }

    fn cache_registry(&self, at: Lease, r: &Registry) {
        let mut known = self.registry.indexes.lock().unwrap_or_else(PoisonError::into_inner);
        known.extend(r.domains.iter().map(|(d, e)| (*d, e.lease_index)));
        drop(known);
        *self.registry.cached.lock().unwrap_or_else(PoisonError::into_inner) = Some((at, r.clone()));
    }

    /// Applies `change` to the committed registry and commits the result
    /// (module doc); `change` returns false for "nothing to do".
    pub(super) fn change_registry(
        &self,
        change: impl Fn(&mut Registry) -> Result<bool, BlockError>,
    ) -> Result<Registry, BlockError> {
        let me = self.me()?;
        let _one_at_a_time = self.registry.changing.lock().unwrap_or_else(PoisonError::into_inner);
        for _ in 0..MAX_REGISTRY_ATTEMPTS {
            let v = self.registry_version()?;
            let Some(current) = self.registry_at(&v)? else { continue };
            let mut next = current.clone();
            if !change(&mut next)? {
                return Ok(current);
            }
            let body =
                postcard::to_allocvec(&next).map_err(|e| BlockError::Encode(RecordError::Malformed(e.to_string())))?;
            let header = match self.place_copy(me, &v, &body)? {
                Placed::Written(h) => h,
                Placed::FinishPending(h) => {
                    self.commit_registry(me, &v, &h)?;
                    continue;
                }
            };
            if let CasOutcome::Done(l) = self.commit_registry(me, &v, &header)? {
                self.cache_registry(l, &next);
                return Ok(next);
            }
        }
        Err(BlockError::RegistryBusy { path: self.path.clone(), attempts: MAX_REGISTRY_ATTEMPTS })
    }

    /// Writes version v+1 into a copy of ours that holds neither the
    /// committed version nor a pending proposal of v+1.
    fn place_copy(&self, me: HostId, v: &Lease, body: &[u8]) -> Result<Placed, BlockError> {
        let headers = self.copy_headers(CopyArea::Registry, me)?;
        let next = v.generation + 1;
        let tag = (u64::try_from(body.len()).unwrap_or(u64::MAX) << 32) | u64::from(crc32c::crc32c(body));
        let committed =
            |h: &CopyHeader| v.owner.is_some_and(|o| o.host == me && o.boot == h.tag()) && h.version == v.generation;
        let pending = |h: &CopyHeader| h.version == next;
        if let Some(h) = headers.iter().flatten().find(|h| pending(h) && h.tag() == tag) {
            return Ok(Placed::Written(*h));
        }
        match (0u8..).zip(headers).find(|(_, h)| h.is_none_or(|h| !committed(&h) && !pending(&h))) {
            Some((c, _)) => Ok(Placed::Written(self.write_copy(CopyArea::Registry, c, next, body)?)),
            None => {
                let h = headers.iter().flatten().find(|h| pending(h)).copied();
                Ok(Placed::FinishPending(h.unwrap_or_else(|| unreachable!("a copy is committed or pending"))))
            }
        }
    }

    fn commit_registry(&self, me: HostId, v: &Lease, h: &CopyHeader) -> Result<CasOutcome, BlockError> {
        let new = Lease {
            owner: Some(Owner { host: me, boot: h.tag() }),
            generation: v.generation + 1,
            reason: LeaseReason::Acquired,
        };
        let area = self.area(AreaIndex::Registry, REGISTRY_KEY);
        self.cas_area(REGISTRY_KEY, AreaIndex::Registry, area, v.generation, new)
    }

    /// The table index of `d`'s lease; added to the registry (a new index)
    /// if `add` and it has none.
    pub(super) fn domain_index(&self, d: DomainId, add: bool) -> Result<Option<u32>, BlockError> {
        if d == REGISTRY_KEY_DOMAIN {
            return Err(BlockError::ReservedDomain(d));
        }
        if let Some(i) = self.registry.indexes.lock().unwrap_or_else(PoisonError::into_inner).get(&d) {
            return Ok(Some(*i));
        }
        if let Some(e) = self.read_registry()?.domains.get(&d) {
            return Ok(Some(e.lease_index));
        }
        if !add {
            return Ok(None);
        }
        let max_domains = self.layout.max_domains;
        let r = self.change_registry(|r| {
            if r.domains.contains_key(&d) {
                return Ok(false);
            }
            if r.next_index >= max_domains {
                return Err(BlockError::DomainTableFull { max_domains, index: r.next_index });
            }
            r.domains.insert(d, RegistryEntry { lease_index: r.next_index, xml: None });
            r.next_index += 1;
            Ok(true)
        })?;
        Ok(r.domains.get(&d).map(|e| e.lease_index))
    }

    /// Stores `d`'s definition (only the lease owner writes it). A domain
    /// with no table index yet gets one.
    pub fn write_domain_xml(&self, d: DomainId, xml: &str) -> Result<(), BlockError> {
        if d == REGISTRY_KEY_DOMAIN {
            return Err(BlockError::ReservedDomain(d));
        }
        let max_domains = self.layout.max_domains;
        self.change_registry(|r| {
            if r.domains.get(&d).is_some_and(|e| e.xml.as_deref() == Some(xml)) {
                return Ok(false);
            }
            if !r.domains.contains_key(&d) {
                if r.next_index >= max_domains {
                    return Err(BlockError::DomainTableFull { max_domains, index: r.next_index });
                }
                r.domains.insert(d, RegistryEntry { lease_index: r.next_index, xml: None });
                r.next_index += 1;
            }
            if let Some(e) = r.domains.get_mut(&d) {
                e.xml = Some(xml.to_owned());
            }
            Ok(true)
        })?;
        Ok(())
    }

    /// Unprotect: removes the definition, keeps the lease; absent is fine.
    pub fn remove_domain_xml(&self, d: DomainId) -> Result<(), BlockError> {
        self.change_registry(|r| Ok(r.domains.get_mut(&d).and_then(|e| e.xml.take()).is_some()))?;
        Ok(())
    }

    /// `Ok(None)`: no definition stored for `d`.
    pub fn read_domain_xml(&self, d: DomainId) -> Result<Option<String>, BlockError> {
        Ok(self.read_registry()?.domains.get(&d).and_then(|e| e.xml.clone()))
    }

    /// `read_domain_xml` in the registry as this store last read it (by
    /// `list_domain_xml` a moment before), without reading its version
    /// again: for the daemon's poll, which lists, then stamps each domain.
    pub fn read_domain_xml_cached(&self, d: DomainId) -> Result<Option<String>, BlockError> {
        let cached = self.registry.cached.lock().unwrap_or_else(PoisonError::into_inner);
        match cached.as_ref() {
            Some((_, r)) => Ok(r.domains.get(&d).and_then(|e| e.xml.clone())),
            None => {
                drop(cached);
                self.read_domain_xml(d)
            }
        }
    }

    /// Every domain with a stored definition (the protected domains), sorted.
    pub fn list_domain_xml(&self) -> Result<Vec<DomainId>, BlockError> {
        let r = self.read_registry()?;
        Ok(r.domains.iter().filter(|(_, e)| e.xml.is_some()).map(|(d, _)| *d).collect())
    }
}

enum Placed {
    Written(CopyHeader),
    /// Both copies are taken: re-propose this pending one first.
    FinishPending(CopyHeader),
}

/// Inventories: one writer per host, so no Paxos: the newer of its two
/// copies that checks out is current.
impl BlockStore {
    pub fn write_inventory(&self, bytes: &[u8]) -> Result<(), BlockError> {
        let me = self.me()?;
        let headers = self.copy_headers(CopyArea::Inventory, me)?;
        let version = |c: usize| headers[c].map_or(0, |h| h.version);
        let (older, newest) = if version(0) <= version(1) { (0u8, version(1)) } else { (1u8, version(0)) };
        self.write_copy(CopyArea::Inventory, older, newest + 1, bytes)?;
        Ok(())
    }

    /// Host `host`'s inventory; `Ok(None)`: never written.
    pub fn read_inventory(&self, host: HostId) -> Result<Option<Vec<u8>>, BlockError> {
        let headers = self.copy_headers(CopyArea::Inventory, host)?;
        let mut order: Vec<(u8, CopyHeader)> = (0u8..).zip(headers).filter_map(|(c, h)| Some((c, h?))).collect();
        order.sort_by_key(|(_, h)| std::cmp::Reverse(h.version));
        let mut last_err = None;
        for (c, h) in order {
            match self.read_copy_body(CopyArea::Inventory, host, c, &h) {
                Ok(b) => return Ok(Some(b)),
                Err(e) => last_err = Some(e),
            }
        }
        last_err.map_or(Ok(None), Err)
    }
}
