//! The `tortie` binary: node agent, CNI plugin and operator commands.

fn main() -> anyhow::Result<()> {
    println!("tortie {}", env!("CARGO_PKG_VERSION"));
    Ok(())
}
