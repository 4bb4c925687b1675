//! Manifests for Kubernetes: a Deployment per service (a section with
//! instances is one Deployment with that many replicas), a Service where a
//! health check names a port, and for each dependency an init container
//! that waits for the dependency's Service to answer.

use std::time::Duration;

use serde_json::{Value, json};

use super::{Action, Export, dependency_endpoint, probe_port, workloads};
use crate::config::RestartPolicy;
use crate::deps::Condition;
use crate::health::{HealthCheck, OnUnhealthy, Probe};
use crate::service::{ReadyWhen, ServiceDefinition};

/// The image of the init containers that wait for a dependency.
pub const WAIT_IMAGE: &str = "busybox:1.36";

/// The file everything is written to.
pub const FILE: &str = "orchestrator-services.yaml";

/// The manifests for `definitions`, running `image` (which must hold every
/// service's program at the path it has here).
pub fn export(definitions: &[ServiceDefinition], image: &str) -> Export {
    let (documents, mut export) = manifests(definitions, image);
    let text = documents
        .iter()
        .map(|document| format!("---\n{}", to_yaml(document, 0)))
        .collect::<String>();
    export.file(FILE.to_owned(), text);
    export
}

/// The manifests as JSON values (what `export` writes as YAML), and the
/// notes about what does not carry over.
pub fn manifests(definitions: &[ServiceDefinition], image: &str) -> (Vec<Value>, Export) {
    let mut export = Export::default();
    let mut documents = Vec::new();
    for (name, members) in &workloads(definitions) {
        let noted = export.untranslated.len();
        documents.extend(workload(name, members, definitions, image, &mut export));
        export.dedupe_notes(noted);
    }
    (documents, export)
}

/// A name Kubernetes accepts (RFC 1123 label: lowercase letters, digits
/// and `-`, 63 at most, starting and ending with a letter or digit).
pub fn object_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    out.truncate(63);
    let out = out.trim_matches('-').to_owned();
    if out.is_empty() {
        "service".to_owned()
    } else {
        out
    }
}

fn workload(
    section: &str,
    members: &[&ServiceDefinition],
    all: &[ServiceDefinition],
    image: &str,
    export: &mut Export,
) -> Vec<Value> {
    let first = members[0];
    let service = section;
    let name = object_name(section);
    if name != section {
        export.note(
            service,
            "name",
            Action::Approximated,
            format!("Kubernetes names are lowercase letters, digits and '-': {name}"),
        );
    }
    let spec = &first.spawn;
    if members.iter().any(|member| {
        member.spawn.args != spec.args
            || member.spawn.env.len() != spec.env.len()
            || member
                .spawn
                .env
                .iter()
                .zip(&spec.env)
                .any(|(a, b)| a != b && &*a.0 != "HOME")
    }) {
        export.note(
            service,
            "instances",
            Action::Approximated,
            "the replicas of a Deployment are alike: every one gets instance 0's arguments and environment ({instance} is 0)",
        );
    }
    let policy = &first.policy;
    let mut container = json!({
        "name": name,
        "image": image,
        "command": [spec.program.to_string_lossy()],
        "args": spec.args,
        "workingDir": spec.cwd.to_string_lossy(),
        "env": spec.env.iter().map(|(key, value)| json!({"name": &**key, "value": &**value})).collect::<Vec<_>>(),
    });
    let mut limits = serde_json::Map::new();
    if let Some(mib) = spec.limits.memory_mib {
        limits.insert("memory".into(), json!(format!("{mib}Mi")));
    }
    if let Some(millicores) = spec.limits.cpu_millicores {
        limits.insert("cpu".into(), json!(format!("{millicores}m")));
    }
    if !limits.is_empty() {
        container["resources"] = json!({ "limits": limits });
    }
    if spec.limits.pids.is_some() {
        export.note(
            service,
            "pids_limit",
            Action::Dropped,
            "a pod's process limit is the kubelet's (podPidsLimit), not the manifest's",
        );
    }
    if !spec.rlimits.is_empty() {
        export.note(
            service,
            "rlimits",
            Action::Dropped,
            "Kubernetes sets no rlimits: the container runtime's defaults apply",
        );
    }
    let mut security = serde_json::Map::new();
    if let Some(user) = &spec.user {
        match user.user.parse::<u32>() {
            Ok(uid) => {
                security.insert("runAsUser".into(), json!(uid));
            }
            Err(_) => export.note(
                service,
                "user",
                Action::Dropped,
                format!(
                    "runAsUser takes a number, not the name {:?}: the image's user runs it",
                    user.user
                ),
            ),
        }
        if let Some(group) = &user.group {
            match group.parse::<u32>() {
                Ok(gid) => {
                    security.insert("runAsGroup".into(), json!(gid));
                }
                Err(_) => export.note(
                    service,
                    "group",
                    Action::Dropped,
                    format!("runAsGroup takes a number, not the name {group:?}"),
                ),
            }
        }
        if spec.strict.is_some() && user.user != "root" && user.user != "0" {
            security.insert("allowPrivilegeEscalation".into(), json!(false));
        }
    }
    if !security.is_empty() {
        container["securityContext"] = Value::Object(security);
    }
    let mut ports = Vec::new();
    if let Some(health) = &first.health {
        let (probe, port) = probe(health, service, export);
        if let Some(probe) = probe {
            container["readinessProbe"] = probe.clone();
            match health.on_unhealthy {
                OnUnhealthy::Restart => container["livenessProbe"] = probe,
                OnUnhealthy::Nothing => {}
            }
        }
        ports.extend(port);
    }
    if !ports.is_empty() {
        container["ports"] = json!(
            ports
                .iter()
                .map(|port| json!({"containerPort": port}))
                .collect::<Vec<_>>()
        );
    }
    match policy.restart {
        RestartPolicy::Always => {}
        RestartPolicy::OnFailure | RestartPolicy::Never => export.note(
            service,
            "restart",
            Action::Approximated,
            "a Deployment's pods always restart (a Job runs to completion instead)",
        ),
    }
    export.note(
        service,
        "backoff",
        Action::Approximated,
        "the kubelet's own crash-loop back-off applies (10s doubling to 5m), not this one",
    );
    if policy.stop_signal != nix::sys::signal::Signal::SIGTERM {
        export.note(
            service,
            "stop_signal",
            Action::Dropped,
            format!(
                "the kubelet stops a container with SIGTERM, not {}",
                policy.stop_signal.as_str()
            ),
        );
    }
    if first.notify {
        export.note(
            service,
            "notify",
            Action::Dropped,
            "no sd_notify in Kubernetes: a readiness probe is the nearest",
        );
    }
    if first.watchdog.is_some() {
        export.note(
            service,
            "watchdog",
            Action::Dropped,
            "no sd_notify watchdog in Kubernetes: a liveness probe is the nearest",
        );
    }
    if first.spawn.sha256.is_some() {
        export.note(
            service,
            "sha256",
            Action::Dropped,
            "the image's digest pins what runs, not the binary's",
        );
    }
    if let ReadyWhen::Grace(grace) = policy.ready
        && !grace.is_zero()
        && first.health.is_none()
    {
        container["readinessProbe"] = json!({
            "exec": {"command": ["true"]},
            "initialDelaySeconds": seconds(grace),
        });
    }
    let mut init = Vec::new();
    for dependency in &first.depends_on {
        let other = dependency.name.as_str();
        match dependency_endpoint(dependency, all) {
            Some((base, port)) => {
                let host = object_name(&base);
                init.push(json!({
                    "name": format!("wait-for-{}", object_name(other)),
                    "image": WAIT_IMAGE,
                    "command": ["sh", "-c", format!("until nc -z {host} {port}; do sleep 1; done")],
                }));
                if dependency.condition == Condition::Completed {
                    export.note(
                        service,
                        &format!("depends_on.{other}"),
                        Action::Approximated,
                        "\"completed\": the init container waits for its Service to answer, not for it to exit",
                    );
                }
            }
            None => export.note(
                service,
                &format!("depends_on.{other}"),
                Action::Dropped,
                "it has no health check naming a port, so no Service to wait for: the pods start together",
            ),
        }
    }
    let mut pod = json!({
        "containers": [container],
        "terminationGracePeriodSeconds": seconds(policy.stop_timeout),
    });
    if !init.is_empty() {
        // Deduplicated: depending on web means web@0, web@1... one Service.
        init.dedup_by(|a, b| a["command"] == b["command"]);
        pod["initContainers"] = Value::Array(init);
    }
    let labels = json!({ "app.kubernetes.io/name": name, "app.kubernetes.io/managed-by": "orchestrator-export" });
    let replicas = if first.enabled { members.len() } else { 0 };
    if !first.enabled {
        export.note(
            service,
            "enabled",
            Action::Approximated,
            "replicas: 0 (scale it up to start it)",
        );
    }
    let mut out = vec![json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name, "labels": labels },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": { "app.kubernetes.io/name": name } },
            "template": { "metadata": { "labels": labels }, "spec": pod },
        },
    })];
    if let Some(&port) = ports.first() {
        out.push(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": name, "labels": labels },
            "spec": {
                "selector": { "app.kubernetes.io/name": name },
                "ports": [{ "port": port, "targetPort": port }],
            },
        }));
    }
    out
}

/// The probe for `health`, and the port it names.
fn probe(health: &HealthCheck, service: &str, export: &mut Export) -> (Option<Value>, Option<u16>) {
    let port = probe_port(health);
    let mut probe = match (&health.probe, port) {
        (Probe::Http { url, expect_status }, Some(port)) => {
            let path = url
                .strip_prefix("http://")
                .and_then(|rest| rest.find('/').map(|at| &rest[at..]))
                .unwrap_or("/");
            if expect_status.is_some() {
                export.note(
                    service,
                    "health.expect_status",
                    Action::Approximated,
                    "an httpGet probe passes on any 2xx or 3xx",
                );
            }
            json!({ "httpGet": { "path": path, "port": port } })
        }
        (Probe::Tcp { .. }, Some(port)) => json!({ "tcpSocket": { "port": port } }),
        (Probe::Grpc { service: name, .. }, Some(port)) => {
            let mut grpc = json!({ "port": port });
            if !name.is_empty() {
                grpc["service"] = json!(name);
            }
            json!({ "grpc": grpc })
        }
        (Probe::Exec { argv }, _) => json!({ "exec": { "command": argv } }),
        (_, None) => {
            export.note(
                service,
                "health",
                Action::Dropped,
                "its address names no port",
            );
            return (None, None);
        }
    };
    probe["periodSeconds"] = json!(seconds(health.interval).max(1));
    probe["timeoutSeconds"] = json!(seconds(health.timeout).max(1));
    probe["failureThreshold"] = json!(health.retries.max(1));
    if !health.start_period.is_zero() {
        probe["initialDelaySeconds"] = json!(seconds(health.start_period));
    }
    let sub_second = [health.interval, health.timeout]
        .iter()
        .any(|d| d.subsec_millis() != 0 || d.as_secs() == 0);
    if sub_second {
        export.note(
            service,
            "health.interval",
            Action::Approximated,
            "probes count whole seconds: rounded, at least 1",
        );
    }
    (Some(probe), port)
}

fn seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_millis() >= 500)
}

/// `value` as block YAML. Strings are always double-quoted with JSON's
/// escapes, which YAML reads the same: nothing can be taken for a number,
/// a boolean or a comment.
fn to_yaml(value: &Value, indent: usize) -> String {
    let mut out = String::new();
    write_yaml(value, indent, &mut out);
    out
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(text) => Value::String(text.clone()).to_string(),
        other => other.to_string(),
    }
}

fn write_yaml(value: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) => {
            for (key, item) in map {
                match item {
                    Value::Object(inner) if !inner.is_empty() => {
                        out.push_str(&format!("{pad}{key}:\n"));
                        write_yaml(item, indent + 2, out);
                    }
                    Value::Array(items) if !items.is_empty() => {
                        out.push_str(&format!("{pad}{key}:\n"));
                        write_yaml(item, indent, out);
                    }
                    Value::Object(_) => out.push_str(&format!("{pad}{key}: {{}}\n")),
                    Value::Array(_) => out.push_str(&format!("{pad}{key}: []\n")),
                    _ => out.push_str(&format!("{pad}{key}: {}\n", scalar(item))),
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::Object(map) if !map.is_empty() => {
                        // The first key on the dash's line, the rest below it.
                        let mut inner = String::new();
                        write_yaml(item, indent + 2, &mut inner);
                        let inner = inner.trim_start();
                        out.push_str(&format!("{pad}- {inner}"));
                    }
                    Value::Array(_) => {
                        out.push_str(&format!("{pad}-\n"));
                        write_yaml(item, indent + 2, out);
                    }
                    _ => out.push_str(&format!("{pad}- {}\n", scalar(item))),
                }
            }
        }
        _ => out.push_str(&format!("{pad}{}\n", scalar(value))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_rfc_1123_labels() {
        assert_eq!(object_name("api"), "api");
        assert_eq!(object_name("My_Api.v2"), "my-api-v2");
        assert_eq!(object_name("_x_"), "x");
        assert_eq!(object_name(&"a".repeat(70)).len(), 63);
    }

    #[test]
    fn yaml_quotes_every_string_and_nests_blocks() {
        let value = json!({"a": {"b": ["x", "true", 1]}, "c": [{"d": "1", "e": "# no"}], "f": []});
        assert_eq!(
            to_yaml(&value, 0),
            "a:\n  b:\n  - \"x\"\n  - \"true\"\n  - 1\nc:\n- d: \"1\"\n  e: \"# no\"\nf: []\n"
        );
    }
}
