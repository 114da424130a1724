//! What the tables are keyed by, and how keys appear in records.
use std::{
    hash::{Hash, Hasher},
    net::IpAddr,
    sync::Arc,
};

use serde::{Serialize, Serializer};

use crate::decode::Flow;

/// The remote end of flows: a network namespace and the peer's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PeerKey {
    /// Network namespace inode (0 when unknown).
    pub netns: u32,
    pub addr: IpAddr,
}

impl PeerKey {
    /// The peer of a flow: its `d` side.
    pub fn of_flow(flow: &Flow) -> Self {
        Self {
            netns: flow.netns,
            addr: flow.daddr,
        }
    }
}

/// A listening socket: namespace, local address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ListenerKey {
    pub netns: u32,
    pub addr: IpAddr,
    pub port: u16,
}

impl ListenerKey {
    /// The listener of a flow whose `s` side is the listening socket, as in a SYN-ACK
    /// retransmit (the request socket carries the listener's address and port).
    pub fn of_flow_source(flow: &Flow) -> Self {
        Self {
            netns: flow.netns,
            addr: flow.saddr,
            port: flow.sport,
        }
    }
}

/// A firewall rule, named as `enrich::netfilter::RuleCounter` names it. The strings are shared
/// (`Arc<str>`) so that building an observation per dropped packet does not allocate.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct RuleKey {
    pub netns: u32,
    /// nftables family (`ip`, `ip6`, `inet`, ...).
    #[serde(serialize_with = "serialize_shared_str")]
    pub family: Arc<str>,
    #[serde(serialize_with = "serialize_shared_str")]
    pub table: Arc<str>,
    #[serde(serialize_with = "serialize_shared_str")]
    pub chain: Arc<str>,
    /// nftables rule handle (0 for the chain's policy, as `enrich::netfilter::POLICY_HANDLE`).
    pub handle: u64,
}

/// The tables the engine keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TableId {
    Flows,
    Peers,
    Listeners,
    Rules,
}

impl TableId {
    pub const ALL: [TableId; 4] = [
        TableId::Flows,
        TableId::Peers,
        TableId::Listeners,
        TableId::Rules,
    ];
}

/// The key of a row in any table. In JSON, an object whose `scope` names the table:
/// `{"scope":"peer","netns":4026531840,"addr":"10.0.0.2"}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "scope", rename_all = "snake_case")]
pub enum RowKey {
    Flow(#[serde(serialize_with = "serialize_flow")] Flow),
    Peer(PeerKey),
    Listener(ListenerKey),
    Rule(RuleKey),
}

impl RowKey {
    pub fn table(&self) -> TableId {
        match self {
            RowKey::Flow(_) => TableId::Flows,
            RowKey::Peer(_) => TableId::Peers,
            RowKey::Listener(_) => TableId::Listeners,
            RowKey::Rule(_) => TableId::Rules,
        }
    }
}

/// A key type of one table.
pub(crate) trait TableKey: Eq {
    const TABLE: TableId;
    /// Whether rows remember the flows that contributed (pointless when the key is the flow).
    const KEEPS_EXEMPLARS: bool;
    fn row_key(&self) -> RowKey;
    /// Feeds the key to a hasher. Every event hashes a flow and a peer, and the derived `Hash`
    /// (a call per field, discriminants, length prefixes) cost more than the rest of the hot
    /// path; whole machine words are several times cheaper. Equal keys feed equal words.
    fn hash_with<H: Hasher>(&self, state: &mut H);
}

/// An address as 128 bits (IPv4 as IPv4-mapped IPv6, as the kernel keeps them).
fn address_bits(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().to_bits(),
        IpAddr::V6(v6) => v6.to_bits(),
    }
}

impl TableKey for Flow {
    const TABLE: TableId = TableId::Flows;
    const KEEPS_EXEMPLARS: bool = false;
    fn row_key(&self) -> RowKey {
        RowKey::Flow(*self)
    }
    #[inline]
    fn hash_with<H: Hasher>(&self, state: &mut H) {
        // `family` follows from the addresses, so it adds nothing to the hash.
        let Flow {
            family: _,
            saddr,
            sport,
            daddr,
            dport,
            netns,
        } = *self;
        state.write_u128(address_bits(saddr));
        state.write_u128(address_bits(daddr));
        state.write_u64(u64::from(sport) | u64::from(dport) << 16 | u64::from(netns) << 32);
    }
}

impl TableKey for PeerKey {
    const TABLE: TableId = TableId::Peers;
    const KEEPS_EXEMPLARS: bool = true;
    fn row_key(&self) -> RowKey {
        RowKey::Peer(*self)
    }
    #[inline]
    fn hash_with<H: Hasher>(&self, state: &mut H) {
        let PeerKey { netns, addr } = *self;
        state.write_u128(address_bits(addr));
        state.write_u64(u64::from(netns));
    }
}

impl TableKey for ListenerKey {
    const TABLE: TableId = TableId::Listeners;
    const KEEPS_EXEMPLARS: bool = true;
    fn row_key(&self) -> RowKey {
        RowKey::Listener(*self)
    }
    #[inline]
    fn hash_with<H: Hasher>(&self, state: &mut H) {
        let ListenerKey { netns, addr, port } = *self;
        state.write_u128(address_bits(addr));
        state.write_u64(u64::from(port) | u64::from(netns) << 16);
    }
}

impl TableKey for RuleKey {
    const TABLE: TableId = TableId::Rules;
    const KEEPS_EXEMPLARS: bool = true;
    fn row_key(&self) -> RowKey {
        RowKey::Rule(self.clone())
    }
    fn hash_with<H: Hasher>(&self, state: &mut H) {
        self.hash(state);
    }
}

/// A flow's fields as records show them (the same names as `event` records).
fn serialize_flow<S: Serializer>(flow: &Flow, serializer: S) -> Result<S::Ok, S::Error> {
    flow.serialize(serializer)
}

pub(crate) fn serialize_flows<S: Serializer>(
    flows: &[Flow],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(flows.iter())
}

// serde serializes `Arc<str>` only with its `rc` feature, which the workspace does not enable.
pub(crate) fn serialize_shared_str<S: Serializer>(
    value: &Arc<str>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Family;

    fn flow() -> Flow {
        Flow {
            family: Family::Ipv4,
            saddr: IpAddr::from([10, 0, 0, 1]),
            sport: 443,
            daddr: IpAddr::from([10, 0, 0, 2]),
            dport: 50000,
            netns: 7,
        }
    }

    #[test]
    fn keys_derive_from_flows() {
        let flow = flow();
        assert_eq!(
            PeerKey::of_flow(&flow),
            PeerKey {
                netns: 7,
                addr: IpAddr::from([10, 0, 0, 2])
            }
        );
        assert_eq!(
            ListenerKey::of_flow_source(&flow),
            ListenerKey {
                netns: 7,
                addr: IpAddr::from([10, 0, 0, 1]),
                port: 443
            }
        );
    }

    #[test]
    fn keys_serialize_with_their_scope() -> Result<(), serde_json::Error> {
        assert_eq!(
            serde_json::to_string(&RowKey::Flow(flow()))?,
            r#"{"scope":"flow","family":"ipv4","saddr":"10.0.0.1","sport":443,"daddr":"10.0.0.2","dport":50000,"netns":7}"#
        );
        assert_eq!(
            serde_json::to_string(&RowKey::Peer(PeerKey::of_flow(&flow())))?,
            r#"{"scope":"peer","netns":7,"addr":"10.0.0.2"}"#
        );
        let rule = RowKey::Rule(RuleKey {
            netns: 1,
            family: "inet".into(),
            table: "filter".into(),
            chain: "input".into(),
            handle: 4,
        });
        assert_eq!(rule.table(), TableId::Rules);
        assert_eq!(
            serde_json::to_string(&rule)?,
            r#"{"scope":"rule","netns":1,"family":"inet","table":"filter","chain":"input","handle":4}"#
        );
        Ok(())
    }
}
