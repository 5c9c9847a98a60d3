//! havirt's per-domain policy, stored in the domain's own libvirt XML as one
//! `<metadata>` element (DESIGN.md §6), and its strict parser.
//!
//! The element lives in namespace [`POLICY_NS`] under the prefix
//! [`POLICY_KEY`]. In the domain XML it reads:
//!
//! ```xml
//! <metadata>
//!   <havirt:policy xmlns:havirt="https://havirt.dev/xmlns/policy/1"
//!       priority="high" isolation-response="shutdown" anti-affinity="db"
//!       readiness="guest-agent" readiness-timeout-s="120" max-restarts="3"
//!       on-shutdown="stop" guest-monitor="on" monitor-failure-interval-s="30"
//!       monitor-min-uptime-s="120" monitor-max-resets="3" monitor-reset-window-s="3600">
//!     <havirt:affinity host="h1"/>
//!     <havirt:affinity host="h2"/>
//!   </havirt:policy>
//! </metadata>
//! ```
//!
//! | attribute | values | default |
//! |---|---|---|
//! | `priority` | `disabled`, `lowest`, `low`, `medium`, `high`, `highest` | `medium` |
//! | `isolation-response` | `keep`, `shutdown`, `poweroff` | `keep` |
//! | `anti-affinity` | a group name (1 to 64 characters) | none |
//! | `readiness` | `started`, `guest-agent`, `tcp:PORT` (PORT 1-65535) | `started` |
//! | `readiness-timeout-s` | seconds, 1 to 86400 | `120` |
//! | `max-restarts` | 0 to 1000 | `3` |
//! | `on-shutdown` | `stop` (a shutdown from inside the guest, `virsh shutdown` or `virsh destroy` leaves it stopped everywhere), `restart` | `stop` |
//! | `guest-monitor` | `on`, `off`: reset the guest when its QEMU guest agent stops answering | `off` |
//! | `monitor-failure-interval-s` | seconds, 1 to 86400: agent silence that means a hung guest | `30` |
//! | `monitor-min-uptime-s` | seconds, 0 to 86400: after a start or reset, wait this long for the agent's first answer | `120` |
//! | `monitor-max-resets` | 0 to 1000 resets per window, then leave it running | `3` |
//! | `monitor-reset-window-s` | seconds, 1 to 604800 | `3600` |
//!
//! Each `<havirt:affinity host="hN"/>` child (`N` is the host id; a bare `N`
//! is accepted too) adds a host the domain may run on; none means any host.
//! A missing attribute takes its default. Anything else (an unknown
//! attribute, child or value, a duplicate, text) is an error that names the
//! attribute and the accepted values: a typo must not silently turn a domain's
//! protection off. Set it with `havirt protect`, or by hand:
//! `virsh metadata DOMAIN https://havirt.dev/xmlns/policy/1 --key havirt --set '<policy priority="high"/>'`.

#![deny(unsafe_code)]

use crate::engine::config::{DomainPolicy, HostId, IsolationResponse, OnShutdown, Priority, Readiness};
use crate::engine::time::Duration;
use std::fmt::Write as _;

/// The namespace of havirt's metadata element.
pub const POLICY_NS: &str = "https://havirt.dev/xmlns/policy/1";
/// The namespace prefix libvirt writes for it.
pub const POLICY_KEY: &str = "havirt";
/// A policy element larger than this is refused before parsing.
pub const POLICY_XML_MAX_BYTES: usize = 64 * 1024;
/// At most this many `<affinity>` hosts per domain.
pub const AFFINITY_HOSTS_MAX: usize = 256;
/// Anti-affinity group names are at most this long.
pub const ANTI_AFFINITY_NAME_MAX_CHARS: usize = 64;
/// `readiness-timeout-s` range.
pub const READINESS_TIMEOUT_S_MAX: u64 = 86_400;
/// `max-restarts` range.
pub const MAX_RESTARTS_MAX: u32 = 1000;
/// `monitor-failure-interval-s` and `monitor-min-uptime-s` at most.
pub const MONITOR_SECONDS_MAX: u64 = 86_400;
/// `monitor-reset-window-s` at most (a week).
pub const MONITOR_WINDOW_S_MAX: u64 = 604_800;
/// `monitor-max-resets` at most.
pub const MONITOR_MAX_RESETS_MAX: u32 = 1000;

pub const PRIORITIES: &str = "disabled, lowest, low, medium, high, highest";
pub const ISOLATION_RESPONSES: &str = "keep, shutdown, poweroff";
pub const READINESS_VALUES: &str = "started, guest-agent, tcp:PORT (PORT 1-65535)";
pub const ON_SHUTDOWN_VALUES: &str = "stop, restart";
pub const SWITCH_VALUES: &str = "on, off";

/// Why a policy element was refused. Every message names what to fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("havirt policy: {attribute}=\"{value}\" is not valid; accepted values: {accepted}")]
    BadValue { attribute: &'static str, value: String, accepted: &'static str },
    #[error(
        "havirt policy: unknown attribute {name:?} on <{element}>; accepted: priority, isolation-response, anti-affinity, readiness, readiness-timeout-s, max-restarts, on-shutdown, guest-monitor, monitor-failure-interval-s, monitor-min-uptime-s, monitor-max-resets, monitor-reset-window-s (and host on <affinity>)"
    )]
    UnknownAttribute { element: &'static str, name: String },
    #[error("havirt policy: attribute {name:?} given twice")]
    DuplicateAttribute { name: String },
    #[error("havirt policy: unknown element <{name}> inside <policy>; only <affinity host=\"hN\"/> is accepted")]
    UnknownElement { name: String },
    #[error("havirt policy: the root element is <{name}> in namespace {namespace:?}; expected <policy> in {POLICY_NS}")]
    WrongRoot { name: String, namespace: String },
    #[error("havirt policy: <affinity> lacks its host attribute (e.g. host=\"h1\")")]
    MissingHost,
    #[error("havirt policy: affinity host {host} listed twice")]
    DuplicateHost { host: HostId },
    #[error("havirt policy: more than {AFFINITY_HOSTS_MAX} affinity hosts")]
    TooManyHosts,
    #[error("havirt policy: {len} bytes is more than the {POLICY_XML_MAX_BYTES}-byte limit")]
    TooLarge { len: usize },
    #[error("havirt policy: malformed XML at byte {at}: {what}")]
    Malformed { at: usize, what: &'static str },
}

/// Renders `policy` as the element handed to `virDomainSetMetadata` (libvirt
/// adds the namespace and prefix from [`POLICY_NS`] and [`POLICY_KEY`]).
/// Every attribute is written, defaults included, so a dump shows the whole
/// policy.
pub fn render_policy(policy: &DomainPolicy) -> String {
    let mut s = String::from("<policy");
    let _ = write!(s, " priority=\"{}\"", priority_str(policy.priority));
    let _ = write!(s, " isolation-response=\"{}\"", isolation_str(policy.isolation_response));
    if let Some(group) = &policy.anti_affinity {
        let _ = write!(s, " anti-affinity=\"{}\"", quick_xml::escape::escape(group));
    }
    let _ = write!(s, " readiness=\"{}\"", readiness_str(policy.readiness));
    let _ = write!(s, " readiness-timeout-s=\"{}\"", policy.readiness_timeout.as_millis() / 1000);
    let _ = write!(s, " max-restarts=\"{}\"", policy.max_restarts);
    let _ = write!(s, " on-shutdown=\"{}\"", on_shutdown_str(policy.on_shutdown));
    let m = &policy.monitor;
    let _ = write!(s, " guest-monitor=\"{}\"", if m.enabled { "on" } else { "off" });
    let _ = write!(s, " monitor-failure-interval-s=\"{}\"", m.failure_interval.as_millis() / 1000);
    let _ = write!(s, " monitor-min-uptime-s=\"{}\"", m.min_uptime.as_millis() / 1000);
    let _ = write!(s, " monitor-max-resets=\"{}\"", m.max_resets);
    let _ = write!(s, " monitor-reset-window-s=\"{}\"", m.reset_window.as_millis() / 1000);
    if policy.affinity.is_empty() {
        s.push_str("/>");
        return s;
    }
    s.push('>');
    for host in &policy.affinity {
        let _ = write!(s, "<affinity host=\"{host}\"/>");
    }
    s.push_str("</policy>");
    s
}

/// Parses the element `virDomainGetMetadata` returns for [`POLICY_NS`].
pub fn parse_policy(xml: &str) -> Result<DomainPolicy, PolicyError> {
    if xml.len() > POLICY_XML_MAX_BYTES {
        return Err(PolicyError::TooLarge { len: xml.len() });
    }
    let root = parse_document(xml)?;
    let (prefix, local) = split_name(&root.name);
    // libvirt returns the element stripped of its namespace (it selected it
    // by POLICY_NS already); the form in a domain dump declares it. Either is
    // ours; another namespace or an undeclared prefix is not.
    let namespace = root.namespace_of(prefix);
    let ours = match &namespace {
        Some(ns) => ns == POLICY_NS,
        None => prefix.is_none(),
    };
    if local != "policy" || !ours {
        return Err(PolicyError::WrongRoot { name: root.name.clone(), namespace: namespace.unwrap_or_default() });
    }
    let mut policy = DomainPolicy::default();
    for (name, value) in root.plain_attributes() {
        apply_attribute(&mut policy, name, value)?;
    }
    for child in &root.children {
        let (child_prefix, child_local) = split_name(&child.name);
        // libvirt may keep the prefix on children or drop it; both are ours.
        if child_local != "affinity" || (child_prefix.is_some() && child_prefix != prefix) {
            return Err(PolicyError::UnknownElement { name: child.name.clone() });
        }
        if !child.children.is_empty() {
            return Err(PolicyError::UnknownElement { name: child.children[0].name.clone() });
        }
        let host = affinity_host(child)?;
        if policy.affinity.contains(&host) {
            return Err(PolicyError::DuplicateHost { host });
        }
        if policy.affinity.len() == AFFINITY_HOSTS_MAX {
            return Err(PolicyError::TooManyHosts);
        }
        policy.affinity.push(host);
    }
    Ok(policy)
}

fn affinity_host(el: &Element) -> Result<HostId, PolicyError> {
    let mut host = None;
    for (name, value) in el.plain_attributes() {
        if name != "host" {
            return Err(PolicyError::UnknownAttribute { element: "affinity", name: name.to_string() });
        }
        let digits = value.strip_prefix('h').unwrap_or(value);
        let id = parse_decimal::<u16>(digits).ok_or_else(|| PolicyError::BadValue {
            attribute: "host",
            value: value.to_string(),
            accepted: "a host id: hN or N, N from 0 to 65535",
        })?;
        host = Some(HostId(id));
    }
    host.ok_or(PolicyError::MissingHost)
}

fn apply_attribute(p: &mut DomainPolicy, name: &str, value: &str) -> Result<(), PolicyError> {
    let bad = |attribute: &'static str, accepted: &'static str| PolicyError::BadValue {
        attribute,
        value: value.to_string(),
        accepted,
    };
    match name {
        "priority" => p.priority = parse_priority(value).ok_or_else(|| bad("priority", PRIORITIES))?,
        "isolation-response" => {
            p.isolation_response =
                parse_isolation(value).ok_or_else(|| bad("isolation-response", ISOLATION_RESPONSES))?
        }
        "anti-affinity" => {
            let ok = !value.is_empty()
                && value.chars().count() <= ANTI_AFFINITY_NAME_MAX_CHARS
                && value.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok {
                return Err(bad("anti-affinity", "a group name of 1 to 64 characters from A-Z a-z 0-9 - _ ."));
            }
            p.anti_affinity = Some(value.to_string());
        }
        "readiness" => p.readiness = parse_readiness(value).ok_or_else(|| bad("readiness", READINESS_VALUES))?,
        "readiness-timeout-s" => {
            let s = parse_decimal::<u64>(value)
                .filter(|s| (1..=READINESS_TIMEOUT_S_MAX).contains(s))
                .ok_or_else(|| bad("readiness-timeout-s", "whole seconds from 1 to 86400"))?;
            p.readiness_timeout = Duration::from_secs(s);
        }
        "max-restarts" => {
            p.max_restarts = parse_decimal::<u32>(value)
                .filter(|n| *n <= MAX_RESTARTS_MAX)
                .ok_or_else(|| bad("max-restarts", "a whole number from 0 to 1000"))?;
        }
        other => return apply_monitor_attribute(p, other, value),
    }
    Ok(())
}

/// The intentional-stop and guest-monitoring attributes (issue 5).
fn apply_monitor_attribute(p: &mut DomainPolicy, name: &str, value: &str) -> Result<(), PolicyError> {
    let bad = |attribute: &'static str, accepted: &'static str| PolicyError::BadValue {
        attribute,
        value: value.to_string(),
        accepted,
    };
    let seconds = |attribute: &'static str, min: u64, max: u64, accepted: &'static str| {
        parse_decimal::<u64>(value)
            .filter(|s| (min..=max).contains(s))
            .map(Duration::from_secs)
            .ok_or_else(|| bad(attribute, accepted))
    };
    let m = &mut p.monitor;
    match name {
        "on-shutdown" => {
            p.on_shutdown = parse_on_shutdown(value).ok_or_else(|| bad("on-shutdown", ON_SHUTDOWN_VALUES))?
        }
        "guest-monitor" => m.enabled = parse_switch(value).ok_or_else(|| bad("guest-monitor", SWITCH_VALUES))?,
        "monitor-failure-interval-s" => {
            m.failure_interval =
                seconds("monitor-failure-interval-s", 1, MONITOR_SECONDS_MAX, "whole seconds from 1 to 86400")?
        }
        "monitor-min-uptime-s" => {
            m.min_uptime = seconds("monitor-min-uptime-s", 0, MONITOR_SECONDS_MAX, "whole seconds from 0 to 86400")?
        }
        "monitor-max-resets" => {
            m.max_resets = parse_decimal::<u32>(value)
                .filter(|n| *n <= MONITOR_MAX_RESETS_MAX)
                .ok_or_else(|| bad("monitor-max-resets", "a whole number from 0 to 1000"))?
        }
        "monitor-reset-window-s" => {
            m.reset_window =
                seconds("monitor-reset-window-s", 1, MONITOR_WINDOW_S_MAX, "whole seconds from 1 to 604800")?
        }
        other => return Err(PolicyError::UnknownAttribute { element: "policy", name: other.to_string() }),
    }
    Ok(())
}

pub fn parse_on_shutdown(s: &str) -> Option<OnShutdown> {
    match s {
        "stop" => Some(OnShutdown::Stop),
        "restart" => Some(OnShutdown::Restart),
        _ => None,
    }
}

pub fn on_shutdown_str(o: OnShutdown) -> &'static str {
    match o {
        OnShutdown::Stop => "stop",
        OnShutdown::Restart => "restart",
    }
}

/// `on` / `off`.
pub fn parse_switch(s: &str) -> Option<bool> {
    match s {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

/// Plain ASCII digits only: no sign, no spaces, no leading `+`.
fn parse_decimal<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

pub fn parse_priority(s: &str) -> Option<Priority> {
    Some(match s {
        "disabled" => Priority::Disabled,
        "lowest" => Priority::Lowest,
        "low" => Priority::Low,
        "medium" => Priority::Medium,
        "high" => Priority::High,
        "highest" => Priority::Highest,
        _ => return None,
    })
}

pub fn priority_str(p: Priority) -> &'static str {
    match p {
        Priority::Disabled => "disabled",
        Priority::Lowest => "lowest",
        Priority::Low => "low",
        Priority::Medium => "medium",
        Priority::High => "high",
        Priority::Highest => "highest",
    }
}

pub fn parse_isolation(s: &str) -> Option<IsolationResponse> {
    Some(match s {
        "keep" => IsolationResponse::Keep,
        "shutdown" => IsolationResponse::Shutdown,
        "poweroff" => IsolationResponse::Poweroff,
        _ => return None,
    })
}

pub fn isolation_str(r: IsolationResponse) -> &'static str {
    match r {
        IsolationResponse::Keep => "keep",
        IsolationResponse::Shutdown => "shutdown",
        IsolationResponse::Poweroff => "poweroff",
    }
}

pub fn parse_readiness(s: &str) -> Option<Readiness> {
    match s {
        "started" => Some(Readiness::Started),
        "guest-agent" => Some(Readiness::GuestAgent),
        _ => {
            let port = parse_decimal::<u16>(s.strip_prefix("tcp:")?)?;
            (port != 0).then_some(Readiness::TcpPort(port))
        }
    }
}

pub fn readiness_str(r: Readiness) -> String {
    match r {
        Readiness::Started => "started".into(),
        Readiness::GuestAgent => "guest-agent".into(),
        Readiness::TcpPort(port) => format!("tcp:{port}"),
    }
}

// ---------------------------------------------------------------------------
// A minimal, strict XML reader for the policy element: elements, attributes,
// comments, whitespace and the five predefined entities plus character
// references. No DTD, no CDATA, no text content (the format has none).

/// Elements nest at most this deep (the format needs two levels).
const XML_DEPTH_MAX: usize = 4;

#[derive(Debug)]
struct Element {
    name: String,
    attributes: Vec<(String, String)>,
    children: Vec<Element>,
    /// Namespace declarations in scope here, innermost last: (prefix, uri).
    scope: Vec<(Option<String>, String)>,
}

impl Element {
    fn namespace_of(&self, prefix: Option<&str>) -> Option<String> {
        self.scope.iter().rev().find(|(p, _)| p.as_deref() == prefix).map(|(_, uri)| uri.clone())
    }

    /// Attributes other than namespace declarations.
    fn plain_attributes(&self) -> impl Iterator<Item = (&str, &str)> {
        self.attributes
            .iter()
            .filter(|(n, _)| n != "xmlns" && !n.starts_with("xmlns:"))
            .map(|(n, v)| (n.as_str(), v.as_str()))
    }
}

fn split_name(name: &str) -> (Option<&str>, &str) {
    match name.split_once(':') {
        Some((prefix, local)) => (Some(prefix), local),
        None => (None, name),
    }
}

struct Reader<'a> {
    s: &'a str,
    at: usize,
}

fn parse_document(xml: &str) -> Result<Element, PolicyError> {
    let mut r = Reader { s: xml, at: 0 };
    r.skip_misc()?;
    if r.rest().starts_with("<?xml") {
        let end = r.rest().find("?>").ok_or(r.err("unterminated XML declaration"))?;
        r.at += end + 2;
        r.skip_misc()?;
    }
    let root = r.element(&[], 0)?;
    r.skip_misc()?;
    if r.at != xml.len() {
        return Err(r.err("content after the root element"));
    }
    Ok(root)
}

impl Reader<'_> {
    fn rest(&self) -> &str {
        &self.s[self.at..]
    }

    fn err(&self, what: &'static str) -> PolicyError {
        PolicyError::Malformed { at: self.at, what }
    }

    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start_matches([' ', '\t', '\r', '\n']);
        self.at = self.s.len() - trimmed.len();
    }

    /// Whitespace and comments.
    fn skip_misc(&mut self) -> Result<(), PolicyError> {
        loop {
            self.skip_ws();
            if !self.rest().starts_with("<!--") {
                return Ok(());
            }
            let end = self.rest().find("-->").ok_or(self.err("unterminated comment"))?;
            self.at += end + 3;
        }
    }

    fn expect(&mut self, token: &str, what: &'static str) -> Result<(), PolicyError> {
        if !self.rest().starts_with(token) {
            return Err(self.err(what));
        }
        self.at += token.len();
        Ok(())
    }

    fn name(&mut self) -> Result<String, PolicyError> {
        let len = self.rest().find(|c: char| !(c.is_alphanumeric() || "_-.:".contains(c))).unwrap_or(self.rest().len());
        if len == 0 {
            return Err(self.err("expected a name"));
        }
        let name = self.rest()[..len].to_string();
        self.at += len;
        Ok(name)
    }

    fn element(&mut self, outer: &[(Option<String>, String)], depth: usize) -> Result<Element, PolicyError> {
        if depth == XML_DEPTH_MAX {
            return Err(self.err("elements nested too deep"));
        }
        self.expect("<", "expected an element")?;
        let name = self.name()?;
        let mut el = Element { name, attributes: Vec::new(), children: Vec::new(), scope: outer.to_vec() };
        loop {
            self.skip_ws();
            if self.rest().starts_with("/>") {
                self.at += 2;
                return Ok(el);
            }
            if self.rest().starts_with('>') {
                self.at += 1;
                break;
            }
            let (attr, value) = self.attribute()?;
            if el.attributes.iter().any(|(n, _)| *n == attr) {
                return Err(PolicyError::DuplicateAttribute { name: attr });
            }
            if attr == "xmlns" {
                el.scope.push((None, value.clone()));
            } else if let Some(prefix) = attr.strip_prefix("xmlns:") {
                el.scope.push((Some(prefix.to_string()), value.clone()));
            }
            el.attributes.push((attr, value));
        }
        loop {
            self.skip_misc()?;
            if self.rest().starts_with("</") {
                self.at += 2;
                let end = self.name()?;
                if end != el.name {
                    return Err(self.err("end tag does not match its start tag"));
                }
                self.skip_ws();
                self.expect(">", "expected '>' after the end tag name")?;
                return Ok(el);
            }
            if !self.rest().starts_with('<') || self.rest().starts_with("<!") || self.rest().starts_with("<?") {
                return Err(self.err("text, CDATA or declarations are not allowed in a policy"));
            }
            let scope = el.scope.clone();
            el.children.push(self.element(&scope, depth + 1)?);
        }
    }

    fn attribute(&mut self) -> Result<(String, String), PolicyError> {
        let name = self.name()?;
        self.skip_ws();
        self.expect("=", "expected '=' after an attribute name")?;
        self.skip_ws();
        let quote = match self.rest().chars().next() {
            Some(q @ ('"' | '\'')) => q,
            _ => return Err(self.err("expected a quoted attribute value")),
        };
        self.at += 1;
        let len = self.rest().find(quote).ok_or(self.err("unterminated attribute value"))?;
        let raw = &self.rest()[..len];
        if raw.contains('<') {
            return Err(self.err("'<' inside an attribute value"));
        }
        let value = unescape(raw).ok_or(self.err("unknown entity in an attribute value"))?;
        self.at += len + 1;
        Ok((name, value))
    }
}

fn unescape(raw: &str) -> Option<String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let semi = rest[amp..].find(';')? + amp;
        let entity = &rest[amp + 1..semi];
        let c = match entity {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code = if let Some(hex) = entity.strip_prefix("#x") {
                    u32::from_str_radix(hex, 16).ok()?
                } else {
                    parse_decimal::<u32>(entity.strip_prefix('#')?)?
                };
                char::from_u32(code)?
            }
        };
        out.push(c);
        rest = &rest[semi + 1..];
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::GuestMonitor;

    fn full() -> DomainPolicy {
        DomainPolicy {
            priority: Priority::High,
            isolation_response: IsolationResponse::Shutdown,
            affinity: vec![HostId(1), HostId(3)],
            anti_affinity: Some("db".into()),
            readiness: Readiness::TcpPort(5432),
            readiness_timeout: Duration::from_secs(90),
            max_restarts: 5,
            on_shutdown: OnShutdown::Restart,
            monitor: GuestMonitor {
                enabled: true,
                failure_interval: Duration::from_secs(20),
                min_uptime: Duration::ZERO,
                max_resets: 2,
                reset_window: Duration::from_secs(600),
            },
        }
    }

    /// As `virsh dumpxml` shows it: prefixed, namespace declared on the root.
    /// (`virDomainGetMetadata` returns the plain rendered form.)
    fn as_in_domain_xml(rendered: &str) -> String {
        rendered
            .replacen("<policy", &format!("<havirt:policy xmlns:havirt=\"{POLICY_NS}\""), 1)
            .replace("<affinity", "<havirt:affinity")
            .replace("</policy>", "</havirt:policy>")
    }

    #[test]
    fn round_trip_through_both_forms() {
        for p in [DomainPolicy::default(), full()] {
            let plain = render_policy(&p);
            assert_eq!(parse_policy(&plain), Ok(p.clone()), "{plain}");
            let dumped = as_in_domain_xml(&plain);
            assert_eq!(parse_policy(&dumped), Ok(p), "{dumped}");
        }
    }

    #[test]
    fn documented_example_parses() {
        let xml = format!(
            "<havirt:policy xmlns:havirt=\"{POLICY_NS}\"\n    priority=\"high\" isolation-response=\"shutdown\" \
             anti-affinity=\"db\"\n    readiness=\"guest-agent\" readiness-timeout-s=\"120\" max-restarts=\"3\">\n  \
             <!-- pinned to the first two hosts -->\n  <havirt:affinity host=\"h1\"/>\n  <affinity host='2' />\n\
             </havirt:policy>\n"
        );
        let p = parse_policy(&xml).expect("documented example");
        assert_eq!(p.priority, Priority::High);
        assert_eq!(p.isolation_response, IsolationResponse::Shutdown);
        assert_eq!(p.anti_affinity.as_deref(), Some("db"));
        assert_eq!(p.readiness, Readiness::GuestAgent);
        assert_eq!(p.affinity, vec![HostId(1), HostId(2)]);
    }

    #[test]
    fn missing_attributes_take_defaults() {
        let xml = format!("<policy xmlns=\"{POLICY_NS}\" priority=\"low\"/>");
        assert_eq!(parse_policy(&xml), Ok(DomainPolicy { priority: Priority::Low, ..DomainPolicy::default() }));
    }

    #[test]
    fn bad_values_name_the_attribute_and_the_accepted_values() {
        let cases = [
            ("priority=\"urgent\"", "priority", "highest"),
            ("isolation-response=\"reboot\"", "isolation-response", "poweroff"),
            ("readiness=\"tcp:0\"", "readiness", "tcp:PORT"),
            ("readiness=\"ping\"", "readiness", "guest-agent"),
            ("readiness-timeout-s=\"-1\"", "readiness-timeout-s", "1 to 86400"),
            ("max-restarts=\"lots\"", "max-restarts", "0 to 1000"),
            ("anti-affinity=\"a b\"", "anti-affinity", "group name"),
            ("on-shutdown=\"halt\"", "on-shutdown", "restart"),
            ("guest-monitor=\"yes\"", "guest-monitor", "on, off"),
            ("monitor-failure-interval-s=\"0\"", "monitor-failure-interval-s", "1 to 86400"),
            ("monitor-min-uptime-s=\"86401\"", "monitor-min-uptime-s", "0 to 86400"),
            ("monitor-max-resets=\"1001\"", "monitor-max-resets", "0 to 1000"),
            ("monitor-reset-window-s=\"0\"", "monitor-reset-window-s", "1 to 604800"),
        ];
        for (attr, name, accepted) in cases {
            let xml = format!("<havirt:policy xmlns:havirt=\"{POLICY_NS}\" {attr}/>");
            let err = parse_policy(&xml).expect_err(attr);
            assert!(matches!(&err, PolicyError::BadValue { attribute, .. } if *attribute == name), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains(name) && msg.contains(accepted), "{msg}");
        }
    }

    #[test]
    fn unknown_attributes_children_and_namespaces_are_refused() {
        let wrap = |inner: &str| format!("<havirt:policy xmlns:havirt=\"{POLICY_NS}\" {inner}");
        assert!(matches!(
            parse_policy(&wrap("prio=\"high\"/>")),
            Err(PolicyError::UnknownAttribute { element: "policy", .. })
        ));
        assert!(matches!(
            parse_policy(&wrap("><havirt:affinty host=\"h1\"/></havirt:policy>")),
            Err(PolicyError::UnknownElement { .. })
        ));
        assert!(matches!(
            parse_policy(&wrap("><havirt:affinity node=\"h1\"/></havirt:policy>")),
            Err(PolicyError::UnknownAttribute { element: "affinity", .. })
        ));
        assert!(matches!(
            parse_policy(&wrap("><havirt:affinity host=\"h1\"/><affinity host=\"1\"/></havirt:policy>")),
            Err(PolicyError::DuplicateHost { host: HostId(1) })
        ));
        assert!(matches!(
            parse_policy("<policy xmlns=\"https://example.com/\" priority=\"high\"/>"),
            Err(PolicyError::WrongRoot { .. })
        ));
        assert!(matches!(parse_policy("<other:policy priority=\"high\"/>"), Err(PolicyError::WrongRoot { .. })));
        assert!(matches!(parse_policy("<havirt:policies/>"), Err(PolicyError::WrongRoot { .. })));
        assert!(matches!(
            parse_policy(&wrap("priority=\"high\" priority=\"low\"/>")),
            Err(PolicyError::DuplicateAttribute { .. })
        ));
    }

    #[test]
    fn malformed_xml_is_refused_with_a_position() {
        for xml in [
            "",
            "<policy",
            "<policy priority=high/>",
            "<policy>text</policy>",
            "<policy></polic>",
            "<policy/><policy/>",
            "<policy a=\"&bogus;\"/>",
        ] {
            assert!(matches!(parse_policy(xml), Err(PolicyError::Malformed { .. })), "{xml}");
        }
        let big = format!("<policy>{}</policy>", " ".repeat(POLICY_XML_MAX_BYTES));
        assert!(matches!(parse_policy(&big), Err(PolicyError::TooLarge { .. })));
    }

    #[test]
    fn entities_are_decoded() {
        assert_eq!(unescape("a&amp;b&#x41;&#66;&lt;").as_deref(), Some("a&bAB<"));
    }
}
