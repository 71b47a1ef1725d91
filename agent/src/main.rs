//! The `tortie` binary: node agent, CNI plugin and operator commands.

mod autodetect;
mod cluster;
mod datastore;

use anyhow::Result;
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
    /// Prints the node address autodetection would choose (IP_AUTODETECTION_METHOD).
    DetectAddress {
        #[arg(long, env = "IP_AUTODETECTION_METHOD", default_value = "first-found")]
        method: String,
        #[arg(long)]
        ipv6: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::DetectAddress { method, ipv6 } => {
            let method = autodetect::Method::parse(&method)?;
            let addrs = autodetect::interface_addrs()?;
            println!("{}", autodetect::select(&method, &addrs, ipv6, &[])?);
        }
    }
    Ok(())
}
