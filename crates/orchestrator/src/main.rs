//! The `orchestrator` command: a thin shell around `orchestrator-core`.

mod api;
mod cli;
mod console;
mod journal;
mod logview;
mod paths;
mod upgrade;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use anyhow::Context;
use clap::{FromArgMatches, Parser, Subcommand};
use orchestrator_core::config::{self, Config, ConfigErrors, ConfigProblem, LogFormat};
use orchestrator_core::daemon::{self, DaemonEvent};
use orchestrator_core::discovery::scan;
use orchestrator_core::guardian;
use orchestrator_core::plan::HostEnv;
use orchestrator_core::process::{
    UnixSpawner, become_subreaper, mark_inherited_fds_cloexec, reap_orphans,
    record_original_nofile, reserve_spawn_slots, resolve_program,
};
use orchestrator_core::reload::{Loader, Planned, Reread};
use orchestrator_core::state::DaemonLock;
use orchestrator_core::validate::{Finding, Scope, Severity, Validation, validate};
use orchestrator_core::watch::{Binaries, DEFAULT_DEBOUNCE, WatchHandle, spawn_watcher};
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

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ExportTarget {
    /// One unit per service, a template for instances, a target for them all
    Systemd,
    /// A Deployment per service (replicas from instances), Services for probed ports (needs --image)
    Kubernetes,
    /// One job, a group per service with an exec task (HCL2; --json for the API's JSON)
    Nomad,
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
    Run {
        /// Internal: resume from an upgrade's hand-over (a memfd the old daemon left open)
        #[arg(long, hide = true, value_name = "FD")]
        handover: Option<std::os::fd::RawFd>,
    },
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
    /// Write the services as another engine's files (systemd units, a Nomad job, Kubernetes manifests)
    ///
    /// From the effective configuration: defaults, env files, ${VAR} and instances applied, as `run` would start them. Each setting the target has no equivalent for is named on stderr with what was done instead (dropped or approximated); --strict makes any of them an error (exit 2, nothing written). Without --out the files are printed, each after a `# FILE` line.
    #[command(after_help = "\
Examples:
  orchestrator export systemd --out /etc/systemd/system
                                        then: systemctl daemon-reload && systemctl start orchestrator-services.target
  orchestrator export systemd           print the units
  orchestrator export systemd --strict  exit 2 if anything would not carry over
  orchestrator export kubernetes --image registry.example/app:1.4 > services.yaml
  orchestrator export nomad --out deploy/   then: nomad job run deploy/orchestrator-services.nomad.hcl")]
    Export {
        /// What to write for
        target: ExportTarget,
        /// The container image holding the services' programs at their paths here (kubernetes)
        #[arg(long, value_name = "IMAGE")]
        image: Option<String>,
        /// The job as the Nomad API's JSON instead of HCL2 (nomad)
        #[arg(long)]
        json: bool,
        /// Write the files into this directory (created if missing) instead of printing them
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Fail (exit 2, nothing written) when a setting has no equivalent on the target
        #[arg(long)]
        strict: bool,
    },
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
    /// Re-exec the daemon as a new binary under the running services
    ///
    /// The daemon first checks the new binary (the file it was started from, which may have been replaced since, or --binary): `BINARY --version` and `BINARY check` of the current config must pass, else nothing changes and this exits 1 saying why. Then it stops taking requests (clients wait, none is refused), hands every service, listener and lock over to the new binary with the same pid, and this returns once the new daemon answers. Same as SIGUSR2 to the daemon (without --binary).
    #[command(after_help = "\
Examples:
  install target/release/orchestrator /usr/local/bin/ && orchestrator upgrade
  orchestrator upgrade --binary /opt/orchestrator-0.2.0/orchestrator
  kill -USR2 $(pidof -s orchestrator)        the same, from a script without the CLI")]
    Upgrade {
        /// The new binary [default: the path the daemon was started from]
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
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
    /// Internal: the hand-over formats this binary reads (asked by an
    /// upgrade's dry run before it execs us)
    #[command(hide = true, name = "handover-formats")]
    HandoverFormats,
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
    // Before anything: what an upgrade execs again.
    let origin = upgrade::Origin::record();
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
        Command::Run { .. }
            | Command::Check
            | Command::Discover
            | Command::Export { .. }
            | Command::Guardian { .. }
    );
    match cli.command {
        Command::Completions { shell } => return completions(shell),
        Command::Manpage => return manpage(),
        Command::HandoverFormats => {
            let formats: Vec<String> = orchestrator_core::handover::READABLE_FORMATS
                .iter()
                .map(ToString::to_string)
                .collect();
            cli::outln!("{}", formats.join(" "));
            return ExitCode::SUCCESS;
        }
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
        // A client needs only to find its daemon: the service sections,
        // 10,000 of them on a big host, are the daemon's to read. So does
        // the guardian while it waits (it reads them anew if the daemon
        // dies): parsing them cost it 3.6 MiB of heap it then kept.
        let every_service = matches!(
            cli.command,
            Command::Run { .. } | Command::Check | Command::Discover | Command::Export { .. }
        );
        let loaded = match every_service {
            true => config::load_all(cli.config.as_deref()),
            false => config::load_daemon_settings(cli.config.as_deref()),
        };
        match loaded {
            // Resuming from an upgrade: this binary's `check` passed on this
            // file moments ago (the dry run), and every service's findings
            // were said when the daemon first started; the switch does not
            // wait for them again. The schema's problems still count.
            Ok(loaded) if matches!(cli.command, Command::Run { handover: Some(_) }) => {
                config_stamp = loaded.config.source.as_deref().and_then(file_stamp);
                if !loaded.problems.is_empty() {
                    let errors = ConfigErrors {
                        problems: loaded.problems,
                    };
                    eprintln!("orchestrator: {errors}");
                    return ExitCode::from(EXIT_USAGE);
                }
                validation = Some(Validation::default());
                Some(loaded.config)
            }
            Ok(loaded)
                if matches!(
                    cli.command,
                    Command::Check | Command::Run { .. } | Command::Export { .. }
                ) =>
            {
                config_stamp = loaded.config.source.as_deref().and_then(file_stamp);
                let found = validate(&loaded, &HostEnv::from_process(), Some(resolve_program));
                let stop = match cli.command {
                    Command::Check | Command::Export { .. } => found.errors().next().is_some(),
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
        Command::Export {
            target,
            image,
            json,
            out,
            strict,
        } => export_command(
            &validation.expect("validated for export"),
            target,
            image.as_deref(),
            json,
            out.as_deref(),
            strict,
        ),
        Command::Guardian { cgroup_parent } => guardian(
            config.expect("loaded for guardian"),
            cli.config.clone(),
            cgroup_parent,
        ),
        Command::Run { handover } => {
            // Taken out in a statement of its own: a temporary in the
            // `match` below would live as long as the daemon, and the
            // validation's plan of every service with it (~1.3 KiB each).
            let findings = validation.expect("validated for run").findings;
            match run(
                config.expect("loaded for run"),
                reloader(cli.config.clone()),
                run_socket,
                findings,
                config_stamp,
                handover,
                origin,
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
            }
        }
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
const NO_DAEMON: [&str; 7] = [
    "run",
    "check",
    "discover",
    "completions",
    "manpage",
    "guardian",
    "handover-formats",
];
const NO_SOCKET: [&str; 6] = [
    "check",
    "discover",
    "completions",
    "manpage",
    "guardian",
    "handover-formats",
];
const NO_CONFIG: [&str; 3] = ["completions", "manpage", "handover-formats"];

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
    let mut command = Cli::command().version(upgrade::version());
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
            Command::Upgrade { binary } => cli::upgrade(&client, binary).await,
            Command::Run { .. }
            | Command::Check
            | Command::Discover
            | Command::Export { .. }
            | Command::Guardian { .. }
            | Command::Completions { .. }
            | Command::Manpage
            | Command::HandoverFormats => {
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

/// `export`: what `run` would start, as the target's files.
fn export_command(
    validation: &Validation,
    target: ExportTarget,
    image: Option<&str>,
    json: bool,
    out: Option<&Path>,
    strict: bool,
) -> ExitCode {
    let image = match (target, image) {
        (ExportTarget::Kubernetes, None) => {
            eprintln!(
                "orchestrator: export kubernetes needs --image IMAGE: the container image that holds the services' programs"
            );
            return ExitCode::from(EXIT_USAGE);
        }
        (_, image) => image.unwrap_or_default(),
    };
    for finding in validation.warnings() {
        eprintln!("orchestrator: warning: {}", finding.problem);
    }
    let definitions = &validation.definitions;
    let export = match target {
        ExportTarget::Systemd => orchestrator_core::export::systemd::export(definitions),
        ExportTarget::Kubernetes => {
            orchestrator_core::export::kubernetes::export(definitions, image)
        }
        ExportTarget::Nomad => orchestrator_core::export::nomad::export(definitions, json),
    };
    for untranslated in &export.untranslated {
        eprintln!("orchestrator: export: {untranslated}");
    }
    if strict && !export.untranslated.is_empty() {
        eprintln!(
            "orchestrator: export: {} setting{} would not carry over (--strict): nothing written",
            export.untranslated.len(),
            if export.untranslated.len() == 1 {
                ""
            } else {
                "s"
            }
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let Some(dir) = out else {
        for file in &export.files {
            cli::outln!("# {}\n{}", file.path, file.contents);
        }
        return ExitCode::SUCCESS;
    };
    for file in &export.files {
        let path = dir.join(&file.path);
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, &file.contents));
        if let Err(error) = written {
            eprintln!(
                "orchestrator: cannot write {}: {error}; check that the directory is writable",
                path.display()
            );
            return ExitCode::FAILURE;
        }
    }
    eprintln!(
        "orchestrator: wrote {} file{} to {}",
        export.files.len(),
        if export.files.len() == 1 { "" } else { "s" },
        dir.display()
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
        let host = HostEnv::from_process();
        let found = validate(&loaded, &host, Some(resolve_program));
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
        Ok(Reread {
            config: loaded.config,
            warnings,
            discovered: found.scan.found,
            planned: Some(Planned {
                host,
                definitions: found.definitions,
            }),
        })
    })
}

fn run(
    config: Config,
    loader: Loader,
    socket: PathBuf,
    findings: Vec<Finding>,
    config_stamp: Option<FileStamp>,
    handover_fd: Option<std::os::fd::RawFd>,
    origin: upgrade::Origin,
) -> anyhow::Result<()> {
    // An upgrade's hand-over is read first, while this is the only thread:
    // a document this build cannot read stops us here, before anything is
    // touched (the guardian, still watching, then stops the services as
    // after a crash).
    let mut handover = match handover_fd {
        Some(fd) => Some(
            orchestrator_core::handover::read_inherited(fd)
                .context("cannot resume from the old daemon's hand-over")?,
        ),
        None => None,
    };
    orchestrator_core::memory::tune_malloc();
    // Whatever our parent leaked to us must not reach the services. First,
    // while this is the only thread (the console's starts next).
    mark_inherited_fds_cloexec().context("cannot mark inherited file descriptors close-on-exec")?;
    // While the descriptor table is short: the slots must lie below every
    // service's descriptors for a spawn to skip copying those.
    reserve_spawn_slots();
    init_tracing(&config);
    match &handover {
        Some(document) => tracing::info!(
            pid = std::process::id(),
            services = document.services.len(),
            "orchestrator {} upgraded from {}",
            upgrade::version(),
            document.from_version
        ),
        None => tracing::info!(
            pid = std::process::id(),
            data_dir = %config.orchestrator.data_dir.display(),
            "orchestrator {} starting",
            upgrade::version()
        ),
    }
    log_findings(&findings);
    // The limit the services get back is the first daemon's, not the one
    // this image inherited from the raise before the upgrade.
    if let Some(soft) = handover
        .as_ref()
        .and_then(|document| document.original_nofile)
    {
        orchestrator_core::process::record_original_nofile_as(soft);
    }
    raise_fd_limit(&config);
    if let Err(error) = become_subreaper() {
        tracing::warn!("cannot become the subreaper of the services' orphans: {error}");
    }
    // Declared before the runtime, so dropped after it even when a panic
    // unwinds through here: the guardian wakes only once every task (and
    // the locks and cgroup parent they hold) is gone, so it never acts
    // beside a daemon that is still there.
    let mut guardian: Option<guardian::Guardian> = None;
    // Blocking threads (start-up's preparations, state writes, /proc scans)
    // retire after 2 s idle rather than tokio's 10 s: an idle daemon then
    // has no thread left to end, and so no wake-up, a few seconds after a
    // burst; starting a thread again costs tens of microseconds.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_keep_alive(BLOCKING_THREAD_KEEP_ALIVE)
        .build()
        .context("cannot start the async runtime")?;
    let guardian_slot = &mut guardian;
    let outcome = runtime.block_on(async move {
        let mut config = config;
        create_private_dir(&config.orchestrator.data_dir)?;
        let mut inherited = match handover.as_mut() {
            Some(document) => Some(upgrade::Inherited::take(document)?),
            None => None,
        };
        let data_dir = config.orchestrator.data_dir.clone();
        // Taken before anything else: a second daemon on the same data_dir
        // stops here and disturbs nothing. After an upgrade, the old
        // daemon's holds are ours as they were: never released meanwhile.
        let lock = match inherited.as_mut().and_then(|inherited| inherited.lock.take()) {
            Some((file, name)) => DaemonLock::from_fds(&data_dir, file, name)?,
            None => {
                let lock = DaemonLock::acquire(&data_dir)?;
                // A previous daemon's guardian may still be stopping what
                // it left: nothing of ours starts before it is done. (Not
                // after an upgrade: that guardian is ours.)
                guardian::wait_for_previous(&data_dir, guardian::PREVIOUS_GUARDIAN_WAIT).await?;
                lock
            }
        };
        // The cgroup parent the old daemon claimed, held by the descriptor
        // it handed over: taken as it is rather than claimed anew.
        let parent_lock = inherited
            .as_mut()
            .and_then(|inherited| inherited.parent_lock.take());
        let inherited_parent = handover
            .as_ref()
            .and_then(|document| document.cgroup_parent.clone())
            .filter(|_| parent_lock.is_some());
        if let Some(parent) = &inherited_parent {
            config.orchestrator.cgroup_parent = parent.clone();
        }
        // Before the guardian: on cgroup v2 the daemon may move itself into
        // a leaf cgroup, and the guardian must be born there with it.
        let controller = resource_controller(&config.orchestrator, inherited_parent.is_some());
        let claimed = controller.claimed_parent().map(Path::to_owned);
        *guardian_slot = match inherited
            .as_mut()
            .and_then(|inherited| inherited.guardian.take())
        {
            Some((control, pid)) => Some(guardian::Guardian::from_parts(control, pid)),
            None => {
                start_guardian(
                    config.source.as_deref(),
                    claimed.as_deref(),
                    controller.parent_lock().or(parent_lock.as_ref().map(AsFd::as_fd)),
                )
                .await
            }
        };
        let spawner: Arc<UnixSpawner> = Arc::new(UnixSpawner::new(
            Arc::clone(&controller),
            config.orchestrator.require_limits,
        ));
        let dismissing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Some(guardian) = guardian_slot.as_ref() {
            watch_guardian(guardian.pid(), Arc::clone(&dismissing));
        }
        // TCP first: if it fails, no control socket is left behind.
        let mut tcp = match config.orchestrator.http_listen {
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
                let inherited_tcp = inherited
                    .as_mut()
                    .and_then(|inherited| inherited.api_tcp.take());
                let listener = match inherited_tcp {
                    Some(fd) => upgrade::tcp_listener(fd)
                        .context("cannot listen on the HTTP socket handed over")?,
                    None => tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("cannot listen on {addr} (http_listen)"))?,
                };
                Some((listener, addr, token))
            }
            None => None,
        };
        let inherited_unix = inherited
            .as_mut()
            .and_then(|inherited| inherited.api_unix.take());
        let listener = match inherited_unix {
            Some(fd) => upgrade::unix_listener(fd)
                .context("cannot listen on the control socket handed over")?,
            None => {
                create_socket_dir(&socket)?;
                bind_unix(&socket).await?
            }
        };
        let mut unix = OwnerOnly::new(listener);
        let socket_shown = socket.display().to_string();
        // The services handed over, resumed by the first run below; every
        // other descriptor the old daemon kept is closed.
        let mut resumed = Vec::new();
        let mut upgrades = 0;
        // The old daemon's version, for the first run only: a run that
        // resumes what a failed exec left is the same binary's.
        let mut upgraded_from = None;
        if let Some(mut document) = handover.take() {
            resumed = document.take_services()?;
            // Before any orphan reaper exists: a service that ended during
            // the switch is a zombie its adopter must be the one to reap.
            orchestrator_core::process::hold_handed_over(
                resumed
                    .iter()
                    .filter_map(|frozen| frozen.service.child.as_ref().map(|child| child.pid)),
            );
            for (name, fd) in document.take_remaining_fds() {
                tracing::debug!(
                    name,
                    taken = fd.is_ok(),
                    "closed a handed-over descriptor this build does not use"
                );
            }
            upgrades = document.upgrades;
            upgraded_from = Some(document.from_version.clone());
        }
        drop(inherited);
        // Every source of daemon events sends into this funnel, which lives
        // as long as the process; each run of the daemon is fed from it.
        let (funnel_tx, mut funnel) = mpsc::channel(16);
        forward_signals(funnel_tx.clone()).context("cannot install signal handlers")?;
        let (upgrader, mut go) =
            upgrade::Upgrader::new(origin.binary.clone(), config.source.clone(), upgrades);
        forward_upgrade_signal(upgrader.clone()).context("cannot install the SIGUSR2 handler")?;
        // Every handler is in place: what an upgrade's exec held back (a
        // SIGTERM sent during the switch) is taken now.
        upgrade::unblock_daemon_signals();
        // The watchers are armed once the services run (a thousand
        // directories take a while to watch, and an upgrade's switch must
        // not wait for them); what they would have seen meanwhile is
        // caught by comparing with the services_dir as it is now, before
        // the daemon discovers it.
        let mut watch = config.orchestrator.watch.then(|| WatchFrom {
            source: config.source.clone(),
            services_dir: config.orchestrator.services_dir.clone(),
            stamp: config_stamp,
            binaries: Binaries::now(&config.orchestrator.services_dir),
        });
        // Held to the end: its output, once armed, is the watchers' handle,
        // and dropping that stops them.
        let mut watching: Option<tokio::task::JoinHandle<Option<WatchHandle>>> = None;
        reap_orphans_on_sigchld().context("cannot install the SIGCHLD handler")?;
        let api_limits = ConnectionLimits {
            max_connections: config.orchestrator.api_max_connections,
            header_timeout: config.orchestrator.api_header_timeout,
            idle_timeout: config.orchestrator.api_idle_timeout,
        };
        let listeners = if tcp.is_some() { 2 } else { 1 };
        let mut limits = None;
        let config_source = config.source.clone();
        let mut config = Some(config);
        let mut said_listening = false;
        // One turn per run of the daemon: the first, and one more after each
        // upgrade whose exec failed, resuming the services it had frozen.
        let result: anyhow::Result<()> = 'runs: loop {
            let config = match config.take() {
                Some(config) => config,
                None => match loader() {
                    Ok(reread) => reread.config,
                    Err(problems) => {
                        break 'runs Err(anyhow::anyhow!(
                            "cannot read the configuration again to resume the services after a failed upgrade: {}; the guardian stops them: start the daemon again",
                            problems.join("; ")
                        ));
                    }
                },
            };
            let (ready_tx, ready) = tokio::sync::oneshot::channel();
            // Run on this (the main) thread rather than spawned: the services
            // are then set up in the allocator arena that parsing the
            // configuration just freed, instead of a worker's fresh one.
            // Boxed, to be dropped once frozen: the funnel it borrows is
            // then looked at for what came in during the freeze.
            let mut daemon = Box::pin(daemon::run(
                config,
                Some(loader.clone()),
                spawner.clone(),
                HostEnv::from_process(),
                &mut funnel,
                Some(ready_tx),
                daemon::Resumed {
                    services: std::mem::take(&mut resumed),
                    upgraded_from: upgraded_from.take(),
                },
            ));
            let handles = tokio::select! {
                result = &mut daemon => break 'runs result.map_err(Into::into),
                handles = ready => handles,
            };
            let Ok(handles) = handles else {
                break 'runs (&mut daemon).await.map_err(Into::into);
            };
            upgrader.set_reloader(Some(handles.reloader.clone()));
            if let Some(from) = watch.take() {
                watching = Some(tokio::spawn(start_watching(from, funnel_tx.clone())));
            }
            // Discovered binaries run too: the plan counts them.
            let limits = *limits.get_or_insert_with(|| {
                let capped = ConnectionLimits {
                    max_connections: connection_cap_here(
                        api_limits.max_connections,
                        listeners,
                        handles.services,
                    ),
                    ..api_limits
                };
                if capped.max_connections < api_limits.max_connections {
                    tracing::info!(
                        api_max_connections = capped.max_connections,
                        "API connections per listener lowered to leave the services their descriptors (RLIMIT_NOFILE)"
                    );
                }
                capped
            });
            // One turn per serving of the API: the first, and one more after
            // each upgrade refused at its freeze.
            loop {
                let session = Session::start(
                    &handles,
                    unix,
                    tcp,
                    limits,
                    funnel_tx.clone(),
                    upgrader.clone(),
                );
                if !said_listening {
                    said_listening = true;
                    tracing::info!(socket = %socket_shown, "control API listening");
                    if let Some(addr) = session.tcp_addr() {
                        tracing::info!(%addr, "HTTP API listening");
                    }
                }
                let request = tokio::select! {
                    result = &mut daemon => {
                        session.stop(SERVER_DRAIN).await?;
                        break 'runs result.map_err(Into::into);
                    }
                    Some(request) = go.recv() => request,
                };
                // The API stops taking requests: connections wait in the
                // listeners' backlogs for whichever daemon serves next, and
                // the answers in flight finish first.
                tracing::info!(binary = %request.binary.display(), to = %request.to, "upgrading");
                (unix, tcp) = session.stop(upgrade::DRAIN_TIMEOUT).await?;
                let (reply, frozen) = tokio::sync::oneshot::channel();
                if funnel_tx.send(DaemonEvent::Freeze { reply }).await.is_err() {
                    upgrader.failed("the daemon stopped taking events".to_owned());
                    continue;
                }
                tokio::pin!(frozen);
                // The run is polled here, on this thread: it may answer the
                // freeze and return within one poll, and a finished run
                // must not be awaited again (it would panic).
                let mut run_ended = None;
                let frozen = tokio::select! {
                    biased;
                    answer = &mut frozen => answer,
                    result = &mut daemon => match frozen.try_recv() {
                        Ok(answer) => {
                            run_ended = Some(result);
                            Ok(answer)
                        }
                        // Shut down before it took the freeze.
                        Err(_) => {
                            upgrader.failed("the daemon shut down first".to_owned());
                            break 'runs result.map_err(Into::into);
                        }
                    },
                };
                let frozen = match frozen {
                    Ok(Ok(frozen)) => frozen,
                    Ok(Err(refused)) => {
                        upgrader.failed(refused.to_string());
                        if let Some(result) = run_ended {
                            // It refused and still ended (a shutdown came
                            // with it): nothing to serve any more.
                            break 'runs result.map_err(Into::into);
                        }
                        continue;
                    }
                    Err(_) => {
                        upgrader.failed("the daemon ended without answering the freeze".to_owned());
                        break 'runs (&mut daemon).await.map_err(Into::into);
                    }
                };
                // Frozen: the run returns without stopping anything.
                let ended = match run_ended {
                    Some(result) => result,
                    None => (&mut daemon).await,
                };
                if let Err(error) = ended {
                    tracing::warn!("the daemon's run ended with an error after the freeze: {error}");
                }
                drop(daemon);
                upgrader.set_reloader(None);
                if let Some(pause) = upgrade::test_switch_pause() {
                    // Until the pause ends or something is asked meanwhile.
                    tracing::info!("pausing the switch for {pause:?} (ORCHESTRATOR_TEST_SWITCH_PAUSE_MS)");
                    let until = tokio::time::Instant::now() + pause;
                    while funnel.is_empty() && tokio::time::Instant::now() < until {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                }
                // What came in while the freeze was under way (a SIGTERM, a
                // reload) would die with the exec: the upgrade is abandoned
                // instead, and the services resumed here; the events stay in
                // the funnel for that run, which carries them out. Looked at
                // again right before the exec.
                let asked_meanwhile = || !funnel.is_empty();
                if asked_meanwhile() {
                    tracing::info!("{ASKED_DURING_THE_SWITCH}");
                    upgrader.failed(ASKED_DURING_THE_SWITCH.to_owned());
                    resumed = frozen;
                    continue 'runs;
                }
                let own = upgrade::Own {
                    lock: lock.fds(),
                    parent_lock: controller.parent_lock().or(parent_lock.as_ref().map(AsFd::as_fd)),
                    cgroup_parent: claimed.clone(),
                    api_unix: upgrade::borrow(unix.listener()),
                    api_tcp: tcp.as_ref().map(|(listener, _, _)| upgrade::borrow(listener)),
                    guardian: guardian_slot
                        .as_ref()
                        .map(|guardian| (guardian.control_fd(), guardian.pid())),
                };
                // Returns only if the exec failed: this binary resumes the
                // services it froze, in its next run.
                let why = upgrade::exec(
                    &request.binary,
                    &origin,
                    config_source.clone(),
                    upgrades,
                    &own,
                    &frozen,
                    &|| asked_meanwhile().then(|| ASKED_DURING_THE_SWITCH.to_owned()),
                );
                upgrader.failed(why);
                resumed = frozen;
                continue 'runs;
            }
        };
        // The watchers stop here, not before.
        drop(watching);
        let _ = std::fs::remove_file(&socket);
        result?;
        drop(lock);
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

/// Why an upgrade is abandoned when a shutdown or a reload is asked while
/// the services are frozen.
const ASKED_DURING_THE_SWITCH: &str = "a shutdown or a reload was asked during the upgrade's switch: the upgrade is abandoned, the services resumed here and the request carried out; upgrade again if it still applies";

/// The control API served on the listeners, for one run of the daemon.
struct Session {
    closing: CancellationToken,
    servers: TaskTracker,
    unix: tokio::task::JoinHandle<OwnerOnly>,
    tcp: Option<(
        tokio::task::JoinHandle<tokio::net::TcpListener>,
        std::net::SocketAddr,
        String,
    )>,
}

type TcpParts = (tokio::net::TcpListener, std::net::SocketAddr, String);

impl Session {
    fn start(
        handles: &daemon::DaemonHandles,
        unix: OwnerOnly,
        tcp: Option<TcpParts>,
        limits: ConnectionLimits,
        daemon: mpsc::Sender<DaemonEvent>,
        upgrader: upgrade::Upgrader,
    ) -> Session {
        // Cancelled once the daemon is done: the listeners stop accepting
        // and every follow stream ends cleanly, so a `logs -f` sees the end
        // of its stream rather than a cut connection.
        let closing = CancellationToken::new();
        let servers = TaskTracker::new();
        let control = DaemonControl {
            supervisor: handles.supervisor.clone(),
            events: handles.events.clone(),
            daemon,
            closing: closing.clone(),
            state: handles.state.clone(),
            reloader: handles.reloader.clone(),
            upgrader,
        };
        let unix = tokio::spawn(serve(
            unix,
            router(control.clone()),
            limits,
            closing.clone(),
            servers.clone(),
        ));
        let tcp = tcp.map(|(listener, addr, token)| {
            let app = tcp_router(control, addr, token.clone());
            let served = tokio::spawn(serve(
                listener,
                app,
                limits,
                closing.clone(),
                servers.clone(),
            ));
            (served, addr, token)
        });
        Session {
            closing,
            servers,
            unix,
            tcp,
        }
    }

    fn tcp_addr(&self) -> Option<std::net::SocketAddr> {
        self.tcp.as_ref().map(|(_, addr, _)| *addr)
    }

    /// Stops accepting, lets the answers in flight finish (at most `drain`:
    /// a client that stopped reading does not hold us up), and returns the
    /// listeners, still bound.
    async fn stop(
        self,
        drain: std::time::Duration,
    ) -> anyhow::Result<(OwnerOnly, Option<TcpParts>)> {
        self.closing.cancel();
        let unix = self.unix.await.context("the control API server failed")?;
        let tcp = match self.tcp {
            Some((served, addr, token)) => Some((
                served.await.context("the HTTP API server failed")?,
                addr,
                token,
            )),
            None => None,
        };
        self.servers.close();
        if tokio::time::timeout(drain, self.servers.wait())
            .await
            .is_err()
        {
            tracing::debug!("API connections still open after {drain:?}; closing them");
        }
        Ok((unix, tcp))
    }
}

/// SIGUSR2 asks for an upgrade to the binary the daemon was started from,
/// as `orchestrator upgrade` does; the outcome is in the log.
fn forward_upgrade_signal(upgrader: upgrade::Upgrader) -> std::io::Result<()> {
    let mut user2 = signal(SignalKind::user_defined2())?;
    tokio::spawn(async move {
        while user2.recv().await.is_some() {
            tracing::info!(
                "received SIGUSR2: upgrading to the binary this daemon was started from"
            );
            let upgrader = upgrader.clone();
            tokio::spawn(async move {
                if let Err(why) = upgrader.request(None).await {
                    tracing::error!("upgrade refused: {why}");
                }
            });
        }
    });
    Ok(())
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
    // The parse of the file (every section, even those skipped) is garbage
    // now: hand it back rather than keep it for the daemon's lifetime.
    orchestrator_core::memory::return_free_memory();
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

/// How long an idle blocking thread of the runtime lives on.
const BLOCKING_THREAD_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(2);

/// Each service costs the daemon a few descriptors (two pipes, a pidfd, a
/// cgroup file), so the usual soft limit of 1024 would cap us near 250
/// services: take the hard limit, as systemd and most servers do, and as
/// root raise the hard one too when the configuration needs more. When it
/// still falls short, say what to raise: otherwise the first sign is a
/// service failing to start with EMFILE. The services get the original
/// limit back (recorded first), not the raised one.
fn raise_fd_limit(config: &Config) {
    use orchestrator_core::process::{DESCRIPTORS_PER_SERVICE, raise_nofile};
    record_original_nofile();
    let services = config.services.len() as u64;
    // What the services cannot do without; the API's connections adapt to
    // what is left (see `connection_cap_here`).
    let needed = services
        .saturating_mul(DESCRIPTORS_PER_SERVICE)
        .saturating_add(crate::api::server::FDS_MARGIN as u64);
    // Asked for, when the hard limit must go up: room for every API
    // connection too, and for discovered binaries (not counted yet) and a
    // reload adding services.
    let listeners = 1 + u64::from(config.orchestrator.http_listen.is_some());
    let api = listeners.saturating_mul(config.orchestrator.api_max_connections as u64);
    let wanted = needed.saturating_add(api).saturating_add(1024);
    match raise_nofile(wanted) {
        Ok(raise) if raise.after.0 >= needed => {
            tracing::debug!(before = ?raise.before, after = ?raise.after, "open-files limit")
        }
        Ok(raise) => tracing::warn!(
            "{services} services need up to {needed} open files but the daemon's limit is {} \
             (hard {}): once that many run (enabled or started later, at most \
             {DESCRIPTORS_PER_SERVICE} descriptors each), starts fail with EMFILE; raise the \
             limit (LimitNOFILE= in \
             the systemd unit, `ulimit -Hn` and `ulimit -n` in the shell that starts the \
             daemon; a daemon with CAP_SYS_RESOURCE, as root usually is, raises its own)",
            raise.after.0,
            raise.after.1
        ),
        Err(error) => tracing::warn!("cannot raise the open-files limit: {error}"),
    }
}

/// Orphans of the services (and, as PID 1 in a container, anything) come
/// to us; reap them as they end so no zombie piles up.
fn reap_orphans_on_sigchld() -> std::io::Result<()> {
    let mut children = signal(SignalKind::child())?;
    tokio::spawn(async move {
        while children.recv().await.is_some() {
            {
                // Not while a dry run waits for its own children.
                let _pass = upgrade::REAPING.read().await;
                let reaped = reap_orphans();
                if reaped > 0 {
                    tracing::debug!(reaped, "reaped orphaned processes");
                }
            }
            // A scan reads every child's pid, and exits come by the thousand
            // per second at scale (exec health checks, restarts): one scan
            // per gap at most. A SIGCHLD in the gap is not lost (the next
            // recv returns at once), so an orphan stays a zombie that long
            // at most.
            tokio::time::sleep(ORPHAN_SCAN_GAP).await;
        }
    });
    Ok(())
}

/// The least time between two scans for orphans (see above).
const ORPHAN_SCAN_GAP: std::time::Duration = std::time::Duration::from_millis(100);

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

/// What the watchers compare with once armed: the config file as read, and
/// services_dir as it was before the daemon discovered it.
struct WatchFrom {
    source: Option<PathBuf>,
    services_dir: PathBuf,
    stamp: Option<FileStamp>,
    binaries: Binaries,
}

async fn start_watching(from: WatchFrom, events: mpsc::Sender<DaemonEvent>) -> Option<WatchHandle> {
    let WatchFrom {
        source,
        services_dir,
        stamp: loaded,
        binaries,
    } = from;
    match spawn_watcher(
        source.clone(),
        services_dir,
        DEFAULT_DEBOUNCE,
        events.clone(),
        Some(binaries),
    )
    .await
    {
        Ok(handle) => {
            // The watchers take the file as they first see it as the known
            // version: an edit between our read and that moment would never
            // be applied. Compare, and reload once if it moved.
            let now = source.as_deref().and_then(file_stamp);
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
