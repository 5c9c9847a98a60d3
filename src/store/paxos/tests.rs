use super::*;
use crate::engine::config::DomainId;
use crate::engine::io::{LeaseReason, Owner};
use crate::store::record::RecordKind;

const N: u16 = 4;

fn area_with(sector: SectorSize, max_hosts: u16) -> Area {
    let layout = Layout::new(sector, max_hosts).expect("valid layout");
    Area { cluster: ClusterId::from_name("lab"), key: LeaseKey::Domain(DomainId(7)), layout }
}

fn area() -> Area {
    area_with(SectorSize::B512, N)
}

fn lease(host: u16, generation: u64) -> Lease {
    Lease { owner: Some(Owner { host: HostId(host), boot: 1 }), generation, reason: LeaseReason::Acquired }
}

fn blank(a: &Area) -> Vec<u8> {
    vec![0u8; a.layout.area_bytes()]
}

fn put(a: &Area, disk: &mut [u8], d: &Dblock) {
    let s = a.layout.sector.bytes();
    let at = usize::from(d.host.0) * s;
    disk[at..at + s].copy_from_slice(&a.encode(d).expect("encodes"));
}

/// Drives `cas` alone against `disk`, calling `before_read(k, disk)` before
/// the k-th read; returns the outcome and the steps taken.
fn drive(mut cas: Cas, disk: &mut Vec<u8>, mut before_read: impl FnMut(usize, &mut Vec<u8>)) -> (Finished, Vec<Step>) {
    let a = *cas.proposer.area();
    let s = a.layout.sector.bytes();
    let mut steps = Vec::new();
    let mut reads = 0;
    while let Some(step) = cas.poll_io() {
        assert_eq!(cas.poll_io(), None, "one I/O at a time");
        match &step {
            Step::Read { first_sector, sectors } => {
                before_read(reads, disk);
                reads += 1;
                let range = usize::from(*first_sector) * s..usize::from(*first_sector + *sectors) * s;
                cas.handle_io(Ok(Completed::Read(disk[range].to_vec())));
            }
            Step::Write { sector, bytes } => {
                assert_eq!(bytes.len(), s, "a write is one sector");
                let at = usize::from(*sector) * s;
                disk[at..at + s].copy_from_slice(bytes);
                cas.handle_io(Ok(Completed::Written));
            }
        }
        steps.push(step);
        assert!(steps.len() <= 6, "a CAS is at most 6 I/Os");
    }
    (cas.finish().expect("finished when no I/O is left"), steps)
}

fn proposer(a: Area, host: u16) -> Proposer {
    Proposer::new(a, HostId(host)).expect("host in range")
}

#[test]
fn uncontended_cas_takes_three_reads_and_three_writes() {
    for sector in [SectorSize::B512, SectorSize::B4096] {
        let a = area_with(sector, N);
        let mut disk = blank(&a);
        let (f, steps) = drive(proposer(a, 2).cas(0, lease(2, 1)), &mut disk, |_, _| {});
        assert_eq!(f.outcome, Ok(Outcome::Done(lease(2, 1))));
        let reads = steps.iter().filter(|s| **s == Step::Read { first_sector: 0, sectors: N }).count();
        let writes = steps.iter().filter(|s| matches!(s, Step::Write { sector: 2, .. })).count();
        assert_eq!((reads, writes, steps.len()), (3, 3, 6));
        assert_eq!(a.lease(&disk), Ok(lease(2, 1)));
        // The proposer comes back for the next CAS.
        let (f, _) = drive(f.proposer.cas(1, lease(2, 2)), &mut disk, |_, _| {});
        assert_eq!(f.outcome, Ok(Outcome::Done(lease(2, 2))));
        assert_eq!(a.lease(&disk), Ok(lease(2, 2)));
    }
}

#[test]
fn a_stale_expectation_is_a_conflict_after_one_read() {
    let a = area();
    let mut disk = blank(&a);
    drive(proposer(a, 0).cas(0, lease(0, 1)), &mut disk, |_, _| {});
    let (f, steps) = drive(proposer(a, 1).cas(0, lease(1, 1)), &mut disk, |_, _| {});
    assert_eq!(f.outcome, Ok(Outcome::Conflict(lease(0, 1))));
    assert_eq!(steps.len(), 1);
    let (f, _) = drive(proposer(a, 1).cas(5, lease(1, 6)), &mut disk, |_, _| {});
    assert_eq!(f.outcome, Ok(Outcome::Conflict(lease(0, 1))), "behind the expectation: a conflict too");
}

#[test]
fn a_value_already_committed_as_ours_is_done() {
    let a = area();
    let mut disk = blank(&a);
    drive(proposer(a, 0).cas(0, lease(3, 1)), &mut disk, |_, _| {});
    let (f, _) = drive(proposer(a, 1).cas(0, lease(3, 1)), &mut disk, |_, _| {});
    assert_eq!(f.outcome, Ok(Outcome::Done(lease(3, 1))));
}

/// Host 3 got its value accepted (phase 2) and died before committing: the
/// lease still reads generation 0. Host 1's CAS adopts and commits host 3's
/// value, and says Conflict.
#[test]
fn a_chosen_but_uncommitted_value_is_adopted_and_committed() {
    let a = area();
    let mut disk = blank(&a);
    let dead = Dblock { mbal: 4, bal: 4, lver: 1, inp: Some(lease(3, 1)), ..Dblock::empty(a.key, HostId(3)) };
    put(&a, &mut disk, &dead);
    assert_eq!(a.lease(&disk), Ok(FREE_LEASE));
    let (f, steps) = drive(proposer(a, 1).cas(0, lease(1, 1)), &mut disk, |_, _| {});
    assert_eq!(f.outcome, Ok(Outcome::Conflict(lease(3, 1))));
    assert_eq!(steps.len(), 6);
    assert_eq!(a.lease(&disk), Ok(lease(3, 1)));
    let own = a.dblocks(&disk).expect("readable")[1];
    assert!(own.mbal > 4 && (own.mbal - 1) % u64::from(N) == 1, "ballot above 4 and host 1's: {}", own.mbal);
}

#[test]
fn a_higher_ballot_between_write_and_read_means_retry() {
    for preempt_before_read in [1, 2] {
        let a = area();
        let mut disk = blank(&a);
        let (f, steps) = drive(proposer(a, 0).cas(0, lease(0, 1)), &mut disk, |k, disk| {
            if k == preempt_before_read {
                put(&a, disk, &Dblock { mbal: 99, lver: 1, ..Dblock::empty(a.key, HostId(2)) });
            }
        });
        assert_eq!(f.outcome, Ok(Outcome::Retry));
        assert_eq!(steps.len(), 1 + 2 * preempt_before_read);
        assert_eq!(a.lease(&disk), Ok(FREE_LEASE), "nothing committed");
    }
}

#[test]
fn a_lease_committed_meanwhile_settles_the_cas() {
    let a = area();
    let mut disk = blank(&a);
    let (f, _) = drive(proposer(a, 0).cas(0, lease(0, 1)), &mut disk, |k, disk| {
        if k == 1 {
            let d = Dblock {
                mbal: 3,
                bal: 3,
                lver: 1,
                inp: Some(lease(2, 1)),
                leader: lease(2, 1),
                host: HostId(2),
                key: a.key,
            };
            put(&a, disk, &d);
        }
    });
    assert_eq!(f.outcome, Ok(Outcome::Conflict(lease(2, 1))));
}

#[test]
fn ballots_are_unique_per_host_and_above_what_was_seen() {
    for n in [1u16, 2, 5, 64] {
        for above in [0u64, 1, 4, 5, 63, 64, 65, 1000] {
            for h in 0..n {
                let b = ballot_above(above, n, HostId(h)).expect("no overflow");
                assert!(b > above && b <= above + u64::from(n), "n={n} above={above} h={h} b={b}");
                assert_eq!((b - 1) % u64::from(n), u64::from(h));
            }
        }
    }
    assert_eq!(ballot_above(u64::MAX - 1, 4, HostId(3)), Err(PaxosError::BallotOverflow));
}

#[test]
fn generation_must_be_next_and_host_in_range() {
    let a = area();
    let cas = proposer(a, 0).cas(3, lease(0, 5));
    assert_eq!(cas.outcome(), Some(&Err(PaxosError::NotNextGeneration { expect: 3, new: 5 })));
    assert_eq!(Proposer::new(a, HostId(N)).err(), Some(PaxosError::HostOutOfRange { host: HostId(N), max_hosts: N }));
    assert_eq!(Layout::new(SectorSize::B512, 0), Err(PaxosError::MaxHostsOutOfRange { max_hosts: 0 }));
}

#[test]
fn an_io_error_finishes_with_the_proposer_back() {
    let mut cas = proposer(area(), 1).cas(0, lease(1, 1));
    assert!(cas.poll_io().is_some());
    cas.handle_io(Err(StorageError::Timeout));
    assert_eq!(cas.poll_io(), None);
    let f = cas.finish().expect("finished");
    assert_eq!(f.outcome, Err(PaxosError::Io { stage: "scan (read)", error: StorageError::Timeout }));
    assert_eq!(f.proposer.host(), HostId(1));
}

#[test]
fn an_unfinished_cas_keeps_its_proposer() {
    let mut cas = proposer(area(), 1).cas(0, lease(1, 1));
    assert!(cas.poll_io().is_some());
    assert!(cas.finish().is_err(), "no proposer while an I/O is outstanding");
}

#[test]
#[should_panic(expected = "no I/O outstanding")]
fn a_result_with_no_io_outstanding_is_a_driver_bug() {
    let mut cas = proposer(area(), 1).cas(0, lease(1, 1));
    cas.handle_io(Ok(Completed::Written));
}

#[test]
fn a_rejected_sector_stops_the_cas_before_any_write() {
    let a = area();
    let mut disk = blank(&a);
    disk[2 * 512 + 100] = 1; // host 2's sector: garbage
    let (f, steps) = drive(proposer(a, 0).cas(0, lease(0, 1)), &mut disk, |_, _| {});
    assert!(matches!(f.outcome, Err(PaxosError::Rejected { sector: 2, source: RecordError::BadMagic })));
    assert_eq!(steps.len(), 1);
}

#[test]
fn sector_round_trip_and_zero() {
    for sector in [SectorSize::B512, SectorSize::B4096] {
        let a = area_with(sector, N);
        let d = Dblock {
            mbal: 9,
            bal: 5,
            lver: 3,
            inp: Some(lease(1, 3)),
            leader: lease(2, 2),
            ..Dblock::empty(a.key, HostId(1))
        };
        let s = a.encode(&d).expect("fits");
        assert_eq!(s.len(), sector.bytes());
        assert_eq!(&s[..8], b"HAVIRT\0\x01");
        assert_eq!(u16::from_le_bytes([s[10], s[11]]), RecordKind::Dblock as u16);
        let crc_at = sector.bytes() - 4;
        assert_eq!(u32::from_le_bytes(s[crc_at..].try_into().expect("4 bytes")), crc32c::crc32c(&s[..crc_at]));
        assert_eq!(sector::decode(&a, HostId(1), &s), Ok(Some(d)));
        assert_eq!(sector::decode(&a, HostId(1), &vec![0u8; sector.bytes()]), Ok(None));
    }
}

#[test]
fn the_largest_dblock_fits_a_512_byte_sector() {
    let a = area_with(SectorSize::B512, N);
    let big = Lease {
        owner: Some(Owner { host: HostId(u16::MAX), boot: u64::MAX }),
        generation: u64::MAX,
        reason: LeaseReason::FenceConfirmed,
    };
    let key = LeaseKey::Domain(DomainId(u128::MAX));
    let d = Dblock {
        key,
        host: HostId(u16::MAX),
        mbal: u64::MAX,
        bal: u64::MAX,
        lver: u64::MAX,
        inp: Some(big),
        leader: big,
    };
    let payload = postcard::to_allocvec(&d).expect("serializes").len();
    assert!(payload <= 512 - 36, "{payload} bytes");
    assert!(Area { key, ..a }.encode(&d).is_ok());
}

#[test]
fn every_single_byte_flip_is_rejected() {
    let a = area();
    let d = Dblock { mbal: 9, bal: 9, lver: 1, inp: Some(lease(1, 1)), ..Dblock::empty(a.key, HostId(1)) };
    let s = a.encode(&d).expect("fits");
    for i in 0..s.len() {
        let mut c = s.clone();
        c[i] ^= 0x5a;
        assert!(sector::decode(&a, HostId(1), &c).is_err(), "flip at {i} accepted");
    }
}

#[test]
fn foreign_misplaced_and_inconsistent_records_are_rejected() {
    let a = area();
    let d = Dblock { mbal: 9, lver: 1, ..Dblock::empty(a.key, HostId(1)) };
    let s = a.encode(&d).expect("fits");
    let other_cluster = Area { cluster: ClusterId::from_name("other"), ..a };
    assert!(matches!(sector::decode(&other_cluster, HostId(1), &s), Err(RecordError::ForeignCluster { .. })));
    let other_lease = Area { key: LeaseKey::Master, ..a };
    assert!(matches!(sector::decode(&other_lease, HostId(1), &s), Err(RecordError::WrongSubject { .. })));
    assert_eq!(
        sector::decode(&a, HostId(2), &s),
        Err(RecordError::WrongSubject { expected: "HostId(2)".into(), found: "HostId(1)".into() })
    );
    assert_eq!(sector::decode(&a, HostId(1), &s[..100]), Err(RecordError::Truncated { len: 100, expected: 512 }));
    let bad = Dblock { bal: 10, inp: Some(lease(1, 1)), ..d };
    assert!(matches!(sector::decode(&a, HostId(1), &a.encode(&bad).expect("fits")), Err(RecordError::Malformed(_))));
    let mut future = s.clone();
    future[8] = 2;
    let crc = crc32c::crc32c(&future[..508]);
    future[508..].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(sector::decode(&a, HostId(1), &future), Err(RecordError::FutureVersion { found: 2, supported: 1 }));
}

#[test]
fn disagreeing_leaders_are_an_error_not_a_choice() {
    let a = area();
    let mut disk = blank(&a);
    put(&a, &mut disk, &Dblock { mbal: 1, lver: 1, leader: lease(0, 1), ..Dblock::empty(a.key, HostId(0)) });
    put(&a, &mut disk, &Dblock { mbal: 2, lver: 1, leader: lease(1, 1), ..Dblock::empty(a.key, HostId(1)) });
    assert_eq!(a.lease(&disk), Err(PaxosError::Disagreement { generation: 1, a: HostId(0), b: HostId(1) }));
}

/// Why there is no shared leader sector: host 0's commit of generation 1
/// stalls and lands after host 2 committed generation 2. It lands in host
/// 0's own sector, so the committed lease stays at 2 (a shared sector
/// would be back at 1, naming the previous owner).
#[test]
fn a_commit_that_lands_late_cannot_roll_the_lease_back() {
    let a = area();
    let mut disk = blank(&a);
    let g1 = lease(0, 1);
    put(
        &a,
        &mut disk,
        &Dblock { mbal: 5, bal: 5, lver: 1, inp: Some(g1), leader: g1, ..Dblock::empty(a.key, HostId(1)) },
    );
    let (f, _) = drive(proposer(a, 2).cas(1, lease(2, 2)), &mut disk, |_, _| {});
    assert_eq!(f.outcome, Ok(Outcome::Done(lease(2, 2))));
    put(
        &a,
        &mut disk,
        &Dblock { mbal: 1, bal: 1, lver: 1, inp: Some(g1), leader: g1, ..Dblock::empty(a.key, HostId(0)) },
    );
    assert_eq!(a.lease(&disk), Ok(lease(2, 2)));
}
