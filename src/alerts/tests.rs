use super::*;
use crate::engine::config::Priority;
use crate::engine::io::DomainState;
use crate::engine::view::{DomainView, HostView};
use crate::failover::{DomainTimeline, Step};

const SILENT: Duration = Duration::from_secs(2);
const WEB: DomainId = DomainId(0xabc);

/// The view of host `me` of a three-host cluster; h2 as given.
fn view(me: u16, master: bool, h2: HostView) -> NodeView {
    let mut hosts = vec![HostView::sample(1, "h1", "alive"), h2, HostView::sample(3, "h3", "alive")];
    hosts[usize::from(me) - 1].verdict = "self".into();
    NodeView {
        host: HostId(me),
        boot: 0xb00 + u64::from(me),
        is_master: master,
        master: master.then_some(HostId(me)),
        self_fence: "healthy".into(),
        isolated: false,
        storage_healthy: true,
        last_good_write_age: Some(Duration(300)),
        hosts,
        domains: vec![DomainView {
            id: WEB,
            name: "web".into(),
            priority: Priority::Medium,
            host: Some(HostId(2)),
            state: Some(DomainState::Running),
            generation: Some(7),
            local: None,
        }],
        tolerance: None,
        admission: Default::default(),
        admission_breach: None,
        migration_failures: Vec::new(),
        given_up: Vec::new(),
    }
}

fn h2(verdict: &str, fenced: bool, boot: u64) -> HostView {
    HostView { fenced, boot: Some(boot), ..HostView::sample(2, "h2", verdict) }
}

fn kinds(alerts: &[Alert]) -> Vec<AlertKind> {
    alerts.iter().map(|a| a.kind).collect()
}

fn record(running: Option<u64>) -> FailoverRecord {
    FailoverRecord {
        host: "h2".into(),
        host_id: HostId(2),
        boot: Some(0xb02),
        detected_unix_ms: 1_700_000_000_000,
        verdict: "suspect".into(),
        silent_before_ms: Some(1_600),
        steps: vec![Step { after_ms: 930, text: "fenced: ipmi confirmed the power-off".into() }],
        domains: vec![DomainTimeline {
            name: "web".into(),
            to: "h1".into(),
            generation: 8,
            reason: "fence confirmed".into(),
            lease_ms: 1_136,
            starting_ms: Some(1_145),
            running_ms: running,
            ready_ms: None,
        }],
    }
}

#[test]
fn an_id_names_one_occurrence_and_nothing_else() {
    let a = alert_id("prod", AlertKind::HostFenced, &["h2", "b02"]);
    assert_eq!(a.len(), ID_HEX_CHARS);
    assert!(a.bytes().all(|b| b.is_ascii_hexdigit()), "{a}");
    assert_eq!(a, alert_id("prod", AlertKind::HostFenced, &["h2", "b02"]), "stable");
    assert_ne!(a, alert_id("prod", AlertKind::HostFenced, &["h2", "b03"]), "another boot");
    assert_ne!(a, alert_id("prod", AlertKind::FailoverOpened, &["h2", "b02"]), "another kind");
    assert_ne!(a, alert_id("test", AlertKind::HostFenced, &["h2", "b02"]), "another cluster");
    assert_ne!(
        alert_id("prod", AlertKind::HostFenced, &["h2b", "02"]),
        alert_id("prod", AlertKind::HostFenced, &["h2", "b02"]),
        "the parts are separated"
    );
}

#[test]
fn the_first_view_is_no_news() {
    let mut o = Observer::new("prod", HostId(1), 0x1c, SILENT);
    let mut v = view(1, true, h2("suspect", true, 0xb02));
    v.hosts[0].maintenance = true;
    v.given_up = vec![WEB];
    assert!(o.observe(Instant(100), 1, &v, &[]).is_empty(), "fenced, given up and in maintenance before it started");
    assert!(o.observe(Instant(200), 2, &v, &[]).is_empty(), "and nothing changed");
}

#[test]
fn the_master_sends_host_fenced_once_per_boot_and_a_member_never() {
    let alive = view(1, true, h2("alive", false, 0xb02));
    let fenced = view(1, true, h2("suspect", true, 0xb02));
    let mut master = Observer::new("prod", HostId(1), 0x1c, SILENT);
    master.observe(Instant(0), 0, &alive, &[]);
    let a = master.observe(Instant(10), 1_000, &fenced, &[record(None)]);
    assert_eq!(kinds(&a), [AlertKind::HostFenced, AlertKind::FailoverOpened]);
    let f = &a[0];
    assert_eq!((f.host.as_str(), f.sender.as_str(), f.cluster.as_str()), ("h2", "h1", "prod"));
    assert_eq!(f.unix_ms, 1_000);
    assert!(f.text.contains("h2 (boot b02) is fenced") && f.text.contains("ipmi confirmed"), "{}", f.text);
    assert!(f.timeline.as_deref().is_some_and(|t| t.contains("FAILOVER of h2")), "{:?}", f.timeline);
    assert!(master.observe(Instant(20), 2_000, &fenced, &[record(None)]).is_empty(), "once");

    // A member sees the same fence (its fenced/ record) and says nothing.
    let mut member = Observer::new("prod", HostId(3), 0x3c, SILENT);
    member.observe(Instant(0), 0, &view(3, false, h2("alive", false, 0xb02)), &[]);
    assert!(member.observe(Instant(10), 1_000, &view(3, false, h2("suspect", true, 0xb02)), &[]).is_empty());

    // A later master of the same fence of the same boot: the same id.
    let mut next = Observer::new("prod", HostId(3), 0x3d, SILENT);
    next.observe(Instant(0), 0, &view(3, true, h2("alive", false, 0xb02)), &[]);
    let again = next.observe(Instant(10), 5_000, &view(3, true, h2("suspect", true, 0xb02)), &[]);
    assert_eq!(again[0].id, f.id, "receivers de-duplicate a second master's alert");

    // Back with a new boot, fenced again: a new alert.
    master.observe(Instant(30), 3_000, &view(1, true, h2("alive", false, 0xb12)), &[]);
    let second = master.observe(Instant(40), 4_000, &view(1, true, h2("suspect", true, 0xb12)), &[]);
    assert_eq!(kinds(&second), [AlertKind::HostFenced]);
    assert_ne!(second[0].id, f.id);
}

#[test]
fn a_failover_opens_when_a_lease_moves_and_closes_once_when_all_run() {
    let v = view(1, true, h2("suspect", true, 0xb02));
    let mut o = Observer::new("prod", HostId(1), 0x1c, SILENT);
    o.observe(Instant(0), 0, &v, &[]);
    let mut no_domains = record(None);
    no_domains.domains.clear();
    assert!(o.observe(Instant(5), 0, &v, &[no_domains]).is_empty(), "fencing alone opens no failover");
    let opened = o.observe(Instant(10), 0, &v, &[record(None)]);
    assert_eq!(kinds(&opened), [AlertKind::FailoverOpened]);
    assert!(opened[0].text.contains("moving web to h1"), "{}", opened[0].text);
    let closed = o.observe(Instant(20), 0, &v, &[record(Some(1_677))]);
    assert_eq!(kinds(&closed), [AlertKind::FailoverClosed]);
    let c = &closed[0];
    assert!(c.text.contains("web on h1 running again, the last 1.677s"), "{}", c.text);
    assert_eq!(c.failover.as_ref().map(|r| r.domains[0].running_ms), Some(Some(1_677)), "with the timeline");
    assert!(c.timeline.as_deref().is_some_and(|t| t.contains("+1.677s  started (running)")), "{:?}", c.timeline);
    assert_ne!(c.id, opened[0].id);
    assert!(o.observe(Instant(30), 0, &v, &[record(Some(1_677))]).is_empty(), "closed once");

    // Not the master: a record of its own is neither opened nor closed.
    let mut member = Observer::new("prod", HostId(1), 0x1c, SILENT);
    let v = view(1, false, h2("suspect", true, 0xb02));
    member.observe(Instant(0), 0, &v, &[]);
    assert!(member.observe(Instant(10), 0, &v, &[record(Some(1_677))]).is_empty());
}

#[test]
fn a_second_failover_of_the_same_boot_gets_ids_of_its_own() {
    let v = view(1, true, h2("storage-lost", false, 0xb02));
    let mut o = Observer::new("prod", HostId(1), 0x1c, SILENT);
    o.observe(Instant(0), 0, &v, &[]);
    let first = o.observe(Instant(10), 0, &v, &[record(Some(500))]);
    let mut later = record(Some(700));
    later.detected_unix_ms += 60_000;
    let second = o.observe(Instant(20), 0, &v, &[record(Some(500)), later]);
    assert_eq!(kinds(&second), [AlertKind::FailoverOpened, AlertKind::FailoverClosed]);
    assert_ne!(first[0].id, second[0].id);
    assert_ne!(first[1].id, second[1].id);
}

#[test]
fn a_domain_given_up_is_the_masters_alert() {
    let mut v = view(1, true, h2("alive", false, 0xb02));
    let mut o = Observer::new("prod", HostId(1), 0x1c, SILENT);
    o.observe(Instant(0), 0, &v, &[]);
    v.given_up = vec![WEB];
    let a = o.observe(Instant(10), 0, &v, &[]);
    assert_eq!(kinds(&a), [AlertKind::DomainGivenUp]);
    assert_eq!((a[0].domain.as_deref(), a[0].host.as_str()), (Some("web"), "h2"));
    assert_eq!(a[0].id, alert_id("prod", AlertKind::DomainGivenUp, &[&format!("{:032x}", WEB.0), "7"]));
    assert!(o.observe(Instant(20), 0, &v, &[]).is_empty());
}

#[test]
fn an_admission_breach_and_its_end_are_the_masters_alerts_once_each() {
    let why = "the cluster could absorb 0 host failure(s), fewer than tolerate_host_failures = 1".to_string();
    for master in [true, false] {
        let mut v = view(1, master, h2("alive", false, 0xb02));
        let mut o = Observer::new("prod", HostId(1), 0x1c, SILENT);
        o.observe(Instant(0), 0, &v, &[]);
        v.admission_breach = Some(why.clone());
        let a = o.observe(Instant(10), 0, &v, &[]);
        if !master {
            assert!(a.is_empty(), "a member sends no admission alert: {a:?}");
            continue;
        }
        assert_eq!(kinds(&a), [AlertKind::AdmissionBreach]);
        assert!(a[0].text.contains(&why), "{}", a[0].text);
        assert!(o.observe(Instant(20), 0, &v, &[]).is_empty(), "once while it lasts");
        v.admission_breach = None;
        let b = o.observe(Instant(30), 0, &v, &[]);
        assert_eq!(kinds(&b), [AlertKind::AdmissionRestored]);
        v.admission_breach = Some(why.clone());
        let c = o.observe(Instant(40), 0, &v, &[]);
        assert_eq!(kinds(&c), [AlertKind::AdmissionBreach]);
        assert_ne!(c[0].id, a[0].id, "a second breach is news of its own");
    }
}

#[test]
fn a_hosts_own_troubles_are_sent_by_that_host_master_or_not() {
    let mut v = view(2, false, HostView::sample(2, "h2", "self"));
    let mut o = Observer::new("prod", HostId(2), 0x2c, SILENT);
    o.observe(Instant(0), 0, &v, &[]);
    v.last_good_write_age = Some(Duration(2_100));
    let lost = o.observe(Instant(2_400), 0, &v, &[]);
    assert_eq!(kinds(&lost), [AlertKind::StorageLost]);
    assert!(lost[0].text.contains("h2 lost its storage") && lost[0].text.contains("2.100s"), "{}", lost[0].text);
    v.self_fence = "fencing".into();
    v.last_good_write_age = Some(Duration(8_100));
    assert_eq!(kinds(&o.observe(Instant(8_400), 0, &v, &[])), [AlertKind::SelfFence]);
    v.self_fence = "fenced".into();
    assert!(o.observe(Instant(8_500), 0, &v, &[]).is_empty(), "one self-fence, however it goes on");
    v.self_fence = "healthy".into();
    v.last_good_write_age = Some(Duration(200));
    assert_eq!(kinds(&o.observe(Instant(20_000), 0, &v, &[])), [AlertKind::StorageRestored]);
    v.hosts[1].maintenance = true;
    let entered = o.observe(Instant(21_000), 0, &v, &[]);
    assert_eq!(kinds(&entered), [AlertKind::MaintenanceEntered]);
    assert_eq!((entered[0].host.as_str(), entered[0].sender.as_str()), ("h2", "h2"));
    v.hosts[1].maintenance = false;
    assert_eq!(kinds(&o.observe(Instant(22_000), 0, &v, &[])), [AlertKind::MaintenanceExited]);
    v.hosts[1].maintenance = true;
    let again = o.observe(Instant(23_000), 0, &v, &[]);
    assert_ne!(again[0].id, entered[0].id, "each maintenance entry is news");
    // A restarted daemon (new incarnation) counts from 1 again, with new ids.
    let mut restarted = Observer::new("prod", HostId(2), 0x2d, SILENT);
    v.hosts[1].maintenance = false;
    restarted.observe(Instant(0), 0, &v, &[]);
    v.hosts[1].maintenance = true;
    assert_ne!(restarted.observe(Instant(10), 0, &v, &[])[0].id, entered[0].id);
}

#[test]
fn a_daemon_that_never_wrote_its_slot_has_lost_its_storage_after_the_silence() {
    let mut v = view(2, false, HostView::sample(2, "h2", "self"));
    v.last_good_write_age = None;
    let mut o = Observer::new("prod", HostId(2), 0x2c, SILENT);
    assert!(o.observe(Instant(100), 0, &v, &[]).is_empty());
    assert!(o.observe(Instant(1_900), 0, &v, &[]).is_empty());
    assert_eq!(kinds(&o.observe(Instant(2_000), 0, &v, &[])), [AlertKind::StorageLost]);
}

#[test]
fn the_json_names_kinds_in_snake_case() {
    let mut o = Observer::new("prod", HostId(1), 0x1c, SILENT);
    o.observe(Instant(0), 0, &view(1, true, h2("alive", false, 0xb02)), &[]);
    let a = o.observe(Instant(10), 0, &view(1, true, h2("suspect", true, 0xb02)), &[]);
    let json: serde_json::Value = serde_json::from_slice(&deliver::body(&a[0])).expect("JSON");
    assert_eq!(json["kind"], "host_fenced");
    assert_eq!(json["format"], FORMAT);
    assert_eq!(json["id"], a[0].id.as_str());
    for k in AlertKind::ALL {
        assert_eq!(serde_json::to_value(k).expect("kind"), k.name());
    }
}
