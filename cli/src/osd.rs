//! `basalt osd ...`: storage daemon tools.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use basalt_osd::store::{ObjectStore, StoreConfig};
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum OsdCommand {
    /// Check a stopped OSD's store: allocator against metadata, every
    /// block's checksum. Exits non-zero when it finds a problem.
    Fsck {
        /// The OSD's data directory.
        #[arg(long)]
        data: PathBuf,
    },
    /// Create an empty store in a new data directory.
    Format {
        /// The OSD's data directory (created).
        #[arg(long)]
        data: PathBuf,
        /// Size of the data file, e.g. 8G, 512M.
        #[arg(long, default_value = "8G")]
        size: String,
        /// Write zeros over the whole data file now, so later writes are
        /// pure overwrites (faster durable writes; slower format).
        #[arg(long)]
        prezero: bool,
    },
}

pub fn run(command: OsdCommand, json: bool) -> anyhow::Result<ExitCode> {
    match command {
        OsdCommand::Fsck { data } => fsck(data, json),
        OsdCommand::Format {
            data,
            size,
            prezero,
        } => {
            let bytes = parse_size(&size)?;
            ObjectStore::format_dir(&data, bytes, prezero)
                .with_context(|| format!("format store in {}", data.display()))?;
            println!("formatted {} ({bytes} bytes)", data.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn fsck(data: PathBuf, json: bool) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start runtime")?;
    let report = runtime.block_on(async {
        let store = ObjectStore::open_dir(&data, StoreConfig::default())
            .await
            .with_context(|| format!("open store in {}", data.display()))?;
        let report = store.fsck().await.context("check store")?;
        store.close().await;
        anyhow::Ok(report)
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{:<14} {}", "store", data.display());
        println!("{:<14} {}", "objects", report.objects);
        println!("{:<14} {}", "blocks used", report.blocks);
        println!("{:<14} {}", "blocks free", report.free_blocks);
        println!("{:<14} {}", "blocks total", report.block_count);
        println!("{:<14} {}", "errors", report.errors.len());
        for error in &report.errors {
            println!("  {error}");
        }
        println!(
            "{}",
            if report.is_clean() {
                "clean"
            } else {
                "NOT CLEAN"
            }
        );
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// Parses a size such as `8G`, `512M`, `4096` (bytes), binary units.
pub fn parse_size(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let (number, shift) = match text.char_indices().last() {
        Some((i, 'K' | 'k')) => (&text[..i], 10),
        Some((i, 'M' | 'm')) => (&text[..i], 20),
        Some((i, 'G' | 'g')) => (&text[..i], 30),
        Some((i, 'T' | 't')) => (&text[..i], 40),
        _ => (text, 0),
    };
    let value: u64 = number
        .parse()
        .with_context(|| format!("size {text:?} is not a number with an optional K/M/G/T"))?;
    value
        .checked_mul(1u64 << shift)
        .with_context(|| format!("size {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
