//! The `orchestrator` command: a thin shell around `orchestrator-core`.

mod api;
mod cli;
mod console;
mod journal;
mod logview;
mod paths;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use anyhow::Context;
use clap::{FromArgMatches, Parser, Subcommand};
use orchestrator_core::config::{self, Config, ConfigErrors, ConfigProblem, LogFormat};
use orchestrator_core::daemon::{self, DaemonEvent};
use orchestrator_core::discovery::{discover, scan};
use orchestrator_core::guardian;
use orchestrator_core::plan::HostEnv;
use orchestrator_core::process::{
    UnixSpawner, become_subreaper, mark_inherited_fds_cloexec, reap_orphans,
    record_original_nofile, resolve_program,
};
use orchestrator_core::reload::Loader;
use orchestrator_core::state::DaemonLock;
use orchestrator_core::validate::{Finding, Scope, Severity, Validation, validate};
use orchestrator_core::watch::{DEFAULT_DEBOUNCE, WatchHandle, spawn_watcher};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::api::client::Client;
use crate::api::control::DaemonControl;
use crate::api::server::{
    ConnectionLimits, OwnerOnly, bind_unix, connection_cap_here, router, serve, tcp_router,
};
use crate::cli::EXIT_USAGE;

#[derive(Parser)]
#[command(
    version,
    about = "The process orchestrator of the Blackhole platform",
    after_help = "\
Examples:
  orchestrator run                      run the services of ./orchestrator.toml (or ./services)
  orchestrator status                   ask that daemon, from the same folder
  sudo orchestrator status              ask the host's daemon (/etc/orchestrator/orchestrator.toml)
  ORCHESTRATOR_SOCKET=/srv/app/.orchestrator/orchestrator.sock orchestrator status
                                        ask a daemon from any folder"
)]
struct Cli {
    /// Configuration file [default: $ORCHESTRATOR_CONFIG, else ./orchestrator.toml, else (root only) /etc/orchestrator/orchestrator.toml, else built-in defaults]
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Control socket, for `run` (where to listen) and the client verbs (where the daemon is)
    ///
    /// Client verbs: $ORCHESTRATOR_SOCKET, else the config's socket (data_dir/orchestrator.sock; /run/orchestrator/orchestrator.sock for /etc/orchestrator/orchestrator.toml), else a zero-config daemon's in this folder, else /run/orchestrator/orchestrator.sock. `run` listens on the config's socket.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// How long a client verb waits for the daemon to answer ("10s", "500ms", "2m"), then exits 3
    ///
    /// start/stop/restart may take longer (a stop lasts up to the service's stop_timeout) as long as the daemon keeps answering its health check; logs -f and events -f wait this long for their first answer only.
    #[arg(long, value_name = "DURATION", default_value = api::client::DEFAULT_TIMEOUT_ARG, value_parser = cli::parse_timeout)]
    timeout: std::time::Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground until SIGINT/SIGTERM
    ///
    /// Starts every enabled service (configured or discovered in services_dir), serves the control API on the socket and stops the services in dependency order at exit. SIGHUP reloads the configuration.
    #[command(after_help = "\
Examples:
  orchestrator run                                     ./orchestrator.toml, or zero-config in this folder
  orchestrator -c /etc/orchestrator/orchestrator.toml run
                                                       host mode: /var/lib/orchestrator, /run/orchestrator
  orchestrator --socket /tmp/orch.sock run             listen on another socket")]
    Run,
    /// Validate the configuration, print every problem, exit 0 or 2
    #[command(after_help = "\
Examples:
  orchestrator check
  orchestrator -c deploy/orchestrator.toml check && systemctl reload orchestrator")]
    Check,
    /// List service binaries found in services_dir
    ///
    /// A binary is services_dir/NAME/NAME, executable; the table says whether each one is configured and whether it runs without a [services.NAME] section (start_discovered).
    #[command(after_help = "\
Examples:
  orchestrator discover
  orchestrator -c /etc/orchestrator/orchestrator.toml discover")]
    Discover,
    /// Show services: NAME STATE PID UPTIME RESTARTS LAST-EXIT CPU MEM REASON
    ///
    /// HEALTH shows when some service has a check; LAST-EXIT names the signal that ended the last process (SIGKILL) or gives its exit code; REASON says why a service is where it is. Exits 1 when an enabled service is not running (a one-shot that ended with code 0 counts as fine), 3 when the daemon cannot be reached.
    #[command(after_help = "Examples:
  orchestrator status                 every service
  orchestrator status api db          two of them (exit 1 if either is down)
  orchestrator status -w              refresh every 2s, like `watch`
  orchestrator status --json | jq '.[] | select(.state != \"running\") | .name'")]
    Status {
        /// Services to show [default: all]
        names: Vec<String>,
        /// Print an array of ServiceInfo as JSON
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Redraw the table in place until interrupted
        #[arg(short, long)]
        watch: bool,
        /// How often -w redraws ("2s", "500ms")
        #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = cli::parse_timeout, requires = "watch")]
        interval: std::time::Duration,
    },
    /// Start services; returns once they run
    ///
    /// What a service depends on starts first; returns once each is up (its health check or READY=1 where it has one). Exits 1 if one could not start, saying why.
    #[command(after_help = "\
Examples:
  orchestrator start api
  orchestrator start api worker
  orchestrator start --all")]
    Start(Targets),
    /// Stop services; returns once their processes are gone
    ///
    /// Each gets its stop_signal, then SIGKILL after its stop_timeout. Only the services named stop: a note names the running services that depend on them.
    #[command(after_help = "\
Examples:
  orchestrator stop api
  orchestrator stop --all
  orchestrator --timeout 2m stop db       wait longer for the daemon to answer")]
    Stop(Targets),
    /// Restart services; returns once the new processes run
    #[command(after_help = "\
Examples:
  orchestrator restart api
  orchestrator restart --with-dependents db    stop what uses db first, start it again after
  orchestrator restart --all")]
    Restart {
        #[command(flatten)]
        targets: Targets,
        /// Also stop what depends on them first, and start it again after
        #[arg(long)]
        with_dependents: bool,
    },
    /// Show services' recent output, merged in time order
    ///
    /// Only what the daemon keeps in memory (the last lines of each service);
    /// older lines are in data_dir/logs/NAME.log. One service prints `TIME STREAM TEXT`;
    /// several (or --all) print `NAME | TIME STREAM TEXT`, names aligned and, on a
    /// terminal without NO_COLOR, coloured, with the bar red for stderr lines.
    #[command(after_help = "Examples:
  orchestrator logs api -n 100              the last 100 lines of api
  orchestrator logs api worker -f           both, merged, then new lines as they come
  orchestrator logs --all --since 10m --grep 'error|panic'
                                            every service's errors of the last 10 minutes")]
    Logs {
        /// Services to show (several are merged in time order)
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        names: Vec<String>,
        /// Every service the daemon runs (instances web@0... included)
        #[arg(long)]
        all: bool,
        /// How many recent lines, in all (not per service) [default: 50; with --since: every line since then]
        #[arg(short = 'n', long = "lines", value_name = "LINES")]
        lines: Option<usize>,
        /// Keep printing new lines of every service until interrupted
        #[arg(short, long)]
        follow: bool,
        /// Only lines from then on: a duration back from now (90s, 10m, 2h) or a UTC RFC 3339 time (2026-01-02T03:04:05Z)
        #[arg(long, value_name = "TIME", value_parser = cli::parse_since)]
        since: Option<std::time::SystemTime>,
        /// Only lines whose text matches this regular expression (also with -f)
        #[arg(long, value_name = "RE", value_parser = cli::parse_grep)]
        grep: Option<regex::Regex>,
    },
    /// Re-read the configuration and apply the difference
    ///
    /// Removed services stop, added ones start, changed ones restart, the others are left alone. An invalid file is refused with its errors and nothing changes. Same as SIGHUP to the daemon.
    #[command(after_help = "\
Examples:
  orchestrator reload
  orchestrator check && orchestrator reload")]
    Reload,
    /// Lifecycle events (start, exit, restart, health, reload, ...)
    #[command(after_help = "Examples:
  orchestrator events -n 10                 the last 10 events
  orchestrator events -f --service api      api's last events, then new ones as they come
  orchestrator events --json | jq .event    one JSON object a line, for scripts")]
    Events {
        /// Print the last events, then keep printing new ones until interrupted
        #[arg(short, long)]
        follow: bool,
        /// How many of the last events
        #[arg(short = 'n', long = "lines", value_name = "N", default_value_t = cli::DEFAULT_EVENTS)]
        lines: usize,
        /// Only this service's events (the daemon's own are left out)
        #[arg(long, value_name = "NAME")]
        service: Option<String>,
        /// One JSON object a line: each event as the API sends it
        #[arg(long)]
        json: bool,
    },
    /// Stop every service and the daemon; returns once it is gone
    #[command(after_help = "\
Examples:
  orchestrator shutdown
  sudo orchestrator shutdown              the host's daemon (under systemd, prefer systemctl stop orchestrator)")]
    Shutdown,
    /// Print a shell completion script on stdout
    #[command(after_help = "\
Examples:
  orchestrator completions bash > /etc/bash_completion.d/orchestrator
  orchestrator completions zsh > \"${fpath[1]}/_orchestrator\"
  orchestrator completions fish > ~/.config/fish/completions/orchestrator.fish")]
    Completions {
        /// The shell the script is for
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout; contrib/orchestrator.1 is its copy
    #[command(hide = true)]
    Manpage,
    /// Internal: started by `run`; stops the services if the daemon dies
    #[command(hide = true)]
    Guardian {
        /// The cgroup parent the daemon claimed (maybe its fallback name)
        #[arg(long, value_name = "PATH")]
        cgroup_parent: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct Targets {
    /// Service names (as in status)
    #[arg(value_name = "NAME")]
    names: Vec<String>,
    /// Every service, instead of names
    #[arg(long)]
    all: bool,
}

fn main() -> ExitCode {
    let parsed = command()
        .try_get_matches()
        .and_then(|matches| Ok((Cli::from_arg_matches(&matches)?, matches)));
    let cli = match parsed {
        Ok((mut cli, matches)) => {
            if let Err(refused) = flags_after_the_verb(&mut cli, &matches) {
                eprintln!("orchestrator: {refused}");
                return ExitCode::from(EXIT_USAGE);
            }
            cli
        }
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let daemon_side = matches!(
        cli.command,
        Command::Run | Command::Check | Command::Discover | Command::Guardian { .. }
    );
    match cli.command {
        Command::Completions { shell } => return completions(shell),
        Command::Manpage => return manpage(),
        _ => {}
    }
    let socket_env = std::env::var_os(paths::SOCKET_ENV);
    // A client given its socket needs no configuration at all.
    let needs_config =
        daemon_side || !paths::socket_given(cli.socket.as_deref(), socket_env.as_ref());
    // `check` and `run` go through one validation, so that what `check`
    // passes `run` can start; `run` stops only for problems of the daemon
    // itself and starts every service it can.
    let mut validation = None;
    // The config file as it was read, to tell an edit made before the
    // watchers are armed (they take the file as it is then as unchanged).
    let mut config_stamp = None;
    let config = if needs_config {
        match config::load_all(cli.config.as_deref()) {
            Ok(loaded) if matches!(cli.command, Command::Check | Command::Run) => {
                config_stamp = loaded.config.source.as_deref().and_then(file_stamp);
                let found = validate(&loaded, &HostEnv::from_process(), Some(resolve_program));
                let stop = match cli.command {
                    Command::Check => found.errors().next().is_some(),
                    _ => found.stops_the_daemon(),
                };
                if stop {
                    report_findings(&found);
                    return ExitCode::from(EXIT_USAGE);
                }
                validation = Some(found);
                Some(loaded.config)
            }
            Ok(loaded) if loaded.problems.is_empty() => Some(loaded.config),
            // A client only needs to find the daemon: a `${VAR}` that only
            // the daemon's environment defines, or a service section the
            // daemon refuses, is no reason to refuse `status`.
            Ok(loaded) if !daemon_side => Some(loaded.config),
            Ok(loaded) => {
                let errors = ConfigErrors {
                    problems: loaded.problems,
                };
                eprintln!("orchestrator: {errors}");
                return ExitCode::from(EXIT_USAGE);
            }
            Err(errors) => {
                eprintln!("orchestrator: {errors}");
                return ExitCode::from(EXIT_USAGE);
            }
        }
    } else {
        None
    };
    let host = config::HostPaths::standard();
    let socket = paths::client_socket(
        cli.socket.as_deref(),
        socket_env,
        config.as_ref(),
        &host,
        Path::exists,
    );
    // `run` listens where --socket or the config says: the variable only
    // tells clients where to look, and a daemon started from a shell that
    // has it set must not take over another one's socket.
    let run_socket = match (&cli.socket, &config) {
        (Some(flag), _) => flag.clone(),
        (None, Some(config)) => host.socket_of(config),
        (None, None) => socket.path.clone(),
    };
    match cli.command {
        Command::Check => check(
            config.as_ref().expect("loaded for check"),
            &validation.expect("validated for check"),
        ),
        Command::Discover => discover_command(config.as_ref().expect("loaded for discover")),
        Command::Guardian { cgroup_parent } => guardian(
            config.expect("loaded for guardian"),
            cli.config.clone(),
            cgroup_parent,
        ),
        Command::Run => match run(
            config.expect("loaded for run"),
            reloader(cli.config.clone()),
            run_socket,
            validation.expect("validated for run").findings,
            config_stamp,
        ) {
            Ok(()) => {
                console::flush();
                ExitCode::SUCCESS
            }
            Err(error) => {
                console::flush();
                eprintln!("orchestrator: {error:#}");
                ExitCode::FAILURE
            }
        },
        command => client_command(
            command,
            Client::new(&socket.path)
                .with_origin(socket.origin.to_string())
                .with_timeout(cli.timeout),
            config.as_ref(),
        ),
    }
}

/// Verbs that never talk to a daemon (--timeout does nothing for them),
/// those that find none either (--socket; `run` listens on it), and those
/// that read no configuration (--config).
const NO_DAEMON: [&str; 6] = [
    "run",
    "check",
    "discover",
    "completions",
    "manpage",
    "guardian",
];
const NO_SOCKET: [&str; 5] = ["check", "discover", "completions", "manpage", "guardian"];
const NO_CONFIG: [&str; 2] = ["completions", "manpage"];

/// The flags of `Cli` that a verb may also take after its name, with the
/// verbs they do nothing for.
const AFTER_THE_VERB: [(&str, &[&str]); 3] = [
    ("config", &NO_CONFIG),
    ("socket", &NO_SOCKET),
    ("timeout", &NO_DAEMON),
];

/// The command line, with --config, --socket and --timeout also accepted
/// after the verbs they do something for. Not clap's global flags: those
/// are offered to every verb, including those they would do nothing for.
fn command() -> clap::Command {
    use clap::CommandFactory;
    let mut command = Cli::command();
    let verbs: Vec<String> = command
        .get_subcommands()
        .map(|sub| sub.get_name().to_owned())
        .collect();
    for (id, except) in AFTER_THE_VERB {
        let arg = command
            .get_arguments()
            .find(|arg| arg.get_id() == id)
            .expect("a flag of Cli")
            .clone();
        for verb in verbs.iter().filter(|verb| !except.contains(&verb.as_str())) {
            command = command.mut_subcommand(verb, |sub| sub.arg(arg.clone()));
        }
    }
    command
}

/// Takes the flags given after the verb (they win over the same flag
/// before it); refuses them before a verb they do nothing for.
fn flags_after_the_verb(cli: &mut Cli, matches: &clap::ArgMatches) -> Result<(), String> {
    use clap::parser::ValueSource::CommandLine;
    let Some((verb, sub)) = matches.subcommand() else {
        return Ok(());
    };
    for (id, except) in AFTER_THE_VERB {
        let given = |matches: &clap::ArgMatches| {
            matches.ids().any(|known| known == id) && matches.value_source(id) == Some(CommandLine)
        };
        if except.contains(&verb) {
            if given(matches) {
                let what = match id {
                    "config" => "reads no configuration",
                    "socket" => "talks to no daemon",
                    _ => "does not wait for a daemon",
                };
                return Err(format!(
                    "--{id} does nothing for `{verb}`, which {what}; drop --{id}"
                ));
            }
            continue;
        }
        if !given(sub) {
            continue;
        }
        match id {
            "config" => cli.config = sub.get_one::<PathBuf>(id).cloned(),
            "socket" => cli.socket = sub.get_one::<PathBuf>(id).cloned(),
            _ => cli.timeout = *sub.get_one::<std::time::Duration>(id).expect("a default"),
        }
    }
    Ok(())
}

fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut command = command();
    clap_complete::generate(shell, &mut command, "orchestrator", &mut std::io::stdout());
    ExitCode::SUCCESS
}

fn manpage() -> ExitCode {
    let mut out = Vec::new();
    // Rendering into memory cannot fail.
    let _ = clap_mangen::Man::new(command()).render(&mut out);
    match std::io::Write::write_all(&mut std::io::stdout(), &out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("orchestrator: cannot write the man page: {error}");
            ExitCode::FAILURE
        }
    }
}

fn client_command(command: Command, client: Client, config: Option<&Config>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("orchestrator: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // How long `shutdown` waits for the daemon to be gone.
    let shutdown_wait = config.map_or(orchestrator_core::config::DEFAULT_SHUTDOWN_TIMEOUT, |c| {
        c.orchestrator.shutdown_timeout
    }) + std::time::Duration::from_secs(5);
    runtime.block_on(async move {
        match command {
            Command::Status {
                names,
                watch: true,
                interval,
                ..
            } => cli::status_watch(&client, &names, interval).await,
            Command::Status { names, json, .. } => cli::status(&client, &names, json).await,
            Command::Start(targets) => cli::act(client, "start", targets.names, targets.all).await,
            Command::Stop(targets) => cli::act(client, "stop", targets.names, targets.all).await,
            Command::Restart {
                targets,
                with_dependents,
            } => {
                let action = if with_dependents {
                    "restart?with_dependents=true"
                } else {
                    "restart"
                };
                cli::act(client, action, targets.names, targets.all).await
            }
            Command::Logs {
                names,
                all,
                lines,
                follow,
                since,
                grep,
            } => {
                let request = cli::LogsRequest {
                    names,
                    all,
                    lines,
                    follow,
                    since,
                    grep,
                };
                cli::logs(&client, request).await
            }
            Command::Reload => cli::reload(&client).await,
            Command::Events {
                follow,
                lines,
                service,
                json,
            } => {
                let request = cli::EventsRequest {
                    follow,
                    lines,
                    service,
                    json,
                };
                cli::events(&client, request).await
            }
            Command::Shutdown => cli::shutdown(&client, shutdown_wait).await,
            Command::Run
            | Command::Check
            | Command::Discover
            | Command::Guardian { .. }
            | Command::Completions { .. }
            | Command::Manpage => {
                unreachable!("handled before")
            }
        }
    })
}

fn source_name(config: &Config) -> String {
    match &config.source {
        Some(path) => path.display().to_string(),
        None => "built-in defaults (no orchestrator.toml)".to_owned(),
    }
}

/// Every finding, errors first, on stderr: for `check`, and for a `run`
/// that cannot start at all.
fn report_findings(validation: &Validation) {
    let problems: Vec<ConfigProblem> = validation
        .errors()
        .map(|finding| finding.problem.clone())
        .collect();
    if !problems.is_empty() {
        eprintln!("orchestrator: {}", ConfigErrors { problems });
    }
    for finding in validation.warnings() {
        eprintln!("orchestrator: warning: {}", finding.problem);
    }
}

fn check(config: &Config, validation: &Validation) -> ExitCode {
    report_findings(validation);
    let extra = validation
        .scan
        .found
        .iter()
        .filter(|d| !config.services.contains_key(&d.name))
        .count();
    cli::outln!(
        "{}: valid; {} configured service{}, {} more discovered in {}",
        source_name(config),
        config.services.len(),
        if config.services.len() == 1 { "" } else { "s" },
        extra,
        config.orchestrator.services_dir.display()
    );
    ExitCode::SUCCESS
}

fn discover_command(config: &Config) -> ExitCode {
    let dir = &config.orchestrator.services_dir;
    let scanned = match scan(dir) {
        Ok(scanned) => scanned,
        Err(error) => {
            eprintln!("orchestrator: {error}");
            return ExitCode::FAILURE;
        }
    };
    // On stderr: the table on stdout stays one row per service for scripts.
    for skipped in &scanned.skipped {
        eprintln!(
            "orchestrator: skipped {}: {}",
            skipped.path.display(),
            skipped.reason
        );
    }
    if scanned.found.is_empty() {
        let why = if scanned.exists {
            ""
        } else {
            " (the directory does not exist)"
        };
        cli::outln!(
            "no service binaries in {}{why} (expected {}/NAME/NAME, executable)",
            dir.display(),
            dir.display()
        );
        return ExitCode::SUCCESS;
    }
    let rows: Vec<[String; 3]> = scanned
        .found
        .iter()
        .map(|found| {
            let configured = if config.services.contains_key(&found.name) {
                "yes"
            } else if config.orchestrator.start_discovered {
                "no (runs with defaults)"
            } else {
                "no (not started)"
            };
            [
                found.name.to_string(),
                configured.to_owned(),
                found.binary.display().to_string(),
            ]
        })
        .collect();
    cli::outln!(
        "{}",
        table(["NAME", "CONFIGURED", "BINARY"], &rows).trim_end()
    );
    ExitCode::SUCCESS
}

/// Columns as wide as their widest cell (in characters, as a terminal shows
/// them), two spaces apart, and no padding after the last one.
fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(|cell| cell.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header = header.map(str::to_owned);
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(widths) {
            line.push_str(&format!("{cell:width$}  "));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// stderr for the daemon's log that never fails: when whoever reads it goes
/// away (a closed terminal, `| head`), writes fail with EPIPE, and
/// tracing-subscriber would report that with `eprintln!`, which panics on
/// that same broken stderr and takes down whatever task was logging.
fn init_tracing(config: &Config) {
    use console::Style;
    let level = config.orchestrator.log_level.as_str();
    let filter = tracing_subscriber::EnvFilter::try_from_env("ORCHESTRATOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let journal = journal::stderr_is_journal();
    // The journal keeps text, not escape sequences.
    let ansi = logview::use_colour(
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
        std::env::var_os("NO_COLOR").as_deref(),
    ) && !journal;
    let style = match config.orchestrator.log_format {
        LogFormat::Text => Style::Compact,
        LogFormat::KeyValue => Style::KeyValue,
        LogFormat::Json => Style::Json,
    };
    // Services discovered later or added by a reload with a longer name are
    // shown unpadded rather than moving the column.
    let width = console::name_width(config.services.keys().map(|name| name.as_ref()));
    let format = console::LineFormat {
        style,
        ansi,
        width,
        journal,
    };
    if let Err(error) = console::start(format) {
        // Without its thread the console writes from the caller's thread.
        eprintln!("orchestrator: cannot start the console thread: {error}");
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| console::ConsoleWriter)
        .with_ansi(ansi)
        .with_target(false);
    match style {
        Style::Json => builder.json().flatten_event(true).init(),
        // Under the journal both text formats are its plain lines.
        Style::KeyValue if !journal => builder.init(),
        _ => builder.event_format(console::DaemonEvents(format)).init(),
    }
    // Service lines are logged at info: below that level they are not
    // shown at all, and tracing's per-line path is the one left in place.
    if tracing::enabled!(target: "service", tracing::Level::INFO) {
        orchestrator_core::output::set_console(console::ServiceConsole);
    }
}

/// A reload reads the same file as `run` did, through the same validation:
/// what `check` passes a reload applies. As at start-up, a problem of one
/// service only keeps that one from starting; any other error rejects it.
fn reloader(explicit: Option<PathBuf>) -> Loader {
    Arc::new(move || {
        let loaded = config::load_all(explicit.as_deref()).map_err(|errors| {
            errors
                .problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        })?;
        let found = validate(&loaded, &HostEnv::from_process(), Some(resolve_program));
        if found.stops_the_daemon() {
            return Err(found
                .errors()
                .map(|finding| finding.problem.to_string())
                .collect());
        }
        let warnings = found
            .findings
            .iter()
            .map(|finding| match &finding.scope {
                Scope::Service(name) => format!("{name}: {}", finding.problem),
                _ => finding.problem.to_string(),
            })
            .collect();
        Ok((loaded.config, warnings))
    })
}

fn run(
    config: Config,
    loader: Loader,
    socket: PathBuf,
    findings: Vec<Finding>,
    config_stamp: Option<FileStamp>,
) -> anyhow::Result<()> {
    // Whatever our parent leaked to us must not reach the services. First,
    // while this is the only thread (the console's starts next).
    mark_inherited_fds_cloexec().context("cannot mark inherited file descriptors close-on-exec")?;
    init_tracing(&config);
    tracing::info!(
        pid = std::process::id(),
        data_dir = %config.orchestrator.data_dir.display(),
        "orchestrator {} starting",
        env!("CARGO_PKG_VERSION")
    );
    log_findings(&findings);
    raise_fd_limit();
    if let Err(error) = become_subreaper() {
        tracing::warn!("cannot become the subreaper of the services' orphans: {error}");
    }
    // Declared before the runtime, so dropped after it even when a panic
    // unwinds through here: the guardian wakes only once every task (and
    // the locks and cgroup parent they hold) is gone, so it never acts
    // beside a daemon that is still there.
    let mut guardian: Option<guardian::Guardian> = None;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let guardian_slot = &mut guardian;
    let outcome = runtime.block_on(async move {
        create_private_dir(&config.orchestrator.data_dir)?;
        // Taken before anything else: a second daemon on the same data_dir
        // stops here and disturbs nothing.
        let _lock = DaemonLock::acquire(&config.orchestrator.data_dir)?;
        // A previous daemon's guardian may still be stopping what it left:
        // nothing of ours starts before it is done.
        guardian::wait_for_previous(
            &config.orchestrator.data_dir,
            guardian::PREVIOUS_GUARDIAN_WAIT,
        )
        .await?;
        // Before the guardian: on cgroup v2 the daemon may move itself into
        // a leaf cgroup, and the guardian must be born there with it.
        let controller = resource_controller(&config.orchestrator, false);
        let claimed = controller.claimed_parent().map(Path::to_owned);
        *guardian_slot = start_guardian(
            config.source.as_deref(),
            claimed.as_deref(),
            controller.parent_lock(),
        )
        .await;
        let spawner = Arc::new(UnixSpawner::new(
            controller,
            config.orchestrator.require_limits,
        ));
        let dismissing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Some(guardian) = guardian_slot.as_ref() {
            watch_guardian(guardian.pid(), Arc::clone(&dismissing));
        }
        // TCP first: if it fails, no control socket is left behind.
        let tcp = match config.orchestrator.http_listen {
            Some(addr) => {
                let token_file = config
                    .orchestrator
                    .http_token_file
                    .clone()
                    .context("http_listen is set without http_token_file")?;
                let token = std::fs::read_to_string(&token_file)
                    .with_context(|| format!("cannot read {}", token_file.display()))?
                    .trim()
                    .to_owned();
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (http_listen)"))?;
                Some((listener, addr, token))
            }
            None => None,
        };
        create_socket_dir(&socket)?;
        let listener = bind_unix(&socket).await?;
        let socket_shown = socket.display().to_string();
        let (events_tx, events) = mpsc::channel(16);
        forward_signals(events_tx.clone()).context("cannot install signal handlers")?;
        // Held to the end: dropping it stops the watchers.
        let _watching = match config.orchestrator.watch {
            true => start_watching(&config, config_stamp, events_tx.clone()).await,
            false => None,
        };
        reap_orphans_on_sigchld().context("cannot install the SIGCHLD handler")?;
        let api_limits = ConnectionLimits {
            max_connections: config.orchestrator.api_max_connections,
            header_timeout: config.orchestrator.api_header_timeout,
            idle_timeout: config.orchestrator.api_idle_timeout,
        };
        // Discovered binaries run too (start_discovered): count them.
        let services = config.services.len()
            + discover(&config.orchestrator.services_dir).map_or(0, |found| found.len());
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        // Run on this (the main) thread rather than spawned: the services
        // are then set up in the allocator arena that parsing the
        // configuration just freed, instead of a worker's fresh one.
        let daemon = daemon::run(
            config,
            Some(loader),
            spawner,
            HostEnv::from_process(),
            events,
            Some(ready_tx),
            Vec::new(),
        );
        // Cancelled once the daemon is done: the listeners stop accepting
        // and every follow stream ends cleanly, so a `logs -f` sees the end
        // of its stream rather than a cut connection.
        let closing = CancellationToken::new();
        let servers = TaskTracker::new();
        let serving = {
            let closing = closing.clone();
            let servers = servers.clone();
            async move {
                let Ok(handles) = ready.await else { return };
                let control = DaemonControl {
                    supervisor: handles.supervisor,
                    events: handles.events,
                    daemon: events_tx,
                    closing: closing.clone(),
                    state: handles.state,
                    reloader: handles.reloader,
                };
                let listeners = if tcp.is_some() { 2 } else { 1 };
                let limits = ConnectionLimits {
                    max_connections: connection_cap_here(
                        api_limits.max_connections,
                        listeners,
                        services,
                    ),
                    ..api_limits
                };
                if limits.max_connections < api_limits.max_connections {
                    tracing::info!(
                        api_max_connections = limits.max_connections,
                        "API connections per listener lowered to leave the services their descriptors (RLIMIT_NOFILE)"
                    );
                }
                servers.spawn(serve(
                    OwnerOnly::new(listener),
                    router(control.clone()),
                    limits,
                    closing.clone(),
                    servers.clone(),
                ));
                tracing::info!(socket = %socket_shown, "control API listening");
                if let Some((listener, addr, token)) = tcp {
                    let app = tcp_router(control, addr, token);
                    servers.spawn(serve(
                        listener,
                        app,
                        limits,
                        closing.clone(),
                        servers.clone(),
                    ));
                    tracing::info!(%addr, "HTTP API listening");
                }
            }
        };
        let (result, ()) = tokio::join!(daemon, serving);
        closing.cancel();
        servers.close();
        // Answers in flight get a moment to finish; a client that stopped
        // reading does not hold the exit up.
        if tokio::time::timeout(SERVER_DRAIN, servers.wait())
            .await
            .is_err()
        {
            tracing::debug!("API connections still open at exit; closing them");
        }
        let _ = std::fs::remove_file(&socket);
        result?;
        // Every service is stopped: nothing for the guardian to do.
        if let Some(guardian) = guardian_slot.take() {
            dismissing.store(true, std::sync::atomic::Ordering::Relaxed);
            guardian.dismiss();
        }
        Ok::<(), anyhow::Error>(())
    });
    drop(runtime);
    drop(guardian);
    outcome
}

/// The services' cgroups, detected once (and logged once) for the
/// daemon's life.
fn resource_controller(
    orchestrator: &config::OrchestratorConfig,
    parent_lock_inherited: bool,
) -> Arc<dyn orchestrator_core::cgroup::ResourceController> {
    orchestrator_core::cgroup::detect(&orchestrator_core::cgroup::Settings {
        cgroup_parent: &orchestrator.cgroup_parent,
        data_dir: &orchestrator.data_dir,
        parent_lock_inherited,
    })
}

/// Our own binary in its guardian mode, with the same configuration. A
/// daemon without one still runs: what it leaves if killed is stopped by
/// the next daemon at its start instead.
async fn start_guardian(
    config: Option<&Path>,
    cgroup_parent: Option<&Path>,
    parent_lock: Option<std::os::fd::BorrowedFd<'_>>,
) -> Option<guardian::Guardian> {
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    if let Some(config) = config {
        args.push("--config".into());
        args.push(config.into());
    }
    args.push("guardian".into());
    // The parent we hold, which may be the fallback name: the guardian
    // claims and sweeps that one, not whatever is free when we die.
    // One argument, `--cgroup-parent=PATH`: a parent starting with `-`
    // would otherwise be taken for a flag.
    if let Some(parent) = cgroup_parent {
        let mut arg = std::ffi::OsString::from("--cgroup-parent=");
        arg.push(parent);
        args.push(arg);
    }
    // Our own file, so the guardian shows as `orchestrator guardian`;
    // /proc/self/exe when that file was replaced or removed since.
    let program = std::env::current_exe()
        .ok()
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
    match guardian::Guardian::spawn(&program, &args, parent_lock).await {
        Ok(guardian) => {
            tracing::debug!(pid = guardian.pid(), "guardian started");
            Some(guardian)
        }
        Err(error) => {
            tracing::warn!("{error}");
            None
        }
    }
}

/// A guardian that ends while the daemon runs (killed, OOM) leaves the
/// services unprotected against a SIGKILL of the daemon: say so once.
fn watch_guardian(pid: u32, dismissing: Arc<std::sync::atomic::AtomicBool>) {
    let Ok(exit) = orchestrator_core::process::ExitWatch::new(pid) else {
        return;
    };
    tokio::spawn(async move {
        exit.exited().await;
        if !dismissing.load(std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                guardian = pid,
                "the guardian ended: until the daemon restarts, a SIGKILL of the daemon would leave its services running until the next daemon starts"
            );
        }
    });
}

/// The guardian process: wait for the daemon to dismiss us or to die, and
/// in the second case stop what it left running.
fn guardian(config: Config, explicit: Option<PathBuf>, cgroup_parent: Option<PathBuf>) -> ExitCode {
    init_tracing(&config);
    let data_dir = config.orchestrator.data_dir.clone();
    // Only the daemon's section is kept while waiting (the services are
    // read anew if they are needed).
    let orchestrator = config.orchestrator.clone();
    drop(config);
    let (lock, end) = match guardian::watch_daemon(&data_dir) {
        Ok(watched) => watched,
        Err(error) => {
            tracing::error!("guardian: cannot watch the daemon: {error}");
            console::flush();
            return ExitCode::FAILURE;
        }
    };
    if end == guardian::DaemonEnd::Dismissed {
        return ExitCode::SUCCESS;
    }
    // Read anew for the services' stop policies; the data_dir we watched
    // for wins, whatever the file says now.
    let mut config = match config::load_all(explicit.as_deref()) {
        Ok(loaded) if loaded.config.orchestrator.data_dir == data_dir => loaded.config,
        _ => Config {
            source: None,
            orchestrator,
            services: Default::default(),
        },
    };
    // With the parent comes its lock, inherited as descriptor 3 and held
    // until this process exits: no other daemon can claim the parent
    // before the sweep below is done.
    let parent_lock_inherited = cgroup_parent.is_some();
    if let Some(parent) = cgroup_parent {
        config.orchestrator.cgroup_parent = parent;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!("guardian: cannot start the async runtime: {error}");
            console::flush();
            return ExitCode::FAILURE;
        }
    };
    // The daemon is gone; the parent it held is still locked by the
    // descriptor we inherited, so detection uses it as it is and its
    // cgroups are swept.
    let spawner = Arc::new(UnixSpawner::new(
        resource_controller(&config.orchestrator, parent_lock_inherited),
        false,
    ));
    runtime.block_on(daemon::recover_after_death(
        config,
        spawner,
        HostEnv::from_process(),
    ));
    // Held until the clean-up is done: a new daemon waits for it.
    drop(lock);
    console::flush();
    ExitCode::SUCCESS
}

/// What `check` would fail on but `run` lives with: the service concerned
/// fails at its start (its state says why), the others start.
fn log_findings(findings: &[Finding]) {
    for finding in findings {
        let problem = &finding.problem;
        match (&finding.severity, &finding.scope) {
            (Severity::Error, Scope::Service(name)) => {
                tracing::error!(service = %name, "{problem}; the other services start")
            }
            (Severity::Error, _) => tracing::error!("{problem}"),
            (Severity::Warning, _) => tracing::warn!("{problem}"),
        }
    }
}

/// How long the API servers may take to finish their answers at exit.
const SERVER_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create data_dir {}", dir.display()))
}

/// The socket's own folder when it is not data_dir (/run/orchestrator in
/// host mode): 0755 as systemd's RuntimeDirectory= makes it, since the
/// socket itself is 0600 and checks its peers.
fn create_socket_dir(socket: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match socket.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.exists() => {
            std::fs::create_dir_all(dir)
                // Whatever the umask: clients of other users must reach the
                // socket to be told, by its own mode, that they may not.
                .and_then(|()| {
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                })
                .with_context(|| format!("cannot create the socket's directory {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Each service costs the daemon three descriptors (two pipes and a pidfd),
/// so the usual soft limit of 1024 would cap us near 300 services: take the
/// hard limit, as systemd and most servers do. The services get the
/// original back (recorded first), not the raised one.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    record_original_nofile();
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

/// Orphans of the services (and, as PID 1 in a container, anything) come
/// to us; reap them as they end so no zombie piles up.
fn reap_orphans_on_sigchld() -> std::io::Result<()> {
    let mut children = signal(SignalKind::child())?;
    tokio::spawn(async move {
        while children.recv().await.is_some() {
            let reaped = reap_orphans();
            if reaped > 0 {
                tracing::debug!(reaped, "reaped orphaned processes");
            }
        }
    });
    Ok(())
}

/// Editing the config file or dropping a binary into services_dir asks for
/// a reload, as SIGHUP does. Without watchers the daemon still runs: only
/// the automatic part is lost.
/// What tells a file's version apart without reading it.
type FileStamp = (u64, u64, std::time::SystemTime);

fn file_stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.ino(), metadata.len(), metadata.modified().ok()?))
}

async fn start_watching(
    config: &Config,
    loaded: Option<FileStamp>,
    events: mpsc::Sender<DaemonEvent>,
) -> Option<WatchHandle> {
    match spawn_watcher(
        config.source.clone(),
        config.orchestrator.services_dir.clone(),
        DEFAULT_DEBOUNCE,
        events.clone(),
    )
    .await
    {
        Ok(handle) => {
            // The watchers take the file as they first see it as the known
            // version: an edit between our read and that moment would never
            // be applied. Compare, and reload once if it moved.
            let now = config.source.as_deref().and_then(file_stamp);
            if now != loaded {
                tracing::info!("the config file changed while the daemon started; reloading");
                let _ = events.send(DaemonEvent::Reload).await;
            }
            Some(handle)
        }
        Err(error) => {
            tracing::warn!(
                "{error} (inotify limits: fs.inotify.max_user_instances, max_user_watches); changes are not picked up by themselves: reload with `orchestrator reload` or SIGHUP"
            );
            None
        }
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
