//! The protected-domain registry: `domains/<uuid>.xml` on the datastore.
//!
//! A domain is protected exactly when its definition is stored there (the
//! lease owner writes it at `havirt protect` and on every redefinition, so
//! a survivor can define it). What the engine needs of each — name, size,
//! policy — is read from that XML: `<name>`, `<memory>` (KiB, as libvirt
//! writes it), `<vcpu>` and havirt's `<havirt:policy>` metadata element.
//!
//! The XML is libvirt's own output on a root-only datastore, so a small
//! scan of its top-level elements is enough; the policy element goes through
//! the strict parser of `hypervisor::metadata`. A definition whose policy is
//! missing or unreadable stays protected with the default policy (a typo
//! must not unprotect a domain), and the problem is reported.

use crate::engine::config::{DomainId, DomainPolicy, DomainSpec};
use crate::hypervisor::metadata::parse_policy;
use crate::hypervisor::{POLICY_KEY, uuid_string};

/// A domain definition as the registry reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub spec: DomainSpec,
    /// What was wrong with the stored XML, if anything (reported, not fatal).
    pub problem: Option<String>,
}

/// The engine's view of one stored definition.
pub fn entry(id: DomainId, xml: &str) -> Entry {
    let body = without_metadata(xml);
    let mut problems = Vec::new();
    let name = match element_text(&body, "name") {
        Some(n) if !n.trim().is_empty() => unescape(n.trim()),
        _ => {
            problems.push("no <name>".to_string());
            uuid_string(id)
        }
    };
    let memory_mib = match element_text(&body, "memory").and_then(|t| t.trim().parse::<u64>().ok()) {
        Some(kib) => kib.div_ceil(1024),
        None => {
            problems.push("no readable <memory> (KiB)".to_string());
            0
        }
    };
    let vcpus = match element_text(&body, "vcpu").and_then(|t| t.trim().parse::<u32>().ok()) {
        Some(n) => n,
        None => {
            problems.push("no readable <vcpu>".to_string());
            1
        }
    };
    let policy = match policy_element(xml) {
        None => {
            problems.push("no havirt policy element; using the default policy".to_string());
            DomainPolicy::default()
        }
        Some(el) => match parse_policy(el) {
            Ok(p) => p,
            Err(e) => {
                problems.push(format!("unreadable havirt policy ({e}); using the default policy"));
                DomainPolicy::default()
            }
        },
    };
    let problem = (!problems.is_empty()).then(|| problems.join("; "));
    Entry { spec: DomainSpec { id, name, memory_mib, vcpus, policy }, problem }
}

/// The XML with its `<metadata>` block removed, so that other applications'
/// metadata cannot look like a top-level element.
fn without_metadata(xml: &str) -> String {
    match (xml.find("<metadata"), xml.find("</metadata>")) {
        (Some(a), Some(b)) if b > a => format!("{}{}", &xml[..a], &xml[b + "</metadata>".len()..]),
        _ => xml.to_string(),
    }
}

/// The text of the first `<tag>` or `<tag attr=...>` element.
fn element_text<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let mut from = 0;
    while let Some(i) = xml[from..].find(&format!("<{tag}")) {
        let start = from + i + 1 + tag.len();
        let next = xml[start..].chars().next()?;
        if next == '>' || next.is_whitespace() {
            let open_end = start + xml[start..].find('>')?;
            if xml[..open_end].ends_with('/') {
                return None;
            }
            let close = xml[open_end..].find(&format!("</{tag}>"))?;
            return Some(&xml[open_end + 1..open_end + close]);
        }
        from = start;
    }
    None
}

/// `<havirt:policy .../>` or `<havirt:policy ...>...</havirt:policy>`.
fn policy_element(xml: &str) -> Option<&str> {
    let open = format!("<{POLICY_KEY}:policy");
    let start = xml.find(&open)?;
    let rest = &xml[start..];
    let first_gt = rest.find('>')?;
    if rest[..first_gt].ends_with('/') {
        return Some(&rest[..=first_gt]);
    }
    let close = format!("</{POLICY_KEY}:policy>");
    let end = rest.find(&close)?;
    Some(&rest[..end + close.len()])
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&apos;", "'").replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::{Priority, Readiness};

    const XML: &str = r#"<domain type='kvm'>
  <name>web&amp;1</name>
  <uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid>
  <metadata>
    <other:app xmlns:other="urn:x"><memory>1</memory><name>not me</name></other:app>
    <havirt:policy xmlns:havirt="https://havirt.dev/xmlns/policy/1" priority="high" isolation-response="keep" readiness="guest-agent" readiness-timeout-s="60" max-restarts="2"/>
  </metadata>
  <memory unit='KiB'>1049600</memory>
  <currentMemory unit='KiB'>1048576</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
</domain>"#;

    #[test]
    fn reads_name_size_and_policy() {
        let e = entry(DomainId(7), XML);
        assert_eq!(e.problem, None);
        assert_eq!(e.spec.name, "web&1");
        assert_eq!(e.spec.memory_mib, 1025, "KiB rounded up to MiB");
        assert_eq!(e.spec.vcpus, 2);
        assert_eq!(e.spec.policy.priority, Priority::High);
        assert_eq!(e.spec.policy.readiness, Readiness::GuestAgent);
        assert_eq!(e.spec.policy.max_restarts, 2);
    }

    #[test]
    fn policy_with_children_is_read_whole() {
        let xml =
            XML.replace(r#"max-restarts="2"/>"#, r#"max-restarts="2"><havirt:affinity host="h1"/></havirt:policy>"#);
        let e = entry(DomainId(7), &xml);
        assert_eq!(e.problem, None, "{xml}");
        assert_eq!(e.spec.policy.affinity.len(), 1);
    }

    #[test]
    fn a_broken_policy_stays_protected_with_defaults_and_says_why() {
        let xml = XML.replace("priority=\"high\"", "priority=\"hihg\"");
        let e = entry(DomainId(7), &xml);
        assert_eq!(e.spec.policy, DomainPolicy::default());
        let p = e.problem.expect("problem");
        assert!(p.contains("hihg") || p.contains("priority"), "{p}");
        let bare = entry(DomainId(7), "<domain><name>x</name><memory unit='KiB'>2048</memory><vcpu>1</vcpu></domain>");
        assert_eq!(bare.spec.memory_mib, 2);
        assert!(bare.problem.expect("problem").contains("no havirt policy"));
    }

    #[test]
    fn garbage_does_not_panic() {
        for xml in ["", "<", "<name>", "<name/>", "<memory>x</memory>", "<havirt:policy", "<vcpu>", "<<<>>>"] {
            let e = entry(DomainId(1), xml);
            assert!(e.problem.is_some(), "{xml:?}");
        }
    }
}
