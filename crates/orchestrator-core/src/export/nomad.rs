//! A Nomad job: a group per service (a section with instances is one group
//! with that count) with one `exec` task (our services are binaries, not
//! images), a restart block from the policy, Consul service checks from the
//! health checks, and for each dependency a prestart task that waits for
//! the dependency's service to answer. Written as HCL2, or as the job API's
//! JSON (`--json`), from one model.

use std::time::Duration;

use serde_json::{Value, json};

use super::kubernetes::object_name;
use super::{
    Action, Export, dependency_endpoint, duration_text as duration, probe_port, workloads,
};
use crate::config::RestartPolicy;
use crate::health::{HealthCheck, OnUnhealthy, Probe};
use crate::service::ServiceDefinition;

/// The job's name and the file it is written to (`.nomad.hcl` or `.json`).
pub const JOB: &str = "orchestrator-services";

struct Group {
    name: String,
    count: usize,
    restart: Restart,
    /// A static port for the health check's service, by label.
    port: Option<u16>,
    tasks: Vec<Task>,
}

struct Restart {
    attempts: u32,
    interval: Duration,
    delay: Duration,
}

struct Task {
    name: String,
    command: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    user: Option<String>,
    memory_mb: Option<u64>,
    cores: Option<u64>,
    kill_signal: String,
    kill_timeout: Duration,
    check: Option<Check>,
    prestart: bool,
}

struct Check {
    /// `check_restart`: (consecutive failures, grace after a start) when an
    /// unhealthy task is restarted.
    restart: Option<(u32, Duration)>,
    kind: &'static str,
    path: Option<String>,
    command: Option<(String, Vec<String>)>,
    interval: Duration,
    timeout: Duration,
}

/// The job for `definitions`, as HCL2 or (with `json`) the API's JSON.
pub fn export(definitions: &[ServiceDefinition], json: bool) -> Export {
    let mut export = Export::default();
    let groups: Vec<Group> = workloads(definitions)
        .iter()
        .map(|(name, members)| {
            let noted = export.untranslated.len();
            let group = group(name, members, definitions, !json, &mut export);
            export.dedupe_notes(noted);
            group
        })
        .collect();
    match json {
        true => {
            let text = serde_json::to_string_pretty(&job_json(&groups)).unwrap_or_default() + "\n";
            export.file(format!("{JOB}.json"), text);
        }
        false => {
            // What did not carry over, said in the job too: a reader of the
            // file did not see the export's stderr.
            let notes: String = export
                .untranslated
                .iter()
                .map(|note| format!("# not carried over: {note}\n"))
                .collect();
            export.file(format!("{JOB}.nomad.hcl"), notes + &job_hcl(&groups));
        }
    }
    export
}

fn group(
    section: &str,
    members: &[&ServiceDefinition],
    all: &[ServiceDefinition],
    hcl: bool,
    export: &mut Export,
) -> Group {
    let first = members[0];
    let service = section;
    let name = object_name(section);
    let spec = &first.spawn;
    let policy = &first.policy;
    if members.iter().any(|member| member.spawn.args != spec.args) {
        export.note(
            service,
            "instances",
            Action::Approximated,
            "the allocations of a group are alike: every one gets instance 0's arguments and environment ({instance} is 0; NOMAD_ALLOC_INDEX is the index)",
        );
    }
    let restart = match policy.restart {
        RestartPolicy::Never => Restart {
            attempts: 0,
            interval: Duration::from_secs(60),
            delay: policy.backoff.initial,
        },
        restart => {
            if restart == RestartPolicy::OnFailure {
                export.note(
                    service,
                    "restart",
                    Action::Approximated,
                    "Nomad restarts a service task whatever its exit code (a batch job's would not be restarted after exit 0)",
                );
            }
            if policy.backoff.max > policy.backoff.initial {
                export.note(
                    service,
                    "backoff",
                    Action::Approximated,
                    "restart's delay is fixed at the initial one; Nomad has no growing delay within a group's restarts",
                );
            }
            Restart {
                attempts: policy.max_restarts,
                interval: policy
                    .backoff
                    .initial
                    .checked_mul(policy.max_restarts.max(1))
                    .and_then(|quick| quick.checked_add(policy.backoff.reset_after))
                    .unwrap_or(Duration::MAX),
                delay: policy.backoff.initial,
            }
        }
    };
    if !spec.rlimits.is_empty() {
        export.note(
            service,
            "rlimits",
            Action::Dropped,
            "the exec driver sets no rlimits",
        );
    }
    if spec.limits.pids.is_some() {
        export.note(
            service,
            "pids_limit",
            Action::Dropped,
            "the exec driver has no process limit",
        );
    }
    if spec.sha256.is_some() {
        export.note(
            service,
            "sha256",
            Action::Dropped,
            "Nomad checks a digest only for an artifact it downloads",
        );
    }
    for (key, _) in spec.env.iter().filter(|(key, _)| hcl && !identifier(key)) {
        export.note(
            service,
            &format!("environment.{key}"),
            Action::Dropped,
            "an env block takes names of letters, digits and '_' (`--json` keeps it)",
        );
    }
    if first.notify || first.watchdog.is_some() {
        export.note(
            service,
            "notify",
            Action::Dropped,
            "no sd_notify in Nomad: a service check is the nearest",
        );
    }
    export.note(
        service,
        "data_dir",
        Action::Approximated,
        "the exec driver runs the task in its allocation directory; HOME still names the data_dir",
    );
    let cores = spec.limits.cpu_millicores.map(|millicores| {
        if millicores % 1000 != 0 {
            export.note(
                service,
                "cpu_limit",
                Action::Approximated,
                "resources.cores takes whole cores: rounded up",
            );
        }
        millicores.div_ceil(1000).max(1)
    });
    let (check, port) = match &first.health {
        Some(health) => check(health, service, export),
        None => (None, None),
    };
    let mut tasks = Vec::new();
    for dependency in &first.depends_on {
        let other = dependency.name.as_str();
        let Some((base, port)) = dependency_endpoint(dependency, all) else {
            export.note(
                service,
                &format!("depends_on.{other}"),
                Action::Dropped,
                "it has no health check naming a port, so no service to wait for: the groups start together",
            );
            continue;
        };
        let wait = format!(
            "until nc -z {}.service.consul {port}; do sleep 1; done",
            object_name(&base)
        );
        let task_name = format!("wait-for-{}", object_name(&base));
        if tasks.iter().any(|task: &Task| task.name == task_name) {
            continue;
        }
        tasks.push(Task {
            name: task_name,
            command: "/bin/sh".to_owned(),
            args: vec!["-c".to_owned(), wait],
            env: Vec::new(),
            user: None,
            memory_mb: None,
            cores: None,
            kill_signal: "SIGTERM".to_owned(),
            kill_timeout: Duration::from_secs(5),
            check: None,
            prestart: true,
        });
    }
    tasks.push(Task {
        name: name.clone(),
        command: spec.program.to_string_lossy().into_owned(),
        args: spec.args.clone(),
        env: spec
            .env
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect(),
        user: spec.user.as_ref().map(|user| user.user.clone()),
        memory_mb: spec.limits.memory_mib,
        cores,
        kill_signal: policy.stop_signal.as_str().to_owned(),
        kill_timeout: policy.stop_timeout,
        check,
        prestart: false,
    });
    if spec.user.as_ref().is_some_and(|user| user.group.is_some()) {
        export.note(
            service,
            "group",
            Action::Dropped,
            "a task runs with its user's primary group",
        );
    }
    let count = if first.enabled { members.len() } else { 0 };
    if !first.enabled {
        export.note(
            service,
            "enabled",
            Action::Approximated,
            "count = 0 (scale it up to start it)",
        );
    }
    Group {
        name,
        count,
        restart,
        port,
        tasks,
    }
}

fn check(health: &HealthCheck, service: &str, export: &mut Export) -> (Option<Check>, Option<u16>) {
    let port = probe_port(health);
    let (kind, path, command) = match &health.probe {
        Probe::Http { url, expect_status } => {
            if expect_status.is_some() {
                export.note(
                    service,
                    "health.expect_status",
                    Action::Approximated,
                    "an http check passes on any 2xx",
                );
            }
            let path = url
                .strip_prefix("http://")
                .and_then(|rest| rest.find('/').map(|at| rest[at..].to_owned()))
                .unwrap_or_else(|| "/".to_owned());
            ("http", Some(path), None)
        }
        Probe::Tcp { .. } => ("tcp", None, None),
        Probe::Grpc { .. } => ("grpc", None, None),
        Probe::Exec { argv } => match argv.split_first() {
            Some((program, args)) => ("script", None, Some((program.clone(), args.to_vec()))),
            None => return (None, None),
        },
    };
    if kind != "script" && port.is_none() {
        export.note(
            service,
            "health",
            Action::Dropped,
            "its address names no port",
        );
        return (None, None);
    }
    // check_restart is on_unhealthy = "restart" exactly: `limit` failures
    // in a row, none counted for `grace` after a start.
    let restart = (health.on_unhealthy == OnUnhealthy::Restart)
        .then_some((health.retries.max(1), health.start_period));
    let check = Check {
        restart,
        kind,
        path,
        command,
        interval: health.interval,
        timeout: health.timeout,
    };
    (Some(check), port)
}

/// Whether `name` can be an attribute of an HCL block (`env`).
fn identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// An HCL string: JSON's escapes are HCL's, but `${` and `%{` start
/// templates and are doubled to stay literal.
fn string(text: &str) -> String {
    Value::String(text.to_owned())
        .to_string()
        .replace("${", "$${")
        .replace("%{", "%%{")
}

fn job_hcl(groups: &[Group]) -> String {
    let mut out = format!(
        "# Exported from orchestrator: one group per service.\njob {} {{\n  datacenters = [\"*\"]\n  type        = \"service\"\n",
        string(JOB)
    );
    for group in groups {
        out.push_str(&format!(
            "\n  group {} {{\n    count = {}\n",
            string(&group.name),
            group.count
        ));
        let restart = &group.restart;
        out.push_str(&format!(
            "\n    restart {{\n      attempts = {}\n      interval = {}\n      delay    = {}\n      mode     = \"fail\"\n    }}\n",
            restart.attempts,
            string(&duration(restart.interval)),
            string(&duration(restart.delay))
        ));
        if let Some(port) = group.port {
            out.push_str(&format!(
                "\n    network {{\n      port \"health\" {{\n        static = {port}\n      }}\n    }}\n"
            ));
        }
        for task in &group.tasks {
            out.push_str(&format!(
                "\n    task {} {{\n      driver = \"exec\"\n",
                string(&task.name)
            ));
            if let Some(user) = &task.user {
                out.push_str(&format!("      user   = {}\n", string(user)));
            }
            out.push_str(&format!(
                "      kill_signal  = {}\n      kill_timeout = {}\n",
                string(&task.kill_signal),
                string(&duration(task.kill_timeout))
            ));
            if task.prestart {
                out.push_str("\n      lifecycle {\n        hook    = \"prestart\"\n        sidecar = false\n      }\n");
            }
            let args = task
                .args
                .iter()
                .map(|arg| string(arg))
                .collect::<Vec<_>>()
                .join(", ");
            out.push_str(&format!(
                "\n      config {{\n        command = {}\n        args    = [{args}]\n      }}\n",
                string(&task.command)
            ));
            if !task.env.is_empty() {
                out.push_str("\n      env {\n");
                // Names that are no HCL identifier were left out (see `group`).
                for (key, value) in task.env.iter().filter(|(key, _)| identifier(key)) {
                    out.push_str(&format!("        {key} = {}\n", string(value)));
                }
                out.push_str("      }\n");
            }
            if task.memory_mb.is_some() || task.cores.is_some() {
                out.push_str("\n      resources {\n");
                if let Some(memory) = task.memory_mb {
                    out.push_str(&format!("        memory = {memory}\n"));
                }
                if let Some(cores) = task.cores {
                    out.push_str(&format!("        cores  = {cores}\n"));
                }
                out.push_str("      }\n");
            }
            if let Some(check) = &task.check {
                out.push_str(&format!(
                    "\n      service {{\n        name = {}\n",
                    string(&task.name)
                ));
                if group.port.is_some() {
                    out.push_str("        port = \"health\"\n");
                }
                out.push_str(&format!(
                    "\n        check {{\n          type     = {}\n          interval = {}\n          timeout  = {}\n",
                    string(check.kind),
                    string(&duration(check.interval)),
                    string(&duration(check.timeout))
                ));
                if let Some(path) = &check.path {
                    out.push_str(&format!("          path     = {}\n", string(path)));
                }
                if let Some((command, args)) = &check.command {
                    let args = args
                        .iter()
                        .map(|arg| string(arg))
                        .collect::<Vec<_>>()
                        .join(", ");
                    out.push_str(&format!(
                        "          command  = {}\n          args     = [{args}]\n",
                        string(command)
                    ));
                }
                if let Some((limit, grace)) = check.restart {
                    out.push_str(&format!(
                        "\n          check_restart {{\n            limit = {limit}\n            grace = {}\n          }}\n",
                        string(&duration(grace))
                    ));
                }
                out.push_str("        }\n      }\n");
            }
            out.push_str("    }\n");
        }
        out.push_str("  }\n");
    }
    out.push_str("}\n");
    out
}

/// The job as `POST /v1/jobs` takes it.
fn job_json(groups: &[Group]) -> Value {
    let groups: Vec<Value> = groups
        .iter()
        .map(|group| {
            let tasks: Vec<Value> = group
                .tasks
                .iter()
                .map(|task| {
                    let mut value = json!({
                        "Name": task.name,
                        "Driver": "exec",
                        "Config": { "command": task.command, "args": task.args },
                        "Env": task.env.iter().map(|(key, value)| (key.clone(), json!(value))).collect::<serde_json::Map<String, Value>>(),
                        "KillSignal": task.kill_signal,
                        "KillTimeout": nanos(task.kill_timeout),
                    });
                    if let Some(user) = &task.user {
                        value["User"] = json!(user);
                    }
                    if task.prestart {
                        value["Lifecycle"] = json!({ "Hook": "prestart", "Sidecar": false });
                    }
                    if task.memory_mb.is_some() || task.cores.is_some() {
                        let mut resources = serde_json::Map::new();
                        if let Some(memory) = task.memory_mb {
                            resources.insert("MemoryMB".into(), json!(memory));
                        }
                        if let Some(cores) = task.cores {
                            resources.insert("Cores".into(), json!(cores));
                        }
                        value["Resources"] = Value::Object(resources);
                    }
                    if let Some(check) = &task.check {
                        let mut json_check = json!({
                            "Name": format!("{}-health", task.name),
                            "Type": check.kind,
                            "Interval": nanos(check.interval),
                            "Timeout": nanos(check.timeout),
                        });
                        if let Some(path) = &check.path {
                            json_check["Path"] = json!(path);
                        }
                        if let Some((command, args)) = &check.command {
                            json_check["Command"] = json!(command);
                            json_check["Args"] = json!(args);
                        }
                        if let Some((limit, grace)) = check.restart {
                            json_check["CheckRestart"] = json!({ "Limit": limit, "Grace": nanos(grace) });
                        }
                        let mut service = json!({ "Name": task.name, "Checks": [json_check] });
                        if group.port.is_some() {
                            service["PortLabel"] = json!("health");
                        }
                        value["Services"] = json!([service]);
                    }
                    value
                })
                .collect();
            let mut value = json!({
                "Name": group.name,
                "Count": group.count,
                "RestartPolicy": {
                    "Attempts": group.restart.attempts,
                    "Interval": nanos(group.restart.interval),
                    "Delay": nanos(group.restart.delay),
                    "Mode": "fail",
                },
                "Tasks": tasks,
            });
            if let Some(port) = group.port {
                value["Networks"] = json!([{ "ReservedPorts": [{ "Label": "health", "Value": port }] }]);
            }
            value
        })
        .collect();
    json!({
        "Job": {
            "ID": JOB,
            "Name": JOB,
            "Type": "service",
            "Datacenters": ["*"],
            "TaskGroups": groups,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hcl_strings_keep_template_markers_literal() {
        assert_eq!(string("a \"b\""), "\"a \\\"b\\\"\"");
        assert_eq!(string("${HOME}"), "\"$${HOME}\"");
        assert_eq!(string("%{if}"), "\"%%{if}\"");
    }
}
