//! `orchestrator export systemd|kubernetes`: the bundled example against
//! golden files (tests/snapshots/export/TARGET/, `UPDATE_SNAPSHOTS=1` writes
//! them anew), a configuration using every key checked and read back, and
//! every file through the target's own validator (installed by .ci/run):
//! `systemd-analyze verify` for units, `kubernetes-validate --strict`
//! (pinned Kubernetes version) for manifests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use orchestrator_e2e::{TestDir, orchestrator_bin};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// `orchestrator -c CONFIG export systemd ARGS`, with a fixed PATH and
/// TMPDIR: the children's environment comes from the daemon's.
fn export(config: &Path, args: &[&str]) -> Output {
    export_to("systemd", config, args)
}

fn export_to(target: &str, config: &Path, args: &[&str]) -> Output {
    Command::new(orchestrator_bin())
        .arg("-c")
        .arg(config)
        .args(["export", target])
        .args(args)
        .env_clear()
        .env("PATH", orchestrator_core::plan::DEFAULT_PATH)
        .output()
        .expect("run the orchestrator binary")
}

/// Every file under `dir`, by its path relative to it.
fn files(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path.strip_prefix(dir).unwrap().display().to_string();
                out.insert(relative, std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    out
}

/// `systemd-analyze verify` of `units` in `dir`; skipped (not in CI) when
/// it is not installed. Unknown keys and bad values are only warnings
/// (exit 0): any line naming one of our files fails too.
fn verify(dir: &Path, units: &[&str]) {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if !analyze.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is missing; .ci/run installs systemd"
        );
        eprintln!("note: systemd-analyze not found; the units are not verified");
        return;
    }
    let output = Command::new(analyze)
        .arg("verify")
        .args(units)
        .current_dir(dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let ours = stderr
        .lines()
        .filter(|line| {
            line.contains(&dir.display().to_string()) || units.iter().any(|u| line.contains(u))
        })
        .collect::<Vec<_>>();
    assert!(
        output.status.success() && ours.is_empty(),
        "systemd-analyze verify {units:?}: {}\n{stderr}",
        output.status
    );
}

/// The values of `key` in a unit's text, in order.
fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

/// The example exported for `target` (with `args`), against its golden
/// files; the directory it was written to.
fn golden_example(dir: &TestDir, target: &str, args: &[&str]) -> PathBuf {
    let out = dir.join(target);
    let mut all = vec!["--out", out.to_str().unwrap()];
    all.extend(args);
    let output = export_to(target, &repo().join("examples/orchestrator.toml"), &all);
    assert!(output.status.success(), "{output:?}");
    let root = repo().display().to_string();
    let mut now: BTreeMap<String, String> = files(&out)
        .into_iter()
        .map(|(path, text)| (path, text.replace(&root, "@REPO@")))
        .collect();
    // What does not carry over is part of the contract too.
    let stderr = String::from_utf8_lossy(&output.stderr).replace(&root, "@REPO@");
    let notes: String = stderr
        .lines()
        .filter(|line| line.starts_with("orchestrator: export: "))
        .map(|line| format!("{line}\n"))
        .collect();
    now.insert("untranslated.txt".to_owned(), notes);

    let golden =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/snapshots/export/{target}"));
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        let _ = std::fs::remove_dir_all(&golden);
        for (path, text) in &now {
            let path = golden.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
    }
    let kept = files(&golden);
    assert_eq!(
        kept.keys().collect::<Vec<_>>(),
        now.keys().collect::<Vec<_>>(),
        "the exported files changed; if on purpose: UPDATE_SNAPSHOTS=1 cargo test -p orchestrator --test export"
    );
    for (path, text) in &kept {
        assert_eq!(
            text, &now[path],
            "{path} changed; if on purpose: UPDATE_SNAPSHOTS=1 cargo test -p orchestrator --test export"
        );
    }
    out
}

#[test]
fn the_example_exports_as_the_golden_units_and_they_verify() {
    let dir = TestDir::new("export-example");
    let out = golden_example(&dir, "systemd", &[]);
    verify(
        &out,
        &[
            "chatty.service",
            "flaky.service",
            "steady.service",
            "orchestrator-services.target",
        ],
    );
}

const EVERY_KEY: &str = r#"
[orchestrator]
services_dir = "services"

[services.db]
command = ["/bin/sleep", "1000"]
notify = true
watchdog = "10s"
start_timeout = "20s"
user = "daemon"
group = "daemon"
memory_limit = 256
cpu_limit = 1.25
pids_limit = 64
rlimits = { nofile = 4096, core = 0, stack = "unlimited" }
stop_signal = "SIGINT"
stop_timeout = "15s"
env_file = ["db.env"]

[services.web]
instances = 2
args = ["--port=80{instance}", "--name", "web server 50%", "$literal"]
environment = { SLOT = "s{instance}", MODE = "${MODE_FROM_FILE}", "weird.key" = "v" }
env_file = "web.env"
restart = "on-failure"
max_restarts = 3
backoff = { initial = "2s", max = "2s", reset_after = "1m" }
depends_on = { db = "healthy" }
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
strict = false
binary_path = "services/web/web"

[services.web.health]
http = "http://127.0.0.1:80{instance}/healthz"

[services.job]
command = ["/bin/true"]
restart = "never"
enabled = false
depends_on = { web = "completed" }
data_dir = "state/job"
start_grace = "2s"
start_limit = { burst = 5, interval = "10s" }
log_timestamps = true
log_max_age = "1h"
"#;

#[test]
fn every_key_exports_faithfully_and_verifies_and_strict_refuses() {
    let dir = TestDir::new("export-keys");
    dir.add_fixture_service("web");
    dir.write_file("db.env", "DB_URL=postgres://db/main\n", 0o644);
    dir.write_file("web.env", "MODE_FROM_FILE=fast\n", 0o644);
    let config = dir.write_file("orchestrator.toml", EVERY_KEY, 0o644);
    let out = dir.join("units");
    let output = export(&config, &["--out", out.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    let units = files(&out);
    assert_eq!(
        units.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "db.service",
            "job.service",
            "orchestrator-services.target",
            "web@.service",
            "web@0.service.d/instance.conf",
            "web@1.service.d/instance.conf",
        ]
    );

    // Read back: what systemd will run is what orchestrator would.
    let db = &units["db.service"];
    assert_eq!(values(db, "Type"), ["notify"]);
    assert_eq!(values(db, "ExecStart"), ["/bin/sleep 1000"]);
    assert_eq!(values(db, "WatchdogSec"), ["10s"]);
    assert_eq!(values(db, "TimeoutStartSec"), ["20s"]);
    assert_eq!(values(db, "User"), ["daemon"]);
    assert_eq!(values(db, "Group"), ["daemon"]);
    assert_eq!(values(db, "NoNewPrivileges"), ["yes"]);
    assert_eq!(values(db, "MemoryMax"), ["256M"]);
    assert_eq!(values(db, "MemorySwapMax"), ["0"]);
    assert_eq!(values(db, "CPUQuota"), ["125%"]);
    assert_eq!(values(db, "TasksMax"), ["64"]);
    assert_eq!(values(db, "LimitNOFILE"), ["4096"]);
    assert_eq!(values(db, "LimitCORE"), ["0"]);
    assert_eq!(values(db, "LimitSTACK"), ["infinity"]);
    assert_eq!(values(db, "KillSignal"), ["SIGINT"]);
    assert_eq!(values(db, "TimeoutStopSec"), ["15s"]);
    assert_eq!(values(db, "Restart"), ["always"]);
    assert!(values(db, "Environment").contains(&"\"DB_URL=postgres://db/main\""));
    assert!(values(db, "Environment").contains(&"\"GOMEMLIMIT=256MiB\""));

    // The template holds what the instances share; each drop-in its own.
    let template = &units["web@.service"];
    assert_eq!(values(template, "Restart"), ["on-failure"]);
    assert_eq!(values(template, "RestartSec"), ["2s"]);
    assert_eq!(values(template, "StartLimitBurst"), ["4"]);
    assert_eq!(values(template, "Wants"), ["db.service"]);
    assert_eq!(values(template, "After"), ["db.service"]);
    assert!(values(template, "Environment").contains(&"\"MODE=fast\""));
    assert!(
        values(template, "NoNewPrivileges").is_empty(),
        "strict = false"
    );
    for index in 0..2 {
        let own = &units[&format!("web@{index}.service.d/instance.conf")];
        let binary = dir.join("services/web/web");
        assert_eq!(
            values(own, "ExecStart"),
            [format!(
                "{} --service web@{index} --log-level info --port=80{index} --name \"web server 50%%\" $$literal",
                binary.display()
            )]
        );
        assert_eq!(
            values(own, "Environment"),
            [
                format!(
                    "\"HOME={}\"",
                    dir.join(format!("services/web/data/{index}")).display()
                ),
                format!("\"SLOT=s{index}\"")
            ]
        );
    }
    let job = &units["job.service"];
    assert_eq!(values(job, "Restart"), ["no"]);
    assert_eq!(
        values(job, "WorkingDirectory"),
        [dir.join("state/job").display().to_string()]
    );
    assert!(values(job, "WantedBy").is_empty(), "disabled: not wanted");
    let target = &units["orchestrator-services.target"];
    assert_eq!(
        values(target, "Wants"),
        ["db.service", "web@0.service", "web@1.service"]
    );

    // What does not carry over, said once for all the instances alike.
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "export: web@*: sha256 dropped",
        "export: web@*: health dropped",
        "export: web@*: environment.weird.key dropped",
        "export: job: depends_on.web@0 approximated",
        "export: db: backoff approximated",
    ] {
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
    // db sends READY=1 and has no check: "healthy" is exactly After=.
    assert!(!stderr.contains("depends_on.db"), "{stderr}");

    verify(
        &out,
        &[
            "db.service",
            "web@0.service",
            "web@1.service",
            "job.service",
            "orchestrator-services.target",
        ],
    );

    // --strict: the same list, exit 2, nothing written.
    let strict_out = dir.join("strict");
    let strict = export(
        &config,
        &["--out", strict_out.to_str().unwrap(), "--strict"],
    );
    assert_eq!(strict.status.code(), Some(2), "{strict:?}");
    assert!(String::from_utf8_lossy(&strict.stderr).contains("nothing written"));
    assert!(!strict_out.exists());
}

#[test]
fn strict_passes_what_carries_over_whole_and_a_bad_config_writes_nothing() {
    let dir = TestDir::new("export-strict");
    let config = dir.write_file(
        "orchestrator.toml",
        "[services.once]\ncommand = [\"/bin/true\"]\nrestart = \"never\"\n",
        0o644,
    );
    let output = export(&config, &["--strict"]);
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.starts_with("# once.service\n[Unit]\n"), "{stdout}");
    assert!(
        stdout.contains("# orchestrator-services.target\n"),
        "{stdout}"
    );

    let bad = dir.write_file("bad.toml", "[services.x]\nrestart = \"sometimes\"\n", 0o644);
    let output = export(&bad, &["--out", dir.join("never").to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(!dir.join("never").exists());
}

/// `kubernetes-validate --strict` of `files`, against the Kubernetes
/// version .ci/run pins the tool for; skipped (not in CI) without it.
fn validate_manifests(files: &[&Path]) {
    let Ok(tool) = which("kubernetes-validate") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "kubernetes-validate is missing; .ci/run installs it"
        );
        eprintln!("note: kubernetes-validate not found; the manifests are not validated");
        return;
    };
    let output = Command::new(tool)
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(files)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && !said.contains("ERROR") && said.contains("passed"),
        "kubernetes-validate: {}\n{said}",
        output.status
    );
}

/// The Kubernetes version the manifests are checked against.
const KUBERNETES_VERSION: &str = "1.33.0";

fn which(program: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .ok_or(())
}

#[test]
fn the_example_exports_as_the_golden_manifests_and_they_validate() {
    let dir = TestDir::new("export-k8s-example");
    let out = golden_example(&dir, "kubernetes", &["--image", "registry.example/app:1.0"]);
    validate_manifests(&[&out.join("orchestrator-services.yaml")]);
}

#[test]
fn the_contrib_daemonset_validates() {
    validate_manifests(&[&repo().join("contrib/kubernetes/orchestrator-daemonset.yaml")]);
}

#[test]
fn every_key_exports_to_kubernetes_and_validates() {
    let dir = TestDir::new("export-k8s-keys");
    dir.add_fixture_service("web");
    dir.write_file("db.env", "DB_URL=postgres://db/main\n", 0o644);
    dir.write_file("web.env", "MODE_FROM_FILE=fast\n", 0o644);
    let config = dir.write_file(
        "orchestrator.toml",
        &EVERY_KEY.replace(
            "user = \"daemon\"\ngroup = \"daemon\"",
            "user = \"1000\"\ngroup = \"1000\"",
        ),
        0o644,
    );
    let out = dir.join("k8s");
    let output = export_to(
        "kubernetes",
        &config,
        &[
            "--image",
            "registry.example/app:1.0",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(output.status.success(), "{output:?}");
    let manifests = out.join("orchestrator-services.yaml");
    let text = std::fs::read_to_string(&manifests).unwrap();
    validate_manifests(&[&manifests]);
    // Read back, document by document.
    let documents: Vec<&str> = text.split("---\n").filter(|d| !d.is_empty()).collect();
    let find = |kind: &str, name: &str| {
        documents
            .iter()
            .find(|d| {
                d.contains(&format!("kind: \"{kind}\"\n"))
                    && d.contains(&format!("  name: \"{name}\"\n"))
            })
            .unwrap_or_else(|| panic!("{kind} {name} in {text}"))
            .to_string()
    };
    let db = find("Deployment", "db");
    for expected in [
        "replicas: 1\n",
        "memory: \"256Mi\"\n",
        "cpu: \"1250m\"\n",
        "runAsUser: 1000\n",
        "runAsGroup: 1000\n",
        "allowPrivilegeEscalation: false\n",
        "terminationGracePeriodSeconds: 15\n",
        "- \"/bin/sleep\"\n",
        "value: \"postgres://db/main\"\n",
        "value: \"256MiB\"\n",
    ] {
        assert!(db.contains(expected), "{expected} in {db}");
    }
    let web = find("Deployment", "web");
    for expected in [
        "replicas: 2\n",
        "httpGet:\n",
        "path: \"/healthz\"\n",
        "port: 800\n",
        "livenessProbe:\n",
        "readinessProbe:\n",
        "- \"--port=800\"\n",
        "- \"web server 50%\"\n",
        "- \"$literal\"\n",
        "value: \"fast\"\n",
    ] {
        assert!(web.contains(expected), "{expected} in {web}");
    }
    let service = find("Service", "web");
    assert!(
        service.contains("port: 800\n") && service.contains("targetPort: 800\n"),
        "{service}"
    );
    // job waits for web's Service, the one port web's check names.
    let job = find("Deployment", "job");
    assert!(job.contains("replicas: 0\n"), "{job}");
    assert!(
        job.contains("until nc -z web 800; do sleep 1; done"),
        "{job}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "export: db: rlimits dropped",
        "export: db: pids_limit dropped",
        "export: db: stop_signal dropped",
        "export: db: watchdog dropped",
        "export: web: instances approximated",
        "export: web: sha256 dropped",
        "export: web: depends_on.db dropped",
        "export: job: depends_on.web@0 approximated",
    ] {
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
    let missing = export_to("kubernetes", &config, &[]);
    assert_eq!(missing.status.code(), Some(2), "--image is required");
}

/// The fields of the Nomad job API's JSON that `export nomad --json` may
/// write, per object, as the API documents them
/// (developer.hashicorp.com/nomad/api-docs/json-jobs).
fn documented_nomad_fields(object: &str) -> &'static [&'static str] {
    match object {
        "Job" => &["ID", "Name", "Type", "Datacenters", "TaskGroups"],
        "TaskGroup" => &["Name", "Count", "RestartPolicy", "Tasks", "Networks"],
        "RestartPolicy" => &["Attempts", "Interval", "Delay", "Mode"],
        "Network" => &["ReservedPorts", "DynamicPorts", "Mode"],
        "Port" => &["Label", "Value", "To"],
        "Task" => &[
            "Name",
            "Driver",
            "Config",
            "Env",
            "KillSignal",
            "KillTimeout",
            "User",
            "Lifecycle",
            "Resources",
            "Services",
        ],
        "Lifecycle" => &["Hook", "Sidecar"],
        "Resources" => &["CPU", "Cores", "MemoryMB"],
        "Service" => &["Name", "PortLabel", "Checks", "Provider"],
        "Check" => &[
            "Name",
            "Type",
            "Interval",
            "Timeout",
            "Path",
            "Command",
            "Args",
            "PortLabel",
            "CheckRestart",
        ],
        "CheckRestart" => &["Limit", "Grace", "IgnoreWarnings"],
        other => panic!("no documented fields listed for {other}"),
    }
}

/// Every key of `value` (a `kind` object) and below is a documented field.
fn check_nomad_fields(kind: &str, value: &serde_json::Value) {
    let object = value
        .as_object()
        .unwrap_or_else(|| panic!("{kind}: {value}"));
    for (key, item) in object {
        assert!(
            documented_nomad_fields(kind).contains(&key.as_str()),
            "{kind}.{key} is not a documented field"
        );
        let child = match (kind, key.as_str()) {
            ("Job", "TaskGroups") => Some("TaskGroup"),
            ("TaskGroup", "RestartPolicy") => Some("RestartPolicy"),
            ("TaskGroup", "Networks") => Some("Network"),
            ("Network", "ReservedPorts") => Some("Port"),
            ("TaskGroup", "Tasks") => Some("Task"),
            ("Task", "Lifecycle") => Some("Lifecycle"),
            ("Task", "Resources") => Some("Resources"),
            ("Task", "Services") => Some("Service"),
            ("Service", "Checks") => Some("Check"),
            ("Check", "CheckRestart") => Some("CheckRestart"),
            _ => None,
        };
        match (child, item) {
            (Some(child), serde_json::Value::Array(items)) => items
                .iter()
                .for_each(|item| check_nomad_fields(child, item)),
            (Some(child), item) => check_nomad_fields(child, item),
            (None, _) => {}
        }
    }
}

#[test]
fn the_example_exports_as_the_golden_nomad_job_which_parses() {
    let dir = TestDir::new("export-nomad-example");
    let out = golden_example(&dir, "nomad", &[]);
    let text = std::fs::read_to_string(out.join("orchestrator-services.nomad.hcl")).unwrap();
    let body: hcl::Body = hcl::from_str(&text).unwrap_or_else(|e| panic!("HCL2: {e}\n{text}"));
    let job = body.blocks().next().expect("a job block");
    assert_eq!(job.identifier(), "job");
    let groups: Vec<&str> = job
        .body()
        .blocks()
        .filter(|block| block.identifier() == "group")
        .map(|block| block.labels()[0].as_str())
        .collect();
    assert_eq!(groups, ["chatty", "flaky", "steady"]);
}

#[test]
fn every_key_exports_to_nomad_in_hcl_and_json_alike() {
    let dir = TestDir::new("export-nomad-keys");
    dir.add_fixture_service("web");
    dir.write_file("db.env", "DB_URL=postgres://db/main\n", 0o644);
    dir.write_file("web.env", "MODE_FROM_FILE=fast\n", 0o644);
    // A check on db, for web's prestart task to wait for.
    let config = dir.write_file(
        "orchestrator.toml",
        &(EVERY_KEY.to_owned() + "\n[services.db.health]\ntcp = \"127.0.0.1:5432\"\nretries = 2\nstart_period = \"3s\"\n"),
        0o644,
    );
    let hcl_out = export_to("nomad", &config, &[]);
    assert!(hcl_out.status.success(), "{hcl_out:?}");
    let text = String::from_utf8(hcl_out.stdout).unwrap();
    let text = text
        .strip_prefix("# orchestrator-services.nomad.hcl\n")
        .unwrap();
    let parsed: serde_json::Value =
        hcl::from_str(text).unwrap_or_else(|e| panic!("HCL2: {e}\n{text}"));
    let json_out = export_to("nomad", &config, &["--json"]);
    assert!(json_out.status.success(), "{json_out:?}");
    let json_text = String::from_utf8(json_out.stdout).unwrap();
    let api: serde_json::Value = serde_json::from_str(
        json_text
            .strip_prefix("# orchestrator-services.json\n")
            .unwrap(),
    )
    .unwrap();
    check_nomad_fields("Job", &api["Job"]);

    // Read back from the API's form; the HCL says the same (spot checks).
    let groups = api["Job"]["TaskGroups"].as_array().unwrap();
    let group = |name: &str| {
        groups
            .iter()
            .find(|g| g["Name"] == name)
            .unwrap_or_else(|| panic!("group {name}"))
    };
    let db = group("db");
    assert_eq!(db["Count"], 1);
    assert_eq!(db["RestartPolicy"]["Attempts"], 10);
    assert_eq!(db["RestartPolicy"]["Mode"], "fail");
    let db_task = &db["Tasks"][0];
    assert_eq!(db_task["Driver"], "exec");
    assert_eq!(db_task["Config"]["command"], "/bin/sleep");
    assert_eq!(db_task["User"], "daemon");
    assert_eq!(db_task["KillSignal"], "SIGINT");
    assert_eq!(db_task["KillTimeout"], 15_000_000_000u64);
    assert_eq!(db_task["Resources"]["MemoryMB"], 256);
    assert_eq!(db_task["Resources"]["Cores"], 2);
    assert_eq!(db_task["Env"]["DB_URL"], "postgres://db/main");
    let check = &db_task["Services"][0]["Checks"][0];
    assert_eq!(check["Type"], "tcp");
    assert_eq!(check["CheckRestart"]["Limit"], 2);
    assert_eq!(check["CheckRestart"]["Grace"], 3_000_000_000u64);
    assert_eq!(db["Networks"][0]["ReservedPorts"][0]["Value"], 5432);

    let web = group("web");
    assert_eq!(web["Count"], 2);
    assert_eq!(web["RestartPolicy"]["Attempts"], 3);
    assert_eq!(web["RestartPolicy"]["Delay"], 2_000_000_000u64);
    let tasks = web["Tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2, "a prestart task waiting for db, then web");
    assert_eq!(tasks[0]["Lifecycle"]["Hook"], "prestart");
    assert_eq!(
        tasks[0]["Config"]["args"][1],
        "until nc -z db.service.consul 5432; do sleep 1; done"
    );
    assert_eq!(tasks[1]["Config"]["args"][6], "web server 50%");
    assert_eq!(tasks[1]["Env"]["MODE"], "fast");
    assert_eq!(
        tasks[1]["Env"]["weird.key"], "v",
        "the API's JSON keeps any name"
    );
    assert_eq!(tasks[1]["Services"][0]["Checks"][0]["Path"], "/healthz");
    assert_eq!(group("job")["Count"], 0);

    // The HCL job carries the same groups and the same web arguments.
    let hcl_job = &parsed["job"]["orchestrator-services"];
    assert_eq!(
        hcl_job["group"]["web"]["task"]["web"]["config"]["args"][6],
        "web server 50%"
    );
    assert_eq!(
        hcl_job["group"]["db"]["task"]["db"]["kill_signal"],
        "SIGINT"
    );
    let stderr = String::from_utf8_lossy(&hcl_out.stderr);
    for expected in [
        "export: db: rlimits dropped",
        "export: db: notify dropped",
        "export: web: sha256 dropped",
        "export: web: environment.weird.key dropped",
        "export: web: instances approximated",
    ] {
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
}

#[test]
fn the_contrib_nomad_job_parses() {
    let text =
        std::fs::read_to_string(repo().join("contrib/nomad/orchestrator.nomad.hcl")).unwrap();
    let job: serde_json::Value = hcl::from_str(&text).unwrap_or_else(|e| panic!("HCL2: {e}"));
    let job = &job["job"]["orchestrator"];
    assert_eq!(job["type"], "system");
    let task = &job["group"]["orchestrator"]["task"]["orchestrator"];
    assert_eq!(task["config"]["command"], "/usr/local/bin/orchestrator");
    assert_eq!(task["kill_signal"], "SIGTERM");
}
