//! The CNI side of tortie: the plugin the container runtime runs, and the conflist the agent
//! writes once the node can serve pods.

pub mod install;
pub mod plugin;
pub mod spec;
pub mod veth_reaper;

use std::path::Path;

use anyhow::{Context, Result};

pub const CONFLIST_NAME: &str = "10-tortie.conflist";

/// Writes the conflist atomically (temp file + rename), so the runtime never reads half a file.
pub fn write_conflist(dir: &Path, mtu: u32, run_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut plugin = serde_json::json!({ "type": "tortie", "mtu": mtu, "log_level": "info" });
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
