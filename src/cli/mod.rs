//! The `berth` command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{Config, Overrides};

/// Berth: an OCI container registry where deleting is safe.
#[derive(Debug, Parser)]
#[command(name = "berth", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the registry (embedded SQLite + filesystem under ./berth-data by default).
    Serve(ServeArgs),
}

/// Settings shared by commands that open the registry.
#[derive(Debug, clap::Args)]
pub struct CommonArgs {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "BERTH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for the embedded deployment's data [default: ./berth-data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Log filter, e.g. `info` or `berth=debug` [default: info].
    #[arg(long)]
    pub log_level: Option<String>,
}

/// `berth serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Common settings.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Address to listen on [default: 127.0.0.1:5000]; port 0 picks a free port.
    #[arg(long)]
    pub listen: Option<String>,
    /// Write the bound address to this file once the server accepts connections.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

impl CommonArgs {
    /// Loads the configuration these arguments point at.
    ///
    /// # Errors
    /// A configuration error that says where the bad value is.
    pub fn load(&self, listen: Option<String>) -> anyhow::Result<Config> {
        let overrides =
            Overrides { listen, data_dir: self.data_dir.clone(), log_level: self.log_level.clone() };
        Ok(Config::load(self.config.as_deref(), &overrides)?)
    }
}

/// Runs the parsed command line.
///
/// # Errors
/// Whatever stopped the command, for `main` to print.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.common.load(args.listen.clone())?;
    crate::telemetry::init(&config.log_level);
    let app = crate::app::App::open(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(listen = %addr, data_dir = %config.data_dir.display(), "berth is serving");
    if let Some(path) = &args.ready_file {
        std::fs::write(path, addr.to_string())?;
    }
    crate::server::serve(listener, app, crate::server::shutdown_signal()).await?;
    Ok(())
}
