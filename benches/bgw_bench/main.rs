//! Benchmark driver for `benches/run`: the measurements that need the `bgw` library in a
//! long-running process. Each subcommand prints one JSON object on stdout, which
//! `benches/suite.py` reads, and errors go to stderr.
//!
//! Not a `cargo bench` harness: `benches/run` builds it with
//! `cargo build --release --bench bgw-bench`, so it shares the release profile and the
//! target directory with the `bgw` binary.

mod latency;
mod sandbox_loop;
mod stats;
mod store;
mod submit;
mod swap;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// Benchmark driver for the `bgw` library.
#[derive(Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Submit tasks with `WorkflowClient::start_activities`, or one at a time
    Submit(submit::SubmitArgs),
    /// Wait for N finished tasks of one resource id and report their drain rate
    Drain(store::DrainArgs),
    /// Submit at a fixed rate and report submit-to-COMPLETED latency
    Latency(latency::LatencyArgs),
    /// Run `Sandbox::run` in a bare loop and report the time per task
    Sandbox(sandbox_loop::SandboxArgs),
    /// Register a new version while tasks run and report when the first one used it
    Swap(swap::SwapArgs),
}

/// Options every subcommand that opens the store shares.
#[derive(clap::Args, Debug, Clone)]
pub struct StoreArgs {
    /// Data directory of the daemon under test
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Resource id (PartitionKey) of the tasks this run submits or reads
    #[arg(long, value_name = "ID", default_value = "bench")]
    resource: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let report = match cli.command {
        Command::Submit(args) => runtime()?.block_on(submit::run(args))?,
        Command::Drain(args) => store::drain(args)?,
        Command::Latency(args) => latency::run(args)?,
        Command::Sandbox(args) => sandbox_loop::run(args)?,
        Command::Swap(args) => swap::run(args)?,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Builds a runtime with one worker thread, because the driver shares two cores with the
/// daemon.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to build the tokio runtime")
}

/// Opens the client the CLI would open for `data_dir`.
pub fn open_client(data_dir: &std::path::Path) -> anyhow::Result<bgw::client::WorkflowClient> {
    let settings = settings(data_dir)?;
    let backend = bgw::open_backend(&settings).context("failed to open the task store")?;
    Ok(bgw::client::WorkflowClient::new(
        backend,
        settings.db_path().display().to_string(),
    ))
}

/// Resolves settings as the CLI does, with `data_dir` given on the command line.
pub fn settings(data_dir: &std::path::Path) -> anyhow::Result<bgw::config::Settings> {
    let overrides = bgw::config::Overrides {
        data_dir: Some(data_dir.to_owned()),
        ..Default::default()
    };
    let settings = bgw::config::Settings::resolve(&overrides)
        .with_context(|| format!("failed to resolve settings for {}", data_dir.display()))?;
    Ok(settings)
}
