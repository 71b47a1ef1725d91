//! `tortie install-cni`: puts the running binary where the runtime looks for plugins.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The plugin's file name: the conflist's `"type": "tortie"` resolves to it.
pub const PLUGIN_NAME: &str = "tortie";

/// Copies the running executable to `<bin_dir>/tortie` (mode 0755) through a temporary file
/// and a rename, so a runtime starting the plugin meanwhile sees the old or the new binary,
/// never a partial one. Returns the installed path.
pub fn install(bin_dir: &Path) -> Result<PathBuf> {
    let source = std::env::current_exe().context("finding the running tortie binary")?;
    install_from(&source, bin_dir)
}

pub fn install_from(source: &Path, bin_dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;
    let target = bin_dir.join(PLUGIN_NAME);
    let tmp = bin_dir.join(format!(".{PLUGIN_NAME}.tmp-{}", std::process::id()));
    let copy = || -> Result<()> {
        let bytes =
            std::fs::read(source).with_context(|| format!("reading {}", source.display()))?;
        let mut file =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(&bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o755))?;
        file.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, &target)
            .with_context(|| format!("renaming {} to {}", tmp.display(), target.display()))?;
        Ok(())
    };
    if let Err(e) = copy() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_replaces_an_existing_plugin_and_leaves_no_temp_file() {
        let dir = std::env::temp_dir().join(format!("tortie-install-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let source = dir.join("source");
        std::fs::write(&source, b"new binary").unwrap();
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join(PLUGIN_NAME), b"old").unwrap();

        let target = install_from(&source, &bin).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new binary");
        let mode = std::fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        let names: Vec<_> = std::fs::read_dir(&bin)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(PLUGIN_NAME)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
