//! The CNI side of tortie: the plugin the container runtime runs, and the conflist the agent
//! writes once the node can serve pods.

pub mod install;
pub mod plugin;
pub mod spec;
pub mod veth_reaper;

use std::path::Path;

use anyhow::{Context, Result};

pub const CONFLIST_NAME: &str = "10-tortie.conflist";

/// Which address families pods of this node get (the conflist's `assign_ipv4`/`assign_ipv6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodFamilies {
    pub ipv4: bool,
    pub ipv6: bool,
}

impl PodFamilies {
    /// A family when the node has an address of it and an enabled pool of it exists (Calico's
    /// dual-stack setup: `IP6` set and an IPv6 pool); IPv4 alone when neither holds yet.
    pub fn of_node(node_v4: bool, node_v6: bool, pool_v4: bool, pool_v6: bool) -> Self {
        let ipv4 = node_v4 && pool_v4;
        let ipv6 = node_v6 && pool_v6;
        if ipv4 || ipv6 {
            Self { ipv4, ipv6 }
        } else {
            Self {
                ipv4: true,
                ipv6: false,
            }
        }
    }
}

/// Writes the conflist atomically (temp file + rename), so the runtime never reads half a file.
pub fn write_conflist(dir: &Path, mtu: u32, run_dir: &Path, families: PodFamilies) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut plugin = serde_json::json!({
        "type": "tortie",
        "mtu": mtu,
        "log_level": "info",
        // As Calico writes it, so tools reading Calico's conflist read this one too.
        "ipam": {
            "type": "calico-ipam",
            "assign_ipv4": families.ipv4.to_string(),
            "assign_ipv6": families.ipv6.to_string(),
        },
    });
    // The runtime passes plugins no environment of ours: a non-default socket dir must be in
    // the config itself.
    if run_dir != Path::new("/run/tortie") {
        plugin["tortie_run_dir"] = serde_json::json!(run_dir);
    }
    let conf = serde_json::json!({
        "name": "k8s-pod-network",
        "cniVersion": "1.0.0",
        "plugins": [
            plugin,
            { "type": "portmap", "snat": true, "capabilities": { "portMappings": true } }
        ]
    });
    let path = dir.join(CONFLIST_NAME);
    let tmp = dir.join(format!(".{CONFLIST_NAME}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&conf)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plugin's config as the runtime hands it over: the conflist's entry plus its name
    /// and version.
    fn plugin_conf(dir: &Path) -> spec::NetConf {
        let list: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(CONFLIST_NAME)).unwrap()).unwrap();
        let mut plugin = list["plugins"][0].clone();
        plugin["name"] = list["name"].clone();
        plugin["cniVersion"] = list["cniVersion"].clone();
        spec::NetConf::parse(plugin.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn families_follow_the_nodes_addresses_and_the_pools() {
        let of = PodFamilies::of_node;
        let v4 = PodFamilies {
            ipv4: true,
            ipv6: false,
        };
        assert_eq!(of(true, false, true, true), v4);
        assert_eq!(
            of(true, true, true, true),
            PodFamilies {
                ipv4: true,
                ipv6: true
            }
        );
        assert_eq!(of(true, true, true, false), v4, "no IPv6 pool yet");
        assert_eq!(
            of(false, true, true, true),
            PodFamilies {
                ipv4: false,
                ipv6: true
            },
            "an IPv6-only node"
        );
        assert_eq!(
            of(true, false, false, false),
            v4,
            "no pool at all: IPv4 as Calico"
        );
    }

    #[test]
    fn the_conflist_tells_the_plugin_which_families_to_assign() {
        let dir = std::env::temp_dir().join(format!("tortie-conflist-{}", std::process::id()));
        let run_dir = Path::new("/run/tortie");
        for (ipv4, ipv6) in [(true, false), (true, true), (false, true)] {
            write_conflist(&dir, 1450, run_dir, PodFamilies { ipv4, ipv6 }).unwrap();
            let conf = plugin_conf(&dir);
            assert_eq!((conf.assign_ipv4, conf.assign_ipv6), (ipv4, ipv6));
            assert_eq!(conf.mtu, Some(1450));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
