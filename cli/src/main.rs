//! `basalt`: the single binary for every Basalt daemon and admin command.
//!
//! One binary keeps deployment simple: the same file runs a monitor, an OSD,
//! an NBD gateway or an admin command. This file only parses arguments, sets
//! up logging and hands over to the library crates.

mod logging;
mod osd;

use clap::{Parser, Subcommand};

/// Basalt: distributed block storage.
#[derive(Parser, Debug)]
#[command(name = "basalt", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// OSD (storage daemon) tools.
    #[command(subcommand)]
    Osd(osd::OsdCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging::init();
    let result = match cli.command {
        Command::Osd(command) => osd::run(command),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("basalt: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
