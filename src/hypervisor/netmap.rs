//! Network mapping: a domain's bridges and libvirt networks under each
//! host's local names (issue 5).
//!
//! Hosts of one cluster often name the same LAN differently (`br-prod` on
//! one, `vmbr0` on another). Each `[[host]]` may carry a `bridge_map` and a
//! `network_map` from the *cluster name* of a bridge or libvirt network to
//! its *local name* on that host ([`NetMap`]).
//!
//! Which XML the datastore holds: always the cluster names. A host maps a
//! definition to its local names ([`NetMap::to_local`]) before every
//! define from the datastore, and back to the cluster names
//! ([`NetMap::to_cluster`]) before every store of its own libvirt's
//! definition. So a domain that fails over twice (h1 -> h2 -> h3) is
//! defined on h3 from cluster names, never from h2's local ones, and a
//! host's map only ever has to know the cluster names and its own. Mapping
//! back needs one local name per cluster name: config validation refuses a
//! map with two cluster names on one local name.
//!
//! What is mapped: `<source bridge='X'/>` of `<interface type='bridge'>` and
//! `<source network='X'/>` of `<interface type='network'>`, each directly
//! under `<domain><devices>`. Nothing else, not even other interface types
//! (`direct` names a host NIC, not a LAN). The rewrite replaces only the
//! bytes of those attribute values: quotes, attribute order, comments,
//! whitespace and everything else stay byte-identical, so an unmapped
//! domain's definition is stored exactly as libvirt wrote it.

#![deny(unsafe_code)]

use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

/// Elements nest at most this deep in a domain definition we rewrite
/// (libvirt's go to about 6; a deeper one is not a domain definition).
pub const XML_DEPTH_MAX: usize = 64;
/// Interfaces of one domain, at most (a bound on the work per rewrite).
pub const INTERFACES_MAX: usize = 1024;

/// Which namespace of names a mapped name lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NetKind {
    /// A Linux bridge on the host (`<interface type='bridge'>`).
    Bridge,
    /// A libvirt network (`<interface type='network'>`).
    Network,
}

impl NetKind {
    /// As havirt's messages say it ("bridge br0", "network default").
    pub fn word(self) -> &'static str {
        match self {
            NetKind::Bridge => "bridge",
            NetKind::Network => "network",
        }
    }

    /// The config key of this kind's map.
    pub fn map_key(self) -> &'static str {
        match self {
            NetKind::Bridge => "bridge_map",
            NetKind::Network => "network_map",
        }
    }

    fn source_attribute(self) -> &'static str {
        match self {
            NetKind::Bridge => "bridge",
            NetKind::Network => "network",
        }
    }
}

/// One network a domain plugs into: a bridge or a libvirt network, by name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NetUse {
    pub kind: NetKind,
    pub name: String,
}

impl fmt::Display for NetUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.word(), self.name)
    }
}

/// Why a definition could not be scanned or rewritten.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NetMapError {
    #[error("domain XML is malformed at byte {at}: {reason}")]
    Malformed { at: u64, reason: String },
    #[error("domain XML nests elements deeper than {XML_DEPTH_MAX} levels: not a libvirt domain definition")]
    TooDeep,
    #[error("domain XML has more than {INTERFACES_MAX} network interfaces")]
    TooManyInterfaces,
    #[error(
        "a map names two cluster {kind}s as local {kind} {local:?}; each local name may stand for one cluster name"
    )]
    NotInjective { kind: &'static str, local: String },
}

/// One host's map from cluster names to local names, per kind. Empty maps
/// every name to itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetMap {
    bridges: BTreeMap<String, String>,
    networks: BTreeMap<String, String>,
}

impl NetMap {
    /// Maps of cluster name -> local name. Refused when two cluster names
    /// share a local name: the definition could not be mapped back.
    pub fn new(bridges: BTreeMap<String, String>, networks: BTreeMap<String, String>) -> Result<NetMap, NetMapError> {
        for (kind, map) in [(NetKind::Bridge, &bridges), (NetKind::Network, &networks)] {
            let mut seen = std::collections::BTreeSet::new();
            if let Some(local) = map.values().find(|v| !seen.insert(v.as_str())) {
                return Err(NetMapError::NotInjective { kind: kind.word(), local: local.clone() });
            }
        }
        Ok(NetMap { bridges, networks })
    }

    pub fn is_empty(&self) -> bool {
        self.bridges.is_empty() && self.networks.is_empty()
    }

    fn map(&self, kind: NetKind) -> &BTreeMap<String, String> {
        match kind {
            NetKind::Bridge => &self.bridges,
            NetKind::Network => &self.networks,
        }
    }

    /// The local name of cluster name `name` on this host.
    pub fn local<'a>(&'a self, kind: NetKind, name: &'a str) -> &'a str {
        self.mapped_local(kind, name).unwrap_or(name)
    }

    /// The cluster name of local name `name` on this host.
    pub fn cluster<'a>(&'a self, kind: NetKind, name: &'a str) -> &'a str {
        self.mapped_cluster(kind, name).unwrap_or(name)
    }

    fn mapped_local(&self, kind: NetKind, name: &str) -> Option<&str> {
        self.map(kind).get(name).map(String::as_str)
    }

    fn mapped_cluster(&self, kind: NetKind, name: &str) -> Option<&str> {
        self.map(kind).iter().find(|(_, l)| *l == name).map(|(c, _)| c.as_str())
    }

    /// The definition with cluster names replaced by this host's local
    /// names: what this host defines. Unchanged (borrowed) when nothing maps.
    pub fn to_local<'x>(&self, xml: &'x str) -> Result<Cow<'x, str>, NetMapError> {
        rewrite(xml, |kind, name| self.mapped_local(kind, name))
    }

    /// The definition with this host's local names replaced by the cluster
    /// names: what this host stores on the datastore.
    pub fn to_cluster<'x>(&self, xml: &'x str) -> Result<Cow<'x, str>, NetMapError> {
        rewrite(xml, |kind, name| self.mapped_cluster(kind, name))
    }
}

/// The bridges and libvirt networks a definition plugs into, sorted,
/// without duplicates.
pub fn interfaces(xml: &str) -> Result<Vec<NetUse>, NetMapError> {
    let mut out: Vec<NetUse> = scan(xml)?.into_iter().map(|s| NetUse { kind: s.kind, name: s.name }).collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// `xml` with every mapped attribute value replaced by `to(kind, name)`
/// (None: not mapped), escaped for either quote. Every other byte is kept.
fn rewrite<'x, 'm>(xml: &'x str, to: impl Fn(NetKind, &str) -> Option<&'m str>) -> Result<Cow<'x, str>, NetMapError> {
    let mut out = String::new();
    let (mut copied, mut changed) = (0, false);
    for site in scan(xml)? {
        let Some(new) = to(site.kind, &site.name).filter(|new| *new != site.name) else { continue };
        out.push_str(&xml[copied..site.value.start]);
        out.push_str(&quick_xml::escape::escape(new));
        (copied, changed) = (site.value.end, true);
    }
    if !changed {
        return Ok(Cow::Borrowed(xml));
    }
    out.push_str(&xml[copied..]);
    Ok(Cow::Owned(out))
}

/// One mapped attribute value found in a definition.
#[derive(Debug)]
struct Site {
    kind: NetKind,
    /// Decoded (entities replaced).
    name: String,
    /// The raw value's bytes in the document, without its quotes.
    value: Range<usize>,
}

/// Where each element sits, as far as the mapping cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    Domain,
    Devices,
    /// An `<interface>` under devices, with its mapped kind (None: a type
    /// that is not mapped).
    Interface(Option<NetKind>),
    Other,
}

/// Every mapped attribute value of `xml`, in document order. quick-xml
/// checks well-formedness (matching end tags, quoted attributes, no
/// duplicate attribute); positions come from its borrowed slices.
fn scan(xml: &str) -> Result<Vec<Site>, NetMapError> {
    let mut reader = Reader::from_str(xml);
    let mut stack: Vec<Level> = Vec::new();
    let mut sites = Vec::new();
    let mut interfaces = 0usize;
    loop {
        let at = reader.buffer_position();
        let event = reader.read_event().map_err(|e| NetMapError::Malformed { at, reason: e.to_string() })?;
        let (start, empty) = match &event {
            Event::Start(e) => (e, false),
            Event::Empty(e) => (e, true),
            Event::End(_) => {
                stack.pop();
                continue;
            }
            Event::Eof => break,
            _ => continue,
        };
        let level = classify(xml, &stack, start, at)?;
        if let Level::Interface(_) = level {
            interfaces += 1;
            if interfaces > INTERFACES_MAX {
                return Err(NetMapError::TooManyInterfaces);
            }
        }
        if let (Some(Level::Interface(Some(kind))), "source") = (stack.last(), start.name().as_ref()) {
            sites.extend(source_value(xml, start, *kind, at)?);
        }
        if !empty {
            if stack.len() == XML_DEPTH_MAX {
                return Err(NetMapError::TooDeep);
            }
            stack.push(level);
        }
    }
    if !stack.is_empty() {
        let at = reader.buffer_position();
        return Err(NetMapError::Malformed { at, reason: "the document ends inside an element".into() });
    }
    Ok(sites)
}

/// What the element `e`, opened under `stack`, is.
fn classify(xml: &str, stack: &[Level], e: &BytesStart<'_>, at: u64) -> Result<Level, NetMapError> {
    Ok(match (stack, e.name().as_ref()) {
        ([], "domain") => Level::Domain,
        ([Level::Domain], "devices") => Level::Devices,
        ([Level::Domain, Level::Devices], "interface") => {
            let kind = match attribute(xml, e, "type", at)?.map(|(v, _)| v) {
                Some(t) if t == "bridge" => Some(NetKind::Bridge),
                Some(t) if t == "network" => Some(NetKind::Network),
                _ => None,
            };
            Level::Interface(kind)
        }
        _ => Level::Other,
    })
}

/// The mapped attribute of an interface's `<source>`, if it has one.
fn source_value(xml: &str, e: &BytesStart<'_>, kind: NetKind, at: u64) -> Result<Option<Site>, NetMapError> {
    Ok(attribute(xml, e, kind.source_attribute(), at)?.map(|(name, value)| Site { kind, name, value }))
}

/// Attribute `name` of `e`: its decoded value and the position of its raw
/// value in `xml`.
fn attribute(
    xml: &str,
    e: &BytesStart<'_>,
    name: &str,
    at: u64,
) -> Result<Option<(String, Range<usize>)>, NetMapError> {
    let bad = |reason: String| NetMapError::Malformed { at, reason };
    let mut found = None;
    // Every attribute is read, so that a duplicate or a broken one after
    // the one we want still refuses the document.
    for a in e.attributes() {
        let a = a.map_err(|err| bad(err.to_string()))?;
        if a.key.as_ref() != name {
            continue;
        }
        let Cow::Borrowed(raw) = a.value else {
            return Err(bad(format!("attribute {name} is not a slice of the document")));
        };
        let start = raw.as_ptr().addr().wrapping_sub(xml.as_ptr().addr());
        let range = start..start + raw.len();
        // The slice is the document's own: its position is exact.
        assert_eq!(xml.get(range.clone()), Some(raw), "quick-xml returned a value outside the document");
        let decoded = a
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map_err(|err| bad(format!("attribute {name}: {err}")))?;
        found = Some((decoded.into_owned(), range));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A definition as libvirt writes it, with what must not be touched: a
    /// comment naming the bridge, metadata with a look-alike interface,
    /// a direct (macvtap) interface, both quote styles and an unusual
    /// attribute order.
    const DOMAIN: &str = r#"<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web1</name>
  <metadata>
    <x:y xmlns:x="urn:x"><interface type='bridge'><source bridge='br-prod'/></interface></x:y>
  </metadata>
  <devices>
    <!-- <interface type='bridge'><source bridge='br-prod'/></interface> -->
    <interface type='bridge'>
      <mac address='52:54:00:00:00:01'/>
      <source bridge='br-prod'/>
      <model type='virtio'/>
    </interface>
    <interface type="network">
      <source   portgroup="web" network="default" />
    </interface>
    <interface type='direct'><source dev='br-prod' mode='bridge'/></interface>
    <interface type='bridge'><source bridge='br-other'/></interface>
  </devices>
</domain>
"#;

    fn map(bridges: &[(&str, &str)], networks: &[(&str, &str)]) -> NetMap {
        let m = |pairs: &[(&str, &str)]| pairs.iter().map(|(c, l)| (c.to_string(), l.to_string())).collect();
        NetMap::new(m(bridges), m(networks)).expect("injective test map")
    }

    fn lab_h2() -> NetMap {
        map(&[("br-prod", "vmbr0")], &[("default", "lan")])
    }

    #[test]
    fn bridges_and_networks_are_mapped_and_nothing_else_changes() {
        let local = lab_h2().to_local(DOMAIN).expect("well-formed");
        let expected = DOMAIN
            .replacen("<source bridge='br-prod'/>\n      <model", "<source bridge='vmbr0'/>\n      <model", 1)
            .replace("network=\"default\"", "network=\"lan\"");
        assert_eq!(local, expected);
        // The comment, the metadata and the macvtap device keep br-prod.
        assert_eq!(local.matches("br-prod").count(), 3, "{local}");
        assert!(local.contains("<source bridge='br-other'/>"), "unmapped names stay: {local}");
    }

    #[test]
    fn mapping_back_restores_the_bytes() {
        let m = lab_h2();
        let local = m.to_local(DOMAIN).expect("well-formed").into_owned();
        assert_eq!(m.to_cluster(&local).expect("well-formed"), DOMAIN);
    }

    #[test]
    fn an_unmapped_definition_is_borrowed_unchanged() {
        let m = map(&[("br-none", "vmbr9")], &[]);
        assert!(matches!(m.to_local(DOMAIN), Ok(Cow::Borrowed(_))));
        assert!(matches!(NetMap::default().to_cluster(DOMAIN), Ok(Cow::Borrowed(_))));
    }

    /// The stored definition stays in cluster names however often the domain
    /// moves: h1 (no map) -> h2 -> h3, each storing what its libvirt holds.
    #[test]
    fn two_failovers_map_from_the_cluster_names() {
        let h1 = NetMap::default();
        let h2 = map(&[("br-prod", "vmbr0")], &[]);
        let h3 = map(&[("br-prod", "lan-h3")], &[]);
        let stored_by_h1 = h1.to_cluster(DOMAIN).expect("ok").into_owned();
        let on_h2 = h2.to_local(&stored_by_h1).expect("ok").into_owned();
        assert!(on_h2.contains("bridge='vmbr0'"), "{on_h2}");
        let stored_by_h2 = h2.to_cluster(&on_h2).expect("ok").into_owned();
        assert_eq!(stored_by_h2, DOMAIN, "h2 stores the cluster names");
        let on_h3 = h3.to_local(&stored_by_h2).expect("ok");
        assert!(on_h3.contains("<source bridge='lan-h3'/>") && !on_h3.contains("vmbr0"), "{on_h3}");
    }

    #[test]
    fn names_are_decoded_and_new_ones_escaped() {
        let xml =
            "<domain><devices><interface type='network'><source network='a&amp;b'/></interface></devices></domain>";
        let m = map(&[], &[("a&b", "it's")]);
        let local = m.to_local(xml).expect("ok");
        assert_eq!(local, xml.replace("a&amp;b", "it&apos;s"));
        assert_eq!(interfaces(&local), Ok(vec![NetUse { kind: NetKind::Network, name: "it's".into() }]));
    }

    #[test]
    fn interfaces_lists_each_mapped_use_once() {
        let uses = interfaces(DOMAIN).expect("ok");
        let names: Vec<String> = uses.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["bridge br-other", "bridge br-prod", "network default"]);
    }

    #[test]
    fn malformed_definitions_are_refused() {
        for xml in [
            "<domain><devices></domain>",
            "<domain><devices><interface type='bridge'><source bridge='x/></interface></devices></domain>",
            "<domain><devices><interface type='bridge' type='network'/></devices></domain>",
            "<domain><devices>",
        ] {
            assert!(matches!(interfaces(xml), Err(NetMapError::Malformed { .. })), "{xml}");
        }
        let deep = format!("{}{}", "<a>".repeat(XML_DEPTH_MAX + 1), "</a>".repeat(XML_DEPTH_MAX + 1));
        assert_eq!(interfaces(&deep), Err(NetMapError::TooDeep));
    }

    #[test]
    fn two_cluster_names_on_one_local_name_are_refused() {
        let m = |pairs: &[(&str, &str)]| pairs.iter().map(|(c, l)| (c.to_string(), l.to_string())).collect();
        let err = NetMap::new(m(&[("a", "x"), ("b", "x")]), BTreeMap::new()).expect_err("not injective");
        assert_eq!(err, NetMapError::NotInjective { kind: "bridge", local: "x".into() });
        assert!(NetMap::new(m(&[("a", "b"), ("b", "a")]), BTreeMap::new()).is_ok(), "a swap is fine");
    }
}
