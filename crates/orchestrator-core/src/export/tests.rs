//! The round trip: what each target keeps, read back from its output,
//! equals the definitions it was made from (restart policy, limits,
//! environment, probes), for every service of a configuration that sets
//! them in many ways.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::config::{RestartPolicy, parse};
use crate::health::Probe;
use crate::plan::{HostEnv, plan};
use crate::service::ServiceDefinition;

const CONFIG: &str = r#"
[services.api]
command = ["/srv/api", "--listen", "0.0.0.0:8080", "two words", "100%", "$HOME", ";", "a;b"]
environment = { MODE = "prod", QUOTE = "say \"hi\"", BACKSLASH = 'a\b' }
memory_limit = 300
cpu_limit = 2
pids_limit = 50
restart = "on-failure"
max_restarts = 7
backoff = { initial = "3s", max = "1m", reset_after = "2m" }
stop_signal = "SIGQUIT"
stop_timeout = "9s"
[services.api.health]
http = "http://127.0.0.1:8080/ready"
interval = "4s"
timeout = "2s"
retries = 5
start_period = "6s"

[services.worker]
command = ["/srv/worker", "--shard={instance}"]
instances = 3
restart = "never"
depends_on = ["api"]
[services.worker.health]
tcp = "127.0.0.1:9000"

[services.cron]
command = ["/srv/cron", "--every", "1m"]
restart = "always"
backoff = { initial = "500ms", max = "500ms", reset_after = "10s" }
[services.cron.health]
exec = ["/srv/cron", "--check"]
on_unhealthy = "none"
"#;

fn definitions() -> Vec<ServiceDefinition> {
    let config = parse(CONFIG, None, Path::new("/etc/app")).expect("a valid configuration");
    let host = HostEnv {
        path: "/usr/bin:/bin".to_owned(),
        tmpdir: "/tmp".to_owned(),
    };
    plan(&config, &[], &host)
}

/// Undo systemd's quoting of one line's words (double quotes, C escapes,
/// `%%`, `$$`).
fn systemd_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c == ' ' {
            chars.next();
            continue;
        }
        let mut word = String::new();
        let quoted = c == '"';
        if quoted {
            chars.next();
        }
        while let Some(c) = chars.next() {
            match c {
                '"' if quoted => break,
                ' ' if !quoted => break,
                '\\' => match chars.next() {
                    Some('n') => word.push('\n'),
                    Some('t') => word.push('\t'),
                    Some(other) => word.push(other),
                    None => {}
                },
                '%' | '$' if chars.peek() == Some(&c) => {
                    chars.next();
                    word.push(c);
                }
                c => word.push(c),
            }
        }
        words.push(word);
    }
    words
}

/// A unit's settings, key → values in order; a drop-in's lines after the
/// template's, as systemd reads them.
fn unit_settings(texts: &[&str]) -> BTreeMap<String, Vec<String>> {
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for text in texts {
        for line in text.lines() {
            if let Some((key, value)) = line.split_once('=')
                && !line.starts_with('#')
            {
                settings
                    .entry(key.to_owned())
                    .or_default()
                    .push(value.to_owned());
            }
        }
    }
    settings
}

#[test]
fn systemd_units_read_back_as_the_definitions() {
    let definitions = definitions();
    let export = super::systemd::export(&definitions);
    let file = |path: &str| {
        export
            .files
            .iter()
            .find(|f| f.path == path)
            .map(|f| f.contents.as_str())
    };
    for definition in &definitions {
        let name = definition.name.as_str();
        let texts: Vec<&str> = match definition.name.instance_of() {
            Some((section, _)) => vec![
                file(&format!("{section}@.service")).expect("a template"),
                file(&format!("{name}.service.d/instance.conf")).unwrap_or(""),
            ],
            None => vec![file(&format!("{name}.service")).expect("a unit")],
        };
        let settings = unit_settings(&texts);
        let one = |key: &str| settings.get(key).map(|v| v.last().unwrap().as_str());
        let spec = &definition.spawn;
        let argv: Vec<String> = std::iter::once(spec.program.display().to_string())
            .chain(spec.args.iter().cloned())
            .collect();
        assert_eq!(systemd_words(one("ExecStart").unwrap()), argv, "{name}");
        let env: Vec<String> = settings["Environment"]
            .iter()
            .flat_map(|line| systemd_words(line))
            .collect();
        let expected: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut env_sorted = env.clone();
        env_sorted.sort();
        let mut expected_sorted = expected.clone();
        expected_sorted.sort();
        assert_eq!(env_sorted, expected_sorted, "{name}");
        let policy = &definition.policy;
        let restart = match policy.restart {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "no",
        };
        assert_eq!(one("Restart"), Some(restart), "{name}");
        assert_eq!(
            one("RestartSec"),
            Some(super::duration_text(policy.backoff.initial).as_str())
        );
        assert_eq!(one("KillSignal"), Some(policy.stop_signal.as_str()));
        assert_eq!(
            one("TimeoutStopSec"),
            Some(super::duration_text(policy.stop_timeout).as_str())
        );
        let limits = &spec.limits;
        assert_eq!(
            one("MemoryMax").map(str::to_owned),
            limits.memory_mib.map(|m| format!("{m}M")),
            "{name}"
        );
        assert_eq!(
            one("CPUQuota").map(str::to_owned),
            limits.cpu_millicores.map(|m| format!("{}%", m / 10)),
            "{name}"
        );
        assert_eq!(
            one("TasksMax").map(str::to_owned),
            limits.pids.map(|p| p.to_string()),
            "{name}"
        );
        assert_eq!(
            one("WorkingDirectory"),
            Some(spec.cwd.to_str().unwrap()),
            "{name}"
        );
    }
}

#[test]
fn nomad_job_reads_back_as_the_definitions() {
    let definitions = definitions();
    let export = super::nomad::export(&definitions, true);
    let job: Value = serde_json::from_str(&export.files[0].contents).unwrap();
    for definition in definitions
        .iter()
        .filter(|d| d.name.instance_of().is_none_or(|(_, i)| i == 0))
    {
        let section = definition
            .name
            .instance_of()
            .map_or(definition.name.as_str(), |(s, _)| s);
        let group = job["Job"]["TaskGroups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["Name"] == section)
            .unwrap_or_else(|| panic!("group {section}"));
        let task = group["Tasks"].as_array().unwrap().last().unwrap();
        let spec = &definition.spawn;
        assert_eq!(task["Config"]["command"], spec.program.to_str().unwrap());
        assert_eq!(task["Config"]["args"], serde_json::json!(spec.args));
        let env: BTreeMap<String, String> = serde_json::from_value(task["Env"].clone()).unwrap();
        let expected: BTreeMap<String, String> = spec
            .env
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        assert_eq!(env, expected);
        let policy = &definition.policy;
        let attempts = match policy.restart {
            RestartPolicy::Never => 0,
            _ => policy.max_restarts,
        };
        assert_eq!(group["RestartPolicy"]["Attempts"], attempts, "{section}");
        assert_eq!(
            group["RestartPolicy"]["Delay"],
            policy.backoff.initial.as_nanos() as u64
        );
        assert_eq!(task["KillSignal"], policy.stop_signal.as_str());
        assert_eq!(task["KillTimeout"], policy.stop_timeout.as_nanos() as u64);
        assert_eq!(
            task["Resources"]["MemoryMB"].as_u64(),
            spec.limits.memory_mib
        );
        if let Some(health) = &definition.health {
            let check = &task["Services"][0]["Checks"][0];
            let kind = match health.probe {
                Probe::Http { .. } => "http",
                Probe::Tcp { .. } => "tcp",
                Probe::Grpc { .. } => "grpc",
                Probe::Exec { .. } => "script",
            };
            assert_eq!(check["Type"], kind, "{section}");
            assert_eq!(check["Interval"], health.interval.as_nanos() as u64);
            assert_eq!(check["Timeout"], health.timeout.as_nanos() as u64);
        }
    }
}

#[test]
fn kubernetes_manifests_read_back_as_the_definitions() {
    let definitions = definitions();
    let (documents, _) = super::kubernetes::manifests(&definitions, "img:1");
    for definition in definitions
        .iter()
        .filter(|d| d.name.instance_of().is_none_or(|(_, i)| i == 0))
    {
        let section = definition
            .name
            .instance_of()
            .map_or(definition.name.as_str(), |(s, _)| s);
        let deployment = documents
            .iter()
            .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == section)
            .unwrap_or_else(|| panic!("deployment {section}"));
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let spec = &definition.spawn;
        assert_eq!(container["command"][0], spec.program.to_str().unwrap());
        assert_eq!(container["args"], serde_json::json!(spec.args));
        let env: Vec<crate::process::EnvVar> = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().into(),
                    e["value"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert_eq!(env, spec.env);
        assert_eq!(
            container["resources"]["limits"]["memory"]
                .as_str()
                .map(str::to_owned),
            spec.limits.memory_mib.map(|m| format!("{m}Mi"))
        );
        assert_eq!(
            deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
            definition.policy.stop_timeout.as_secs()
        );
        if let Some(health) = &definition.health {
            let probe = &container["readinessProbe"];
            assert_eq!(probe["periodSeconds"], health.interval.as_secs());
            assert_eq!(probe["failureThreshold"], health.retries);
            match &health.probe {
                Probe::Http { .. } => assert!(probe["httpGet"].is_object()),
                Probe::Tcp { .. } => assert!(probe["tcpSocket"].is_object()),
                Probe::Grpc { .. } => assert!(probe["grpc"].is_object()),
                Probe::Exec { argv } => {
                    assert_eq!(probe["exec"]["command"], serde_json::json!(argv))
                }
            }
        }
    }
}
