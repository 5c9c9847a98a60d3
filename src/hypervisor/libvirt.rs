//! [`Hypervisor`] over libvirt, through the `virt` crate.
//!
//! One connection per `LibvirtHypervisor`, shared by every call (libvirt
//! connections are thread-safe). The URI comes from the caller:
//! `qemu:///system` in production, `test:///default` in unit tests (an
//! in-process driver whose state every `test:///default` connection of the
//! process shares), `qemu:///system?socket=...` for a lab host.
//!
//! Keepalive (on by default, not for `test:///`) makes libvirt close a
//! connection to a libvirtd that stops answering, which fails the calls
//! blocked on it and fires `HypervisorEvent::ConnectionClosed`.

#![deny(unsafe_code)]

use super::events::{EventStream, ensure_event_loop};
use super::metadata::{POLICY_KEY, POLICY_NS, parse_policy, render_policy};
use super::process::ProcPaths;
use super::{DomainInfo, Hypervisor, HypervisorError, PowerState, Uuid, parse_uuid, uuid_string};
use crate::engine::config::{DomainId, DomainPolicy};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::{Error as VirtError, ErrorNumber};
use virt::sys;

/// Seconds between keepalive probes to libvirtd.
pub const KEEPALIVE_INTERVAL_S: i32 = 2;
/// Unanswered probes before the connection counts as lost (so a hung
/// libvirtd is noticed after about (count + 1) x interval = 8 s).
pub const KEEPALIVE_COUNT: u32 = 3;
/// How long a guest agent may take to answer `guest-ping`, in seconds
/// (libvirt's agent timeout has one-second resolution).
pub const AGENT_PING_TIMEOUT_S: i32 = 2;
/// After SIGKILL, how long `kill_qemu` waits for the qemu to be gone.
pub const KILL_WAIT_MS: u64 = 2000;

const GUEST_PING: &str = r#"{"execute":"guest-ping"}"#;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibvirtOptions {
    pub uri: String,
    /// 0 turns keepalive off (the `test:///` driver has none).
    pub keepalive_interval_s: i32,
    pub keepalive_count: u32,
    pub agent_ping_timeout_s: i32,
    pub kill_wait_ms: u64,
    /// Where `kill_qemu` and `list` find qemu pidfiles and processes.
    pub paths: ProcPaths,
}

impl LibvirtOptions {
    /// The defaults above for `uri`; keepalive off for `test:///` URIs.
    pub fn new(uri: &str) -> LibvirtOptions {
        let local_test = uri.starts_with("test:");
        LibvirtOptions {
            uri: uri.to_string(),
            keepalive_interval_s: if local_test { 0 } else { KEEPALIVE_INTERVAL_S },
            keepalive_count: KEEPALIVE_COUNT,
            agent_ping_timeout_s: AGENT_PING_TIMEOUT_S,
            kill_wait_ms: KILL_WAIT_MS,
            paths: ProcPaths::default(),
        }
    }
}

pub struct LibvirtHypervisor {
    conn: Connect,
    opts: LibvirtOptions,
}

impl LibvirtHypervisor {
    /// Starts the process-wide event loop if needed (libvirt wants it before
    /// the first connection), then connects.
    pub fn open(opts: LibvirtOptions) -> Result<LibvirtHypervisor, HypervisorError> {
        ensure_event_loop()?;
        let mut conn =
            Connect::open(Some(&opts.uri)).map_err(|source| HypervisorError::Libvirt { op: "open", source })?;
        if opts.keepalive_interval_s > 0
            && let Err(source) = conn.set_keep_alive(opts.keepalive_interval_s, opts.keepalive_count)
        {
            let _ = conn.close();
            return Err(HypervisorError::Libvirt { op: "set keepalive", source });
        }
        Ok(LibvirtHypervisor { conn, opts })
    }

    pub fn uri(&self) -> &str {
        &self.opts.uri
    }

    /// Lifecycle and close events of this connection (one stream at a time).
    pub fn events(&self) -> Result<EventStream, HypervisorError> {
        Ok(EventStream::subscribe(&self.conn)?)
    }

    /// Whether the connection still works (false after libvirtd went away).
    pub fn is_alive(&self) -> bool {
        self.conn.is_alive().unwrap_or(false)
    }

    /// The names of the active libvirt networks, sorted (what a domain's
    /// `<interface type='network'>` can plug into here).
    pub fn active_networks(&self) -> Result<Vec<String>, HypervisorError> {
        let mut names =
            self.conn.list_networks().map_err(|source| HypervisorError::Libvirt { op: "list networks", source })?;
        names.sort();
        Ok(names)
    }

    fn lookup(&self, id: DomainId) -> Result<Domain, HypervisorError> {
        Domain::lookup_by_uuid_string(&self.conn, &uuid_string(id)).map_err(|e| domain_error("lookup", id, e))
    }

    /// `None`: the domain went away meanwhile (a transient one stopped).
    fn info(&self, dom: &Domain) -> Result<Option<DomainInfo>, HypervisorError> {
        let uuid = dom.get_uuid_string().map_err(|source| HypervisorError::Libvirt { op: "list (uuid)", source })?;
        let id = parse_uuid(&uuid).ok_or(HypervisorError::BadUuid(uuid))?;
        let details = || -> Result<DomainInfo, VirtError> {
            let name = dom.get_name()?;
            let (state, _reason) = dom.get_state()?;
            let active = dom.is_active()?;
            let policy = read_policy(dom)?.map_or(Ok(None), |xml| parse_policy(&xml).map(Some));
            let qemu_pid = if active { self.opts.paths.pid_from_pidfile(&name, id) } else { None };
            Ok(DomainInfo {
                id,
                name,
                state: power_state(state, active),
                policy,
                qemu_pid,
                persistent: dom.is_persistent()?,
                autostart: dom.get_autostart()?,
            })
        };
        match details() {
            Ok(info) => Ok(Some(info)),
            Err(e) if e.code() == ErrorNumber::NoDomain => Ok(None),
            Err(e) => Err(domain_error("list (details)", id, e)),
        }
    }
}

impl Drop for LibvirtHypervisor {
    fn drop(&mut self) {
        // An error here means the connection is already broken; the
        // reference is released either way.
        let _ = self.conn.close();
    }
}

impl Hypervisor for LibvirtHypervisor {
    fn list(&self) -> Result<Vec<DomainInfo>, HypervisorError> {
        let domains =
            self.conn.list_all_domains(0).map_err(|source| HypervisorError::Libvirt { op: "list", source })?;
        let mut out = Vec::with_capacity(domains.len());
        for dom in &domains {
            if let Some(info) = self.info(dom)? {
                out.push(info);
            }
        }
        out.sort_by_key(|d| d.id);
        Ok(out)
    }

    fn define(&self, xml: &str) -> Result<DomainId, HypervisorError> {
        let dom =
            Domain::define_xml(&self.conn, xml).map_err(|source| HypervisorError::Libvirt { op: "define", source })?;
        let uuid = dom.get_uuid_string().map_err(|source| HypervisorError::Libvirt { op: "define", source })?;
        parse_uuid(&uuid).ok_or(HypervisorError::BadUuid(uuid))
    }

    fn start(&self, id: DomainId) -> Result<(), HypervisorError> {
        let dom = self.lookup(id)?;
        match dom.create() {
            Ok(_) => Ok(()),
            // Drivers differ in the error code (qemu: operation invalid, test:
            // internal error); the state is what counts.
            Err(_) if dom.is_active().unwrap_or(false) => Err(HypervisorError::AlreadyRunning(Uuid(id))),
            Err(e) => Err(domain_error("start", id, e)),
        }
    }

    fn destroy(&self, id: DomainId) -> Result<(), HypervisorError> {
        let dom = self.lookup(id)?;
        match dom.destroy() {
            Ok(()) => Ok(()),
            Err(_) if stopped_already(&dom) => Ok(()),
            Err(e) => Err(domain_error("destroy", id, e)),
        }
    }

    fn shutdown(&self, id: DomainId) -> Result<(), HypervisorError> {
        let dom = self.lookup(id)?;
        match dom.shutdown() {
            Ok(_) => Ok(()),
            Err(_) if stopped_already(&dom) => Ok(()),
            Err(e) => Err(domain_error("shutdown", id, e)),
        }
    }

    fn migrate(
        &self,
        id: DomainId,
        dest_uri: &str,
        data_uri: &str,
        unsafe_storage: bool,
        remap: Option<(&super::netmap::NetMap, &super::netmap::NetMap)>,
    ) -> Result<(), HypervisorError> {
        let dom = self.lookup(id)?;
        // The live, migratable XML with the target's bridge and network
        // names (through the cluster's names), when the maps differ.
        let dest_xml = match remap {
            Some((here, there)) if !(here.is_empty() && there.is_empty()) => {
                let flags = sys::VIR_DOMAIN_XML_MIGRATABLE | sys::VIR_DOMAIN_XML_SECURE;
                let live = dom.get_xml_desc(flags).map_err(|e| domain_error("get migratable xml", id, e))?;
                let mapped = here
                    .to_cluster(&live)
                    .and_then(|c| there.to_local(&c).map(|x| x.into_owned()))
                    .map_err(|e| HypervisorError::Mapping { domain: Uuid(id), reason: e.to_string() })?;
                Some(mapped)
            }
            _ => None,
        };
        let unsafe_flag = if unsafe_storage { sys::VIR_MIGRATE_UNSAFE } else { 0 };
        let flags = unsafe_flag
            | sys::VIR_MIGRATE_LIVE
            | sys::VIR_MIGRATE_PEER2PEER
            | sys::VIR_MIGRATE_PAUSED
            | sys::VIR_MIGRATE_PERSIST_DEST
            | sys::VIR_MIGRATE_UNDEFINE_SOURCE;
        dom.migrate_to_uri2(Some(dest_uri), Some(data_uri), dest_xml.as_deref(), flags, None, 0)
            .map_err(|e| domain_error("migrate", id, e))
    }

    fn resume_if_paused(&self, id: DomainId) -> Result<bool, HypervisorError> {
        let dom = match self.lookup(id) {
            Ok(d) => d,
            Err(HypervisorError::NoSuchDomain(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        let (state, _) = dom.get_state().map_err(|e| domain_error("state", id, e))?;
        if state != sys::VIR_DOMAIN_PAUSED {
            return Ok(false);
        }
        dom.resume().map(|_| true).map_err(|e| domain_error("resume", id, e))
    }

    fn reset(&self, id: DomainId) -> Result<(), HypervisorError> {
        let dom = self.lookup(id)?;
        dom.reset().map(drop).map_err(|e| domain_error("reset", id, e))
    }

    fn kill_qemu(&self, id: DomainId) -> Result<Vec<u32>, HypervisorError> {
        self.opts
            .paths
            .kill_qemu(id, self.opts.kill_wait_ms)
            .map_err(|source| HypervisorError::Kill { domain: Uuid(id), source })
    }

    fn set_autostart(&self, id: DomainId, on: bool) -> Result<(), HypervisorError> {
        let dom = self.lookup(id)?;
        dom.set_autostart(on).map(|_| ()).map_err(|e| domain_error("set autostart", id, e))
    }

    fn policy(&self, id: DomainId) -> Result<Option<DomainPolicy>, HypervisorError> {
        let dom = self.lookup(id)?;
        let Some(xml) = read_policy(&dom).map_err(|e| domain_error("read policy", id, e))? else {
            return Ok(None);
        };
        parse_policy(&xml).map(Some).map_err(|source| HypervisorError::Policy { domain: Uuid(id), source })
    }

    fn set_policy(&self, id: DomainId, policy: &DomainPolicy) -> Result<(), HypervisorError> {
        let dom = self.lookup(id)?;
        let active = dom.is_active().map_err(|e| domain_error("set policy", id, e))?;
        let persistent = dom.is_persistent().map_err(|e| domain_error("set policy", id, e))?;
        // The persistent definition is what a survivor defines; the live one
        // is what `policy` reads while the domain runs. Write both.
        let mut flags = 0;
        if active {
            flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
        }
        if persistent {
            flags |= sys::VIR_DOMAIN_AFFECT_CONFIG;
        }
        let xml = render_policy(policy);
        dom.set_metadata(sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(&xml), Some(POLICY_KEY), Some(POLICY_NS), flags)
            .map(|_| ())
            .map_err(|e| domain_error("set policy", id, e))
    }

    fn ping_guest_agent(&self, id: DomainId) -> Result<bool, HypervisorError> {
        let dom = self.lookup(id)?;
        match dom.qemu_agent_command(GUEST_PING, self.opts.agent_ping_timeout_s, 0) {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.code(), ErrorNumber::AgentUnresponsive | ErrorNumber::AgentUnsynced) => Ok(false),
            Err(e) => Err(domain_error("guest-agent ping", id, e)),
        }
    }

    fn xml(&self, id: DomainId) -> Result<String, HypervisorError> {
        let dom = self.lookup(id)?;
        dom.get_xml_desc(sys::VIR_DOMAIN_XML_INACTIVE).map_err(|e| domain_error("get xml", id, e))
    }

    fn addresses(&self, id: DomainId) -> Result<Vec<std::net::IpAddr>, HypervisorError> {
        let dom = self.lookup(id)?;
        let lease = dom.interface_addresses(sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0);
        if let Ok(ifaces) = &lease {
            let ips = interface_ips(ifaces);
            if !ips.is_empty() {
                return Ok(ips);
            }
        }
        let agent = dom
            .interface_addresses(sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT, 0)
            .map_err(|e| domain_error("interface addresses", id, e))?;
        Ok(interface_ips(&agent))
    }
}

/// Parses the addresses of `virDomainInterfaceAddresses`, skipping loopback.
fn interface_ips(ifaces: &[virt::domain::Interface]) -> Vec<std::net::IpAddr> {
    ifaces
        .iter()
        .flat_map(|i| i.addrs.iter())
        .filter_map(|a| a.addr.parse::<std::net::IpAddr>().ok())
        .filter(|ip| !ip.is_loopback())
        .collect()
}

/// The policy element as libvirt returns it, `None` when there is none.
fn read_policy(dom: &Domain) -> Result<Option<String>, VirtError> {
    match dom.get_metadata(sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(POLICY_NS), 0) {
        Ok(xml) => Ok(Some(xml)),
        Err(e) if e.code() == ErrorNumber::NoDomainMetadata => Ok(None),
        Err(e) => Err(e),
    }
}

fn power_state(state: sys::virDomainState, active: bool) -> PowerState {
    match state {
        sys::VIR_DOMAIN_RUNNING | sys::VIR_DOMAIN_BLOCKED | sys::VIR_DOMAIN_SHUTDOWN => PowerState::Running,
        sys::VIR_DOMAIN_PAUSED | sys::VIR_DOMAIN_PMSUSPENDED => PowerState::Paused,
        sys::VIR_DOMAIN_SHUTOFF => PowerState::ShutOff,
        sys::VIR_DOMAIN_CRASHED => PowerState::Crashed,
        // NOSTATE or a state newer than these bindings: trust is_active, so
        // a qemu that exists is never reported as absent.
        _ if active => PowerState::Running,
        _ => PowerState::ShutOff,
    }
}

/// After a failed destroy or shutdown: the domain is not running, so the
/// goal holds (whatever code the driver used to refuse).
fn stopped_already(dom: &Domain) -> bool {
    dom.is_active().is_ok_and(|active| !active)
}

fn domain_error(op: &'static str, id: DomainId, source: VirtError) -> HypervisorError {
    if source.code() == ErrorNumber::NoDomain {
        return HypervisorError::NoSuchDomain(Uuid(id));
    }
    HypervisorError::Domain { op, domain: Uuid(id), source }
}

#[cfg(test)]
mod tests {
    //! Against libvirt's in-process `test:///default` driver. Its state is
    //! shared by every connection of the test process, and tests run in
    //! parallel: each test uses domains of its own and leaves "test" alone.

    use super::*;
    use crate::engine::config::{HostId, IsolationResponse, Priority, Readiness};
    use crate::engine::io::DomainEvent;
    use crate::engine::time::Duration;
    use crate::hypervisor::{HypervisorEvent, PolicyError};

    /// Every wait for an event is bounded by this.
    const EVENT_WAIT_MS: u64 = 5000;

    fn hv() -> LibvirtHypervisor {
        LibvirtHypervisor::open(LibvirtOptions::new("test:///default")).expect("open test:///default")
    }

    fn define(hv: &LibvirtHypervisor, name: &str, id: DomainId) -> DomainId {
        let xml = format!(
            "<domain type='test'><name>{name}</name><uuid>{}</uuid><memory unit='MiB'>64</memory>\
             <vcpu>1</vcpu><os><type>hvm</type></os></domain>",
            uuid_string(id)
        );
        let got = hv.define(&xml).expect("define");
        assert_eq!(got, id);
        got
    }

    fn state(hv: &LibvirtHypervisor, id: DomainId) -> PowerState {
        let list = hv.list().expect("list");
        list.iter().find(|d| d.id == id).map(|d| d.state).expect("domain listed")
    }

    #[test]
    fn list_shows_the_running_test_domain() {
        let list = hv().list().expect("list");
        let test = list.iter().find(|d| d.name == "test").expect("the test driver's domain");
        assert_eq!(test.state, PowerState::Running);
        assert!(test.persistent);
        assert_eq!(test.policy, Ok(None));
        assert_eq!(test.qemu_pid, None, "the test driver runs no qemu");
        assert!(list.windows(2).all(|w| w[0].id < w[1].id), "ordered by uuid");
    }

    #[test]
    fn define_start_shutdown_destroy() {
        let hv = hv();
        let id = define(&hv, "havirt-unit-lifecycle", DomainId(0xa1));
        assert_eq!(state(&hv, id), PowerState::ShutOff);
        assert!(hv.xml(id).expect("xml").contains("<name>havirt-unit-lifecycle</name>"));
        hv.start(id).expect("start");
        assert_eq!(state(&hv, id), PowerState::Running);
        assert_eq!(hv.start(id), Err(HypervisorError::AlreadyRunning(Uuid(id))));
        hv.shutdown(id).expect("shutdown");
        assert_eq!(state(&hv, id), PowerState::ShutOff);
        hv.shutdown(id).expect("shutdown of a stopped domain is done already");
        hv.start(id).expect("start again");
        hv.destroy(id).expect("destroy");
        assert_eq!(state(&hv, id), PowerState::ShutOff);
        hv.destroy(id).expect("destroy of a stopped domain is done already");
        assert_eq!(hv.kill_qemu(id), Ok(vec![]), "no qemu runs under the test driver");
    }

    #[test]
    fn unknown_domain_is_named() {
        let missing = DomainId(0xdead);
        let err = hv().start(missing).expect_err("no such domain");
        assert_eq!(err, HypervisorError::NoSuchDomain(Uuid(missing)));
        assert!(err.to_string().contains("00000000-0000-0000-0000-00000000dead"), "{err}");
    }

    #[test]
    fn policy_round_trip_stopped_and_running() {
        let hv = hv();
        let id = define(&hv, "havirt-unit-policy", DomainId(0xa2));
        assert_eq!(hv.policy(id), Ok(None));
        let mut policy = DomainPolicy {
            priority: Priority::High,
            isolation_response: IsolationResponse::Shutdown,
            affinity: vec![HostId(1), HostId(2)],
            anti_affinity: Some("db".into()),
            readiness: Readiness::GuestAgent,
            readiness_timeout: Duration::from_secs(60),
            max_restarts: 5,
            ..DomainPolicy::default()
        };
        hv.set_policy(id, &policy).expect("set policy");
        assert_eq!(hv.policy(id), Ok(Some(policy.clone())));
        let xml = hv.xml(id).expect("xml");
        assert!(xml.contains(POLICY_NS) && xml.contains("priority=\"high\""), "{xml}");

        hv.start(id).expect("start");
        policy.readiness = Readiness::TcpPort(22);
        policy.affinity = vec![];
        hv.set_policy(id, &policy).expect("set policy while running");
        assert_eq!(hv.policy(id), Ok(Some(policy.clone())), "live definition");
        hv.destroy(id).expect("destroy");
        assert_eq!(hv.policy(id), Ok(Some(policy.clone())), "persistent definition");
        let listed = hv.list().expect("list").into_iter().find(|d| d.id == id).expect("listed");
        assert_eq!(listed.policy, Ok(Some(policy)));
    }

    #[test]
    fn malformed_policy_is_refused_with_the_attribute_named() {
        let hv = hv();
        let id = define(&hv, "havirt-unit-badpolicy", DomainId(0xa3));
        // Written by hand, as an operator would with `virsh metadata`.
        let dom = hv.lookup(id).expect("lookup");
        dom.set_metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some("<policy priority=\"urgent\"/>"),
            Some(POLICY_KEY),
            Some(POLICY_NS),
            sys::VIR_DOMAIN_AFFECT_CONFIG,
        )
        .expect("raw set_metadata");
        let err = hv.policy(id).expect_err("malformed policy");
        let HypervisorError::Policy { source: PolicyError::BadValue { attribute, value, .. }, .. } = &err else {
            panic!("unexpected error {err:?}");
        };
        assert_eq!((*attribute, value.as_str()), ("priority", "urgent"));
        let msg = err.to_string();
        assert!(
            msg.contains("priority=\"urgent\"") && msg.contains("disabled, lowest, low, medium, high, highest"),
            "{msg}"
        );
        // One bad domain does not hide the others from `list`.
        let list = hv.list().expect("list despite a bad policy");
        let listed = list.iter().find(|d| d.id == id).expect("listed");
        assert!(matches!(listed.policy, Err(PolicyError::BadValue { attribute: "priority", .. })));
        assert!(list.iter().any(|d| d.name == "test"));
    }

    #[test]
    fn autostart_on_and_off() {
        let hv = hv();
        let id = define(&hv, "havirt-unit-autostart", DomainId(0xa4));
        let autostart =
            |hv: &LibvirtHypervisor| hv.list().expect("list").iter().find(|d| d.id == id).map(|d| d.autostart);
        hv.set_autostart(id, true).expect("autostart on");
        assert_eq!(autostart(&hv), Some(true));
        hv.set_autostart(id, false).expect("autostart off");
        assert_eq!(autostart(&hv), Some(false));
    }

    #[test]
    fn guest_agent_ping_is_an_error_not_a_hang_without_qemu() {
        let hv = hv();
        let id = define(&hv, "havirt-unit-agent", DomainId(0xa5));
        hv.start(id).expect("start");
        assert!(hv.ping_guest_agent(id).is_err(), "the test driver has no guest agent");
        hv.destroy(id).expect("destroy");
    }

    /// The next event about `id`, skipping other tests' domains.
    fn next_event(events: &EventStream, id: DomainId) -> Option<HypervisorEvent> {
        for _ in 0..100 {
            let ev = events.recv_timeout(std::time::Duration::from_millis(EVENT_WAIT_MS))?;
            match ev {
                HypervisorEvent::Domain { domain, .. }
                | HypervisorEvent::Defined { domain }
                | HypervisorEvent::Undefined { domain }
                    if domain != id => {}
                ev => return Some(ev),
            }
        }
        None
    }

    #[test]
    fn events_for_define_start_shutdown_destroy() {
        let hv = hv();
        let events = hv.events().expect("subscribe");
        let id = define(&hv, "havirt-unit-events", DomainId(0xa6));
        assert_eq!(next_event(&events, id), Some(HypervisorEvent::Defined { domain: id }));
        let domain = |event| Some(HypervisorEvent::Domain { domain: id, event });
        hv.start(id).expect("start");
        assert_eq!(next_event(&events, id), domain(DomainEvent::Started));
        hv.destroy(id).expect("destroy");
        assert_eq!(next_event(&events, id), domain(DomainEvent::Destroyed));
        hv.start(id).expect("start");
        assert_eq!(next_event(&events, id), domain(DomainEvent::Started));
        hv.shutdown(id).expect("shutdown");
        assert_eq!(next_event(&events, id), domain(DomainEvent::ShutDown));
        drop(events);
        // A second stream after the first is gone works (callbacks released).
        let again = hv.events().expect("subscribe again");
        hv.start(id).expect("start");
        assert_eq!(next_event(&again, id), domain(DomainEvent::Started));
        hv.destroy(id).expect("destroy");
    }
}
