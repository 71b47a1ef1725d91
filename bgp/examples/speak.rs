//! A small command-line BGP speaker on top of tortie-bgp, for interop checks by hand or from
//! the e2e test bed: peers, originates prefixes, prints best-path changes and peer status.
//!
//! ```text
//! speak --id 127.0.30.1 --as 64512 --listen 127.0.30.1:11179 \
//!       --peer 127.0.30.2:11190:64512 --originate 10.80.0.0/26 --seconds 20
//! ```
//! `--peer ADDR:PORT:AS` may repeat (append `:passive`, `:rr-client`, `:md5=KEY`,
//! `:nh4=IPV4` or `:nh6=IPV6` with `_` for `:` in the address);
//! `--originate` may repeat; `--seconds 0` runs until killed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use tortie_bgp::{PeerConfig, Speaker, SpeakerConfig};

fn usage(problem: &str) -> ! {
    eprintln!("speak: {problem}");
    eprintln!(
        "usage: speak --id IPV4 --as ASN [--listen ADDR:PORT] [--peer ADDR:PORT:AS[:passive][:rr-client][:md5=KEY]]... [--originate PREFIX]... [--seconds N]"
    );
    std::process::exit(2)
}

fn parse_peer(spec: &str, listen: Option<SocketAddr>) -> PeerConfig {
    let mut parts = spec.split(':');
    let address: IpAddr = parts
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage(&format!("--peer {spec}: bad address")));
    let port: u16 = parts
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| usage(&format!("--peer {spec}: bad port")));
    let remote_as: u32 = parts
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage(&format!("--peer {spec}: bad AS")));
    let mut peer = PeerConfig {
        port,
        source_address: listen.map(|l| l.ip()),
        ..PeerConfig::new(address, remote_as)
    };
    for flag in parts {
        match flag {
            "passive" => peer.passive = true,
            "rr-client" => peer.route_reflector_client = true,
            f if f.starts_with("md5=") => peer.md5_password = Some(f[4..].to_string()),
            f if f.starts_with("nh4=") => {
                peer.next_hop_v4 = Some(
                    f[4..]
                        .parse()
                        .unwrap_or_else(|_| usage(&format!("--peer {spec}: bad nh4"))),
                )
            }
            f if f.starts_with("nh6=") => {
                peer.next_hop_v6 = Some(
                    f[4..]
                        .replace('_', ":")
                        .parse()
                        .unwrap_or_else(|_| usage(&format!("--peer {spec}: bad nh6"))),
                )
            }
            other => usage(&format!("--peer {spec}: unknown flag {other}")),
        }
    }
    peer
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut id: Option<Ipv4Addr> = None;
    let mut local_as: Option<u32> = None;
    let mut listen: Option<SocketAddr> = None;
    let mut peers = Vec::new();
    let mut prefixes = Vec::new();
    let mut seconds = 30u64;
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--id" => id = Some(value().parse()?),
            "--as" => local_as = Some(value().parse()?),
            "--listen" => listen = Some(value().parse()?),
            "--peer" => peers.push(value()),
            "--originate" => prefixes.push(value().parse::<ipnet::IpNet>()?),
            "--seconds" => seconds = value().parse()?,
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let id = id.unwrap_or_else(|| usage("--id is required"));
    let local_as = local_as.unwrap_or_else(|| usage("--as is required"));
    let speaker = Speaker::start(SpeakerConfig {
        listen,
        connect_retry: Duration::from_secs(2),
        ..SpeakerConfig::new(id, local_as)
    })
    .await?;
    for prefix in prefixes {
        speaker.originate(prefix)?;
    }
    for spec in &peers {
        speaker.add_peer(parse_peer(spec, listen))?;
    }
    let mut changes = speaker.subscribe();
    let printer = tokio::spawn(async move {
        while let Ok(change) = changes.recv().await {
            match change.best {
                Some(best) => println!(
                    "best {} via {:?} from {:?} path {:?} communities {:?}",
                    change.prefix,
                    best.attrs.next_hop,
                    best.from,
                    best.attrs.path.as_path.segments,
                    best.attrs.path.communities
                ),
                None => println!("withdrawn {}", change.prefix),
            }
        }
    });
    let mut ticks = 0u64;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        ticks += 1;
        for status in speaker.peer_status() {
            println!(
                "peer {} {:?} up {:?} rx {} acc {} tx {} in {} out {} err {:?}",
                status.address,
                status.state,
                status.uptime.map(|u| u.as_secs()),
                status.prefixes_received,
                status.prefixes_accepted,
                status.prefixes_advertised,
                status.messages_in,
                status.messages_out,
                status.last_error
            );
        }
        if seconds != 0 && ticks >= seconds {
            break;
        }
    }
    printer.abort();
    speaker.shutdown().await;
    Ok(())
}
