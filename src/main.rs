//! The `outbox-tailer` binary: flags and environment → [`Config`], logging,
//! then the subcommand. Every failure is one line on stderr and a non-zero exit.

use clap::Parser;
use outbox_tailer::config::{parse_duration, Cli, Command, Config, LogFormat};
use outbox_tailer::{app, shutdown};
use std::process::ExitCode;

/// Exit code for a configuration the tailer cannot run with.
const EXIT_CONFIG: u8 = 2;
/// Exit code for a failure at run time (the line says what to fix).
const EXIT_FAILURE: u8 = 1;

fn main() -> ExitCode {
    // One rustls provider for every TLS connection, before any is configured.
    outbox_tailer::tls::install_crypto_provider();
    let cli = Cli::parse();
    // Needs only --metrics-addr: a container health check has no database settings to spare.
    if let Some(Command::Healthcheck) = cli.command {
        return match outbox_tailer::http::healthcheck(&cli.options.metrics_addr) {
            Ok(()) => ExitCode::SUCCESS,
            Err(line) => {
                eprintln!("outbox-tailer: healthcheck: {line}");
                ExitCode::from(EXIT_FAILURE)
            }
        };
    }
    init_logging(cli.options.log_format);
    let config = match Config::from_options(&cli.options) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("outbox-tailer: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    tracing::debug!(?config, "configuration");
    let command = cli.command.unwrap_or(Command::Run);
    // Validated with the flags: a bad value is a usage error (exit 2).
    let older_than = match &command {
        Command::Prune { older_than } => match parse_duration("older-than", older_than) {
            Ok(duration) => duration,
            Err(error) => {
                eprintln!("outbox-tailer: {error}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        _ => std::time::Duration::ZERO,
    };
    if let Command::Republish(args) = &command {
        if !args.selects() {
            eprintln!("outbox-tailer: republish needs a selector: --since, --until, --aggregate-type, --aggregate-id, --event-type or --id");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("outbox-tailer: cannot start the runtime: {error}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = runtime.block_on(async {
        match command {
            Command::Run => {
                let shutdown =
                    shutdown::on_signals().map_err(|e| format!("cannot handle signals: {e}"))?;
                app::run(&config, shutdown).await.map_err(|e| e.to_string())
            }
            Command::Setup => app::setup(&config).await.map_err(|e| e.to_string()),
            Command::Status { json } => app::status(&config, json)
                .await
                .map(|text| println!("{}", text.trim_end()))
                .map_err(|e| e.to_string()),
            Command::Healthcheck => Ok(()),
            Command::Prune { .. } => app::prune(&config, older_than)
                .await
                .map(|count| println!("pruned {count} published events"))
                .map_err(|e| e.to_string()),
            Command::Republish(args) => {
                let shutdown =
                    shutdown::on_signals().map_err(|e| format!("cannot handle signals: {e}"))?;
                outbox_tailer::republish::republish(&config, &args, shutdown)
                    .await
                    .map(|summary| {
                        for note in summary.notes() {
                            eprintln!("outbox-tailer: {note}");
                        }
                        println!("{summary}");
                    })
                    .map_err(|e| e.to_string())
            }
            Command::Requeue(which) => app::requeue(&config, &which)
                .await
                .map(|count| {
                    println!("requeued {count} failed events; a running tailer publishes them")
                })
                .map_err(|e| e.to_string()),
        }
    });
    // Whatever is still running (a NATS reconnect loop) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(line) => {
            // A republish's progress bar gives way to the line.
            outbox_tailer::republish::progress::clear();
            eprintln!("outbox-tailer: {line}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| {
            // A republish's progress bar gives way to the line.
            outbox_tailer::republish::progress::clear();
            std::io::stderr()
        })
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
