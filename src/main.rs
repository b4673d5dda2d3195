//! The `outbox-tailer` binary: flags and environment → [`Config`], logging,
//! then the subcommand. Every failure is one line on stderr and a non-zero exit.

use clap::Parser;
use outbox_tailer::config::{Cli, Command, Config, LogFormat};
use std::process::ExitCode;

/// Exit code for a configuration the tailer cannot run with.
const EXIT_CONFIG: u8 = 2;
/// Exit code for a subcommand this build does not do yet.
const EXIT_UNAVAILABLE: u8 = 69;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.options.log_format);
    let config = match Config::from_options(&cli.options) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("outbox-tailer: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    tracing::debug!(?config, "configuration");
    let (name, issue) = match cli.command.unwrap_or(Command::Run) {
        Command::Run => ("run", "#3 (the tailer)"),
        Command::Setup => ("setup", "#3 (the tailer)"),
        Command::Status { .. } => ("status", "#4 (observability)"),
        Command::Requeue(_) => ("requeue", "#5 (dead letters)"),
    };
    eprintln!(
        "outbox-tailer: `{name}` is not available in this build yet; it arrives with issue {issue}"
    );
    ExitCode::from(EXIT_UNAVAILABLE)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
