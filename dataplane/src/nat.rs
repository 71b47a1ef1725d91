//! natOutgoing: masquerading of pod traffic that leaves every IP pool, in tortie's own nftables
//! table, programmed over NETLINK_NETFILTER.
//!
//! Calico's rule: a packet whose source is in a pool with `natOutgoing: true` and whose
//! destination is in no pool at all (enabled or disabled) is masqueraded to the address of the
//! interface it leaves by. tortie expresses it as one table, and touches nothing else:
//!
//! ```text
//! table inet tortie-nat {
//!     set masq-pools-v4 { type ipv4_addr; flags interval; elements = { 10.244.0.0/16 } }
//!     set all-pools-v4  { type ipv4_addr; flags interval; elements = { 10.244.0.0/16, … } }
//!     set masq-pools-v6 { type ipv6_addr; flags interval; }
//!     set all-pools-v6  { type ipv6_addr; flags interval; }
//!     chain postrouting {
//!         type nat hook postrouting priority srcnat; policy accept;
//!         ip saddr @masq-pools-v4 ip daddr != @all-pools-v4 masquerade fully-random
//!         ip6 saddr @masq-pools-v6 ip6 daddr != @all-pools-v6 masquerade fully-random
//!     }
//! }
//! ```
//!
//! Layers, as in the route reconciler: [`desired`] (inputs → set contents, pure), [`diff`]
//! (desired vs what [`NatOutgoing::read_actual`] found → [`Plan`], pure) and
//! [`NatOutgoing::execute`], the only step that writes. Every write is one nftables
//! transaction, so the kernel never shows a half-built table or an emptied set.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use ipnet::IpNet;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use crate::socket::Messages;

/// The one table tortie owns; nothing outside it is ever read for changes or written.
pub const TABLE_NAME: &str = "tortie-nat";
/// The base chain holding the masquerade rules.
pub const CHAIN_NAME: &str = "postrouting";
/// `srcnat`, where iptables' nat POSTROUTING sits too.
pub const CHAIN_PRIORITY: i32 = 100;

/// What the agent knows: pools with natOutgoing on, and every pool (enabled or not).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatInputs {
    /// CIDRs of pools with `natOutgoing: true`.
    pub masquerade: Vec<IpNet>,
    /// CIDRs of all pools, whatever their state. The masquerading pools are added to this
    /// set in any case: a pool's own traffic to itself is never masqueraded.
    pub all_pools: Vec<IpNet>,
}

/// One of the table's four address sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NatSet {
    MasqueradeV4,
    AllPoolsV4,
    MasqueradeV6,
    AllPoolsV6,
}

impl NatSet {
    pub const ALL: [NatSet; 4] = [
        NatSet::MasqueradeV4,
        NatSet::AllPoolsV4,
        NatSet::MasqueradeV6,
        NatSet::AllPoolsV6,
    ];

    pub fn name(self) -> &'static str {
        match self {
            NatSet::MasqueradeV4 => "masq-pools-v4",
            NatSet::AllPoolsV4 => "all-pools-v4",
            NatSet::MasqueradeV6 => "masq-pools-v6",
            NatSet::AllPoolsV6 => "all-pools-v6",
        }
    }

    fn from_name(name: &str) -> Option<NatSet> {
        NatSet::ALL.into_iter().find(|s| s.name() == name)
    }

    fn is_v6(self) -> bool {
        matches!(self, NatSet::MasqueradeV6 | NatSet::AllPoolsV6)
    }

    fn key_len(self) -> u32 {
        if self.is_v6() { 16 } else { 4 }
    }

    /// nft's datatype numbers, so that `nft list` prints addresses rather than integers.
    fn key_type(self) -> u32 {
        if self.is_v6() {
            NFT_TYPE_IP6ADDR
        } else {
            NFT_TYPE_IPADDR
        }
    }

    /// The set's ID inside a creating transaction (rules refer to sets created alongside).
    fn transaction_id(self) -> u32 {
        self as u32 + 1
    }
}

/// One element of an interval set as the kernel stores it: the first address of a range, or
/// (with `interval_end`) the first address past it. Keys are in network byte order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SetElement {
    pub key: Vec<u8>,
    pub interval_end: bool,
}

/// The table's desired contents; its structure (sets, chain, rules) is fixed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Every set, each with its elements sorted.
    pub elements: BTreeMap<NatSet, Vec<SetElement>>,
}

/// The desired table, or `None` when no pool masquerades (the table must then not exist).
pub fn desired(inputs: &NatInputs) -> Option<Desired> {
    if inputs.masquerade.is_empty() {
        return None;
    }
    let all: Vec<IpNet> = inputs
        .all_pools
        .iter()
        .chain(&inputs.masquerade)
        .copied()
        .collect();
    let mut elements = BTreeMap::new();
    for set in NatSet::ALL {
        let source = match set {
            NatSet::MasqueradeV4 | NatSet::MasqueradeV6 => &inputs.masquerade,
            NatSet::AllPoolsV4 | NatSet::AllPoolsV6 => &all,
        };
        elements.insert(set, interval_elements(source, set.is_v6()));
    }
    Some(Desired { elements })
}

/// The interval-set elements covering `nets` of one family: overlapping and adjacent ranges
/// merged (the kernel refuses overlaps), each range as a start element and, unless it reaches
/// the top of the address space, an end element one past its last address.
fn interval_elements(nets: &[IpNet], v6: bool) -> Vec<SetElement> {
    let max: u128 = if v6 { u128::MAX } else { u128::from(u32::MAX) };
    let mut ranges: Vec<(u128, u128)> = nets
        .iter()
        .filter_map(|net| match (net.trunc(), v6) {
            (IpNet::V4(n), false) => Some((
                u128::from(u32::from(n.network())),
                u128::from(u32::from(n.broadcast())),
            )),
            (IpNet::V6(n), true) => Some((u128::from(n.network()), u128::from(n.broadcast()))),
            _ => None,
        })
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    let key = |v: u128| -> Vec<u8> {
        if v6 {
            v.to_be_bytes().to_vec()
        } else {
            (v as u32).to_be_bytes().to_vec()
        }
    };
    let mut out = Vec::with_capacity(merged.len() * 2);
    for (start, end) in merged {
        out.push(SetElement {
            key: key(start),
            interval_end: false,
        });
        if end < max {
            out.push(SetElement {
                key: key(end + 1),
                interval_end: true,
            });
        }
    }
    out
}

/// What the kernel holds in tortie's table, as far as the reconciler cares.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Actual {
    pub table: Option<ActualTable>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActualTable {
    /// False when anything but exactly tortie's sets, chain and two rules is in the table.
    pub structure_matches: bool,
    /// Elements (sorted) of those of tortie's sets that exist.
    pub elements: BTreeMap<NatSet, Vec<SetElement>>,
}

/// The writes that bring the kernel to the desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Nothing,
    /// Build the whole table, first deleting a table of that name whose structure is wrong.
    Create {
        replace_existing: bool,
        desired: Desired,
    },
    /// Flush these sets and fill them anew (one transaction, so lookups never see them empty).
    ReplaceSets(Vec<(NatSet, Vec<SetElement>)>),
    DeleteTable,
}

/// Compares the desired table with the kernel's.
pub fn diff(desired: Option<&Desired>, actual: &Actual) -> Plan {
    match (desired, &actual.table) {
        (None, None) => Plan::Nothing,
        (None, Some(_)) => Plan::DeleteTable,
        (Some(d), None) => Plan::Create {
            replace_existing: false,
            desired: d.clone(),
        },
        (Some(d), Some(table)) if !table.structure_matches => Plan::Create {
            replace_existing: true,
            desired: d.clone(),
        },
        (Some(d), Some(table)) => {
            let changed: Vec<(NatSet, Vec<SetElement>)> = d
                .elements
                .iter()
                .filter(|(set, want)| table.elements.get(set) != Some(want))
                .map(|(set, want)| (*set, want.clone()))
                .collect();
            if changed.is_empty() {
                Plan::Nothing
            } else {
                Plan::ReplaceSets(changed)
            }
        }
    }
}

/// What an apply did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatChange {
    /// The kernel already matched; nothing was written.
    Unchanged,
    /// The table did not exist and was built.
    Created,
    /// The table existed with a wrong structure (tampered, older layout) and was rebuilt.
    Rebuilt,
    /// Only set contents changed; these sets were refilled.
    SetsReplaced(Vec<NatSet>),
    /// No pool masquerades any more; the table was deleted.
    Removed,
}

/// Failures, each naming the nftables object at fault.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    #[error("nftables socket {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("nftables {operation} {object}: kernel answered errno {errno} ({}){}",
        io::Error::from_raw_os_error(*errno),
        message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Kernel {
        operation: &'static str,
        object: String,
        errno: i32,
        message: Option<String>,
    },
    #[error("nftables {what}: malformed kernel message: {detail}")]
    Decode { what: String, detail: String },
    #[error("nftables {what}: dump kept being interrupted by concurrent changes")]
    DumpInterrupted { what: String },
}

// ---------------------------------------------------------------------------------------------
// Wire format: nfnetlink messages for nf_tables.
// ---------------------------------------------------------------------------------------------

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSGERR_ATTR_MSG: u16 = 1;

const NFNETLINK_V0: u8 = 0;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_GEN_ID: u16 = 1;

const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_SET_ID: u16 = 4;
const NFTA_LOOKUP_FLAGS: u16 = 5;
const NFTA_MASQ_FLAGS: u16 = 1;

const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
const NFT_TYPE_IPADDR: u32 = 7;
const NFT_TYPE_IP6ADDR: u32 = 8;
const NFT_REG_1: u32 = 1;
const NFT_META_NFPROTO: u32 = 15;
const NFT_CMP_EQ: u32 = 0;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_LOOKUP_F_INV: u32 = 1;
const NF_INET_POST_ROUTING: u32 = 4;
const NF_ACCEPT: u32 = 1;
const NF_NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 0x10;

/// Elements per NEWSETELEM message, keeping each message far below 64 KiB.
const ELEMENTS_PER_MESSAGE: usize = 256;

fn pad4(buf: &mut Vec<u8>) {
    buf.resize((buf.len() + 3) & !3, 0);
}

/// Appends a netlink header and an nfgenmsg, returning where the message starts.
///
/// ```text
/// 0               4       6       8               12              16
/// +---------------+-------+-------+---------------+---------------+
/// | length        | type  | flags | sequence      | port id (0)   |
/// +-------+-------+-------+-------+---------------+---------------+
/// |family |version| res_id (big-endian)
/// +-------+-------+---------------+
/// ```
fn start_message(buf: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, family: u8) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    let res_id = if kind == NFNL_MSG_BATCH_BEGIN || kind == NFNL_MSG_BATCH_END {
        NFNL_SUBSYS_NFTABLES
    } else {
        0
    };
    buf.push(family);
    buf.push(NFNETLINK_V0);
    buf.extend_from_slice(&res_id.to_be_bytes());
    start
}

fn finish_message(buf: &mut Vec<u8>, start: usize) {
    pad4(buf);
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// Appends one attribute (`u16 length, u16 type, payload, padding to 4`).
fn put_attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    pad4(buf);
}

fn put_str(buf: &mut Vec<u8>, kind: u16, s: &str) {
    let mut data = Vec::with_capacity(s.len() + 1);
    data.extend_from_slice(s.as_bytes());
    data.push(0);
    put_attr(buf, kind, &data);
}

fn put_be32(buf: &mut Vec<u8>, kind: u16, value: u32) {
    put_attr(buf, kind, &value.to_be_bytes());
}

fn put_nested(buf: &mut Vec<u8>, kind: u16, inner: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    inner(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    buf[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
}

/// One nf_tables expression of tortie's rules. Attributes are written in the order and with
/// the presence the kernel dumps them, so a rule read back compares equal to the one built.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expr {
    /// `meta load <key> => reg <dreg>`
    Meta { key: u32, dreg: u32 },
    /// `cmp eq reg <sreg> <data>`
    CmpEq { sreg: u32, data: Vec<u8> },
    /// `payload load <len>b @ network header + <offset> => reg <dreg>`
    NetworkPayload { offset: u32, len: u32, dreg: u32 },
    /// `lookup reg <sreg> set <set>` (negated with `invert`); the set ID is sent only when the
    /// set is created in the same transaction.
    Lookup {
        set: NatSet,
        sreg: u32,
        invert: bool,
        with_set_id: bool,
    },
    /// `masq fully-random`: Calico masquerades with `--random-fully` wherever the kernel
    /// supports it, so that parallel connections never race for the same source port.
    Masquerade,
}

impl Expr {
    fn name(&self) -> &'static str {
        match self {
            Expr::Meta { .. } => "meta",
            Expr::CmpEq { .. } => "cmp",
            Expr::NetworkPayload { .. } => "payload",
            Expr::Lookup { .. } => "lookup",
            Expr::Masquerade => "masq",
        }
    }

    fn encode(&self, buf: &mut Vec<u8>) {
        put_nested(buf, NFTA_LIST_ELEM, |buf| {
            put_str(buf, NFTA_EXPR_NAME, self.name());
            put_nested(buf, NFTA_EXPR_DATA, |buf| match self {
                Expr::Meta { key, dreg } => {
                    put_be32(buf, NFTA_META_KEY, *key);
                    put_be32(buf, NFTA_META_DREG, *dreg);
                }
                Expr::CmpEq { sreg, data } => {
                    put_be32(buf, NFTA_CMP_SREG, *sreg);
                    put_be32(buf, NFTA_CMP_OP, NFT_CMP_EQ);
                    put_nested(buf, NFTA_CMP_DATA, |buf| {
                        put_attr(buf, NFTA_DATA_VALUE, data)
                    });
                }
                Expr::NetworkPayload { offset, len, dreg } => {
                    put_be32(buf, NFTA_PAYLOAD_DREG, *dreg);
                    put_be32(buf, NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER);
                    put_be32(buf, NFTA_PAYLOAD_OFFSET, *offset);
                    put_be32(buf, NFTA_PAYLOAD_LEN, *len);
                }
                Expr::Lookup {
                    set,
                    sreg,
                    invert,
                    with_set_id,
                } => {
                    put_str(buf, NFTA_LOOKUP_SET, set.name());
                    put_be32(buf, NFTA_LOOKUP_SREG, *sreg);
                    if *with_set_id {
                        put_be32(buf, NFTA_LOOKUP_SET_ID, set.transaction_id());
                    }
                    let flags = if *invert { NFT_LOOKUP_F_INV } else { 0 };
                    put_be32(buf, NFTA_LOOKUP_FLAGS, flags);
                }
                Expr::Masquerade => put_be32(buf, NFTA_MASQ_FLAGS, NF_NAT_RANGE_PROTO_RANDOM_FULLY),
            });
        });
    }
}

/// One of the two masquerade rules: `ip saddr @masq-pools-v4 ip daddr != @all-pools-v4
/// masquerade`, or its IPv6 twin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MasqueradeRule {
    V4,
    V6,
}

impl MasqueradeRule {
    const BOTH: [MasqueradeRule; 2] = [MasqueradeRule::V4, MasqueradeRule::V6];

    fn expressions(self, with_set_ids: bool) -> Vec<Expr> {
        // Source and destination offsets in the IPv4 (12, 16) and IPv6 (8, 24) headers.
        let (nfproto, addr_len, saddr, daddr, masq, all) = match self {
            MasqueradeRule::V4 => (
                NFPROTO_IPV4,
                4,
                12,
                16,
                NatSet::MasqueradeV4,
                NatSet::AllPoolsV4,
            ),
            MasqueradeRule::V6 => (
                NFPROTO_IPV6,
                16,
                8,
                24,
                NatSet::MasqueradeV6,
                NatSet::AllPoolsV6,
            ),
        };
        vec![
            Expr::Meta {
                key: NFT_META_NFPROTO,
                dreg: NFT_REG_1,
            },
            Expr::CmpEq {
                sreg: NFT_REG_1,
                data: vec![nfproto],
            },
            Expr::NetworkPayload {
                offset: saddr,
                len: addr_len,
                dreg: NFT_REG_1,
            },
            Expr::Lookup {
                set: masq,
                sreg: NFT_REG_1,
                invert: false,
                with_set_id: with_set_ids,
            },
            Expr::NetworkPayload {
                offset: daddr,
                len: addr_len,
                dreg: NFT_REG_1,
            },
            Expr::Lookup {
                set: all,
                sreg: NFT_REG_1,
                invert: true,
                with_set_id: with_set_ids,
            },
            Expr::Masquerade,
        ]
    }

    /// The rule as the kernel will dump it, in comparable form.
    fn canonical(self) -> Vec<CanonicalExpr> {
        let mut buf = Vec::new();
        for e in self.expressions(false) {
            e.encode(&mut buf);
        }
        // Our own encoding always parses; an empty list would only make every compare fail.
        canonical_expressions(&buf).unwrap_or_default()
    }
}

/// One message of a write transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Request {
    NewTable,
    DeleteTable,
    NewSet(NatSet),
    AddElements {
        set: NatSet,
        elements: Vec<SetElement>,
        with_set_id: bool,
    },
    FlushSet(NatSet),
    NewChain,
    NewRule(MasqueradeRule),
}

impl Request {
    fn operation(&self) -> &'static str {
        match self {
            Request::NewTable | Request::NewSet(_) | Request::NewChain | Request::NewRule(_) => {
                "create"
            }
            Request::DeleteTable => "delete",
            Request::AddElements { .. } => "add elements to",
            Request::FlushSet(_) => "flush",
        }
    }

    /// The object, named as `nft` would, for error messages.
    fn object(&self) -> String {
        match self {
            Request::NewTable | Request::DeleteTable => format!("table inet {TABLE_NAME}"),
            Request::NewSet(set) | Request::AddElements { set, .. } | Request::FlushSet(set) => {
                format!("set inet {TABLE_NAME} {}", set.name())
            }
            Request::NewChain => format!("chain inet {TABLE_NAME} {CHAIN_NAME}"),
            Request::NewRule(rule) => format!(
                "rule {} in chain inet {TABLE_NAME} {CHAIN_NAME}",
                match rule {
                    MasqueradeRule::V4 => "ip saddr @masq-pools-v4 masquerade",
                    MasqueradeRule::V6 => "ip6 saddr @masq-pools-v6 masquerade",
                }
            ),
        }
    }

    fn encode(&self, buf: &mut Vec<u8>, seq: u32) {
        let flags = NLM_F_REQUEST | NLM_F_ACK;
        match self {
            Request::NewTable => {
                let m = start_message(
                    buf,
                    nft_type(NFT_MSG_NEWTABLE),
                    flags | NLM_F_CREATE,
                    seq,
                    NFPROTO_INET,
                );
                put_str(buf, NFTA_TABLE_NAME, TABLE_NAME);
                finish_message(buf, m);
            }
            Request::DeleteTable => {
                let m = start_message(buf, nft_type(NFT_MSG_DELTABLE), flags, seq, NFPROTO_INET);
                put_str(buf, NFTA_TABLE_NAME, TABLE_NAME);
                finish_message(buf, m);
            }
            Request::NewSet(set) => {
                let m = start_message(
                    buf,
                    nft_type(NFT_MSG_NEWSET),
                    flags | NLM_F_CREATE,
                    seq,
                    NFPROTO_INET,
                );
                put_str(buf, NFTA_SET_TABLE, TABLE_NAME);
                put_str(buf, NFTA_SET_NAME, set.name());
                put_be32(buf, NFTA_SET_FLAGS, NFT_SET_INTERVAL);
                put_be32(buf, NFTA_SET_KEY_TYPE, set.key_type());
                put_be32(buf, NFTA_SET_KEY_LEN, set.key_len());
                put_be32(buf, NFTA_SET_ID, set.transaction_id());
                finish_message(buf, m);
            }
            Request::AddElements {
                set,
                elements,
                with_set_id,
            } => {
                let m = start_message(
                    buf,
                    nft_type(NFT_MSG_NEWSETELEM),
                    flags | NLM_F_CREATE,
                    seq,
                    NFPROTO_INET,
                );
                put_str(buf, NFTA_SET_ELEM_LIST_TABLE, TABLE_NAME);
                put_str(buf, NFTA_SET_ELEM_LIST_SET, set.name());
                if *with_set_id {
                    put_be32(buf, NFTA_SET_ELEM_LIST_SET_ID, set.transaction_id());
                }
                put_nested(buf, NFTA_SET_ELEM_LIST_ELEMENTS, |buf| {
                    for element in elements {
                        put_nested(buf, NFTA_LIST_ELEM, |buf| {
                            put_nested(buf, NFTA_SET_ELEM_KEY, |buf| {
                                put_attr(buf, NFTA_DATA_VALUE, &element.key)
                            });
                            if element.interval_end {
                                put_be32(buf, NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
                            }
                        });
                    }
                });
                finish_message(buf, m);
            }
            Request::FlushSet(set) => {
                // A DELSETELEM without an element list empties the set.
                let m = start_message(buf, nft_type(NFT_MSG_DELSETELEM), flags, seq, NFPROTO_INET);
                put_str(buf, NFTA_SET_ELEM_LIST_TABLE, TABLE_NAME);
                put_str(buf, NFTA_SET_ELEM_LIST_SET, set.name());
                finish_message(buf, m);
            }
            Request::NewChain => {
                let m = start_message(
                    buf,
                    nft_type(NFT_MSG_NEWCHAIN),
                    flags | NLM_F_CREATE,
                    seq,
                    NFPROTO_INET,
                );
                put_str(buf, NFTA_CHAIN_TABLE, TABLE_NAME);
                put_str(buf, NFTA_CHAIN_NAME, CHAIN_NAME);
                put_nested(buf, NFTA_CHAIN_HOOK, |buf| {
                    put_be32(buf, NFTA_HOOK_HOOKNUM, NF_INET_POST_ROUTING);
                    put_be32(buf, NFTA_HOOK_PRIORITY, CHAIN_PRIORITY as u32);
                });
                put_be32(buf, NFTA_CHAIN_POLICY, NF_ACCEPT);
                put_str(buf, NFTA_CHAIN_TYPE, "nat");
                finish_message(buf, m);
            }
            Request::NewRule(rule) => {
                let m = start_message(
                    buf,
                    nft_type(NFT_MSG_NEWRULE),
                    flags | NLM_F_CREATE | NLM_F_APPEND,
                    seq,
                    NFPROTO_INET,
                );
                put_str(buf, NFTA_RULE_TABLE, TABLE_NAME);
                put_str(buf, NFTA_RULE_CHAIN, CHAIN_NAME);
                put_nested(buf, NFTA_RULE_EXPRESSIONS, |buf| {
                    for e in rule.expressions(true) {
                        e.encode(buf);
                    }
                });
                finish_message(buf, m);
            }
        }
    }
}

/// The transaction's messages for a plan, in an order the kernel accepts (table, sets,
/// elements, chain, rules referring to the sets).
fn requests_for(plan: &Plan) -> Vec<Request> {
    fn add_elements(
        set: NatSet,
        elements: &[SetElement],
        with_set_id: bool,
    ) -> impl Iterator<Item = Request> + '_ {
        elements
            .chunks(ELEMENTS_PER_MESSAGE)
            .map(move |chunk| Request::AddElements {
                set,
                elements: chunk.to_vec(),
                with_set_id,
            })
    }
    let mut out = Vec::new();
    match plan {
        Plan::Nothing => {}
        Plan::Create {
            replace_existing,
            desired,
        } => {
            if *replace_existing {
                out.push(Request::DeleteTable);
            }
            out.push(Request::NewTable);
            out.extend(NatSet::ALL.map(Request::NewSet));
            for (set, elements) in &desired.elements {
                out.extend(add_elements(*set, elements, true));
            }
            out.push(Request::NewChain);
            out.extend(MasqueradeRule::BOTH.map(Request::NewRule));
        }
        Plan::ReplaceSets(sets) => {
            for (set, elements) in sets {
                out.push(Request::FlushSet(*set));
                out.extend(add_elements(*set, elements, false));
            }
        }
        Plan::DeleteTable => out.push(Request::DeleteTable),
    }
    out
}

/// A whole transaction: BATCH_BEGIN, the requests with sequence numbers `first_seq + 1 ..`,
/// BATCH_END (sequence numbers `first_seq` and `first_seq + requests + 1`).
fn encode_transaction(buf: &mut Vec<u8>, requests: &[Request], first_seq: u32) {
    let m = start_message(
        buf,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        first_seq,
        NFPROTO_UNSPEC,
    );
    finish_message(buf, m);
    for (i, r) in requests.iter().enumerate() {
        r.encode(buf, first_seq.wrapping_add(1 + i as u32));
    }
    let end_seq = first_seq.wrapping_add(1 + requests.len() as u32);
    let m = start_message(
        buf,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        end_seq,
        NFPROTO_UNSPEC,
    );
    finish_message(buf, m);
}

// ---------------------------------------------------------------------------------------------
// Decoding what the kernel dumps.
// ---------------------------------------------------------------------------------------------

fn decode_err(what: impl Into<String>, detail: impl Into<String>) -> NatError {
    NatError::Decode {
        what: what.into(),
        detail: detail.into(),
    }
}

/// Iterates attributes (type without flag bits, payload), checking lengths before reading.
struct Attrs<'a> {
    data: &'a [u8],
}

fn attrs(data: &[u8]) -> Attrs<'_> {
    Attrs { data }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8]), NatError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.data.len() < 4 {
            return None;
        }
        let d = self.data;
        let len = u16::from_ne_bytes([d[0], d[1]]) as usize;
        let kind = u16::from_ne_bytes([d[2], d[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > d.len() {
            self.data = &[];
            return Some(Err(decode_err(
                "attribute",
                format!("type {kind} length {len} with {} bytes left", d.len()),
            )));
        }
        self.data = &d[((len + 3) & !3).min(d.len())..];
        Some(Ok((kind, &d[4..len])))
    }
}

fn be32(what: &str, data: &[u8]) -> Result<u32, NatError> {
    match <[u8; 4]>::try_from(data) {
        Ok(b) => Ok(u32::from_be_bytes(b)),
        Err(_) => Err(decode_err(what, format!("{} bytes for a u32", data.len()))),
    }
}

fn c_string(data: &[u8]) -> String {
    let raw = data.split(|b| *b == 0).next().unwrap_or(data);
    String::from_utf8_lossy(raw).into_owned()
}

/// An expression reduced to a comparable form: its name and its attributes sorted by type
/// (flag bits dropped, nested payloads kept as bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
struct CanonicalExpr {
    name: String,
    attributes: Vec<(u16, Vec<u8>)>,
}

fn canonical_expressions(list: &[u8]) -> Result<Vec<CanonicalExpr>, NatError> {
    let mut out = Vec::new();
    for item in attrs(list) {
        let (kind, elem) = item?;
        if kind != NFTA_LIST_ELEM {
            continue;
        }
        let mut name = String::new();
        let mut attributes = Vec::new();
        for a in attrs(elem) {
            match a? {
                (NFTA_EXPR_NAME, v) => name = c_string(v),
                (NFTA_EXPR_DATA, data) => {
                    for d in attrs(data) {
                        let (t, v) = d?;
                        attributes.push((t, v.to_vec()));
                    }
                }
                _ => {}
            }
        }
        attributes.sort();
        out.push(CanonicalExpr { name, attributes });
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SetInfo {
    name: String,
    flags: u32,
    key_type: u32,
    key_len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ChainInfo {
    name: String,
    hook: Option<(u32, i32)>,
    policy: Option<u32>,
    kind: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct RuleInfo {
    chain: String,
    expressions: Vec<CanonicalExpr>,
}

/// Dumps are filtered by table in the request; answers naming another table are dropped too.
fn table_attr_is_ours(table: Option<&str>) -> bool {
    table.is_none_or(|t| t == TABLE_NAME)
}

fn decode_table_name(payload: &[u8]) -> Result<Option<String>, NatError> {
    for a in attrs(payload) {
        if let (NFTA_TABLE_NAME, v) = a? {
            return Ok(Some(c_string(v)));
        }
    }
    Ok(None)
}

fn decode_set(payload: &[u8]) -> Result<Option<SetInfo>, NatError> {
    let mut table = None;
    let mut info = SetInfo {
        name: String::new(),
        flags: 0,
        key_type: 0,
        key_len: 0,
    };
    for a in attrs(payload) {
        match a? {
            (NFTA_SET_TABLE, v) => table = Some(c_string(v)),
            (NFTA_SET_NAME, v) => info.name = c_string(v),
            (NFTA_SET_FLAGS, v) => info.flags = be32("set flags", v)?,
            (NFTA_SET_KEY_TYPE, v) => info.key_type = be32("set key type", v)?,
            (NFTA_SET_KEY_LEN, v) => info.key_len = be32("set key length", v)?,
            _ => {}
        }
    }
    Ok(table_attr_is_ours(table.as_deref()).then_some(info))
}

fn decode_chain(payload: &[u8]) -> Result<Option<ChainInfo>, NatError> {
    let mut table = None;
    let mut info = ChainInfo {
        name: String::new(),
        hook: None,
        policy: None,
        kind: None,
    };
    for a in attrs(payload) {
        match a? {
            (NFTA_CHAIN_TABLE, v) => table = Some(c_string(v)),
            (NFTA_CHAIN_NAME, v) => info.name = c_string(v),
            (NFTA_CHAIN_POLICY, v) => info.policy = Some(be32("chain policy", v)?),
            (NFTA_CHAIN_TYPE, v) => info.kind = Some(c_string(v)),
            (NFTA_CHAIN_HOOK, hook) => {
                let (mut num, mut prio) = (None, None);
                for h in attrs(hook) {
                    match h? {
                        (NFTA_HOOK_HOOKNUM, v) => num = Some(be32("hook number", v)?),
                        (NFTA_HOOK_PRIORITY, v) => prio = Some(be32("hook priority", v)? as i32),
                        _ => {}
                    }
                }
                if let (Some(n), Some(p)) = (num, prio) {
                    info.hook = Some((n, p));
                }
            }
            _ => {}
        }
    }
    Ok(table_attr_is_ours(table.as_deref()).then_some(info))
}

fn decode_rule(payload: &[u8]) -> Result<Option<RuleInfo>, NatError> {
    let mut table = None;
    let mut info = RuleInfo {
        chain: String::new(),
        expressions: Vec::new(),
    };
    for a in attrs(payload) {
        match a? {
            (NFTA_RULE_TABLE, v) => table = Some(c_string(v)),
            (NFTA_RULE_CHAIN, v) => info.chain = c_string(v),
            (NFTA_RULE_EXPRESSIONS, v) => info.expressions = canonical_expressions(v)?,
            _ => {}
        }
    }
    Ok(table_attr_is_ours(table.as_deref()).then_some(info))
}

/// Appends the elements of one dumped NEWSETELEM message.
fn decode_elements(payload: &[u8], out: &mut Vec<SetElement>) -> Result<(), NatError> {
    for a in attrs(payload) {
        let (kind, list) = a?;
        if kind != NFTA_SET_ELEM_LIST_ELEMENTS {
            continue;
        }
        for item in attrs(list) {
            let (kind, elem) = item?;
            if kind != NFTA_LIST_ELEM {
                continue;
            }
            let mut key = None;
            let mut flags = 0;
            for e in attrs(elem) {
                match e? {
                    (NFTA_SET_ELEM_KEY, data) => {
                        for d in attrs(data) {
                            if let (NFTA_DATA_VALUE, v) = d? {
                                key = Some(v.to_vec());
                            }
                        }
                    }
                    (NFTA_SET_ELEM_FLAGS, v) => flags = be32("element flags", v)?,
                    _ => {}
                }
            }
            let Some(key) = key else {
                return Err(decode_err("set element", "no key"));
            };
            out.push(SetElement {
                key,
                interval_end: flags & NFT_SET_ELEM_INTERVAL_END != 0,
            });
        }
    }
    Ok(())
}

/// True when the table holds exactly tortie's sets, chain and rules.
fn structure_matches(sets: &[SetInfo], chains: &[ChainInfo], rules: &[RuleInfo]) -> bool {
    let sets_ok = sets.len() == NatSet::ALL.len()
        && NatSet::ALL.iter().all(|want| {
            sets.iter().any(|s| {
                s.name == want.name()
                    && s.flags == NFT_SET_INTERVAL
                    && s.key_type == want.key_type()
                    && s.key_len == want.key_len()
            })
        });
    let chains_ok = matches!(chains, [c] if c.name == CHAIN_NAME
        && c.hook == Some((NF_INET_POST_ROUTING, CHAIN_PRIORITY))
        && c.policy.is_none_or(|p| p == NF_ACCEPT)
        && c.kind.as_deref() == Some("nat"));
    let rules_ok = rules.len() == MasqueradeRule::BOTH.len()
        && rules
            .iter()
            .zip(MasqueradeRule::BOTH)
            .all(|(have, want)| have.chain == CHAIN_NAME && have.expressions == want.canonical());
    sets_ok && chains_ok && rules_ok
}

// ---------------------------------------------------------------------------------------------
// The socket and the reconciler.
// ---------------------------------------------------------------------------------------------

const RECV_BUFFER: usize = 64 * 1024;
const RECV_TIMEOUT: Duration = Duration::from_secs(10);
const DUMP_ATTEMPTS: usize = 5;
/// Datagrams read for one answer before giving up (a dump of our table is a handful).
const MAX_DATAGRAMS: usize = 100_000;

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> NatError {
    move |source| NatError::Io { op, source }
}

/// Reads one datagram; `None` when `flags` has MSG_DONTWAIT and nothing is queued.
fn recv_into(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> Result<Option<usize>, NatError> {
    loop {
        // SAFETY: buf is a live, writable slice of buf.len() bytes.
        let rc = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                flags | libc::MSG_TRUNC,
            )
        };
        if rc >= 0 {
            let n = rc as usize;
            if n > buf.len() {
                return Err(decode_err(
                    "receive",
                    format!("datagram of {n} bytes truncated"),
                ));
            }
            return Ok(Some(n));
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock if flags & libc::MSG_DONTWAIT != 0 => return Ok(None),
            io::ErrorKind::WouldBlock => {
                return Err(NatError::Io {
                    op: "recv (no kernel answer within the receive timeout)",
                    source: err,
                });
            }
            _ => {
                return Err(NatError::Io {
                    op: "recv",
                    source: err,
                });
            }
        }
    }
}

/// Decodes an NLMSG_ERROR payload: errno (positive, 0 for an ACK) and the extended-ACK text.
fn decode_ack(payload: &[u8]) -> Result<(i32, Option<String>), NatError> {
    let Some(code) = payload.get(..4) else {
        return Err(decode_err(
            "error message",
            format!("{} bytes", payload.len()),
        ));
    };
    let code = i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
    let mut text = None;
    // With NETLINK_CAP_ACK the echoed request is only its header.
    for a in attrs(payload.get(4 + NLMSG_HDRLEN..).unwrap_or(&[])) {
        if let Ok((NLMSGERR_ATTR_MSG, v)) = a {
            text = Some(c_string(v));
        }
    }
    Ok((code.saturating_neg(), text))
}

/// tortie's natOutgoing table in the network namespace the socket was opened in.
pub struct NatOutgoing {
    socket: Socket,
    seq: u32,
    send_buf: Vec<u8>,
    recv_buf: Vec<u8>,
    messages_sent: u64,
    transactions: u64,
}

impl std::fmt::Debug for NatOutgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatOutgoing")
            .field("fd", &self.socket.as_raw_fd())
            .field("messages_sent", &self.messages_sent)
            .finish()
    }
}

impl NatOutgoing {
    /// Opens a NETLINK_NETFILTER socket in the calling thread's network namespace. Nothing is
    /// read or written until [`NatOutgoing::apply`].
    pub fn open() -> Result<NatOutgoing, NatError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(io_err("socket"))?;
        socket
            .bind(&SocketAddr::new(0, 0))
            .map_err(io_err("bind"))?;
        socket
            .set_cap_ack(true)
            .map_err(io_err("NETLINK_CAP_ACK"))?;
        socket
            .set_ext_ack(true)
            .map_err(io_err("NETLINK_EXT_ACK"))?;
        let fd = socket.as_raw_fd();
        // Root may exceed the default limits; a smaller buffer still works for our few messages.
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            if crate::socket::setsockopt_int(fd, force, 1 << 20).is_err() {
                let _ = crate::socket::setsockopt_int(fd, plain, 1 << 20);
            }
        }
        let tv = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as _,
            tv_usec: 0,
        };
        // SAFETY: tv is a live timeval and its size is passed.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(NatError::Io {
                op: "SO_RCVTIMEO",
                source: io::Error::last_os_error(),
            });
        }
        Ok(NatOutgoing {
            socket,
            seq: 0,
            send_buf: Vec::with_capacity(16 * 1024),
            recv_buf: vec![0; RECV_BUFFER],
            messages_sent: 0,
            transactions: 0,
        })
    }

    /// Brings the table to what `inputs` ask for: created when missing, rebuilt when its
    /// structure is wrong, sets refilled when their contents differ, deleted when no pool
    /// masquerades. Writes nothing when the kernel already matches.
    pub fn apply(&mut self, inputs: &NatInputs) -> Result<NatChange, NatError> {
        let desired = desired(inputs);
        let actual = self.read_actual()?;
        let plan = diff(desired.as_ref(), &actual);
        let change = match &plan {
            Plan::Nothing => NatChange::Unchanged,
            Plan::Create {
                replace_existing: false,
                ..
            } => NatChange::Created,
            Plan::Create { .. } => NatChange::Rebuilt,
            Plan::ReplaceSets(sets) => NatChange::SetsReplaced(sets.iter().map(|s| s.0).collect()),
            Plan::DeleteTable => NatChange::Removed,
        };
        self.execute(&plan)?;
        match &change {
            NatChange::Unchanged => tracing::trace!(table = TABLE_NAME, "natOutgoing unchanged"),
            change => tracing::info!(table = TABLE_NAME, ?change, "natOutgoing applied"),
        }
        Ok(change)
    }

    /// Deletes tortie's table if it exists.
    pub fn remove(&mut self) -> Result<NatChange, NatError> {
        self.apply(&NatInputs::default())
    }

    /// Reads tortie's table (and only it) from the kernel.
    pub fn read_actual(&mut self) -> Result<Actual, NatError> {
        let mut exists = false;
        for payload in self.dump("tables", NFT_MSG_GETTABLE, &[])? {
            if decode_table_name(&payload)?.as_deref() == Some(TABLE_NAME) {
                exists = true;
            }
        }
        if !exists {
            return Ok(Actual { table: None });
        }
        let mut filter = Vec::new();
        put_str(&mut filter, NFTA_SET_TABLE, TABLE_NAME);
        let mut sets = Vec::new();
        for payload in self.dump("sets", NFT_MSG_GETSET, &filter)? {
            sets.extend(decode_set(&payload)?);
        }
        // NFTA_CHAIN_TABLE and NFTA_RULE_TABLE are attribute 1 too: the same filter fits.
        let mut chains = Vec::new();
        for payload in self.dump("chains", NFT_MSG_GETCHAIN, &filter)? {
            chains.extend(decode_chain(&payload)?);
        }
        let mut rules = Vec::new();
        for payload in self.dump("rules", NFT_MSG_GETRULE, &filter)? {
            rules.extend(decode_rule(&payload)?);
        }
        let mut elements = BTreeMap::new();
        for info in &sets {
            let Some(set) = NatSet::from_name(&info.name) else {
                continue;
            };
            let mut set_filter = Vec::new();
            put_str(&mut set_filter, NFTA_SET_ELEM_LIST_TABLE, TABLE_NAME);
            put_str(&mut set_filter, NFTA_SET_ELEM_LIST_SET, set.name());
            let mut found = Vec::new();
            for payload in self.dump(set.name(), NFT_MSG_GETSETELEM, &set_filter)? {
                decode_elements(&payload, &mut found)?;
            }
            found.sort();
            elements.insert(set, found);
        }
        Ok(Actual {
            table: Some(ActualTable {
                structure_matches: structure_matches(&sets, &chains, &rules),
                elements,
            }),
        })
    }

    /// Writes a plan as one nftables transaction: all of it takes effect, or none of it.
    pub fn execute(&mut self, plan: &Plan) -> Result<(), NatError> {
        let requests = requests_for(plan);
        if requests.is_empty() {
            return Ok(());
        }
        match self.transaction(&requests) {
            // The table vanished between reading and deleting: the goal is reached.
            Err(NatError::Kernel { errno, .. })
                if errno == libc::ENOENT && *plan == Plan::DeleteTable =>
            {
                Ok(())
            }
            other => other,
        }
    }

    /// Messages written to the kernel so far (batch markers included), for tests and metrics.
    pub fn messages_sent(&self) -> u64 {
        self.messages_sent
    }

    /// Transactions committed or attempted so far.
    pub fn transactions(&self) -> u64 {
        self.transactions
    }

    /// The nftables ruleset generation: it changes with every committed transaction, by anyone.
    pub fn generation(&mut self) -> Result<u32, NatError> {
        let seq = self.next_seq(1);
        self.send_buf.clear();
        let m = start_message(
            &mut self.send_buf,
            nft_type(NFT_MSG_GETGEN),
            NLM_F_REQUEST,
            seq,
            NFPROTO_UNSPEC,
        );
        finish_message(&mut self.send_buf, m);
        self.send()?;
        let fd = self.socket.as_raw_fd();
        for _ in 0..MAX_DATAGRAMS {
            let Some(n) = recv_into(fd, &mut self.recv_buf, 0)? else {
                break;
            };
            for msg in Messages::new(&self.recv_buf[..n]) {
                let msg = msg.map_err(|e| decode_err("generation", e.to_string()))?;
                if msg.seq != seq {
                    continue;
                }
                if msg.kind == NLMSG_ERROR {
                    let (errno, message) = decode_ack(msg.payload)?;
                    if errno != 0 {
                        return Err(NatError::Kernel {
                            operation: "read",
                            object: "ruleset generation".into(),
                            errno,
                            message,
                        });
                    }
                } else if msg.kind == nft_type(NFT_MSG_NEWGEN) {
                    for a in attrs(msg.payload.get(4..).unwrap_or(&[])) {
                        if let (NFTA_GEN_ID, v) = a? {
                            return be32("generation id", v);
                        }
                    }
                    return Err(decode_err("generation", "no NFTA_GEN_ID"));
                }
            }
        }
        Err(decode_err("generation", "no answer"))
    }

    /// Reserves `count` consecutive sequence numbers and returns the first.
    fn next_seq(&mut self, count: u32) -> u32 {
        if self.seq.checked_add(count + 1).is_none() {
            self.seq = 0;
        }
        let first = self.seq + 1;
        self.seq += count;
        first
    }

    fn send(&mut self) -> Result<(), NatError> {
        let sent = self
            .socket
            .send(&self.send_buf, 0)
            .map_err(io_err("sendmsg"))?;
        if sent != self.send_buf.len() {
            return Err(NatError::Io {
                op: "sendmsg",
                source: io::Error::other(format!("sent {sent} of {} bytes", self.send_buf.len())),
            });
        }
        Ok(())
    }

    /// Sends the requests as one transaction and reads an ACK for each.
    fn transaction(&mut self, requests: &[Request]) -> Result<(), NatError> {
        let total = requests.len() as u32 + 2;
        let begin_seq = self.next_seq(total);
        let end_seq = begin_seq + total - 1;
        self.send_buf.clear();
        encode_transaction(&mut self.send_buf, requests, begin_seq);
        self.transactions += 1;
        self.messages_sent += u64::from(total);
        self.send()?;

        let fd = self.socket.as_raw_fd();
        let mut answered = vec![false; requests.len()];
        let mut pending = requests.len();
        let mut first_failure: Option<NatError> = None;
        let mut batch_failure: Option<NatError> = None;
        let mut datagrams = 0;
        while pending > 0 {
            datagrams += 1;
            if datagrams > MAX_DATAGRAMS {
                return Err(decode_err("transaction", format!("{pending} ACKs missing")));
            }
            // nfnetlink answers a batch while processing the send, so once the batch itself
            // was refused every answer is already queued: drain without blocking.
            let flags = if batch_failure.is_some() {
                libc::MSG_DONTWAIT
            } else {
                0
            };
            let Some(n) = recv_into(fd, &mut self.recv_buf, flags)? else {
                break;
            };
            for msg in Messages::new(&self.recv_buf[..n]) {
                let msg = msg.map_err(|e| decode_err("transaction", e.to_string()))?;
                if msg.kind != NLMSG_ERROR {
                    continue;
                }
                let (errno, message) = decode_ack(msg.payload)?;
                if msg.seq == begin_seq || msg.seq == end_seq {
                    if errno != 0 && batch_failure.is_none() {
                        batch_failure = Some(NatError::Kernel {
                            operation: "commit",
                            object: format!("transaction on table inet {TABLE_NAME}"),
                            errno,
                            message,
                        });
                    }
                    continue;
                }
                let index = msg.seq.wrapping_sub(begin_seq + 1) as usize;
                let Some(done) = answered.get_mut(index) else {
                    continue; // an answer to an earlier, abandoned request
                };
                if !*done {
                    *done = true;
                    pending -= 1;
                }
                if errno != 0 && first_failure.is_none() {
                    first_failure = Some(NatError::Kernel {
                        operation: requests[index].operation(),
                        object: requests[index].object(),
                        errno,
                        message,
                    });
                }
            }
        }
        match first_failure.or(batch_failure) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Runs a dump of one nf_tables object type (family inet) and returns each answer's
    /// attributes (the nfgenmsg stripped). Restarts when the kernel flags it as interrupted.
    fn dump(&mut self, what: &str, msg: u16, filter: &[u8]) -> Result<Vec<Vec<u8>>, NatError> {
        let fd = self.socket.as_raw_fd();
        for _ in 0..DUMP_ATTEMPTS {
            let seq = self.next_seq(1);
            self.send_buf.clear();
            let m = start_message(
                &mut self.send_buf,
                nft_type(msg),
                NLM_F_REQUEST | NLM_F_DUMP,
                seq,
                NFPROTO_INET,
            );
            self.send_buf.extend_from_slice(filter);
            finish_message(&mut self.send_buf, m);
            self.send()?;
            let mut out = Vec::new();
            let mut interrupted = false;
            let mut done = false;
            for _ in 0..MAX_DATAGRAMS {
                let Some(n) = recv_into(fd, &mut self.recv_buf, 0)? else {
                    break;
                };
                for m in Messages::new(&self.recv_buf[..n]) {
                    let m = m.map_err(|e| decode_err(what, e.to_string()))?;
                    if m.seq != seq {
                        continue;
                    }
                    interrupted |= m.flags & NLM_F_DUMP_INTR != 0;
                    match m.kind {
                        NLMSG_DONE => done = true,
                        NLMSG_ERROR => {
                            let (errno, message) = decode_ack(m.payload)?;
                            if errno != 0 {
                                return Err(NatError::Kernel {
                                    operation: "list",
                                    object: format!("{what} of table inet {TABLE_NAME}"),
                                    errno,
                                    message,
                                });
                            }
                            done = true;
                        }
                        _ => out.push(m.payload.get(4..).unwrap_or(&[]).to_vec()),
                    }
                }
                if done {
                    break;
                }
            }
            if !done {
                return Err(decode_err(what, "dump never finished"));
            }
            if !interrupted {
                return Ok(out);
            }
        }
        Err(NatError::DumpInterrupted { what: what.into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn v4(s: &str, end: bool) -> SetElement {
        let a: std::net::Ipv4Addr = s.parse().unwrap();
        SetElement {
            key: a.octets().to_vec(),
            interval_end: end,
        }
    }

    fn v6(s: &str, end: bool) -> SetElement {
        let a: std::net::Ipv6Addr = s.parse().unwrap();
        SetElement {
            key: a.octets().to_vec(),
            interval_end: end,
        }
    }

    fn inputs(masq: &[&str], all: &[&str]) -> NatInputs {
        NatInputs {
            masquerade: nets(masq),
            all_pools: nets(all),
        }
    }

    #[test]
    fn no_masquerading_pool_means_no_table() {
        assert_eq!(desired(&inputs(&[], &["10.244.0.0/16"])), None);
        assert_eq!(desired(&NatInputs::default()), None);
    }

    #[test]
    fn each_range_is_a_start_and_an_end_one_past_it() {
        let d = desired(&inputs(&["10.244.0.0/16"], &["10.245.0.0/16"])).unwrap();
        assert_eq!(
            d.elements[&NatSet::MasqueradeV4],
            vec![v4("10.244.0.0", false), v4("10.245.0.0", true)]
        );
        // The masquerading pool is a pool too, and the two /16s touch: one merged range.
        assert_eq!(
            d.elements[&NatSet::AllPoolsV4],
            vec![v4("10.244.0.0", false), v4("10.246.0.0", true)]
        );
        assert!(d.elements[&NatSet::MasqueradeV6].is_empty());
        assert!(d.elements[&NatSet::AllPoolsV6].is_empty());
    }

    #[test]
    fn overlapping_ranges_merge_and_host_bits_are_ignored() {
        let d = desired(&inputs(
            &[
                "10.0.0.0/24",
                "10.0.0.128/25",
                "10.0.0.77/24",
                "10.9.0.0/16",
            ],
            &[],
        ))
        .unwrap();
        assert_eq!(
            d.elements[&NatSet::MasqueradeV4],
            vec![
                v4("10.0.0.0", false),
                v4("10.0.1.0", true),
                v4("10.9.0.0", false),
                v4("10.10.0.0", true),
            ]
        );
    }

    #[test]
    fn range_reaching_the_top_of_the_space_has_no_end_element() {
        let d = desired(&inputs(&["0.0.0.0/0", "::/0"], &[])).unwrap();
        assert_eq!(
            d.elements[&NatSet::MasqueradeV4],
            vec![v4("0.0.0.0", false)]
        );
        assert_eq!(d.elements[&NatSet::MasqueradeV6], vec![v6("::", false)]);
        let d = desired(&inputs(&["255.255.255.0/24"], &[])).unwrap();
        assert_eq!(
            d.elements[&NatSet::MasqueradeV4],
            vec![v4("255.255.255.0", false)]
        );
    }

    #[test]
    fn ipv6_pools_fill_only_the_ipv6_sets() {
        let d = desired(&inputs(&["fd44::/48"], &["fd45::/48"])).unwrap();
        assert!(d.elements[&NatSet::MasqueradeV4].is_empty());
        assert_eq!(
            d.elements[&NatSet::MasqueradeV6],
            vec![v6("fd44::", false), v6("fd44:0:1::", true)]
        );
        assert_eq!(d.elements[&NatSet::AllPoolsV6].len(), 4);
    }

    fn actual_of(d: &Desired, structure_matches: bool) -> Actual {
        Actual {
            table: Some(ActualTable {
                structure_matches,
                elements: d.elements.clone(),
            }),
        }
    }

    #[test]
    fn diff_creates_missing_table_and_deletes_unwanted_one() {
        let d = desired(&inputs(&["10.244.0.0/16"], &[])).unwrap();
        assert_eq!(
            diff(Some(&d), &Actual::default()),
            Plan::Create {
                replace_existing: false,
                desired: d.clone()
            }
        );
        assert_eq!(diff(None, &actual_of(&d, true)), Plan::DeleteTable);
        assert_eq!(diff(None, &Actual::default()), Plan::Nothing);
    }

    #[test]
    fn diff_of_a_matching_table_is_nothing() {
        let d = desired(&inputs(&["10.244.0.0/16"], &["10.96.0.0/12"])).unwrap();
        assert_eq!(diff(Some(&d), &actual_of(&d, true)), Plan::Nothing);
    }

    #[test]
    fn diff_rebuilds_a_table_whose_structure_is_wrong() {
        let d = desired(&inputs(&["10.244.0.0/16"], &[])).unwrap();
        assert_eq!(
            diff(Some(&d), &actual_of(&d, false)),
            Plan::Create {
                replace_existing: true,
                desired: d.clone()
            }
        );
    }

    #[test]
    fn diff_replaces_only_the_sets_that_differ() {
        let old = desired(&inputs(&["10.244.0.0/16"], &[])).unwrap();
        let new = desired(&inputs(&["10.244.0.0/16"], &["10.50.0.0/16"])).unwrap();
        assert_eq!(
            diff(Some(&new), &actual_of(&old, true)),
            Plan::ReplaceSets(vec![(
                NatSet::AllPoolsV4,
                new.elements[&NatSet::AllPoolsV4].clone()
            )])
        );
    }

    #[test]
    fn create_plan_builds_table_sets_elements_chain_then_rules() {
        let d = desired(&inputs(&["10.244.0.0/16"], &[])).unwrap();
        let reqs = requests_for(&Plan::Create {
            replace_existing: true,
            desired: d,
        });
        let kinds: Vec<String> = reqs.iter().map(|r| r.object()).collect();
        assert_eq!(reqs[0], Request::DeleteTable, "{kinds:?}");
        assert_eq!(reqs[1], Request::NewTable, "{kinds:?}");
        assert_eq!(reqs.len(), 2 + 4 + 2 + 1 + 2, "{kinds:?}");
        assert_eq!(reqs[reqs.len() - 3], Request::NewChain);
        assert!(matches!(
            reqs.last(),
            Some(Request::NewRule(MasqueradeRule::V6))
        ));
    }

    #[test]
    fn replace_plan_flushes_then_refills_in_chunks() {
        let many: Vec<SetElement> = (0..600u32)
            .map(|i| SetElement {
                key: (i * 4).to_be_bytes().to_vec(),
                interval_end: i % 2 == 1,
            })
            .collect();
        let reqs = requests_for(&Plan::ReplaceSets(vec![(NatSet::AllPoolsV4, many)]));
        assert_eq!(reqs[0], Request::FlushSet(NatSet::AllPoolsV4));
        assert_eq!(reqs.len(), 1 + 3, "600 elements in chunks of 256");
    }

    #[test]
    fn new_table_message_bytes() {
        let mut buf = Vec::new();
        Request::NewTable.encode(&mut buf, 7);
        let name_attr_len = 4 + TABLE_NAME.len() + 1; // 15, padded to 16
        let total = 16 + 4 + 16;
        assert_eq!(buf.len(), total);
        assert_eq!(&buf[0..4], &(total as u32).to_ne_bytes());
        assert_eq!(&buf[4..6], &((10u16 << 8) | NFT_MSG_NEWTABLE).to_ne_bytes());
        assert_eq!(
            &buf[6..8],
            &(NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE).to_ne_bytes()
        );
        assert_eq!(&buf[8..12], &7u32.to_ne_bytes());
        assert_eq!(&buf[16..20], &[NFPROTO_INET, 0, 0, 0]);
        assert_eq!(&buf[20..22], &(name_attr_len as u16).to_ne_bytes());
        assert_eq!(&buf[22..24], &NFTA_TABLE_NAME.to_ne_bytes());
        assert_eq!(&buf[24..35], b"tortie-nat\0");
        assert_eq!(buf[35], 0, "padding");
    }

    #[test]
    fn transaction_is_framed_by_batch_markers_for_nftables() {
        let mut buf = Vec::new();
        encode_transaction(&mut buf, &[Request::DeleteTable], 40);
        let msgs: Vec<_> = Messages::new(&buf).map(|m| m.unwrap()).collect();
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[0].kind, NFNL_MSG_BATCH_BEGIN);
        assert_eq!(msgs[0].seq, 40);
        // res_id carries the subsystem, big-endian.
        assert_eq!(msgs[0].payload, &[0, 0, 0, 10]);
        assert_eq!(msgs[1].kind, (10 << 8) | NFT_MSG_DELTABLE);
        assert_eq!(msgs[1].seq, 41);
        assert_eq!(msgs[1].flags, NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(msgs[2].kind, NFNL_MSG_BATCH_END);
        assert_eq!(msgs[2].seq, 42);
    }

    #[test]
    fn element_message_round_trips_through_the_dump_decoder() {
        let elements = vec![v4("10.244.0.0", false), v4("10.245.0.0", true)];
        let mut buf = Vec::new();
        Request::AddElements {
            set: NatSet::MasqueradeV4,
            elements: elements.clone(),
            with_set_id: false,
        }
        .encode(&mut buf, 1);
        let msg = Messages::new(&buf).next().unwrap().unwrap();
        let mut decoded = Vec::new();
        decode_elements(&msg.payload[4..], &mut decoded).unwrap();
        assert_eq!(decoded, elements);
    }

    #[test]
    fn rule_read_back_in_kernel_attribute_order_matches() {
        // The kernel dumps meta as (DREG, KEY) where we send (KEY, DREG), without the set ID
        // we send at creation, and with nests lacking NLA_F_NESTED.
        let mut dumped = Vec::new();
        for e in MasqueradeRule::V4.expressions(false) {
            if let Expr::Meta { key, dreg } = e {
                put_nested(&mut dumped, NFTA_LIST_ELEM, |b| {
                    put_str(b, NFTA_EXPR_NAME, "meta");
                    let start = b.len();
                    put_nested(b, NFTA_EXPR_DATA, |b| {
                        put_be32(b, NFTA_META_DREG, dreg);
                        put_be32(b, NFTA_META_KEY, key);
                    });
                    b[start + 2..start + 4].copy_from_slice(&NFTA_EXPR_DATA.to_ne_bytes());
                });
            } else {
                e.encode(&mut dumped);
            }
        }
        let rule = RuleInfo {
            chain: CHAIN_NAME.into(),
            expressions: canonical_expressions(&dumped).unwrap(),
        };
        assert_eq!(rule.expressions, MasqueradeRule::V4.canonical());
        assert_ne!(rule.expressions, MasqueradeRule::V6.canonical());
        let lookups: Vec<_> = rule
            .expressions
            .iter()
            .filter(|e| e.name == "lookup")
            .collect();
        assert_eq!(lookups.len(), 2);
        assert!(
            lookups[1]
                .attributes
                .contains(&(NFTA_LOOKUP_FLAGS, NFT_LOOKUP_F_INV.to_be_bytes().to_vec())),
            "destination lookup is negated: {lookups:?}"
        );
    }

    fn good_structure() -> (Vec<SetInfo>, Vec<ChainInfo>, Vec<RuleInfo>) {
        let sets = NatSet::ALL
            .iter()
            .map(|s| SetInfo {
                name: s.name().into(),
                flags: NFT_SET_INTERVAL,
                key_type: s.key_type(),
                key_len: s.key_len(),
            })
            .collect();
        let chains = vec![ChainInfo {
            name: CHAIN_NAME.into(),
            hook: Some((NF_INET_POST_ROUTING, 100)),
            policy: Some(NF_ACCEPT),
            kind: Some("nat".into()),
        }];
        let rules = MasqueradeRule::BOTH
            .iter()
            .map(|r| RuleInfo {
                chain: CHAIN_NAME.into(),
                expressions: r.canonical(),
            })
            .collect();
        (sets, chains, rules)
    }

    #[test]
    fn structure_check_accepts_ours_and_refuses_extras_or_changes() {
        let (sets, chains, rules) = good_structure();
        assert!(structure_matches(&sets, &chains, &rules));

        let mut extra_rule = rules.clone();
        extra_rule.push(RuleInfo {
            chain: CHAIN_NAME.into(),
            expressions: vec![],
        });
        assert!(!structure_matches(&sets, &chains, &extra_rule));

        let mut moved = chains.clone();
        moved[0].hook = Some((NF_INET_POST_ROUTING, -100));
        assert!(!structure_matches(&sets, &moved, &rules));

        let mut dropping = chains.clone();
        dropping[0].policy = Some(0);
        assert!(!structure_matches(&sets, &dropping, &rules));

        assert!(!structure_matches(&sets[..3], &chains, &rules));
        let mut swapped = rules.clone();
        swapped.reverse();
        assert!(!structure_matches(&sets, &chains, &swapped));
    }

    #[test]
    fn attribute_longer_than_its_buffer_is_refused() {
        let mut data = vec![0u8; 8];
        data[0..2].copy_from_slice(&32u16.to_ne_bytes());
        assert!(attrs(&data).next().unwrap().is_err());
    }

    #[test]
    fn ack_decoding_yields_errno_and_extack_text() {
        let mut p = Vec::new();
        p.extend_from_slice(&(-2i32).to_ne_bytes());
        p.extend_from_slice(&[0u8; NLMSG_HDRLEN]);
        put_str(&mut p, NLMSGERR_ATTR_MSG, "No such file");
        assert_eq!(
            decode_ack(&p).unwrap(),
            (libc::ENOENT, Some("No such file".to_string()))
        );
    }

    #[test]
    fn kernel_error_names_the_object_and_errno() {
        let e = NatError::Kernel {
            operation: Request::NewChain.operation(),
            object: Request::NewChain.object(),
            errno: libc::EOPNOTSUPP,
            message: None,
        };
        let text = e.to_string();
        assert!(
            text.contains("create chain inet tortie-nat postrouting")
                && text.contains(&format!("errno {}", libc::EOPNOTSUPP)),
            "{text}"
        );
    }

    #[test]
    fn addresses_of_the_wrong_family_are_left_out() {
        let d = desired(&inputs(&["10.244.0.0/16", "fd44::/48"], &[])).unwrap();
        assert_eq!(d.elements[&NatSet::MasqueradeV4].len(), 2);
        assert_eq!(d.elements[&NatSet::MasqueradeV6].len(), 2);
    }
}
