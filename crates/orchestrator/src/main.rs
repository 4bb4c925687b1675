//! The `orchestrator` command: a thin shell around `orchestrator-core`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use orchestrator_core::config::{self, Config, ConfigErrors, ConfigProblem, LogFormat};
use orchestrator_core::daemon::{self, DaemonEvent};
use orchestrator_core::discovery::discover;
use orchestrator_core::plan::{HostEnv, binary_of};
use orchestrator_core::process::{
    UnixSpawner, mark_inherited_fds_cloexec, reset_signal_dispositions,
};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

/// Exit codes (SPEC section 2).
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(version, about = "The process orchestrator of the Blackhole platform")]
struct Cli {
    /// Configuration file [default: $ORCHESTRATOR_CONFIG, else ./orchestrator.toml, else built-in defaults]
    #[arg(short, long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground until SIGINT/SIGTERM
    Run,
    /// Validate the configuration, print every problem, exit 0 or 2
    Check,
    /// List service binaries found in services_dir
    Discover,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let config = match config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("orchestrator: {errors}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match cli.command {
        Command::Check => check(&config),
        Command::Discover => discover_command(&config),
        Command::Run => match run(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("orchestrator: {error:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn source_name(config: &Config) -> String {
    match &config.source {
        Some(path) => path.display().to_string(),
        None => "built-in defaults (no orchestrator.toml)".to_owned(),
    }
}

fn check(config: &Config) -> ExitCode {
    let mut problems = Vec::new();
    for (name, service) in &config.services {
        if service.command.is_some() || !service.enabled {
            continue;
        }
        let binary = binary_of(config, name, service);
        if let Err(message) = executable(&binary) {
            problems.push(ConfigProblem {
                file: config.source.clone(),
                line: None,
                column: None,
                key: format!("services.{name}"),
                message: format!(
                    "binary {}: {message}; set binary_path or place it at services_dir/{name}/{name}",
                    binary.display()
                ),
            });
        }
    }
    if !problems.is_empty() {
        eprintln!("orchestrator: {}", ConfigErrors { problems });
        return ExitCode::from(EXIT_USAGE);
    }
    let discovered = discover(&config.orchestrator.services_dir).unwrap_or_default();
    let extra = discovered
        .iter()
        .filter(|d| !config.services.contains_key(&d.name))
        .count();
    println!(
        "{}: valid; {} configured service{}, {} more discovered in {}",
        source_name(config),
        config.services.len(),
        if config.services.len() == 1 { "" } else { "s" },
        extra,
        config.orchestrator.services_dir.display()
    );
    ExitCode::SUCCESS
}

fn executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path).map_err(|error| error.to_string())?;
    if !metadata.is_file() {
        return Err("not a regular file".to_owned());
    }
    if metadata.permissions().mode() & 0o111 == 0 {
        return Err("not executable (chmod +x it)".to_owned());
    }
    Ok(())
}

fn discover_command(config: &Config) -> ExitCode {
    let dir = &config.orchestrator.services_dir;
    let discovered = match discover(dir) {
        Ok(found) => found,
        Err(error) => {
            eprintln!("orchestrator: {error}");
            return ExitCode::FAILURE;
        }
    };
    if discovered.is_empty() {
        println!(
            "no service binaries in {} (expected {}/NAME/NAME, executable)",
            dir.display(),
            dir.display()
        );
        return ExitCode::SUCCESS;
    }
    let width = discovered
        .iter()
        .map(|d| d.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!("{:width$}  CONFIGURED  BINARY", "NAME");
    for found in &discovered {
        let configured = if config.services.contains_key(&found.name) {
            "yes"
        } else if config.orchestrator.start_discovered {
            "no (runs with defaults)"
        } else {
            "no (not started)"
        };
        println!(
            "{:width$}  {configured:10}  {}",
            found.name,
            found.binary.display()
        );
    }
    ExitCode::SUCCESS
}

fn init_tracing(config: &Config) {
    let level = config.orchestrator.log_level.as_str();
    let filter = tracing_subscriber::EnvFilter::try_from_env("ORCHESTRATOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    match config.orchestrator.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    init_tracing(&config);
    // Whatever our parent leaked to us must not reach the services.
    mark_inherited_fds_cloexec().context("cannot mark inherited file descriptors close-on-exec")?;
    reset_signal_dispositions();
    raise_fd_limit();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let (events_tx, events) = mpsc::channel(16);
        forward_signals(events_tx).context("cannot install signal handlers")?;
        daemon::run(
            config,
            Arc::new(UnixSpawner),
            HostEnv::from_process(),
            events,
            None,
        )
        .await?;
        Ok(())
    })
}

/// Each service costs the daemon three descriptors (two pipes and a pidfd),
/// so the usual soft limit of 1024 would cap us near 300 services: take the
/// hard limit, as systemd and most servers do.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!("cannot raise the open-files limit from {soft} to {hard}: {error}");
            }
        }
        Ok(_) => {}
        Err(error) => tracing::warn!("cannot read the open-files limit: {error}"),
    }
}

/// Signals become daemon events: the first SIGINT/SIGTERM asks for a clean
/// shutdown, a second one for an immediate kill; SIGHUP asks for a reload.
fn forward_signals(events: mpsc::Sender<DaemonEvent>) -> std::io::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        let mut stopping = false;
        loop {
            let (name, event) = tokio::select! {
                _ = interrupt.recv() => ("SIGINT", None),
                _ = terminate.recv() => ("SIGTERM", None),
                _ = hangup.recv() => ("SIGHUP", Some(DaemonEvent::Reload)),
            };
            let event = event.unwrap_or(if stopping {
                DaemonEvent::ForceShutdown
            } else {
                stopping = true;
                DaemonEvent::Shutdown
            });
            tracing::info!("received {name}");
            if events.send(event).await.is_err() {
                return;
            }
        }
    });
    Ok(())
}
