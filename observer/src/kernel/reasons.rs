//! Names of the kernel's drop reasons (`enum skb_drop_reason`) and RST reasons
//! (`enum sk_rst_reason`), read from the running kernel: their numbering differs between kernel
//! versions, so no built-in table can be right everywhere.
use std::collections::BTreeMap;

use observer_common::MAX_DROP_REASONS;

/// Code -> name for one kernel enum, names without their C prefix (`NETFILTER_DROP`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReasonNames {
    names: BTreeMap<u32, String>,
}

impl ReasonNames {
    /// From `(value, name)` pairs as found in a tracepoint's print fmt or BTF; `prefix` is
    /// stripped (`SKB_DROP_REASON_`, `SK_RST_REASON_`), negative values are ignored.
    pub fn from_pairs<S: AsRef<str>>(
        pairs: impl IntoIterator<Item = (i64, S)>,
        prefix: &str,
    ) -> Self {
        let names = pairs
            .into_iter()
            .filter_map(|(value, name)| {
                let name = name.as_ref();
                let name = name.strip_prefix(prefix).unwrap_or(name);
                Some((u32::try_from(value).ok()?, name.to_owned()))
            })
            .collect();
        Self { names }
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The name of `code`, or `UNKNOWN_<code>`.
    pub fn name(&self, code: u32) -> String {
        self.names
            .get(&code)
            .cloned()
            .unwrap_or_else(|| format!("UNKNOWN_{code}"))
    }

    pub fn code(&self, name: &str) -> Option<u32> {
        self.names
            .iter()
            .find_map(|(code, n)| n.eq_ignore_ascii_case(name).then_some(*code))
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &str)> {
        self.names.iter().map(|(c, n)| (*c, n.as_str()))
    }
}

/// Why a drop-reason selection is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectionError {
    #[error("unknown drop reason `{0}` on this kernel (see `observer reasons` for the list)")]
    Unknown(String),
    #[error("drop reason `{name}` has code {code}, beyond the supported {max}")]
    TooLarge { name: String, code: u32, max: u32 },
}

/// Whether a reason belongs to the default set: every reason an operator cares about on a TCP
/// path, not the routine frees that happen at every socket close (NOT_SPECIFIED, QUEUE_PURGE,
/// SOCKET_CLOSE) or the pseudo-value MAX.
pub fn is_default(name: &str) -> bool {
    const ROUTINE: &[&str] = &[
        "NOT_SPECIFIED",
        "QUEUE_PURGE",
        "SOCKET_CLOSE",
        "MAX",
        "UNIX_DISCONNECT",
        "UNIX_SKIP_OOB",
    ];
    !ROUTINE.contains(&name)
        && !name.starts_with("UNIX_")
        && !name.starts_with("CAN")
        && !name.starts_with("VXLAN_")
        && !name.starts_with("IPV6_NDISC_")
        && !name.starts_with("MPTCP_")
        && !name.starts_with("UDP_")
}

/// Resolves a selection like `default,-NO_SOCKET,QUEUE_PURGE` or `all` or
/// `NETFILTER_DROP,TCP_LISTEN_OVERFLOW` into reason codes. Items apply left to right: `default`
/// and `all` add sets, `-NAME` removes, `NAME` adds.
pub fn select(names: &ReasonNames, spec: &str) -> Result<Vec<u32>, SelectionError> {
    let mut chosen = std::collections::BTreeSet::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item {
            "default" => chosen.extend(names.iter().filter(|(_, n)| is_default(n)).map(|(c, _)| c)),
            "all" => chosen.extend(names.iter().filter(|(_, n)| *n != "MAX").map(|(c, _)| c)),
            _ => {
                let (remove, name) = match item.strip_prefix('-') {
                    Some(rest) => (true, rest),
                    None => (false, item),
                };
                let code = names
                    .code(name)
                    .ok_or_else(|| SelectionError::Unknown(name.to_owned()))?;
                if remove {
                    chosen.remove(&code);
                } else {
                    chosen.insert(code);
                }
            }
        }
    }
    for &code in &chosen {
        if code >= MAX_DROP_REASONS {
            return Err(SelectionError::TooLarge {
                name: names.name(code),
                code,
                max: MAX_DROP_REASONS,
            });
        }
    }
    Ok(chosen.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::tracefs::parse_format;

    fn kfree(text: &str) -> ReasonNames {
        let f = parse_format(text).expect("parses");
        ReasonNames::from_pairs(f.symbolic_values("reason"), "SKB_DROP_REASON_")
    }

    #[test]
    fn names_follow_the_running_kernel_numbering() {
        let new = kfree(include_str!("fixtures/kfree_skb.format"));
        let old = kfree(include_str!("fixtures/kfree_skb_5.17.format"));
        assert_eq!(new.code("NETFILTER_DROP"), Some(12));
        assert_eq!(old.code("NETFILTER_DROP"), Some(6));
        assert_eq!(new.name(12), "NETFILTER_DROP");
        assert_eq!(new.name(9999), "UNKNOWN_9999");
    }

    #[test]
    fn prefixes_are_stripped() {
        let n = ReasonNames::from_pairs([(3, "SKB_DROP_REASON_NO_SOCKET")], "SKB_DROP_REASON_");
        assert_eq!(n.name(3), "NO_SOCKET");
    }

    #[test]
    fn default_selection_skips_routine_frees() {
        let names = kfree(include_str!("fixtures/kfree_skb.format"));
        let chosen = select(&names, "default").expect("valid");
        let has = |n: &str| chosen.contains(&names.code(n).expect("known"));
        assert!(has("NETFILTER_DROP") && has("TCP_LISTEN_OVERFLOW") && has("IP_RPFILTER"));
        assert!(has("NO_SOCKET") && has("SOCKET_BACKLOG") && has("PROTO_MEM"));
        assert!(!has("NOT_SPECIFIED") && !has("QUEUE_PURGE") && !has("SOCKET_CLOSE"));
    }

    #[test]
    fn selection_adds_and_removes_by_name() {
        let names = kfree(include_str!("fixtures/kfree_skb.format"));
        let chosen = select(&names, "NETFILTER_DROP, tcp_csum").expect("valid");
        assert_eq!(chosen, vec![10, 12]);
        let chosen = select(&names, "default,-NO_SOCKET,QUEUE_PURGE").expect("valid");
        assert!(!chosen.contains(&3) && chosen.contains(&104));
        assert_eq!(
            select(&names, "NO_SUCH_REASON"),
            Err(SelectionError::Unknown("NO_SUCH_REASON".to_owned()))
        );
    }
}
