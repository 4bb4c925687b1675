//! `env_file`, `${VAR}` and `instances` as the loader reads them.

use std::fs;
use std::path::{Path, PathBuf};

use super::parse_in;
use crate::config::model::*;
use crate::config::{ConfigProblem, Loaded};
use crate::name::ServiceName;

/// The daemon's environment, as these tests play it.
fn host(name: &str) -> Option<String> {
    match name {
        "HOST_ONLY" => Some("from-host".to_owned()),
        "SHARED" => Some("host-shared".to_owned()),
        _ => None,
    }
}

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        Dir(tempfile::Builder::new()
            .prefix("orchestrator-env-")
            .tempdir()
            .unwrap())
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path().join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, text).unwrap();
        path
    }

    fn load(&self, text: &str) -> Loaded {
        let file = self.path().join("orchestrator.toml");
        parse_in(text, Some(&file), self.path(), &host).unwrap()
    }

    fn ok(&self, text: &str) -> Config {
        let loaded = self.load(text);
        assert!(loaded.problems.is_empty(), "{:#?}", loaded.problems);
        loaded.config
    }

    fn problems(&self, text: &str) -> Vec<ConfigProblem> {
        let loaded = self.load(text);
        assert!(!loaded.problems.is_empty(), "expected problems");
        loaded.problems
    }
}

fn env(service: &ServiceConfig) -> Vec<(&str, &str)> {
    service
        .environment
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

#[test]
fn env_files_later_win_and_the_table_wins_over_them() {
    let dir = Dir::new();
    dir.write("a.env", "A=1\nSHARED=from-a\nBOTH=a\n");
    dir.write("conf/b.env", "export BOTH=b\nB='2'\n");
    let config = dir.ok(r#"
[services.api]
env_file = ["a.env", "conf/b.env", "-missing.env"]
environment = { BOTH = "table", OWN = "x" }

[services.one]
env_file = "a.env"
"#);
    let api = &config.services["api"];
    assert_eq!(
        env(api),
        [
            ("A", "1"),
            ("B", "2"),
            ("BOTH", "table"),
            ("OWN", "x"),
            ("SHARED", "from-a"),
        ]
    );
    assert_eq!(
        api.env_file,
        [
            EnvFile {
                path: dir.path().join("a.env"),
                optional: false
            },
            EnvFile {
                path: dir.path().join("conf/b.env"),
                optional: false
            },
            EnvFile {
                path: dir.path().join("missing.env"),
                optional: true
            },
        ]
    );
    assert_eq!(config.services["one"].environment["A"], "1");
}

#[test]
fn env_file_problems_name_the_file_and_line() {
    let dir = Dir::new();
    dir.write("bad.env", "GOOD=1\n\nnot a line\n");
    let found = dir.problems(
        "[services.api]\nenabled = true\nenv_file = [\"bad.env\", \"gone.env\"]\n[services.b]\nenv_file = 3\n",
    );
    let shown: Vec<String> = found.iter().map(ToString::to_string).collect();
    assert_eq!(found.len(), 3, "{shown:#?}");
    assert_eq!(found[0].line, Some(3));
    assert_eq!(found[0].key, "services.api.env_file");
    let bad = dir.path().join("bad.env");
    assert!(
        found[0]
            .message
            .starts_with(&format!("env file {}:3: expected KEY=VALUE", bad.display())),
        "{}",
        found[0].message
    );
    assert_eq!(found[1].line, Some(3));
    let gone = dir.path().join("gone.env");
    assert!(
        found[1].message.starts_with(&format!(
            "env file {} does not exist; create it, fix the path, or write \"-",
            gone.display()
        )),
        "{}",
        found[1].message
    );
    assert_eq!(
        (found[2].line, found[2].key.as_str()),
        (Some(5), "services.b.env_file")
    );
    let found = dir.problems("[services.api]\nenv_file = [\"-\"]\n");
    assert!(found[0].message.contains("must be a path"), "{found:#?}");
}

#[test]
fn an_env_file_must_be_a_small_regular_file() {
    let dir = Dir::new();
    fs::create_dir(dir.path().join("a-dir")).unwrap();
    dir.write("huge.env", &"X=1\n".repeat(300_000));
    let fifo = dir.path().join("pipe.env");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // A FIFO would hang the load (open waits for a writer): refused first.
    let found = dir.problems(
        "[services.api]\nenv_file = [\"a-dir\", \"huge.env\", \"pipe.env\", \"/dev/zero\"]\n",
    );
    let shown: Vec<String> = found.iter().map(ToString::to_string).collect();
    assert_eq!(found.len(), 4, "{shown:#?}");
    for (problem, why) in found.iter().zip([
        "not a regular file",
        "larger than 1048576 bytes",
        "not a regular file",
        "not a regular file",
    ]) {
        assert!(
            problem.message.starts_with("cannot read env file") && problem.message.contains(why),
            "{}",
            problem.message
        );
    }
}

#[test]
fn variables_expand_from_env_files_then_the_host() {
    let dir = Dir::new();
    dir.write("api.env", "FILE_ONLY=from-file\nSHARED=file-shared\n");
    let config = dir.ok(r#"
[services.api]
env_file = "api.env"
args = ["--a=${FILE_ONLY}", "--b=${HOST_ONLY}", "--c=${SHARED}", "--d=${NOPE:-dflt}", "$$x", "$5"]
environment = { URL = "http://${HOST_ONLY}:80", LITERAL = "$${HOST_ONLY}" }

[services.cmd]
command = ["/bin/echo", "${HOST_ONLY}"]
"#);
    let api = &config.services["api"];
    assert_eq!(
        api.args,
        [
            "--a=from-file",
            "--b=from-host",
            "--c=file-shared",
            "--d=dflt",
            "$x",
            "$5"
        ]
    );
    assert_eq!(api.environment["URL"], "http://from-host:80");
    assert_eq!(api.environment["LITERAL"], "${HOST_ONLY}");
    // Env file values are literal: not expanded.
    assert_eq!(api.environment["SHARED"], "file-shared");
    assert_eq!(
        config.services["cmd"].command.as_deref(),
        Some(&["/bin/echo".to_owned(), "from-host".to_owned()][..])
    );
}

#[test]
fn an_undefined_variable_names_itself_the_service_and_the_key() {
    let dir = Dir::new();
    let found = dir.problems(
        "[services.api]\nargs = [\"ok\", \"--x=${NOT_SET}\"]\n\n[services.web]\nenvironment = { URL = \"${ALSO_NOT}\" }\ncommand = [\"${CMD_NOT}\"]\n",
    );
    let got: Vec<(Option<usize>, &str)> = found
        .iter()
        .map(|problem| (problem.line, problem.key.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (Some(2), "services.api.args[1]"),
            (Some(5), "services.web.environment.URL"),
            (Some(6), "services.web.command[0]"),
        ]
    );
    assert_eq!(
        found[0].message,
        "undefined variable ${NOT_SET}; set NOT_SET in the daemon's environment or in an \
         env_file, or give a default: ${NOT_SET:-value}"
    );
    let shown = found[1].to_string();
    assert!(
        shown.contains(":5:")
            && shown.contains("services.web.environment.URL: undefined variable ${ALSO_NOT}"),
        "{shown}"
    );
    let found = dir.problems("[services.api]\nargs = [\"${UNCLOSED\"]\n");
    assert!(found[0].message.contains("without a closing"), "{found:#?}");
}

#[test]
fn the_host_environment_is_only_what_the_lookup_gives() {
    // PATH is surely set in the real environment; the lookup says not.
    let dir = Dir::new();
    let file = dir.path().join("o.toml");
    let loaded = parse_in(
        "[services.api]\nargs = [\"${PATH}\"]\n",
        Some(&file),
        dir.path(),
        &|_| None,
    )
    .unwrap();
    assert_eq!(loaded.problems.len(), 1);
    assert!(loaded.problems[0].message.contains("${PATH}"));
}

fn names(config: &Config) -> Vec<&str> {
    config.services.keys().map(|name| name.as_str()).collect()
}

#[test]
fn instances_expand_into_named_services() {
    let dir = Dir::new();
    dir.write("web.env", "SLOT=s{instance}\n");
    let config = dir.ok(r#"
[services.web]
instances = 3
env_file = "web.env"
args = ["--port=80{instance}", "--host=${HOST_ONLY}"]
environment = { ID = "web-{instance}" }
data_dir = "state/{instance}"

[services.web.health]
http = "http://127.0.0.1:80{instance}/healthz"

[services.one]
instances = 1
args = ["--i={instance}"]

[services.plain]
args = ["{instance}"]

[services.front]
depends_on = { web = "healthy", one = "started" }
"#);
    assert_eq!(
        names(&config),
        ["front", "one", "plain", "web@0", "web@1", "web@2"]
    );
    for index in 0..3u32 {
        let web = &config.services[format!("web@{index}").as_str()];
        assert_eq!(
            web.args,
            [format!("--port=80{index}"), "--host=from-host".to_owned()]
        );
        assert_eq!(web.environment["ID"], format!("web-{index}"));
        assert_eq!(web.environment["SLOT"], format!("s{index}"));
        assert_eq!(
            web.health.as_ref().map(|health| &health.probe),
            Some(&crate::health::Probe::Http {
                url: format!("http://127.0.0.1:80{index}/healthz"),
                expect_status: None
            }),
            "a port per instance in its check too"
        );
        assert_eq!(
            web.data_dir,
            Some(dir.path().join(format!("state/{index}")))
        );
        assert_eq!(
            web.instance,
            Some(Instance {
                section: ServiceName::parse("web").unwrap(),
                index
            })
        );
    }
    // One instance keeps the plain name; {instance} is 0.
    assert_eq!(config.services["one"].args, ["--i=0"]);
    assert_eq!(config.services["one"].instance, None);
    // Without instances, {instance} is not special.
    assert_eq!(config.services["plain"].args, ["{instance}"]);
    let depends: Vec<(&str, Condition)> = config.services["front"]
        .depends_on
        .iter()
        .map(|dependency| (dependency.name.as_str(), dependency.condition))
        .collect();
    assert_eq!(
        depends,
        [
            ("web@0", Condition::Healthy),
            ("web@1", Condition::Healthy),
            ("web@2", Condition::Healthy),
            ("one", Condition::Started),
        ]
    );
}

#[test]
fn instance_problems_are_located_at_their_section() {
    let dir = Dir::new();
    for (text, line, key, needle) in [
        (
            "[services.web]\ninstances = 0\n",
            2,
            "services.web.instances",
            "from 1 to 1000",
        ),
        (
            "[services.web]\ninstances = 1001\n",
            2,
            "services.web.instances",
            "from 1 to 1000",
        ),
        (
            "[services.web]\ninstances = \"3\"\n",
            2,
            "services.web.instances",
            "expected",
        ),
        (
            "[services.\"web@1\"]\n",
            1,
            "services.\"web@1\"",
            "set instances = N",
        ),
    ] {
        let found = dir.problems(text);
        assert_eq!(found.len(), 1, "{text}: {found:#?}");
        assert_eq!(
            (found[0].line, found[0].key.as_str()),
            (Some(line), key),
            "{text}"
        );
        assert!(
            found[0].message.contains(needle),
            "{text}: {}",
            found[0].message
        );
    }
    // Each instance is located where its section's keys are.
    let loaded = dir.load("\n[services.web]\ninstances = 2\nbinary_path = \"x\"\n");
    assert_eq!(
        loaded.locations.get("services.\"web@1\".binary_path"),
        loaded.locations.get("services.web.binary_path")
    );
    assert!(loaded.locations.get("services.\"web@1\"").is_some());
}
