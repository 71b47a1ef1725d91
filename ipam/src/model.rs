//! Calico `crd.projectcalico.org/v1` IPAM objects: exact JSON field names, object naming, lossless round trip.
//!
//! Every struct keeps the fields it does not know in an `extra` map (`#[serde(flatten)]`), and
//! optional fields are `Option` so that "absent" and "present with the default value" both survive
//! a read-modify-write: an object written by Calico goes back out with every field it came with.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// `apiVersion` of every object in this module.
pub const API_VERSION: &str = "crd.projectcalico.org/v1";

/// Name of the single cluster-wide IPAMConfig object Calico reads.
pub const IPAM_CONFIG_NAME: &str = "default";

/// A Calico custom resource kind this crate reads and writes through a [`crate::Store`].
pub trait Resource: Clone + Send + Sync + Serialize + DeserializeOwned + 'static {
    /// The `kind` field, e.g. `IPAMBlock`.
    const KIND: &'static str;
    /// The plural resource name in the API path, e.g. `ipamblocks`.
    const PLURAL: &'static str;
    /// Object metadata (name, resourceVersion, …).
    fn metadata(&self) -> &ObjectMeta;
    /// Mutable object metadata; stores set `resourceVersion` through this.
    fn metadata_mut(&mut self) -> &mut ObjectMeta;
}

/// The part of Kubernetes `metadata` IPAM looks at; everything else (uid, creationTimestamp,
/// managedFields, ownerReferences, …) is kept verbatim in `extra`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Object name (cluster scoped: no namespace).
    #[serde(default)]
    pub name: String,
    /// Opaque revision used for compare-and-swap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// Labels, kept as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Annotations, kept as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Every other metadata field, untouched.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ObjectMeta {
    /// Metadata for a new object with only a name.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }
}

fn default_api_version() -> String {
    API_VERSION.to_string()
}

/// Deserializes JSON `null` as the type's default (Go writes nil slices and maps as `null`).
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

// serde's `default = "path"` needs a function path string per kind.
macro_rules! kind_default_fn {
    ($fn_name:ident, $kind:literal) => {
        fn $fn_name() -> String {
            $kind.to_string()
        }
    };
}
kind_default_fn!(kind_ip_pool, "IPPool");
kind_default_fn!(kind_ipam_block, "IPAMBlock");
kind_default_fn!(kind_block_affinity, "BlockAffinity");
kind_default_fn!(kind_ipam_handle, "IPAMHandle");
kind_default_fn!(kind_ipam_config, "IPAMConfig");

macro_rules! calico_resource {
    ($(#[$doc:meta])* $name:ident, $spec:ty, $kind:literal, $plural:literal, $kind_fn:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        pub struct $name {
            /// Always `crd.projectcalico.org/v1` (filled in when a list item omits it).
            #[serde(rename = "apiVersion", default = "default_api_version")]
            pub api_version: String,
            /// The kind name (filled in when a list item omits it).
            #[serde(default = $kind_fn)]
            pub kind: String,
            /// Object metadata.
            #[serde(default)]
            pub metadata: ObjectMeta,
            /// The Calico spec.
            pub spec: $spec,
            /// Top-level fields this crate does not know (e.g. `status`), kept verbatim.
            #[serde(flatten)]
            pub extra: Map<String, Value>,
        }

        impl $name {
            /// A new object with the given name and spec.
            pub fn new(name: impl Into<String>, spec: $spec) -> Self {
                Self {
                    api_version: API_VERSION.to_string(),
                    kind: $kind.to_string(),
                    metadata: ObjectMeta::named(name),
                    spec,
                    extra: Map::new(),
                }
            }
        }

        impl Resource for $name {
            const KIND: &'static str = $kind;
            const PLURAL: &'static str = $plural;
            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

calico_resource!(
    /// `IPPool`: a CIDR from which blocks are carved.
    IpPool, IpPoolSpec, "IPPool", "ippools", "kind_ip_pool"
);
calico_resource!(
    /// `IPAMBlock`: one block of a pool and its allocations; named by [`block_name`].
    IpamBlock, IpamBlockSpec, "IPAMBlock", "ipamblocks", "kind_ipam_block"
);
calico_resource!(
    /// `BlockAffinity`: a host's claim on a block; named by [`affinity_name`].
    BlockAffinity, BlockAffinitySpec, "BlockAffinity", "blockaffinities", "kind_block_affinity"
);
calico_resource!(
    /// `IPAMHandle`: how many addresses a handle holds in each block; named by [`handle_name`].
    IpamHandle, IpamHandleSpec, "IPAMHandle", "ipamhandles", "kind_ipam_handle"
);
calico_resource!(
    /// `IPAMConfig`: the cluster-wide IPAM settings, object `default`.
    IpamConfig, IpamConfigSpec, "IPAMConfig", "ipamconfigs", "kind_ipam_config"
);

/// Deprecated APIv1 `ipip` block of a pool (`spec.ipip`), read only for compatibility.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LegacyIpip {
    /// `enabled`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// `mode`: `always` or `cross-subnet`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Unknown fields, kept.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `IPPool.spec`. Calico's CRD has no defaults: absent fields are defaulted by
/// [`crate::Pool::from_resource`], never written back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IpPoolSpec {
    /// `cidr` (required).
    pub cidr: String,
    /// `blockSize`; kept as a wide integer so an out-of-range value is reported, not a parse error.
    #[serde(rename = "blockSize", default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<i64>,
    /// `ipipMode`: `Never`, `Always` or `CrossSubnet`.
    #[serde(rename = "ipipMode", default, skip_serializing_if = "Option::is_none")]
    pub ipip_mode: Option<String>,
    /// `vxlanMode`: `Never`, `Always` or `CrossSubnet`.
    #[serde(rename = "vxlanMode", default, skip_serializing_if = "Option::is_none")]
    pub vxlan_mode: Option<String>,
    /// `natOutgoing`
    #[serde(
        rename = "natOutgoing",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub nat_outgoing: Option<bool>,
    /// `disabled`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    /// `disableBGPExport`
    #[serde(
        rename = "disableBGPExport",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub disable_bgp_export: Option<bool>,
    /// `nodeSelector`, Calico selector syntax.
    #[serde(
        rename = "nodeSelector",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub node_selector: Option<String>,
    /// `allowedUses`: `Workload`, `Tunnel`.
    #[serde(
        rename = "allowedUses",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub allowed_uses: Option<Vec<String>>,
    /// Deprecated `ipip` (APIv1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipip: Option<LegacyIpip>,
    /// Deprecated `nat-outgoing` (APIv1).
    #[serde(
        rename = "nat-outgoing",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub nat_outgoing_legacy: Option<bool>,
    /// Unknown fields (e.g. newer Calico's `assignmentMode`), kept.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One entry of `IPAMBlock.spec.attributes`: who owns the allocations pointing at it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AllocationAttribute {
    /// `handle_id` (snake case in Calico's JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle_id: Option<String>,
    /// `secondary`: namespace, pod, node, timestamp, type…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<BTreeMap<String, String>>,
    /// Unknown fields, kept.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `IPAMBlock.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IpamBlockSpec {
    /// `cidr`
    pub cidr: String,
    /// `affinity`: `host:<node>` or absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<String>,
    /// `allocations`: per ordinal, `null` when free, else an index into `attributes`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub allocations: Vec<Option<u32>>,
    /// `unallocated`: ordered free list; assignment takes from the front, release appends.
    #[serde(default, deserialize_with = "null_as_default")]
    pub unallocated: Vec<u32>,
    /// `attributes`
    #[serde(default, deserialize_with = "null_as_default")]
    pub attributes: Vec<AllocationAttribute>,
    /// `deleted`: set by Calico just before deleting the block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<bool>,
    /// `sequenceNumber`, bumped on every write that changes allocations.
    #[serde(rename = "sequenceNumber", default)]
    pub sequence_number: u64,
    /// `sequenceNumberForAllocation`: ordinal (as a string) → block sequence number at allocation.
    #[serde(
        rename = "sequenceNumberForAllocation",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub sequence_number_for_allocation: Option<BTreeMap<String, u64>>,
    /// `strictAffinity`: deprecated on blocks, always written `false` by Calico.
    #[serde(rename = "strictAffinity", default)]
    pub strict_affinity: bool,
    /// Unknown fields, kept.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `BlockAffinity.spec.state`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AffinityState {
    /// `pending`: claimed, block not yet created.
    Pending,
    /// `confirmed`: the block exists and belongs to the node.
    Confirmed,
    /// `pendingDeletion`: being released.
    PendingDeletion,
    /// Anything else, kept as written.
    Other(String),
}

impl AffinityState {
    /// The JSON string.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Pending => "pending",
            Self::Confirmed => "confirmed",
            Self::PendingDeletion => "pendingDeletion",
            Self::Other(s) => s,
        }
    }
}

impl Serialize for AffinityState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for AffinityState {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Ok(match s.as_str() {
            "pending" => Self::Pending,
            "confirmed" => Self::Confirmed,
            "pendingDeletion" => Self::PendingDeletion,
            _ => Self::Other(s),
        })
    }
}

/// `BlockAffinity.spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockAffinitySpec {
    /// `state`
    pub state: AffinityState,
    /// `node`
    pub node: String,
    /// `cidr`
    pub cidr: String,
    /// `deleted`: a *string* `"true"`/`"false"` for compatibility with old Calico releases.
    #[serde(default)]
    pub deleted: String,
    /// Unknown fields, kept.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `IPAMHandle.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IpamHandleSpec {
    /// `handleID`, e.g. `k8s-pod-network.<containerID>`.
    #[serde(rename = "handleID")]
    pub handle_id: String,
    /// `block`: block CIDR string → number of addresses this handle holds there.
    #[serde(default, deserialize_with = "null_as_default")]
    pub block: BTreeMap<String, i64>,
    /// `deleted`: set by Calico just before deleting the handle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<bool>,
    /// Unknown fields, kept.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `IPAMConfig.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IpamConfigSpec {
    /// `strictAffinity`: when true a host never borrows from another host's block.
    #[serde(rename = "strictAffinity", default)]
    pub strict_affinity: bool,
    /// `autoAllocateBlocks`: when false hosts never claim new blocks.
    #[serde(rename = "autoAllocateBlocks", default)]
    pub auto_allocate_blocks: bool,
    /// `maxBlocksPerHost`: 0 means the default (see [`crate::IpamSettings`]).
    #[serde(
        rename = "maxBlocksPerHost",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub max_blocks_per_host: Option<i64>,
    /// Unknown fields, kept.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The Kubernetes-safe form of a CIDR used in object names: `.`, `:` and `/` become `-`
/// (`10.244.1.0/26` → `10-244-1-0-26`, `fd00:10:244::/122` → `fd00-10-244---122`).
pub fn cidr_to_name(cidr: &IpNet) -> String {
    cidr.to_string().replace(['.', ':', '/'], "-")
}

/// Object name of the IPAMBlock for `cidr`.
pub fn block_name(cidr: &IpNet) -> String {
    cidr_to_name(cidr)
}

/// Longest Kubernetes object name.
const MAX_NAME_LEN: usize = 253;

/// Object name of the BlockAffinity of `node` for `cidr`: `<node>-<cidr name>`. A name that would
/// reach 253 characters is shortened as Calico does: the node part is cut so that
/// `-<cidr name>-<11 hex digits of sha256("<node>+<cidr name>")>` fits.
pub fn affinity_name(node: &str, cidr: &IpNet) -> String {
    let cidr_name = cidr_to_name(cidr);
    let name = format!("{node}-{cidr_name}");
    if name.len() < MAX_NAME_LEN {
        return name;
    }
    let keep = (MAX_NAME_LEN - 1).saturating_sub(cidr_name.len() + 13);
    // Node names are DNS subdomains (ASCII), but never split a character whatever arrives.
    let mut cut = keep.min(node.len());
    while !node.is_char_boundary(cut) {
        cut -= 1;
    }
    let digest = Sha256::digest(format!("{node}+{cidr_name}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{cidr_name}-{}", &node[..cut], &hex[..11])
}

/// Object name of the IPAMHandle for a handle ID (Kubernetes names are lower case).
pub fn handle_name(handle_id: &str) -> String {
    handle_id.to_lowercase()
}

/// The block `affinity` value for a node: `host:<node>`.
pub fn host_affinity(node: &str) -> String {
    format!("host:{node}")
}

/// Handle ID Calico's CNI plugin uses for a pod sandbox.
pub fn pod_handle_id(container_id: &str) -> String {
    format!("k8s-pod-network.{container_id}")
}

/// Secondary attribute keys Calico writes on allocations.
pub mod attr {
    /// Pod namespace.
    pub const NAMESPACE: &str = "namespace";
    /// Pod name.
    pub const POD: &str = "pod";
    /// Node the allocation was made for.
    pub const NODE: &str = "node";
    /// Allocation time as written by the caller.
    pub const TIMESTAMP: &str = "timestamp";
    /// Allocation type (tunnel addresses).
    pub const TYPE: &str = "type";
    /// `type` value of an IPIP tunnel address.
    pub const TYPE_IPIP_TUNNEL: &str = "ipipTunnelAddress";
    /// `type` value of a VXLAN tunnel address.
    pub const TYPE_VXLAN_TUNNEL: &str = "vxlanTunnelAddress";
    /// `type` value of an IPv6 VXLAN tunnel address.
    pub const TYPE_VXLAN_V6_TUNNEL: &str = "vxlanV6TunnelAddress";
}

/// Secondary attributes of a pod's allocation, as Calico's CNI plugin writes them.
pub fn workload_attributes(
    namespace: &str,
    pod: &str,
    node: &str,
    timestamp: &str,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        (attr::NAMESPACE.to_string(), namespace.to_string()),
        (attr::POD.to_string(), pod.to_string()),
        (attr::NODE.to_string(), node.to_string()),
        (attr::TIMESTAMP.to_string(), timestamp.to_string()),
    ])
}

/// The address family of an address or network, as 4 or 6.
pub(crate) fn family(addr: &IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 4,
        IpAddr::V6(_) => 6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_calico() {
        let v4: IpNet = "10.244.1.0/26".parse().unwrap();
        let v6: IpNet = "fd00:10:244::40/122".parse().unwrap();
        assert_eq!(block_name(&v4), "10-244-1-0-26");
        assert_eq!(block_name(&v6), "fd00-10-244--40-122");
        assert_eq!(
            affinity_name("node-1.example.com", &v4),
            "node-1.example.com-10-244-1-0-26"
        );
        assert_eq!(handle_name("K8s-Pod-Network.ABC"), "k8s-pod-network.abc");
    }

    #[test]
    fn overlong_affinity_names_are_cut_and_hashed() {
        let v4: IpNet = "10.244.1.0/26".parse().unwrap();
        let node = "n".repeat(300);
        let name = affinity_name(&node, &v4);
        assert!(name.len() < 253, "{}", name.len());
        assert_eq!(name.len(), 252);
        let (head, hash) = name.rsplit_once('-').unwrap();
        assert!(head.ends_with("-10-244-1-0-26"));
        assert_eq!(hash.len(), 11);
        assert!(hash.chars().all(|c| c.is_ascii_hexdigit()));
        let other = affinity_name(&format!("{}m", "n".repeat(299)), &v4);
        assert_ne!(name, other, "the hash keeps long names apart");
        // Just below the limit nothing changes.
        let node = "n".repeat(252 - 1 - 13);
        assert_eq!(affinity_name(&node, &v4), format!("{node}-10-244-1-0-26"));
    }
}
