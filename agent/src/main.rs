//! The `tortie` binary: node agent, CNI plugin and operator commands.

mod agent;
mod assigner;
mod autodetect;
mod bootstrap;
mod cluster;
mod cni;
mod config;
mod datastore;
mod gc;
mod http;
mod local_api;
mod metrics;
mod releases;
mod routing;

use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "tortie",
    version,
    about = "Calico-compatible pod networking in one process"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs the node agent (as calico-node does), configured by calico-node's env vars.
    Agent {
        /// Log as JSON lines.
        #[arg(long, env = "TORTIE_LOG_JSON")]
        log_json: bool,
    },
    /// Shows this node's BGP sessions, blocks and routes (like `calicoctl node status`).
    Status {
        #[arg(long, env = "TORTIE_RUN_DIR", default_value = "/run/tortie")]
        run_dir: std::path::PathBuf,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// preStop hook: sets the Node's NetworkUnavailable condition before the agent stops.
    Shutdown {
        #[arg(long, env = "TORTIE_RUN_DIR", default_value = "/run/tortie")]
        run_dir: std::path::PathBuf,
    },
    /// Prints the node address autodetection would choose (IP_AUTODETECTION_METHOD).
    DetectAddress {
        #[arg(long, env = "IP_AUTODETECTION_METHOD", default_value = "first-found")]
        method: String,
        #[arg(long)]
        ipv6: bool,
    },
    /// Checks that the datastore keeps the IPAM store's compare-and-swap contract (create,
    /// read, update and delete of a scratch IPAMHandle) with this kubeconfig's identity: an
    /// install and RBAC check before the agents run.
    CheckDatastore {
        /// Prefix of the scratch handle's name (removed again on success).
        #[arg(long, default_value = "tortie-check")]
        name_prefix: String,
    },
    /// Installs this binary as the CNI plugin (`<dir>/tortie`, atomically replaced).
    InstallCni {
        #[arg(long, env = "CNI_BIN_DIR", default_value = "/opt/cni/bin")]
        cni_bin_dir: std::path::PathBuf,
    },
}

fn init_logging(json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> Result<()> {
    // The runtime runs the plugin as `/opt/cni/bin/tortie` with no arguments; CNI_COMMAND
    // is what tells a plugin invocation from an operator's.
    if std::env::var_os("CNI_COMMAND").is_some() {
        std::process::exit(cni::plugin::run());
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Agent { log_json } => {
            init_logging(log_json);
            let env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
            let cfg = config::from_env(&env)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(agent::run(cfg))
        }
        Command::Status { run_dir, json } => {
            let reply = local_api::call(
                &local_api::socket_path(&run_dir),
                &local_api::Request::Status,
                Duration::from_secs(5),
            )?;
            let Some(status) = reply.status else {
                bail!("agent error: {}", reply.error.unwrap_or_default());
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(())
        }
        Command::Shutdown { run_dir } => {
            let reply = local_api::call(
                &local_api::socket_path(&run_dir),
                &local_api::Request::Shutdown,
                Duration::from_secs(10),
            )?;
            if !reply.ok {
                bail!("agent error: {}", reply.error.unwrap_or_default());
            }
            Ok(())
        }
        Command::DetectAddress { method, ipv6 } => {
            let method = autodetect::Method::parse(&method)?;
            let addrs = autodetect::interface_addrs()?;
            println!("{}", autodetect::select(&method, &addrs, ipv6, &[])?);
            Ok(())
        }
        Command::CheckDatastore { name_prefix } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let client = kube::Client::try_default().await?;
                let store = datastore::ipam_store::KubeIpamStore::new(client);
                tortie_ipam::check_store_contract(&store, &name_prefix).await?;
                println!("datastore keeps the IPAM compare-and-swap contract");
                Ok(())
            })
        }
        Command::InstallCni { cni_bin_dir } => {
            let path = cni::install::install(&cni_bin_dir)?;
            println!("installed the tortie CNI plugin as {}", path.display());
            Ok(())
        }
    }
}

fn print_status(s: &serde_json::Value) {
    println!(
        "tortie on node {} ({}), AS {}, {}",
        s["node"].as_str().unwrap_or("?"),
        s["address"].as_str().unwrap_or("no address"),
        s["as_number"],
        if s["ready"].as_bool() == Some(true) {
            "ready"
        } else {
            "NOT ready"
        }
    );
    println!("\nBGP peers:");
    println!(
        "  {:<40} {:<8} {:<12} {:<22} PREFIXES",
        "PEER", "AS", "STATE", "SINCE"
    );
    for p in s["peers"].as_array().into_iter().flatten() {
        println!(
            "  {:<40} {:<8} {:<12} {:<22} {}",
            p["address"].as_str().unwrap_or("?"),
            p["as"],
            p["state"].as_str().unwrap_or("?"),
            p["since"].as_str().unwrap_or("-"),
            p["prefixes_received"]
                .as_u64()
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into())
        );
    }
    println!(
        "\nOwned blocks: {}",
        s["blocks"].as_array().map(|b| b.len()).unwrap_or(0)
    );
    for b in s["blocks"].as_array().into_iter().flatten() {
        println!("  {}", b.as_str().unwrap_or("?"));
    }
    println!("\nRoutes: {}", s["routes"]);
    println!("Workloads: {}", s["workloads"]);
    if let Some(pending) = s["pending_releases"].as_u64().filter(|n| *n > 0) {
        println!(
            "Address releases waiting for the API server: {pending} (oldest {:.0} s)",
            s["oldest_pending_release_seconds"].as_f64().unwrap_or(0.0)
        );
    }
}
