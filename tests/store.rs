//! Storage records and backends on real files (O_DIRECT, file locks).

use havirt::engine::config::{DomainId, HostId};
use havirt::engine::io::{
    Assignments, CasOutcome, DomainReport, DomainState, FencedRecord, Lease, LeaseKey, LeaseReason, Owner, Slot,
};
use havirt::engine::time::Rng;
use havirt::store::block::{BlockError, BlockFormat, BlockStore, DeviceHeader, MAX_BLOCK_HOSTS};
use havirt::store::dir::{DirError, DirStore, FREE_LEASE, domain_uuid};
use havirt::store::record::{
    AssignmentsRecord, BLOCK_BYTES, Block, ClusterId, FORMAT_VERSION, LeaseRecord, MAX_PAYLOAD_BYTES, PoisonRequest,
    RecordError, RecordKind, decode, encode,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{self, OpenOptions};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const CLUSTER: &str = "lab";
/// Threads racing on one lease, and the CAS attempts each makes.
const CAS_THREADS: u64 = 2;
const CAS_ATTEMPTS_PER_THREAD: u64 = 200;
const FUZZ_BLOCKS: usize = 10_000;
const FUZZ_SEED: u64 = 0x5eed_0001;

/// A fresh directory for one test under cargo's per-crate scratch space.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("store").join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn cid() -> ClusterId {
    ClusterId::from_name(CLUSTER)
}

fn dom(n: u128) -> DomainId {
    DomainId(0x1234_5678_9abc_def0_1122_3344_5566_0000 + n)
}

fn slot(host: u16, seq: u64, domains: u128) -> Slot {
    let report = |g| DomainReport { state: DomainState::Running, generation: g };
    Slot {
        host: HostId(host),
        boot: 1000 + u64::from(host),
        incarnation: 7,
        seq,
        isolated: false,
        self_fenced: false,
        maintenance: true,
        released_master: Some(3),
        used_memory_mib: 4096,
        used_vcpus: 8,
        domains: (0..domains).map(|n| (dom(n), report(u64::try_from(n).expect("small") + 1))).collect(),
        memory_mib: 262_144,
        vcpus: 64,
        stopped: None,
    }
}

fn owned(host: u16, generation: u64) -> Lease {
    Lease { owner: Some(Owner { host: HostId(host), boot: 9 }), generation, reason: LeaseReason::Acquired }
}

fn assignments() -> Assignments {
    Assignments { seq: 4, domains: BTreeMap::from([(dom(1), 2), (dom(2), 5)]) }
}

/// Recomputes the checksum of a hand-edited block, as a writer would.
fn reseal(b: &mut Block) {
    let crc = crc32c::crc32c(&b[..BLOCK_BYTES - 4]);
    b[BLOCK_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(kind: RecordKind, v: T) {
    let b = encode(kind, cid(), &v).expect("fits in a block");
    assert_eq!(decode::<T>(kind, cid(), &b), Ok(Some(v)));
}

#[test]
fn every_record_kind_round_trips_in_memory() {
    round_trip(RecordKind::Slot, slot(1, 42, 3));
    round_trip(RecordKind::Lease, LeaseRecord { key: LeaseKey::Master, lease: owned(1, 3) });
    round_trip(RecordKind::Lease, LeaseRecord { key: LeaseKey::Domain(dom(u128::MAX - dom(0).0)), lease: FREE_LEASE });
    round_trip(RecordKind::Fenced, FencedRecord { host: HostId(2), boot: 77, by: HostId(1) });
    round_trip(RecordKind::Assignments, AssignmentsRecord { host: HostId(2), assignments: assignments() });
    round_trip(RecordKind::Poison, PoisonRequest { target: HostId(2), boot: 77, by: HostId(1) });
    round_trip(
        RecordKind::DeviceHeader,
        DeviceHeader {
            layout: 2,
            max_hosts: 16,
            max_domains: 256,
            sector_bytes: 512,
            registry_blocks: 512,
            inventory_blocks: 16,
        },
    );
}

#[test]
fn slot_capacity_in_one_block() {
    // postcard payload: how many domain reports fit beside the slot fields
    // with the widest UUIDs. A slot that does not fit is refused, not cut.
    let mut n = 0u128;
    let wide = |n: u128| DomainId(u128::MAX - n);
    loop {
        let mut s = slot(1, u64::MAX, 0);
        s.domains =
            (0..=n).map(|i| (wide(i), DomainReport { state: DomainState::Ready, generation: u64::MAX })).collect();
        match encode(RecordKind::Slot, cid(), &s) {
            Ok(_) => n += 1,
            Err(RecordError::PayloadTooLarge { max, .. }) => {
                assert_eq!(max, MAX_PAYLOAD_BYTES);
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    println!("worst-case domains per heartbeat slot: {n}");
    assert!(n >= 130, "only {n} domains fit in a slot");
}

#[test]
fn dir_every_record_round_trips_on_disk() {
    let root = scratch("dir_round_trip");
    let st = DirStore::init(&root, CLUSTER).expect("init");
    assert_eq!(st.read_slot(HostId(1)).expect("read"), None);
    st.write_slot(&slot(1, 1, 2)).expect("write slot");
    st.write_slot(&slot(1, 2, 3)).expect("rewrite slot in place");
    assert_eq!(st.read_slot(HostId(1)).expect("read"), Some(slot(1, 2, 3)));
    assert_eq!(fs::metadata(st.slot_path(HostId(1))).expect("stat").len(), BLOCK_BYTES as u64);
    let f = FencedRecord { host: HostId(2), boot: 77, by: HostId(1) };
    st.write_fenced(&f).expect("fenced");
    assert_eq!(st.read_fenced(HostId(2)).expect("read"), Some(f));
    st.write_assignments(HostId(2), &assignments()).expect("assign");
    assert_eq!(st.read_assignments(HostId(2)).expect("read"), Some(assignments()));
    let p = PoisonRequest { target: HostId(2), boot: 77, by: HostId(1) };
    st.write_poison(&p).expect("poison");
    assert_eq!(st.read_poison(HostId(2)).expect("read"), Some(p));
    st.clear_poison(HostId(2)).expect("clear");
    assert_eq!(st.read_poison(HostId(2)).expect("read"), None);
    st.write_domain_xml(dom(1), "<domain/>").expect("xml");
    assert_eq!(st.read_domain_xml(dom(1)).expect("read"), Some("<domain/>".to_string()));
    assert_eq!(st.read_domain_xml(dom(2)).expect("read"), None);
    assert_eq!(st.rejects().total(), 0);
}

#[test]
fn dir_layout_and_paths() {
    let root = scratch("dir_layout");
    let st = DirStore::init(&root, CLUSTER).expect("init");
    for sub in ["hosts", "leases", "fenced", "assign", "poison", "domains"] {
        assert!(root.join(sub).is_dir(), "{sub}");
    }
    assert_eq!(
        domain_uuid(DomainId(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff)),
        "00112233-4455-6677-8899-aabbccddeeff"
    );
    assert_eq!(st.slot_path(HostId(3)), root.join("hosts/3.hb"));
    assert_eq!(st.lease_path(LeaseKey::Master), root.join("master.lease"));
    assert!(st.lease_path(LeaseKey::Domain(dom(0))).ends_with("leases/12345678-9abc-def0-1122-334455660000.lease"));
    // init is idempotent and keeps data.
    st.write_slot(&slot(3, 1, 0)).expect("write");
    let again = DirStore::init(&root, CLUSTER).expect("init again");
    assert_eq!(again.read_slot(HostId(3)).expect("read"), Some(slot(3, 1, 0)));
}

#[test]
fn dir_refuses_uninitialized_or_unmounted_datastore() {
    let root = scratch("dir_uninit");
    assert!(matches!(DirStore::open(&root, CLUSTER), Err(DirError::NotInitialized { .. })));
    for bad in ["", "..", ".hidden", "a/b", "x y"] {
        assert!(matches!(DirStore::init(&root, bad), Err(DirError::InvalidClusterName { .. })), "{bad:?}");
    }
    let st = DirStore::init(&root, CLUSTER).expect("init");
    fs::remove_dir_all(root.join("leases")).expect("rm");
    // Not "every lease is free": the datastore is gone.
    assert!(matches!(st.read_lease(LeaseKey::Domain(dom(1))), Err(DirError::NotInitialized { .. })));
    let cas = st.cas_lease(LeaseKey::Domain(dom(1)), 0, owned(1, 1));
    assert!(matches!(cas, Err(DirError::NotInitialized { .. })), "{cas:?}");
}

/// Writes raw bytes where a record file belongs (as a faulty or foreign
/// writer would).
fn plant(path: &PathBuf, bytes: &[u8]) {
    fs::write(path, bytes).expect("plant");
}

fn rejected_as(r: Result<Option<Slot>, DirError>) -> RecordError {
    match r {
        Err(DirError::Rejected { source, .. }) => source,
        other => panic!("expected a rejected record, got {other:?}"),
    }
}

#[test]
fn dir_rejects_bad_records_counts_them_and_never_panics() {
    let root = scratch("dir_reject");
    let st = DirStore::init(&root, CLUSTER).expect("init");
    let good = encode(RecordKind::Slot, cid(), &slot(1, 5, 2)).expect("encode");
    let path = st.slot_path(HostId(1));

    let mut flipped = good;
    flipped[40] ^= 0x01;
    plant(&path, &flipped);
    assert!(matches!(rejected_as(st.read_slot(HostId(1))), RecordError::BadChecksum { .. }));

    plant(&path, &encode(RecordKind::Slot, ClusterId::from_name("other"), &slot(1, 5, 2)).expect("encode"));
    assert!(matches!(rejected_as(st.read_slot(HostId(1))), RecordError::ForeignCluster { .. }));

    plant(&path, &good[..1000]);
    assert_eq!(rejected_as(st.read_slot(HostId(1))), RecordError::Truncated { len: 1000, expected: BLOCK_BYTES });

    let mut future = good;
    future[8..10].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    reseal(&mut future);
    plant(&path, &future);
    let want = RecordError::FutureVersion { found: FORMAT_VERSION + 1, supported: FORMAT_VERSION };
    assert_eq!(rejected_as(st.read_slot(HostId(1))), want);

    let fenced = FencedRecord { host: HostId(1), boot: 1, by: HostId(2) };
    plant(&path, &encode(RecordKind::Fenced, cid(), &fenced).expect("encode"));
    assert_eq!(rejected_as(st.read_slot(HostId(1))), RecordError::WrongKind { expected: RecordKind::Slot, found: 3 });

    let mut garbage = [0u8; BLOCK_BYTES];
    garbage[..5].copy_from_slice(b"hello");
    plant(&path, &garbage);
    assert_eq!(rejected_as(st.read_slot(HostId(1))), RecordError::BadMagic);

    let c = st.rejects();
    let got = (c.bad_checksum, c.foreign_cluster, c.truncated, c.future_version, c.wrong_kind, c.bad_magic);
    assert_eq!(got, (1, 1, 1, 1, 1, 1));
    assert_eq!(c.total(), 6);
}

#[test]
fn dir_misplaced_record_is_rejected() {
    let root = scratch("dir_subject");
    let st = DirStore::init(&root, CLUSTER).expect("init");
    st.write_slot(&slot(2, 1, 0)).expect("write");
    fs::copy(st.slot_path(HostId(2)), st.slot_path(HostId(3))).expect("copy");
    assert!(matches!(rejected_as(st.read_slot(HostId(3))), RecordError::WrongSubject { .. }));
    st.cas_lease(LeaseKey::Domain(dom(1)), 0, owned(1, 1)).expect("cas");
    fs::copy(st.lease_path(LeaseKey::Domain(dom(1))), st.lease_path(LeaseKey::Domain(dom(2)))).expect("copy");
    let r = st.read_lease(LeaseKey::Domain(dom(2)));
    assert!(matches!(r, Err(DirError::Rejected { source: RecordError::WrongSubject { .. }, .. })), "{r:?}");
    assert_eq!(st.rejects().wrong_subject, 2);
}

#[test]
fn dir_snapshot_reads_slots_fenced_and_my_assignments() {
    let root = scratch("dir_snapshot");
    let st = DirStore::init(&root, CLUSTER).expect("init");
    st.write_slot(&slot(1, 3, 1)).expect("w");
    st.write_slot(&slot(2, 4, 0)).expect("w");
    plant(&st.slot_path(HostId(3)), &[0xff; BLOCK_BYTES]);
    st.write_fenced(&FencedRecord { host: HostId(2), boot: 1002, by: HostId(1) }).expect("w");
    st.write_assignments(HostId(1), &assignments()).expect("w");
    st.write_assignments(HostId(2), &Assignments::default()).expect("w");
    let hosts = [HostId(3), HostId(1), HostId(2), HostId(4), HostId(1)];
    let snap = st.read_snapshot(HostId(1), &hosts).expect("snapshot");
    assert_eq!(snap.slots.keys().copied().collect::<Vec<_>>(), vec![HostId(1), HostId(2)]);
    assert_eq!(snap.slots[&HostId(1)], slot(1, 3, 1));
    assert_eq!(snap.fenced.keys().copied().collect::<Vec<_>>(), vec![HostId(2)]);
    assert_eq!(snap.assignments, assignments());
    assert_eq!(snap.rejected_records, 1, "host 3's slot is garbage: no heartbeat, counted once");
    assert_eq!(st.rejects().bad_magic, 1);
    assert_eq!(snap.poison, None);
    st.write_poison(&PoisonRequest { target: HostId(1), boot: 77, by: HostId(2) }).expect("w");
    st.write_poison(&PoisonRequest { target: HostId(2), boot: 78, by: HostId(1) }).expect("w");
    let snap = st.read_snapshot(HostId(1), &hosts).expect("snapshot");
    assert_eq!(snap.poison, Some(77), "my own poison request, with the boot it targets");
}

#[test]
fn dir_cas_conflict_returns_current_lease() {
    let root = scratch("dir_cas_conflict");
    let st = DirStore::init(&root, CLUSTER).expect("init");
    let key = LeaseKey::Domain(dom(7));
    assert_eq!(st.read_lease(key).expect("read"), FREE_LEASE);
    assert_eq!(st.cas_lease(key, 0, owned(1, 1)).expect("cas"), CasOutcome::Done(owned(1, 1)));
    assert_eq!(st.cas_lease(key, 0, owned(2, 1)).expect("cas"), CasOutcome::Conflict(owned(1, 1)));
    assert_eq!(st.cas_lease(key, 5, owned(2, 6)).expect("cas"), CasOutcome::Conflict(owned(1, 1)));
    assert_eq!(st.cas_lease(key, 1, owned(2, 2)).expect("cas"), CasOutcome::Done(owned(2, 2)));
    assert_eq!(st.read_lease(key).expect("read"), owned(2, 2));
    let master = st.cas_lease(LeaseKey::Master, 0, owned(3, 1)).expect("cas");
    assert_eq!(master, CasOutcome::Done(owned(3, 1)));
    let bad = st.cas_lease(key, 2, owned(1, 2));
    assert!(matches!(bad, Err(DirError::GenerationNotIncreasing { expect: 2, new: 2 })), "{bad:?}");
}

#[test]
fn dir_cas_never_overwrites_a_corrupt_lease() {
    let root = scratch("dir_cas_corrupt");
    let st = DirStore::init(&root, CLUSTER).expect("init");
    let key = LeaseKey::Domain(dom(7));
    st.cas_lease(key, 0, owned(1, 1)).expect("cas");
    let path = st.lease_path(key);
    let mut b = fs::read(&path).expect("read");
    b[50] ^= 0x80;
    plant(&path, &b);
    let r = st.cas_lease(key, 0, owned(2, 1));
    assert!(matches!(r, Err(DirError::Rejected { source: RecordError::BadChecksum { .. }, .. })), "{r:?}");
    assert_eq!(fs::read(&path).expect("read"), b, "a corrupt lease is left for the operator, not taken as free");
}

#[test]
fn dir_cas_lock_wait_is_bounded() {
    let root = scratch("dir_cas_lock");
    let st = DirStore::init(&root, CLUSTER).expect("init").with_lock_wait(Duration::from_millis(20));
    let key = LeaseKey::Master;
    st.cas_lease(key, 0, owned(1, 1)).expect("cas");
    let holder = OpenOptions::new().read(true).open(st.lease_path(key)).expect("open");
    holder.lock().expect("lock");
    let r = st.cas_lease(key, 1, owned(2, 2));
    assert!(matches!(r, Err(DirError::LockTimeout { .. })), "{r:?}");
    assert_eq!(r.map_err(|e| e.storage_error()), Err(havirt::engine::io::StorageError::Timeout));
    holder.unlock().expect("unlock");
    assert_eq!(st.cas_lease(key, 1, owned(2, 2)).expect("cas"), CasOutcome::Done(owned(2, 2)));
}

/// One racer: CAS from the generation it last saw to the next, retrying from
/// what a conflict returns. Returns the generations it won.
fn race(st: &DirStore, key: LeaseKey, me: u16) -> Vec<u64> {
    let mut seen = st.read_lease(key).expect("read").generation;
    let mut won = Vec::new();
    for _ in 0..CAS_ATTEMPTS_PER_THREAD {
        match st.cas_lease(key, seen, owned(me, seen + 1)).expect("cas") {
            CasOutcome::Done(l) => {
                assert_eq!(l, owned(me, seen + 1));
                won.push(l.generation);
                seen = l.generation;
            }
            CasOutcome::Conflict(l) => {
                assert!(l.generation > seen, "a conflict shows a newer lease: {} after {seen}", l.generation);
                seen = l.generation;
            }
        }
    }
    won
}

/// Runs the racers, each on its own `DirStore` (as separate hosts: only the
/// file lock excludes them) or all on one (as one daemon's worker threads).
fn race_all(name: &str, shared: bool) {
    let root = scratch(name);
    let open = || Arc::new(DirStore::init(&root, CLUSTER).expect("init").with_lock_wait(Duration::from_secs(60)));
    let one = open();
    let key = LeaseKey::Domain(dom(9));
    let racers: Vec<_> = (0..CAS_THREADS)
        .map(|i| {
            let st = if shared { Arc::clone(&one) } else { open() };
            std::thread::spawn(move || race(&st, key, u16::try_from(i + 1).expect("small")))
        })
        .collect();
    let won: Vec<Vec<u64>> = racers.into_iter().map(|t| t.join().expect("racer")).collect();
    println!("{name}: wins per racer: {:?}", won.iter().map(Vec::len).collect::<Vec<_>>());
    for w in &won {
        assert!(w.windows(2).all(|p| p[0] < p[1]), "each racer's generations strictly increase");
    }
    let mut all: Vec<u64> = won.concat();
    all.sort_unstable();
    let total = all.len() as u64;
    assert!(total >= CAS_ATTEMPTS_PER_THREAD, "at least one racer's worth of wins: {total}");
    assert_eq!(all, (1..=total).collect::<Vec<_>>(), "every generation won exactly once");
    assert_eq!(one.read_lease(key).expect("read").generation, total, "no update lost");
}

#[test]
fn dir_concurrent_cas_from_two_hosts_never_loses_an_update() {
    race_all("dir_cas_race_hosts", false);
}

#[test]
fn dir_concurrent_cas_from_one_daemon_never_loses_an_update() {
    race_all("dir_cas_race_threads", true);
}

/// A small layout for `max_hosts` hosts (8 domains, small copy areas).
fn small(max_hosts: u16) -> BlockFormat {
    BlockFormat { max_hosts, max_domains: 8, registry_blocks: 8, inventory_blocks: 4 }
}

fn block_file(name: &str) -> PathBuf {
    let path = scratch(name).join("lun.img");
    fs::File::create(&path).expect("create");
    path
}

#[test]
fn block_slot_poison_fenced_assignments_round_trip() {
    let path = block_file("block_round_trip");
    let st = BlockStore::init(&path, CLUSTER, small(8), false).expect("init");
    assert_eq!(fs::metadata(&path).expect("stat").len(), st.layout().device_bytes());
    // Header, 4 per-host regions, then 2 + 8 lease areas and the copy areas.
    let area_blocks = st.layout().area_blocks();
    let blocks = 1 + 4 * 8 + (2 + 8) * area_blocks + 2 * 8 * 8 + 2 * 8 * 4;
    assert_eq!(st.layout().device_bytes(), blocks * BLOCK_BYTES as u64);
    assert_eq!(st.read_slot(HostId(0)).expect("read"), None);
    st.write_slot(&slot(0, 1, 2)).expect("w");
    st.write_slot(&slot(7, 9, 0)).expect("w");
    let p = PoisonRequest { target: HostId(3), boot: 5, by: HostId(0) };
    st.write_poison(&p).expect("poison");
    st.write_fenced(&FencedRecord { host: HostId(3), boot: 5, by: HostId(0) }).expect("fenced");
    st.write_assignments(HostId(0), &assignments()).expect("assign");

    let other = BlockStore::open(&path, CLUSTER).expect("second host opens");
    assert_eq!(other.read_slot(HostId(0)).expect("read"), Some(slot(0, 1, 2)));
    assert_eq!(other.read_slot(HostId(7)).expect("read"), Some(slot(7, 9, 0)));
    assert_eq!(other.read_poison(HostId(3)).expect("read"), Some(p));
    assert_eq!(other.read_poison(HostId(0)).expect("read"), None);
    st.clear_poison(HostId(3)).expect("clear");
    assert_eq!(other.read_poison(HostId(3)).expect("read"), None);
    let snap = other.read_snapshot(HostId(0), &[HostId(0), HostId(3), HostId(7)]).expect("snapshot");
    assert_eq!(snap.slots.len(), 2);
    assert_eq!(snap.fenced[&HostId(3)].boot, 5);
    assert_eq!(snap.assignments, assignments());
    assert_eq!(snap.rejected_records, 0);
}

#[test]
fn block_refuses_foreign_or_unformatted_devices_and_bad_hosts() {
    let path = block_file("block_refuse");
    assert!(matches!(BlockStore::open(&path, CLUSTER), Err(BlockError::NotInitialized { .. })));
    assert!(matches!(BlockStore::init(&path, CLUSTER, small(0), false), Err(BlockError::MaxHostsOutOfRange { .. })));
    let too_many = MAX_BLOCK_HOSTS + 1;
    assert!(matches!(
        BlockStore::init(&path, CLUSTER, small(too_many), false),
        Err(BlockError::MaxHostsOutOfRange { .. })
    ));
    let st = BlockStore::init(&path, CLUSTER, small(4), false).expect("init");
    st.write_slot(&slot(1, 1, 0)).expect("w");
    let again = BlockStore::init(&path, CLUSTER, small(4), false).expect("idempotent init");
    assert_eq!(again.read_slot(HostId(1)).expect("kept"), Some(slot(1, 1, 0)));
    assert!(matches!(BlockStore::init(&path, CLUSTER, small(5), false), Err(BlockError::NotEmpty { .. })));
    assert!(matches!(BlockStore::init(&path, "other", small(4), false), Err(BlockError::NotEmpty { .. })));
    let foreign = BlockStore::open(&path, "other");
    let is_foreign = matches!(foreign, Err(BlockError::Rejected { source: RecordError::ForeignCluster { .. }, .. }));
    assert!(is_foreign, "{foreign:?}");
    assert!(matches!(st.write_slot(&slot(4, 1, 0)), Err(BlockError::HostOutOfRange { .. })));
    assert!(matches!(st.read_snapshot(HostId(0), &[HostId(9)]), Err(BlockError::HostOutOfRange { .. })));
}

#[test]
fn block_corrupt_slot_reads_as_no_heartbeat() {
    let path = block_file("block_corrupt");
    let st = BlockStore::init(&path, CLUSTER, small(4), false).expect("init");
    st.write_slot(&slot(2, 1, 1)).expect("w");
    let mut img = fs::read(&path).expect("read");
    let at = usize::try_from(st.layout().block(havirt::store::block::Region::Slot, HostId(2)).expect("block"))
        .expect("small")
        * BLOCK_BYTES
        + 100;
    img[at] ^= 0x04;
    fs::write(&path, &img).expect("write");
    let r = st.read_slot(HostId(2));
    assert!(matches!(r, Err(BlockError::Rejected { source: RecordError::BadChecksum { .. }, .. })), "{r:?}");
    let snap = st.read_snapshot(HostId(0), &[HostId(2)]).expect("snapshot");
    assert!(snap.slots.is_empty());
    assert_eq!(snap.rejected_records, 1);
    assert_eq!(st.rejects().bad_checksum, 2);
}

/// One fuzz input: fully random, a mutated valid record, a valid header
/// around random payload bytes (resealed), or a random length.
fn fuzz_block(rng: &mut Rng, valid: &Block) -> Vec<u8> {
    match rng.range(0, 3) {
        0 => (0..BLOCK_BYTES).map(|_| rng.next_u64().to_le_bytes()[0]).collect(),
        1 => {
            let mut b = *valid;
            for _ in 0..rng.range(1, 8) {
                b[rng.index(BLOCK_BYTES)] ^= u8::try_from(rng.range(1, 255)).expect("a byte");
            }
            b.to_vec()
        }
        2 => {
            let mut b = *valid;
            let len = u32::try_from(rng.range(0, MAX_PAYLOAD_BYTES as u64 + 64)).expect("small");
            b[28..32].copy_from_slice(&len.to_le_bytes());
            let n = rng.index(200);
            for x in b.iter_mut().skip(32).take(n) {
                *x = rng.pick(&b"{}[]\":,0123456789.-eE truefalsnul\\u"[..]);
            }
            reseal(&mut b);
            b.to_vec()
        }
        _ => valid[..rng.index(BLOCK_BYTES + 64).min(BLOCK_BYTES)].to_vec(),
    }
}

#[test]
fn fuzz_decoding_random_blocks_never_panics() {
    let mut rng = Rng::new(FUZZ_SEED);
    let valid = encode(RecordKind::Slot, cid(), &slot(1, 2, 3)).expect("encode");
    let mut outcomes: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..FUZZ_BLOCKS {
        let bytes = fuzz_block(&mut rng, &valid);
        let r = decode::<Slot>(RecordKind::Slot, cid(), &bytes);
        let _ = decode::<LeaseRecord>(RecordKind::Lease, cid(), &bytes);
        if r.is_ok() && bytes.as_slice() != valid.as_slice() {
            // Only a resealed, well-formed payload may decode.
            assert_eq!(&bytes[..28], &valid[..28]);
        }
        let name = match &r {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("{e:?}").split([' ', '(', '{']).next().unwrap_or("").to_string(),
        };
        *outcomes.entry(name).or_default() += 1;
    }
    println!("fuzz outcomes: {outcomes:?}");
    for reason in ["BadMagic", "BadChecksum", "Truncated", "Malformed"] {
        assert!(outcomes.contains_key(reason), "fuzzing never produced {reason}: {outcomes:?}");
    }
}

/// Our slot file stays open between heartbeats (one pwrite + fdatasync per
/// write): every write still lands in the file readers see, and a file
/// unlinked behind our back is written again within SLOT_FILE_REOPEN.
#[test]
#[allow(clippy::disallowed_methods, reason = "the reopen is due in wall time")]
fn dir_slot_writes_through_the_kept_file_and_reopen_a_replaced_one() {
    let root = scratch("dir_slot_kept_open");
    let st = DirStore::init(&root, CLUSTER).expect("init");
    for seq in 1..=3 {
        st.write_slot(&slot(1, seq, 1)).expect("write");
        assert_eq!(st.read_slot(HostId(1)).expect("read"), Some(slot(1, seq, 1)));
    }
    fs::remove_file(st.slot_path(HostId(1))).expect("unlink the slot file");
    let gone_until = std::time::Instant::now() + havirt::store::dir::SLOT_FILE_REOPEN + Duration::from_millis(500);
    let mut seq = 4;
    while st.read_slot(HostId(1)).expect("read").is_none() {
        assert!(std::time::Instant::now() < gone_until, "the unlinked slot file was not written again");
        st.write_slot(&slot(1, seq, 1)).expect("write");
        seq += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(st.read_slot(HostId(1)).expect("read").map(|s| s.seq), Some(seq - 1));
}
