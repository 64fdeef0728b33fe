//! `basalt`: the single binary for every Basalt daemon and admin command.
//!
//! One binary keeps deployment simple: the same file runs a monitor, an OSD,
//! an NBD gateway or an admin command. This file only parses arguments, sets
//! up logging and hands over to the library crates.

mod logging;

use clap::Parser;

/// Basalt: distributed block storage.
#[derive(Parser, Debug)]
#[command(name = "basalt", version, about, long_about = None)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    logging::init();
    Ok(())
}
