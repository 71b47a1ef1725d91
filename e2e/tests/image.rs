//! The DaemonSet image (`make image`): reproducible, only the static binary, and an OCI archive
//! that skopeo reads (containerd's `ctr images import` takes it in `cluster_install`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use tortie_e2e::cluster::workspace_root;
use tortie_e2e::kubelet_cluster::image_dir;

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tortie-{}-image-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn archive_digest(rootfs: &Path, out: &Path, epoch: &str) -> Result<String> {
    let printed = run(Command::new(workspace_root().join("image/oci-archive.sh"))
        .env("SOURCE_DATE_EPOCH", epoch)
        .arg(rootfs)
        .arg("example:1")
        .arg(out)
        .arg(r#"["/bin/app"]"#))?;
    Ok(printed
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

#[test]
fn the_same_files_give_the_same_image_digest() -> Result<()> {
    let dir = scratch("repro");
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin"))?;
    std::fs::write(rootfs.join("bin/app"), b"#!/bin/sh\necho hi\n")?;
    let first = archive_digest(&rootfs, &dir.join("a.tar"), "0")?;
    // New modification times and a second run: nothing of the build's moment may leak in.
    run(Command::new("touch")
        .arg("-d")
        .arg("2020-01-01")
        .arg(rootfs.join("bin/app")))?;
    let second = archive_digest(&rootfs, &dir.join("b.tar"), "0")?;
    assert_eq!(first, second, "same files, different digests");
    assert_eq!(
        std::fs::read(dir.join("a.tar"))?,
        std::fs::read(dir.join("b.tar"))?,
        "same files, different archives"
    );
    // The digest does follow the content and the declared epoch.
    let later = archive_digest(&rootfs, &dir.join("c.tar"), "86400")?;
    assert_ne!(first, later, "SOURCE_DATE_EPOCH ignored");
    std::fs::write(rootfs.join("bin/app"), b"#!/bin/sh\necho bye\n")?;
    let changed = archive_digest(&rootfs, &dir.join("d.tar"), "0")?;
    assert_ne!(first, changed, "a changed file kept the digest");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn tortie_image_holds_only_the_static_binary_and_rebuilds_to_the_same_digest() -> Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    let archive = image_dir().join(format!("tortie-{version}.oci.tar"));
    if !archive.is_file() {
        if std::env::var_os("TORTIE_REQUIRE_KUBE").is_some() {
            bail!("{} missing: `make image` builds it", archive.display());
        }
        eprintln!("SKIP: {} missing (run `make image`)", archive.display());
        return Ok(());
    }
    let recorded = std::fs::read_to_string(image_dir().join(format!("tortie-{version}.digest")))?;
    // skopeo reads it as an OCI archive and finds the manifest the build recorded.
    let inspect = run(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci-archive:{}", archive.display())))?;
    let inspected: serde_json::Value = serde_json::from_str(&inspect)?;
    assert_eq!(inspected["Digest"].as_str(), Some(recorded.trim()));
    assert_eq!(inspected["Architecture"], "amd64");

    // One layer: the binary and /tmp, nothing else; the binary has no ELF interpreter.
    let dir = scratch("layer");
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&dir))?;
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("index.json"))?)?;
    let manifest_digest = index["manifests"][0]["digest"].as_str().context("index")?;
    let blob = |digest: &str| {
        dir.join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(manifest_digest))?)?;
    let layers = manifest["layers"].as_array().context("layers")?;
    assert_eq!(layers.len(), 1, "{manifest}");
    let layer = blob(layers[0]["digest"].as_str().context("layer digest")?);
    let listing = run(Command::new("tar").arg("-tzf").arg(&layer))?;
    let entries: Vec<&str> = listing.lines().collect();
    assert_eq!(
        entries,
        [
            "tmp/",
            "usr/",
            "usr/local/",
            "usr/local/bin/",
            "usr/local/bin/tortie"
        ]
    );
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&layer)
        .arg("-C")
        .arg(&dir))?;
    let binary = std::fs::read(dir.join("usr/local/bin/tortie"))?;
    assert!(
        !contains(&binary, b"ld-linux"),
        "the binary asks for a dynamic loader"
    );
    std::fs::remove_dir_all(&dir)?;

    // Built again from the same sources: the same digest.
    let printed = run(&mut Command::new(workspace_root().join("image/build.sh")))?;
    assert!(
        printed.contains(&format!("digest={}", recorded.trim())),
        "rebuild gave another image: {printed} (recorded {recorded})"
    );
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
