//! The client verbs: each talks to the running daemon over its socket and
//! maps the outcome to SPEC's exit codes (0 ok, 1 failed, 2 usage, 3 no daemon).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use hyper::Method;
use orchestrator_core::events::Event;
use orchestrator_core::process::ExitWatch;
use orchestrator_core::wire::{
    ChangeAction, DaemonInfo, ErrorCode, LogRecord, ReloadReport, ServiceInfo, UpgradeAccepted,
};
use tokio::task::JoinSet;

use crate::api::client::{Client, ClientError};
use crate::console::escape_controls;

/// `println!` that does not panic when stdout's reader has gone away
/// (`orchestrator status | head -1`): there is nobody left to tell.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(&format!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use outln;

pub fn write_stdout(text: &str) {
    if let Err(error) = std::io::stdout().lock().write_all(text.as_bytes())
        && error.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("orchestrator: cannot write the output: {error}");
    }
}

/// `--timeout`: a whole number with a unit (`ms`, `s`, `m`, `h`), or of
/// seconds without one.
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: write e.g. 10s, 500ms or 2m"))?;
    let millis = match unit {
        "ms" => Some(number),
        "" | "s" => number.checked_mul(1000),
        "m" => number.checked_mul(60_000),
        "h" => number.checked_mul(3_600_000),
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m or h)")),
    };
    match millis {
        Some(0) => Err("a timeout of zero would never let the daemon answer".to_owned()),
        Some(millis) => Ok(Duration::from_millis(millis)),
        None => Err(format!("{text:?} is too long")),
    }
}

pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_UNREACHABLE: u8 = 3;

pub fn exit_code(error: &ClientError) -> ExitCode {
    ExitCode::from(match error {
        ClientError::Unreachable { .. }
        | ClientError::NotResponding { .. }
        | ClientError::Cut { .. } => EXIT_UNREACHABLE,
        ClientError::Api { body, .. } if body.code.is_usage() => EXIT_USAGE,
        // Too many clients right now: as unreachable as a daemon can be.
        ClientError::Api { body, .. } if body.code == ErrorCode::Busy => EXIT_UNREACHABLE,
        _ => EXIT_FAILED,
    })
}

fn fail(error: &ClientError) -> ExitCode {
    eprintln!("orchestrator: {error}");
    exit_code(error)
}

/// Path segments are service names, which are validated by the daemon; this
/// only keeps a name with `/` or `?` from being read as another route.
fn segment(name: &str) -> String {
    let mut out = String::new();
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"._-".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

pub async fn status(client: &Client, names: &[String], json: bool) -> ExitCode {
    let services = match fetch_status(client, names).await {
        Ok(Ok(services)) => services,
        Ok(Err(unknown)) => return unknown_services(&unknown),
        Err(error) => return fail(&error),
    };
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&services).unwrap_or_else(|_| "[]".to_owned())
        );
    } else {
        write_stdout(&status_table(&services));
        // A daemon too old to answer for itself is no reason to fail `status`.
        if let Ok(daemon) = client.json::<DaemonInfo>(Method::GET, "/v1/daemon").await
            && let Some(warning) = daemon_warning(&daemon)
        {
            eprintln!("orchestrator: warning: {warning}");
        }
    }
    status_exit(&services)
}

/// The services asked for, in the order asked (all of them without names,
/// in the daemon's), a name with instances standing for all of them; or
/// the names that match nothing.
async fn fetch_status(
    client: &Client,
    names: &[String],
) -> Result<Result<Vec<ServiceInfo>, Vec<String>>, ClientError> {
    let services: Vec<ServiceInfo> = client.json(Method::GET, "/v1/services").await?;
    if names.is_empty() {
        return Ok(Ok(services));
    }
    Ok(
        targets(&services, "status", names.to_vec(), false).map(|wanted| {
            wanted
                .iter()
                .filter_map(|name| services.iter().find(|s| &s.name == name).cloned())
                .collect()
        }),
    )
}

/// Names that match no service (nor a group of instances): said on stderr,
/// exit 1, as the daemon's "unknown service" would.
fn unknown_services(unknown: &[String]) -> ExitCode {
    for name in unknown {
        eprintln!(
            "orchestrator: unknown service {name:?}: `orchestrator status` lists the known ones"
        );
    }
    ExitCode::from(EXIT_FAILED)
}

/// SPEC: `status` exits 1 when an enabled service is not running, so that
/// `orchestrator status && deploy` and monitoring checks can use it. A
/// one-shot that completed (ended by itself with code 0, as the daemon
/// says) counts as fine: it is done, not down.
pub fn status_exit(services: &[ServiceInfo]) -> ExitCode {
    use orchestrator_core::wire::State;
    let down = services
        .iter()
        .any(|service| service.enabled && service.state != State::Running && !service.completed);
    if down {
        ExitCode::from(EXIT_FAILED)
    } else {
        ExitCode::SUCCESS
    }
}

/// `status -w`: the table, redrawn in place every `every` until
/// interrupted (as `watch orchestrator status`). On a terminal the screen
/// is cleared and the table drawn from its top; piped, each table follows
/// the last after a blank line. Ends with exit 3 when the daemon goes.
pub async fn status_watch(client: &Client, names: &[String], every: Duration) -> ExitCode {
    // One handler for the whole watch: a Ctrl-C that comes while a table
    // is being fetched is kept for the next look, not lost.
    let mut interrupt =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()) {
            Ok(interrupt) => interrupt,
            Err(error) => {
                eprintln!("orchestrator: cannot watch for Ctrl-C: {error}");
                return ExitCode::FAILURE;
            }
        };
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut first = true;
    loop {
        let services = tokio::select! {
            fetched = fetch_status(client, names) => match fetched {
                Ok(Ok(services)) => services,
                Ok(Err(unknown)) => return unknown_services(&unknown),
                Err(error) => return fail(&error),
            },
            _ = interrupt.recv() => return ExitCode::SUCCESS,
        };
        let mut screen = String::new();
        if terminal {
            // Home, then clear to the end: no flicker of a blank screen.
            screen.push_str("\x1b[H\x1b[2J");
        } else if !first {
            screen.push('\n');
        }
        first = false;
        let now = orchestrator_core::events::rfc3339(std::time::SystemTime::now());
        screen.push_str(&format!(
            "every {}s; {now}; Ctrl-C to stop\n\n",
            every.as_secs_f64()
        ));
        screen.push_str(&status_table(&services));
        write_stdout(&screen);
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = interrupt.recv() => return ExitCode::SUCCESS,
        }
    }
}

/// What `status` must tell about the daemon itself, if anything.
pub fn daemon_warning(daemon: &DaemonInfo) -> Option<String> {
    daemon.state_stale.then(|| {
        format!(
            "the daemon cannot write its crash-recovery record (data_dir/state; {} failed writes): \
             if it is killed now, the next daemon may not find the services started since and \
             could run them twice; free space in data_dir or fix its file system",
            daemon.state_failed_writes
        )
    })
}

pub fn status_table(services: &[ServiceInfo]) -> String {
    // SPEC column order; HEALTH only when some service has a check.
    let with_health = services.iter().any(|s| s.health.is_some());
    let mut header = vec!["NAME", "STATE"];
    if with_health {
        header.push("HEALTH");
    }
    header.extend([
        "PID",
        "UPTIME",
        "RESTARTS",
        "LAST-EXIT",
        "CPU",
        "MEM",
        "REASON",
    ]);
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|s| {
            let mut row = vec![s.name.clone(), s.state.to_string()];
            if with_health {
                row.push(s.health.map_or("-".to_owned(), |h| h.to_string()));
            }
            row.extend([
                s.pid.map_or("-".to_owned(), |p| p.to_string()),
                s.uptime.map_or("-".to_owned(), format_uptime),
                s.restarts.to_string(),
                last_exit_of(s),
                s.cpu_seconds.map_or("-".to_owned(), format_cpu),
                s.memory_bytes.map_or("-".to_owned(), format_bytes),
                reason_of(s),
            ]);
            row
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, &width)| format!("{cell:width$}"))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&cells);
    }
    out
}

/// The last exit as a person reads it: the signal's name when a signal
/// ended it (`SIGKILL`, not 137), else the exit code.
fn last_exit_of(service: &ServiceInfo) -> String {
    match (&service.last_exit_signal, service.last_exit_code) {
        (Some(signal), _) => signal.clone(),
        (None, Some(code)) => code.to_string(),
        (None, None) => "-".to_owned(),
    }
}

/// Why a service is where it is: what it waits for or said (STATUS=), else
/// its last error while it is not running; control characters escaped.
fn reason_of(service: &ServiceInfo) -> String {
    let text = match (&service.reason, service.state) {
        (Some(reason), _) => reason.as_str(),
        (
            None,
            orchestrator_core::wire::State::Failed
            | orchestrator_core::wire::State::Restarting
            | orchestrator_core::wire::State::Stopped,
        ) => service.last_error.as_deref().unwrap_or("-"),
        (None, _) => "-",
    };
    let mut shown = Vec::new();
    escape_controls(text, &mut shown);
    String::from_utf8_lossy(&shown).into_owned()
}

/// CPU time used, as `0.42s`, `12.3s` or `5m07s`.
pub fn format_cpu(seconds: f64) -> String {
    match seconds {
        s if s < 10.0 => format!("{s:.2}s"),
        s if s < 60.0 => format!("{s:.1}s"),
        s => format_uptime(s as u64),
    }
}

/// Binary units as `ps` and `top` show them: `812K`, `12.4M`, `1.5G`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["K", "M", "G", "T"];
    let mut value = bytes as f64 / 1024.0;
    if value < 1.0 {
        return format!("{bytes}B");
    }
    for (i, unit) in UNITS.iter().enumerate() {
        if value < 1024.0 || i == UNITS.len() - 1 {
            return if value < 10.0 {
                format!("{value:.1}{unit}")
            } else {
                format!("{value:.0}{unit}")
            };
        }
        value /= 1024.0;
    }
    unreachable!("the last unit returns")
}

pub fn format_uptime(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Actions sent at once by `start|stop|restart --all`.
const ACTIONS_IN_FLIGHT: usize = 64;
/// How long to wait before asking again after a 503 busy.
const BUSY_RETRY: Duration = Duration::from_millis(200);
/// Refusals of one request before it is reported (a minute of them).
const MAX_REFUSALS: u32 = 300;

/// start/stop/restart on each name (or every service), in parallel; each
/// returns once applied.
pub async fn act(client: Client, action: &str, names: Vec<String>, all: bool) -> ExitCode {
    // Several stops go dependents first (SPEC: stop dependents before their
    // dependencies): in waves, each once the services that depend on it
    // (among those named) are down.
    // One listing first: every name is checked before anything is done
    // (`stop a nope` stops nothing), instance groups are expanded, and
    // several stops go in dependency order.
    let services = match client
        .json::<Vec<ServiceInfo>>(Method::GET, "/v1/services")
        .await
    {
        Ok(services) => services,
        Err(error) => return fail(&error),
    };
    let names = match targets(&services, action, names, all) {
        Ok(names) => names,
        Err(unknown) => {
            for name in &unknown {
                eprintln!(
                    "orchestrator: unknown service {name:?} (see `orchestrator status` for the services there are); nothing was done"
                );
            }
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let ordered = action == "stop" && names.len() > 1;
    let waves = match ordered {
        true => stop_waves(&services, names),
        false => vec![names],
    };
    let client = std::sync::Arc::new(client);
    let watch = std::sync::Arc::clone(&client);
    // Each request holds a connection until its action is applied: well
    // under the daemon's cap (api_max_connections, 256 by default), so that
    // `stop --all` on a large host is not refused by the daemon.
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(ACTIONS_IN_FLIGHT));
    let mut results = Vec::new();
    let mut index = 0;
    for wave in waves {
        let mut requests = JoinSet::new();
        for name in wave {
            index += 1;
            let client = std::sync::Arc::clone(&client);
            let slots = std::sync::Arc::clone(&slots);
            let path = format!("/v1/services/{}/{action}", segment(&name));
            requests.spawn(async move {
                let _slot = slots.acquire_owned().await;
                let mut refusals = 0;
                let result = loop {
                    let result = client
                        .json_unbounded::<ServiceInfo>(Method::POST, &path)
                        .await;
                    // A daemon at its connection cap answers 503 busy, or closes
                    // the connection before the request went out (then the
                    // daemon still answers its health check): either way
                    // nothing was done, so asking again is safe.
                    let refused = match &result {
                        Err(ClientError::Api { body, .. }) => body.code == ErrorCode::Busy,
                        // Closed by a live daemon: its socket still takes
                        // connections (a dead daemon's refuses them) and answers
                        // or refuses within the timeout.
                        Err(ClientError::Cut { .. }) => matches!(
                            client.alive().await,
                            Ok(()) | Err(ClientError::Api { .. } | ClientError::Cut { .. })
                        ),
                        _ => false,
                    };
                    if !refused || refusals == MAX_REFUSALS {
                        break result;
                    }
                    refusals += 1;
                    tokio::time::sleep(BUSY_RETRY).await;
                };
                (index, name, result)
            });
        }
        let collect = async {
            while let Some(joined) = requests.join_next().await {
                if let Ok(result) = joined {
                    results.push(result);
                }
            }
        };
        // The answers come once applied, unbounded; meanwhile one liveness
        // check for all the requests stands for the timeout.
        tokio::select! {
            () = collect => {}
            error = watch.until_unresponsive() => return fail(&error),
        }
    }
    results.sort_by_key(|(index, _, _)| *index);
    let mut code = ExitCode::SUCCESS;
    let mut stopped = Vec::new();
    for (_, name, result) in results {
        match result {
            Ok(info) => {
                let pid = info.pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
                // A stop that had to SIGKILL says so (the service ignored
                // its stop signal): the machine left that as last_error.
                let killed = match (&info.last_error, action) {
                    (Some(error), "stop") if error.starts_with("stopped with SIGKILL") => {
                        format!(": {error}")
                    }
                    _ => String::new(),
                };
                outln!("{name}: {}{pid}{killed}", info.state);
                if action == "stop" {
                    stopped.push(name);
                }
            }
            Err(error) => {
                eprintln!("orchestrator: {}", about_service(&name, &error.to_string()));
                code = exit_code(&error);
            }
        }
    }
    if !stopped.is_empty() {
        note_running_dependents(&watch, &stopped).await;
    }
    code
}

/// What an action applies to, from the daemon's listing: `--all` is every
/// service for `stop`, but only the enabled ones (and, for `restart`, those
/// running anyway) for `start` and `restart`, so `start --all` leaves
/// `enabled = false` services alone. A name that is no service but has
/// instances (`web` for `web@0`, `web@1`) stands for all of them. Names
/// that match nothing come back as the error, so that nothing is done.
pub fn targets(
    services: &[ServiceInfo],
    action: &str,
    names: Vec<String>,
    all: bool,
) -> Result<Vec<String>, Vec<String>> {
    use orchestrator_core::wire::State;
    if all {
        return Ok(services
            .iter()
            .filter(|s| match action {
                "stop" => true,
                "start" => s.enabled,
                _ => s.enabled || !matches!(s.state, State::Stopped | State::Failed),
            })
            .map(|s| s.name.clone())
            .collect());
    }
    let mut found = Vec::new();
    let mut unknown = Vec::new();
    for name in names {
        if services.iter().any(|s| s.name == name) {
            found.push(name);
            continue;
        }
        let instances: Vec<String> = services
            .iter()
            .filter(|s| {
                orchestrator_core::name::ServiceName::parse(&s.name).is_ok_and(|service| {
                    service.instance_of().is_some_and(|(base, _)| base == name)
                })
            })
            .map(|s| s.name.clone())
            .collect();
        if instances.is_empty() {
            unknown.push(name);
        } else {
            found.extend(instances);
        }
    }
    if unknown.is_empty() {
        let mut seen = std::collections::HashSet::new();
        found.retain(|name| seen.insert(name.clone()));
        Ok(found)
    } else {
        Err(unknown)
    }
}

/// `names` in waves for stopping, dependents first (the engine's
/// `deps::stop_order_levels`, on the graph the listing gives); a wave stops
/// in parallel. A name that is not a valid service name goes in the first
/// wave, for the daemon to refuse.
fn stop_waves(services: &[ServiceInfo], names: Vec<String>) -> Vec<Vec<String>> {
    use orchestrator_core::name::ServiceName;
    let graph: orchestrator_core::deps::Graph = services
        .iter()
        .filter_map(|s| {
            let deps = s
                .depends_on
                .keys()
                .filter_map(|d| ServiceName::parse(d).ok())
                .collect();
            Some((ServiceName::parse(&s.name).ok()?, deps))
        })
        .collect();
    let (valid, invalid): (Vec<String>, Vec<String>) = names
        .into_iter()
        .partition(|name| ServiceName::parse(name).is_ok());
    let valid: Vec<ServiceName> = valid
        .iter()
        .filter_map(|name| ServiceName::parse(name).ok())
        .collect();
    let mut waves: Vec<Vec<String>> = orchestrator_core::deps::stop_order_levels(&graph, &valid)
        .into_iter()
        .map(|wave| wave.iter().map(ToString::to_string).collect())
        .collect();
    if !invalid.is_empty() {
        waves.insert(0, invalid);
    }
    waves
}

/// A stop stops what was named and nothing else: say which running
/// services depend on what was stopped, so that is no surprise either.
async fn note_running_dependents(client: &Client, stopped: &[String]) {
    let Ok(services) = client
        .json::<Vec<ServiceInfo>>(Method::GET, "/v1/services")
        .await
    else {
        return;
    };
    for service in services {
        if matches!(
            service.state,
            orchestrator_core::wire::State::Stopped | orchestrator_core::wire::State::Failed
        ) {
            continue;
        }
        for dependency in service.depends_on.keys() {
            if stopped.contains(dependency) {
                eprintln!(
                    "orchestrator: note: {} depends on {dependency} and still runs (stop it too, or `restart {dependency} --with-dependents` to restart both)",
                    service.name
                );
            }
        }
    }
}

/// `message` with the service's name in front, unless it names the service
/// already (the daemon's errors mostly do), which would say it twice.
fn about_service(name: &str, message: &str) -> String {
    let named = message.contains(&format!("service {name}:"))
        || message.contains(&format!("service {name:?}"));
    if named {
        message.to_owned()
    } else {
        format!("{name}: {message}")
    }
}

/// Lines `logs` shows when not told (`-n`).
pub const DEFAULT_LOG_LINES: usize = 50;
/// Events `events` shows when not told (`-n`): as many as `logs` shows lines.
pub const DEFAULT_EVENTS: usize = 50;
/// All the daemon keeps of a service (its `tail=` cap): what `--grep`
/// searches, so that `-n 10 --grep x` shows the last 10 that match.
const WHOLE_BUFFER: usize = 100_000;

/// What `logs` was asked for.
pub struct LogsRequest {
    pub names: Vec<String>,
    pub all: bool,
    /// `-n`: lines in all, over every service shown (as `journalctl -n`).
    pub lines: Option<usize>,
    pub follow: bool,
    pub since: Option<std::time::SystemTime>,
    pub grep: Option<regex::Regex>,
}

/// `--grep`: a regular expression; a bad one is a usage error (exit 2)
/// with the reason the regex crate gives.
pub fn parse_grep(text: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(text).map_err(|error| format!("not a valid regular expression: {error}"))
}

/// `--since`, read against the clock now.
pub fn parse_since(text: &str) -> Result<std::time::SystemTime, String> {
    crate::logview::parse_since(text, std::time::SystemTime::now())
}

/// The services' recent lines merged in time order, then (`-f`) every new
/// line of each as it comes. One service named alone prints as it always
/// has; several, or `--all`, get a `name | ` prefix.
pub async fn logs(client: &Client, request: LogsRequest) -> ExitCode {
    use crate::logview::{Entry, Prefixer, merge, since_param, use_colour};
    use std::io::IsTerminal;

    let names = if request.all {
        match client
            .json::<Vec<ServiceInfo>>(Method::GET, "/v1/services")
            .await
        {
            Ok(services) => services.into_iter().map(|s| s.name).collect(),
            Err(error) => return fail(&error),
        }
    } else {
        // A name with instances (`web`) stands for all of them.
        let services = match client
            .json::<Vec<ServiceInfo>>(Method::GET, "/v1/services")
            .await
        {
            Ok(services) => services,
            Err(error) => return fail(&error),
        };
        match targets(&services, "logs", request.names, false) {
            Ok(names) => names,
            Err(unknown) => return unknown_services(&unknown),
        }
    };
    if names.is_empty() {
        eprintln!("orchestrator: the daemon has no services, so no logs to show");
        return ExitCode::SUCCESS;
    }
    let colour = use_colour(
        std::io::stdout().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let prefixer = Prefixer::new(&names, request.all || names.len() > 1, colour);
    let since = request.since.map(since_param);
    let matches = |text: &str| request.grep.as_ref().is_none_or(|re| re.is_match(text));

    // Subscribed before the recent lines are read: a line printed between
    // the two comes in both, and is shown once (by its number).
    let mut streams = Vec::new();
    if request.follow {
        for name in &names {
            let path = format!("/v1/services/{}/logs?tail=0&follow=true", segment(name));
            match client.open_lines(&path, true).await {
                Ok(lines) => streams.push(lines),
                Err(error) => return fail(&error),
            }
        }
    }

    let mut query = match (&request.grep, &since, request.lines) {
        (Some(_), _, _) => format!("tail={WHOLE_BUFFER}"),
        // Every line since then unless told how many.
        (None, Some(_), None) => String::new(),
        (None, _, lines) => format!("tail={}", lines.unwrap_or(DEFAULT_LOG_LINES)),
    };
    if let Some(since) = &since {
        query.push_str(&format!("&since={since}"));
    }
    let mut per_service = Vec::new();
    let mut shown_up_to: Vec<Option<u64>> = Vec::new();
    for (index, name) in names.iter().enumerate() {
        let path = format!("/v1/services/{}/logs?{query}", segment(name));
        let mut entries = Vec::new();
        let result = client
            .lines_within(&path, false, |line| {
                if let Ok(LogRecord::Line {
                    seq,
                    time,
                    stream,
                    text,
                }) = serde_json::from_slice::<LogRecord>(line)
                {
                    entries.push(Entry {
                        service: index,
                        seq,
                        time,
                        stream,
                        text,
                    });
                }
                Ok(())
            })
            .await;
        if let Err(error) = result {
            return fail(&error);
        }
        shown_up_to.push(entries.last().map(|e| e.seq));
        entries.retain(|e| matches(&e.text));
        per_service.push(entries);
    }
    let lines = request.lines.unwrap_or(if since.is_some() {
        usize::MAX
    } else {
        DEFAULT_LOG_LINES
    });
    let recent = merge(per_service, lines);
    let printed = write_stdout_io(&render_entries(&recent, prefixer.as_ref()));
    if let Err(error) = printed {
        return streamed(client, Err(ClientError::Output(error)), request.follow).await;
    }
    if !request.follow {
        return ExitCode::SUCCESS;
    }

    let (sender, mut received) = tokio::sync::mpsc::channel(64);
    let mut readers = JoinSet::new();
    for (index, mut lines) in streams.into_iter().enumerate() {
        let sender = sender.clone();
        readers.spawn(async move {
            loop {
                let next = lines.next_line().await;
                let last = !matches!(next, Ok(Some(_)));
                if sender.send((index, next)).await.is_err() || last {
                    return;
                }
            }
        });
    }
    drop(sender);
    let mut open = names.len();
    let stdout = std::io::stdout();
    let mut shown = Vec::new();
    let mut result = Ok(());
    while open > 0 {
        let Some((index, next)) = received.recv().await else {
            break;
        };
        let line = match next {
            Ok(Some(line)) => line,
            // This service's stream ended (it was removed by a reload, or
            // the daemon is shutting down): the others go on.
            Ok(None) => {
                open -= 1;
                continue;
            }
            Err(error) => {
                result = Err(error);
                break;
            }
        };
        let written = match serde_json::from_slice::<LogRecord>(&line) {
            Ok(LogRecord::Line {
                seq,
                time,
                stream,
                text,
            }) => {
                let old = shown_up_to[index].is_some_and(|up_to| seq <= up_to);
                let early = since.as_deref().is_some_and(|since| time.as_str() < since);
                if old || early || !matches(&text) {
                    continue;
                }
                shown.clear();
                let entry = Entry {
                    service: index,
                    seq,
                    time,
                    stream,
                    text,
                };
                write_entry(&mut shown, &entry, prefixer.as_ref());
                let mut out = stdout.lock();
                out.write_all(&shown).and_then(|()| out.flush())
            }
            Ok(LogRecord::Skipped { skipped }) => {
                let prefix = prefixer
                    .as_ref()
                    .map(|p| p.prefix(index, orchestrator_core::wire::Stream::Stdout))
                    .unwrap_or_default();
                let mut out = stdout.lock();
                writeln!(
                    out,
                    "{prefix}… {skipped} lines skipped (this reader was too slow)"
                )
                .and_then(|()| out.flush())
            }
            Err(_) => continue,
        };
        if let Err(error) = written {
            result = Err(ClientError::Output(error));
            break;
        }
    }
    readers.abort_all();
    streamed(client, result, true).await
}

fn write_stdout_io(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// The lines as `logs` prints them: `TIME STREAM TEXT`, after `name | `
/// when several services are shown; control characters escaped.
pub fn render_entries(
    entries: &[crate::logview::Entry],
    prefixer: Option<&crate::logview::Prefixer>,
) -> String {
    let mut out = Vec::new();
    for entry in entries {
        write_entry(&mut out, entry, prefixer);
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn write_entry(
    out: &mut Vec<u8>,
    entry: &crate::logview::Entry,
    prefixer: Option<&crate::logview::Prefixer>,
) {
    if let Some(prefixer) = prefixer {
        out.extend_from_slice(prefixer.prefix(entry.service, entry.stream).as_bytes());
    }
    out.extend_from_slice(format!("{} {:6} ", entry.time, entry.stream).as_bytes());
    escape_controls(&entry.text, out);
    out.push(b'\n');
}
/// A reader that went away (`logs -f | head`) ends the stream as the end
/// of the output would, quietly: not an error, and not a reason to keep
/// following forever.
///
/// A follow stream ends only when the daemon ends it, at a clean shutdown;
/// the last line says so, as the output alone looks like any pause.
async fn streamed(client: &Client, result: Result<(), ClientError>, follow: bool) -> ExitCode {
    match result {
        Ok(()) if follow => {
            eprintln!("{}", followed_to_the_end(client).await);
            ExitCode::SUCCESS
        }
        Ok(()) => ExitCode::SUCCESS,
        Err(ClientError::Output(error)) if error.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::SUCCESS
        }
        Err(error) => fail(&error),
    }
}

/// What ended a follow stream the daemon closed cleanly: it closes them all
/// as it shuts down, and a log stream also when its service goes away.
async fn followed_to_the_end(client: &Client) -> String {
    // Quick: a daemon that shut down refuses the connection at once.
    let probe = Client::new(client.socket()).with_timeout(Duration::from_secs(1));
    match probe.alive().await {
        Ok(()) => "orchestrator: the daemon ended the stream".to_owned(),
        Err(_) => "orchestrator: the daemon shut down".to_owned(),
    }
}

/// What `events` was asked for.
pub struct EventsRequest {
    pub follow: bool,
    /// `-n`: the last N of the history (then, with `-f`, every new one).
    pub lines: usize,
    /// Only this service's events; the daemon's own are left out.
    pub service: Option<String>,
    /// One JSON object a line: the event as the API sends it.
    pub json: bool,
}

pub async fn events(client: &Client, request: EventsRequest) -> ExitCode {
    let mut path = format!(
        "/v1/events?follow={}&tail={}",
        request.follow, request.lines
    );
    if let Some(service) = &request.service {
        path.push_str(&format!("&service={}", segment(service)));
    }
    let stdout = std::io::stdout();
    let (mut shown, mut escaped) = (String::new(), Vec::new());
    let result = client
        .lines_within(&path, request.follow, |line| {
            let Some(data) = line.strip_prefix(b"data:") else {
                return Ok(());
            };
            let data = data.strip_prefix(b" ").unwrap_or(data);
            let mut out = stdout.lock();
            match serde_json::from_slice::<Event>(data) {
                Ok(_) if request.json => {
                    // As the daemon sent it: fields a newer daemon added stay.
                    out.write_all(data)?;
                    writeln!(out)?;
                    return out.flush();
                }
                Ok(event) => shown.push_str(&event.describe()),
                Err(_) => {
                    // The only other data: a follower that fell behind.
                    let missed = serde_json::from_slice::<serde_json::Value>(data)
                        .ok()
                        .and_then(|v| v["missed"].as_u64());
                    match missed {
                        Some(missed) => eprintln!(
                            "orchestrator: {missed} events missed (this reader was too slow)"
                        ),
                        None if !request.json => {
                            shown.push_str(&String::from_utf8_lossy(data));
                        }
                        None => {}
                    }
                    if shown.is_empty() {
                        return Ok(());
                    }
                }
            };
            // Events quote services' errors, which may hold their output.
            escaped.clear();
            escape_controls(&shown, &mut escaped);
            shown.clear();
            out.write_all(&escaped)?;
            writeln!(out)?;
            out.flush()
        })
        .await;
    streamed(client, result, request.follow).await
}

/// One line per service that changed (and a count of the others), then
/// the warnings; an invalid configuration exits 2 with its problems.
pub async fn reload(client: &Client) -> ExitCode {
    // The answer comes once applied, and a removed service's stop may take
    // its whole stop_timeout: unbounded, as long as the daemon answers.
    let answer = tokio::select! {
        answer = client.json_unbounded::<ReloadReport>(Method::POST, "/v1/reload") => answer,
        error = client.until_unresponsive() => Err(error),
    };
    match answer {
        Ok(report) => {
            let mut unchanged = 0;
            for change in &report.applied {
                if change.action == ChangeAction::Unchanged {
                    unchanged += 1;
                    continue;
                }
                let action = serde_json::to_value(change.action)
                    .ok()
                    .and_then(|value| value.as_str().map(str::to_owned))
                    .unwrap_or_default();
                match &change.reason {
                    Some(reason) => outln!("{:<10} {} ({reason})", action, change.service),
                    None => outln!("{:<10} {}", action, change.service),
                }
            }
            outln!("{unchanged} unchanged");
            for warning in &report.warnings {
                outln!("warning: {warning}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => fail(&error),
    }
}

/// Asks for a shutdown and returns once the daemon process has exited.
pub async fn shutdown(client: &Client, wait: Duration) -> ExitCode {
    // Pinned before asking, while the daemon certainly runs: its pid cannot
    // be recycled under the watch.
    let watch = match client.server_pid().await {
        Ok(pid) => ExitWatch::new(pid).ok(),
        Err(error) => return fail(&error),
    };
    if let Err(error) = client
        .json::<serde_json::Value>(Method::POST, "/v1/shutdown")
        .await
    {
        return fail(&error);
    }
    let gone = async {
        match &watch {
            Some(watch) => watch.exited().await,
            // No pidfd (kernel < 5.3): the socket going away is the sign.
            None => {
                while !matches!(
                    client.request(Method::GET, "/healthz").await,
                    Err(ClientError::Unreachable { .. })
                ) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    if tokio::time::timeout(wait, gone).await.is_err() {
        eprintln!(
            "orchestrator: the daemon is still shutting down after {wait:?}; it answers on {}",
            client.socket().display()
        );
        return ExitCode::from(EXIT_FAILED);
    }
    outln!("daemon stopped");
    ExitCode::SUCCESS
}

/// How long `upgrade` waits for the new daemon to answer once the old one
/// accepted the new binary (freezing a thousand services and the exec take
/// far less; a stuck freeze is the old daemon's to report).
const UPGRADE_WAIT: Duration = Duration::from_secs(120);
const UPGRADE_POLL: Duration = Duration::from_millis(50);

/// Asks for an upgrade and returns once the new daemon answers (exit 0), or
/// says why it was refused or failed (exit 1; the daemon goes on as before).
pub async fn upgrade(client: &Client, binary: Option<std::path::PathBuf>) -> ExitCode {
    // The daemon runs elsewhere: a path relative to here means nothing there.
    let binary = match binary.as_deref().map(std::path::absolute).transpose() {
        Ok(binary) => binary,
        Err(error) => {
            eprintln!("orchestrator: cannot make --binary an absolute path: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let body = serde_json::json!({ "binary": binary });
    // The answer comes after the dry run, which may take a while: unbounded
    // as long as the daemon answers its health check.
    let answer = tokio::select! {
        answer = client.json_with_body::<UpgradeAccepted>(Method::POST, "/v1/upgrade", &body) => answer,
        error = client.until_unresponsive() => Err(error),
    };
    let accepted = match answer {
        Ok(accepted) => accepted,
        Err(error) => return fail(&error),
    };
    let began = std::time::Instant::now();
    loop {
        // While the daemon switches, the request waits in the socket's
        // backlog (or times out and is asked again): only a refused
        // connection means there is no daemon any more.
        match client.json::<DaemonInfo>(Method::GET, "/v1/daemon").await {
            Ok(daemon) if daemon.upgrades > accepted.upgrades => {
                outln!(
                    "daemon upgraded from {} to {} (pid {})",
                    accepted.from,
                    daemon.version,
                    daemon.pid
                );
                return ExitCode::SUCCESS;
            }
            Ok(daemon) if daemon.upgrade_failures > accepted.upgrade_failures => {
                eprintln!(
                    "orchestrator: the upgrade to {} failed: {}; the daemon goes on as {}",
                    accepted.binary.display(),
                    daemon
                        .last_upgrade_error
                        .as_deref()
                        .unwrap_or("no reason given (see the daemon's log)"),
                    daemon.version
                );
                return ExitCode::from(EXIT_FAILED);
            }
            Ok(_) => {}
            Err(error @ ClientError::Unreachable { .. }) => {
                eprintln!(
                    "orchestrator: {error}: the daemon ended during the upgrade to {} (see its log): its guardian stops the services; start the daemon again",
                    accepted.binary.display()
                );
                return ExitCode::from(EXIT_FAILED);
            }
            Err(_) => {}
        }
        if began.elapsed() >= UPGRADE_WAIT {
            eprintln!(
                "orchestrator: the daemon accepted the upgrade to {} but the new one has not answered after {UPGRADE_WAIT:?}; see the daemon's log",
                accepted.binary.display()
            );
            return ExitCode::from(EXIT_FAILED);
        }
        tokio::time::sleep(UPGRADE_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_warns_when_the_crash_record_is_stale() {
        let mut daemon = DaemonInfo {
            pid: 1,
            version: "0".into(),
            state_stale: false,
            state_failed_writes: 2,
            events_file_dropped: 0,
            upgrades: 0,
            upgrade_failures: 0,
            last_upgrade_error: None,
        };
        assert_eq!(daemon_warning(&daemon), None, "an old failure that healed");
        daemon.state_stale = true;
        let warning = daemon_warning(&daemon).unwrap();
        assert!(
            warning.contains("2 failed writes") && warning.contains("twice"),
            "{warning}"
        );
    }

    #[test]
    fn an_error_names_its_service_once() {
        assert_eq!(
            super::about_service("api", "service api: a later stop request overrode this one"),
            "service api: a later stop request overrode this one"
        );
        let unknown = "unknown service \"api\": `orchestrator status` lists the known ones";
        assert_eq!(super::about_service("api", unknown), unknown);
        assert_eq!(
            super::about_service("api", "cannot reach the daemon"),
            "api: cannot reach the daemon"
        );
    }

    #[test]
    fn timeouts_read_as_durations() {
        use crate::api::client::{DEFAULT_TIMEOUT, DEFAULT_TIMEOUT_ARG};
        assert_eq!(parse_timeout(DEFAULT_TIMEOUT_ARG), Ok(DEFAULT_TIMEOUT));
        assert_eq!(parse_timeout("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_timeout("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_timeout("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_timeout("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_timeout("7"), Ok(Duration::from_secs(7)));
        for bad in [
            "",
            "s",
            "0",
            "0ms",
            "1.5s",
            "-1s",
            "10 s",
            "3d",
            "99999999999999999h",
        ] {
            assert!(parse_timeout(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn uptime_is_short_and_readable() {
        assert_eq!(format_uptime(5), "5s");
        assert_eq!(format_uptime(65), "1m05s");
        assert_eq!(format_uptime(3 * 3600 + 120), "3h02m");
        assert_eq!(format_uptime(2 * 86_400 + 3600), "2d01h");
    }

    #[test]
    fn names_cannot_escape_their_path_segment() {
        assert_eq!(segment("api-1.x_y"), "api-1.x_y");
        assert_eq!(segment("../shutdown"), "..%2Fshutdown");
        assert_eq!(segment("a?b"), "a%3Fb");
    }

    /// A running service with nothing special about it.
    fn running(name: &str) -> ServiceInfo {
        ServiceInfo {
            name: name.into(),
            configured: true,
            enabled: true,
            state: orchestrator_core::wire::State::Running,
            pid: Some(42),
            uptime: None,
            restarts: 0,
            requested_starts: 0,
            last_exit_code: None,
            last_exit_signal: None,
            completed: false,
            last_error: None,
            health: None,
            log_dropped_bytes: 0,
            generation: 1,
            memory_bytes: None,
            cpu_seconds: None,
            oom_kills: 0,
            reason: None,
            notify_rejected: 0,
            depends_on: Default::default(),
        }
    }

    /// A snapshot of the table: a change to its look is a visible diff here.
    #[test]
    fn table_has_the_spec_columns_in_order() {
        use orchestrator_core::wire::State;
        let table = status_table(&[
            ServiceInfo {
                uptime: Some(61),
                restarts: 2,
                last_exit_code: Some(1),
                memory_bytes: Some(13 * 1024 * 1024 + 300 * 1024),
                cpu_seconds: Some(0.5),
                ..running("api")
            },
            ServiceInfo {
                state: State::Restarting,
                pid: None,
                restarts: 3,
                last_exit_code: Some(137),
                last_exit_signal: Some("SIGKILL".into()),
                reason: Some("retry in 8s: killed by SIGKILL".into()),
                ..running("worker")
            },
            ServiceInfo {
                state: State::Failed,
                pid: None,
                restarts: 5,
                last_exit_code: Some(3),
                last_error: Some("gave up after 5 restarts: exited with code 3".into()),
                ..running("cron@0")
            },
        ]);
        assert_eq!(
            table,
            "\
NAME    STATE       PID  UPTIME  RESTARTS  LAST-EXIT  CPU    MEM  REASON
api     running     42   1m01s   2         1          0.50s  13M  -
worker  restarting  -    -       3         SIGKILL    -      -    retry in 8s: killed by SIGKILL
cron@0  failed      -    -       5         3          -      -    gave up after 5 restarts: exited with code 3
"
        );
    }

    #[test]
    fn status_fails_while_an_enabled_service_is_down() {
        use orchestrator_core::wire::State;
        let up = running("api");
        assert_eq!(status_exit(std::slice::from_ref(&up)), ExitCode::SUCCESS);
        let disabled = ServiceInfo {
            enabled: false,
            state: State::Stopped,
            pid: None,
            ..running("spare")
        };
        assert_eq!(
            status_exit(&[up.clone(), disabled.clone()]),
            ExitCode::SUCCESS
        );
        let done = ServiceInfo {
            state: State::Stopped,
            pid: None,
            last_exit_code: Some(0),
            completed: true,
            ..running("migrate")
        };
        assert_eq!(status_exit(&[up.clone(), done]), ExitCode::SUCCESS);
        // A server stopped by a user that exits 0 on SIGTERM is down.
        let stopped_clean = ServiceInfo {
            state: State::Stopped,
            pid: None,
            last_exit_code: Some(0),
            ..running("api")
        };
        assert_eq!(
            status_exit(&[up.clone(), stopped_clean]),
            ExitCode::from(EXIT_FAILED)
        );
        for state in [
            State::Stopped,
            State::Starting,
            State::Stopping,
            State::Restarting,
            State::Failed,
        ] {
            let down = ServiceInfo {
                state,
                ..running("db")
            };
            assert_eq!(
                status_exit(&[up.clone(), down]),
                ExitCode::from(EXIT_FAILED),
                "{state}"
            );
        }
        let killed = ServiceInfo {
            state: State::Stopped,
            pid: None,
            last_exit_code: Some(0),
            last_error: Some(
                "stopped with SIGKILL: still running 10s (stop_timeout) after SIGTERM".into(),
            ),
            ..running("stubborn")
        };
        assert_eq!(status_exit(&[killed]), ExitCode::from(EXIT_FAILED));
    }

    #[test]
    fn every_name_is_checked_before_acting_and_groups_expand() {
        use orchestrator_core::wire::State;
        let services = [
            running("api"),
            running("web@0"),
            running("web@1"),
            running("web@1x"),
            ServiceInfo {
                enabled: false,
                state: State::Stopped,
                ..running("spare")
            },
            ServiceInfo {
                enabled: false,
                ..running("manual")
            },
        ];
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            targets(&services, "stop", names(&["api", "nope", "other"]), false),
            Err(names(&["nope", "other"])),
            "one unknown name stops the whole action"
        );
        assert_eq!(
            targets(&services, "stop", names(&["web", "api", "web@0"]), false),
            Ok(names(&["web@0", "web@1", "api"])),
            "a group name stands for its instances, each once"
        );
        assert_eq!(
            targets(&services, "stop", names(&["web@"]), false),
            Err(names(&["web@"]))
        );
        assert_eq!(
            targets(&services, "start", vec![], true),
            Ok(names(&["api", "web@0", "web@1", "web@1x"])),
            "start --all leaves enabled = false alone"
        );
        assert_eq!(
            targets(&services, "restart", vec![], true),
            Ok(names(&["api", "web@0", "web@1", "web@1x", "manual"])),
            "restart --all restarts what runs, but starts nothing disabled"
        );
        assert_eq!(targets(&services, "stop", vec![], true).unwrap().len(), 6);
    }

    #[test]
    fn health_shows_when_a_service_has_a_check_and_reason_says_why() {
        let running = ServiceInfo {
            uptime: Some(1),
            health: Some(orchestrator_core::wire::Health::Healthy),
            reason: Some("serving \u{1b}[2J".into()),
            ..running("api")
        };
        let waiting = ServiceInfo {
            name: "web".into(),
            state: orchestrator_core::wire::State::Starting,
            pid: None,
            health: None,
            reason: Some("waiting for api (healthy)".into()),
            ..running.clone()
        };
        let failed = ServiceInfo {
            name: "job".into(),
            state: orchestrator_core::wire::State::Failed,
            pid: None,
            health: None,
            reason: None,
            last_error: Some("exited with code 3 while starting".into()),
            ..running.clone()
        };
        let table = status_table(&[running, waiting, failed]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[0].contains("HEALTH") && lines[0].ends_with("REASON"),
            "{table}"
        );
        assert!(
            lines[1].contains("healthy") && lines[1].ends_with("serving \\x1b[2J"),
            "{table}"
        );
        assert!(lines[2].ends_with("waiting for api (healthy)"), "{table}");
        assert!(
            lines[3].ends_with("exited with code 3 while starting"),
            "{table}"
        );
    }

    #[test]
    fn several_stops_go_dependents_first_in_waves() {
        let service = |name: &str, deps: &[&str]| ServiceInfo {
            depends_on: deps
                .iter()
                .map(|d| (d.to_string(), orchestrator_core::deps::Condition::Started))
                .collect(),
            ..running(name)
        };
        let services = [
            service("db", &[]),
            service("api", &["db"]),
            service("web", &["api"]),
            service("cron", &[]),
        ];
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            stop_waves(&services, names(&["db", "api", "web", "cron"])),
            [names(&["cron", "web"]), names(&["api"]), names(&["db"])]
        );
        // Through a service not named: web still goes before db.
        assert_eq!(
            stop_waves(&services, names(&["db", "web"])),
            [names(&["web"]), names(&["db"])]
        );
    }

    #[test]
    fn sizes_read_as_ps_shows_them() {
        assert_eq!(format_bytes(512), "512B");
        assert_eq!(format_bytes(812 * 1024), "812K");
        assert_eq!(format_bytes(5 * 1024 * 1024 + 512 * 1024), "5.5M");
        assert_eq!(format_bytes(3 << 30), "3.0G");
        assert_eq!(format_cpu(0.0), "0.00s");
        assert_eq!(format_cpu(42.25), "42.2s");
        assert_eq!(format_cpu(307.0), "5m07s");
    }

    #[test]
    fn several_services_print_as_aligned_name_bars() {
        use crate::logview::{Entry, Prefixer};
        use orchestrator_core::wire::Stream;
        let entry = |service, seq, time: &str, stream, text: &str| Entry {
            service,
            seq,
            time: format!("2026-01-02T03:04:{time}Z"),
            stream,
            text: text.into(),
        };
        let entries = [
            entry(0, 1, "05.001", Stream::Stdout, "listening on :8080"),
            entry(1, 7, "05.002", Stream::Stderr, "slow query \u{1b}[2J"),
            entry(0, 2, "06.000", Stream::Stdout, "GET /"),
        ];
        let names = ["api".to_owned(), "worker@0".to_owned()];
        let prefixer = Prefixer::new(&names, true, false);
        assert_eq!(
            render_entries(&entries, prefixer.as_ref()),
            "\
api      | 2026-01-02T03:04:05.001Z stdout listening on :8080
worker@0 | 2026-01-02T03:04:05.002Z stderr slow query \\x1b[2J
api      | 2026-01-02T03:04:06.000Z stdout GET /
"
        );
        // One service named alone: as `logs NAME` always printed.
        assert_eq!(
            render_entries(&entries[..1], None),
            "2026-01-02T03:04:05.001Z stdout listening on :8080\n"
        );
    }
}
