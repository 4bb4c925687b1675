//! Units for systemd: one `NAME.service` per service, a template
//! `NAME@.service` for a section with instances (what differs from one
//! instance to the next goes into a drop-in `NAME@I.service.d/`), and a
//! target that wants them all.

use std::time::Duration;

use super::{Action, Export, Untranslated, duration_text as duration, group_instances};
use crate::config::{RestartPolicy, Rlimit, RlimitValue};
use crate::deps::Condition;
use crate::service::{ReadyWhen, ServiceDefinition};

/// The target that groups the exported units: `systemctl start` it to start
/// them all, `enable` it to start them at boot.
pub const TARGET: &str = "orchestrator-services.target";

/// Where a line goes in a unit file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Section {
    Unit,
    Service,
    Install,
}

impl Section {
    fn header(self) -> &'static str {
        match self {
            Section::Unit => "[Unit]",
            Section::Service => "[Service]",
            Section::Install => "[Install]",
        }
    }
}

type Line = (Section, String);

/// The units for `definitions` and what they leave out.
pub fn export(definitions: &[ServiceDefinition]) -> Export {
    let mut export = Export::default();
    let mut wanted = Vec::new();
    let (alone, groups) = group_instances(definitions);
    for definition in alone {
        let lines = unit_lines(definition, definitions, &mut export);
        let name = format!("{}.service", definition.name);
        export.file(name.clone(), render(&lines));
        if definition.enabled {
            wanted.push(name);
        }
    }
    for (section, members) in groups {
        let noted = export.untranslated.len();
        let units: Vec<Vec<Line>> = members
            .iter()
            .map(|member| unit_lines(member, definitions, &mut export))
            .collect();
        merge_instance_notes(&mut export, noted, &section, members.len());
        // What every instance has goes into the template; the rest (the
        // working directory, HOME, an argument with `{instance}`...) into
        // each instance's drop-in.
        let common: Vec<Line> = units[0]
            .iter()
            .filter(|line| units.iter().all(|unit| unit.contains(line)))
            .cloned()
            .collect();
        let header = format!(
            "# The instances of [services.{section}] ({} of them): what differs\n\
             # between them is in NAME@I.service.d/instance.conf.\n",
            members.len()
        );
        export.file(format!("{section}@.service"), header + &render(&common));
        for (member, unit) in members.iter().zip(&units) {
            let own: Vec<Line> = unit
                .iter()
                .filter(|line| !common.contains(line))
                .cloned()
                .collect();
            let name = format!("{}.service", member.name);
            if !own.is_empty() {
                export.file(format!("{name}.d/instance.conf"), render(&own));
            }
            if member.enabled {
                wanted.push(name);
            }
        }
    }
    let mut target = String::from("[Unit]\nDescription=Services exported from orchestrator\n");
    for unit in &wanted {
        target.push_str(&format!("Wants={unit}\n"));
    }
    target.push_str("\n[Install]\nWantedBy=multi-user.target\n");
    export.file(TARGET.to_owned(), target);
    export
}

/// The notes from `from` on, made for the `count` instances of `section`:
/// one that every instance got alike is said once, for `section@*`.
fn merge_instance_notes(export: &mut Export, from: usize, section: &str, count: usize) {
    let notes: Vec<Untranslated> = export.untranslated.drain(from..).collect();
    let alike = |a: &Untranslated, b: &Untranslated| {
        (a.key.as_str(), a.action, a.detail.as_str())
            == (b.key.as_str(), b.action, b.detail.as_str())
    };
    let mut said: Vec<Untranslated> = Vec::new();
    for note in &notes {
        if notes.iter().filter(|other| alike(note, other)).count() == count {
            if !said.iter().any(|done| alike(done, note)) {
                said.push(Untranslated {
                    service: format!("{section}@*"),
                    ..note.clone()
                });
            }
        } else {
            said.push(note.clone());
        }
    }
    export.untranslated.extend(said);
}

fn render(lines: &[Line]) -> String {
    let mut out = String::new();
    for section in [Section::Unit, Section::Service, Section::Install] {
        let mut first = true;
        for (_, line) in lines.iter().filter(|(s, _)| *s == section) {
            if first {
                if !out.is_empty() {
                    out.push('\n');
                }
                out.push_str(section.header());
                out.push('\n');
                first = false;
            }
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn unit_lines(
    definition: &ServiceDefinition,
    all: &[ServiceDefinition],
    export: &mut Export,
) -> Vec<Line> {
    let name = definition.name.as_str();
    let spec = &definition.spawn;
    let policy = &definition.policy;
    let mut lines: Vec<Line> = Vec::new();
    let mut unit = |line: String| lines.push((Section::Unit, line));
    unit(format!(
        "Description={} (exported from orchestrator)",
        specifiers(name)
    ));
    unit(format!("PartOf={TARGET}"));
    for dependency in &definition.depends_on {
        let other = dependency.name.as_str();
        unit(format!("Wants={other}.service"));
        unit(format!("After={other}.service"));
        let target = all.iter().find(|d| d.name == dependency.name);
        match dependency.condition {
            Condition::Started => {}
            // READY=1 is what systemd waits for with Type=notify: exact.
            Condition::Healthy if target.is_some_and(|d| d.notify && d.health.is_none()) => {}
            Condition::Healthy => export.note(
                name,
                &format!("depends_on.{other}"),
                Action::Approximated,
                "\"healthy\": systemd has no health checks; After= waits only until it has started",
            ),
            Condition::Completed => export.note(
                name,
                &format!("depends_on.{other}"),
                Action::Approximated,
                "\"completed\": After= waits for its exit only if it is Type=oneshot; here it waits until it has started",
            ),
        }
    }
    // systemd gives up on a unit started more than StartLimitBurst times
    // within StartLimitIntervalSec; we give up after max_restarts failed
    // restarts in a row (the count resets once a run lasts reset_after).
    // The window is what max_restarts quick failures take with systemd's
    // fixed RestartSec, plus reset_after.
    let backoff = &policy.backoff;
    let burst = policy.max_restarts.saturating_add(1);
    let window = backoff
        .initial
        .checked_mul(policy.max_restarts)
        .and_then(|quick| quick.checked_add(backoff.reset_after))
        .unwrap_or(Duration::MAX);
    unit(format!("StartLimitIntervalSec={}", duration(window)));
    unit(format!("StartLimitBurst={burst}"));

    let mut service = |line: String| lines.push((Section::Service, line));
    service(format!(
        "Type={}",
        if definition.notify { "notify" } else { "exec" }
    ));
    let argv = std::iter::once(exec_word(&spec.program.to_string_lossy(), true))
        .chain(spec.args.iter().map(|arg| exec_word(arg, false)))
        .collect::<Vec<_>>()
        .join(" ");
    service(format!("ExecStart={argv}"));
    service(format!(
        "WorkingDirectory={}",
        specifiers(&spec.cwd.to_string_lossy())
    ));
    for (key, value) in &spec.env {
        if env_name(key) {
            service(format!("Environment={}", quoted(&format!("{key}={value}"))));
        }
    }
    if let Some(user) = &spec.user {
        service(format!("User={}", specifiers(&user.user)));
        if let Some(group) = &user.group {
            service(format!("Group={}", specifiers(group)));
        }
        let root = user.user == "root" || user.user == "0";
        if spec.strict.is_some() && !root {
            service("NoNewPrivileges=yes".to_owned());
        }
    }
    service(format!(
        "Restart={}",
        match policy.restart {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "no",
        }
    ));
    service(format!("RestartSec={}", duration(backoff.initial)));
    if policy.restart != RestartPolicy::Never {
        if backoff.max > backoff.initial {
            export.note(
                name,
                "backoff",
                Action::Approximated,
                format!(
                    "RestartSec={} is every delay; systemd 254+ can grow it to {} with RestartSteps= \
                     and RestartMaxDelaySec= (not written: older versions reject them)",
                    duration(backoff.initial),
                    duration(backoff.max)
                ),
            );
        }
        export.note(
            name,
            "max_restarts",
            Action::Approximated,
            format!(
                "systemd counts starts in a window, not failures in a row: it gives up after \
                 {burst} starts within {}",
                duration(window)
            ),
        );
    }
    service(format!("KillSignal={}", policy.stop_signal.as_str()));
    service(format!("TimeoutStopSec={}", duration(policy.stop_timeout)));
    match policy.ready {
        ReadyWhen::Signalled { timeout } => {
            service(format!("TimeoutStartSec={}", duration(timeout)));
        }
        ReadyWhen::Grace(grace) if !grace.is_zero() => {
            let waited_on = all.iter().any(|other| {
                other.depends_on.iter().any(|dependency| {
                    dependency.name == definition.name && dependency.condition == Condition::Started
                })
            });
            if waited_on {
                export.note(
                    name,
                    "start_grace",
                    Action::Approximated,
                    format!(
                        "systemd counts a Type=exec service started once it has exec'd, not after {}: \
                         its dependents start sooner",
                        duration(grace)
                    ),
                );
            }
        }
        ReadyWhen::Grace(_) => {}
    }
    if let Some(watchdog) = definition.watchdog {
        service(format!("WatchdogSec={}", duration(watchdog)));
    }
    let limits = &spec.limits;
    if let Some(mib) = limits.memory_mib {
        service(format!("MemoryMax={mib}M"));
        service("MemorySwapMax=0".to_owned());
    }
    if let Some(millicores) = limits.cpu_millicores {
        // CPUQuota= takes a percentage of one CPU: 1.5 cores is 150%.
        let quota = match millicores % 10 {
            0 => format!("{}%", millicores / 10),
            tenth => format!("{}.{tenth}%", millicores / 10),
        };
        service(format!("CPUQuota={quota}"));
    }
    if let Some(pids) = limits.pids {
        service(format!("TasksMax={pids}"));
    }
    for (rlimit, value) in &spec.rlimits {
        let value = match value {
            RlimitValue::Limited(n) => n.to_string(),
            RlimitValue::Unlimited => "infinity".to_owned(),
        };
        service(format!("{}={value}", limit_key(*rlimit)));
    }
    if spec.sha256.is_some() {
        export.note(
            name,
            "sha256",
            Action::Dropped,
            "systemd does not check a binary's digest before running it",
        );
    }
    for (key, _) in spec.env.iter().filter(|(key, _)| !env_name(key)) {
        export.note(
            name,
            &format!("environment.{key}"),
            Action::Dropped,
            "systemd takes only names of letters, digits and '_', not starting with a digit",
        );
    }
    if let Some(health) = &definition.health {
        let what = match &health.probe {
            crate::health::Probe::Http { .. } => "an http check",
            crate::health::Probe::Tcp { .. } => "a tcp check",
            crate::health::Probe::Grpc { .. } => "a grpc check",
            crate::health::Probe::Exec { .. } => "an exec check",
        };
        export.note(
            name,
            "health",
            Action::Dropped,
            format!(
                "systemd has no health checks ({what} every {}); its watchdog (notify + watchdog) is the nearest",
                duration(health.interval)
            ),
        );
    }
    if definition.enabled {
        lines.push((Section::Install, format!("WantedBy={TARGET}")));
    }
    lines
}

fn limit_key(rlimit: Rlimit) -> &'static str {
    match rlimit {
        Rlimit::Nofile => "LimitNOFILE",
        Rlimit::Nproc => "LimitNPROC",
        Rlimit::Core => "LimitCORE",
        Rlimit::Memlock => "LimitMEMLOCK",
        Rlimit::Stack => "LimitSTACK",
        Rlimit::As => "LimitAS",
        Rlimit::Cpu => "LimitCPU",
        Rlimit::Fsize => "LimitFSIZE",
    }
}

/// Whether systemd takes `name` as an environment variable's name.
fn env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `%` is where systemd expands specifiers (`%i`, `%n`): a literal one is `%%`.
fn specifiers(text: &str) -> String {
    text.replace('%', "%%")
}

/// `text` in double quotes, with the C escapes systemd undoes.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '%' => out.push_str("%%"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One word of ExecStart=: quoted when it must be, `$` doubled (ExecStart
/// expands `$VAR`), `%` doubled. The program (`first`) is quoted too when
/// it starts with one of the prefixes systemd reads there (`-`, `@`...).
fn exec_word(word: &str, first: bool) -> String {
    // A lone `;` separates commands; systemd documents `\;` as the literal.
    if word == ";" && !first {
        return "\\;".to_owned();
    }
    let needs_quotes = word.is_empty()
        || word
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | ';'))
        || (first && word.starts_with(['@', '-', ':', '+', '!']));
    let word = word.replace('$', "$$");
    match needs_quotes {
        false => specifiers(&word),
        true => quoted(&word),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_only_when_they_must_be() {
        assert_eq!(exec_word("--port", false), "--port");
        assert_eq!(exec_word("a b", false), "\"a b\"");
        assert_eq!(exec_word("", false), "\"\"");
        assert_eq!(exec_word("50%", false), "50%%");
        assert_eq!(exec_word("$HOME", false), "$$HOME");
        assert_eq!(exec_word("say \"hi\"", false), "\"say \\\"hi\\\"\"");
        assert_eq!(exec_word("-x", true), "\"-x\"");
        assert_eq!(exec_word(";", false), "\\;");
        assert_eq!(exec_word("a;b", false), "\"a;b\"");
        assert_eq!(quoted("A=b\\c"), "\"A=b\\\\c\"");
    }

    #[test]
    fn durations_are_whole_seconds_or_milliseconds() {
        assert_eq!(duration(Duration::from_secs(30)), "30s");
        assert_eq!(duration(Duration::from_millis(500)), "500ms");
        assert_eq!(duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(duration(Duration::ZERO), "0s");
    }
}
