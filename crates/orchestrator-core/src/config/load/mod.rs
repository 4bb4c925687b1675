//! Reading the configuration: TOML parsed with byte spans, then walked by hand
//! rather than through serde, so that every problem is reported at once with
//! its line, column and dotted key instead of stopping at the first one.
//!
//! Each section declares its keys once, in a table (`keys::Key`): name, what
//! it is for, and how its value is read into the model. Values shared across
//! sections (durations, paths, signals...) are read by `values`.

mod cx;
mod dotenv;
#[cfg(test)]
mod env_tests;
mod health_section;
mod keys;
mod orchestrator_section;
mod service_section;
mod skim;
mod values;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

use self::cx::Cx;
use self::keys::Key;
use self::values::normalize;
use super::error::{ConfigErrors, ConfigProblem, Locations};
use super::model::{Config, OrchestratorConfig};
use crate::plan::HostEnv;

const CONFIG_ENV: &str = "ORCHESTRATOR_CONFIG";
const DEFAULT_FILE: &str = "orchestrator.toml";

const TOP_KEYS: &[Key<Config>] = &[
    Key::new(
        "orchestrator",
        "the daemon's own settings, [orchestrator]",
        |cx, f, out| match f.value.get_ref() {
            DeValue::Table(table) => {
                orchestrator_section::read(cx, table, f.base_dir, &mut out.orchestrator)
            }
            _ => cx.mismatch(&f.path, f.value, "a table [orchestrator]"),
        },
    ),
    Key::new(
        "services",
        "one [services.NAME] section per service",
        |cx, f, out| match f.value.get_ref() {
            DeValue::Table(_) if cx.scope == Scope::DaemonOnly => {}
            DeValue::Table(table) => {
                service_section::read_all(cx, table, f.base_dir, &mut out.services)
            }
            _ => cx.mismatch(&f.path, f.value, "a table of services [services.NAME]"),
        },
    ),
];

/// How much of a file to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scope {
    Everything,
    /// `[orchestrator]` only, and no service: what a client needs to find
    /// its daemon. Reading 10,000 service sections took a client longer
    /// than the daemon took to answer it.
    DaemonOnly,
}

/// Parse `text`, the contents of `file`, whose relative paths resolve against
/// `base_dir` (made absolute against the current directory if it is not).
/// Every problem is reported, sorted by line; `file` is only used to name them
/// and as `Config::source`.
pub fn parse(text: &str, file: Option<&Path>, base_dir: &Path) -> Result<Config, ConfigErrors> {
    parse_located(text, file, base_dir).map(|(config, _)| config)
}

/// `parse`, with where each key was found.
pub fn parse_located(
    text: &str,
    file: Option<&Path>,
    base_dir: &Path,
) -> Result<(Config, Locations), ConfigErrors> {
    let loaded = parse_all(text, file, base_dir)?;
    if loaded.problems.is_empty() {
        Ok((loaded.config, loaded.locations))
    } else {
        Err(ConfigErrors {
            problems: loaded.problems,
        })
    }
}

/// A configuration read as far as it could be: `problems` are those of the
/// schema (sorted by line), and `config` holds defaults where a value was
/// wrong. What `check` and `run` validate further, so that a missing binary
/// is reported in the same pass as a typo elsewhere.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub locations: Locations,
    pub problems: Vec<ConfigProblem>,
}

/// `parse`, keeping the configuration beside its schema problems. Only a
/// file that is not TOML at all gives no configuration.
/// `${VAR}` expands from the env files, then the daemon's environment.
pub fn parse_all(text: &str, file: Option<&Path>, base_dir: &Path) -> Result<Loaded, ConfigErrors> {
    parse_in(text, file, base_dir, &HostEnv::process_var)
}

/// `parse_all` with `${VAR}` expanding from `host_var` rather than the
/// daemon's own environment (after the env files).
pub fn parse_in(
    text: &str,
    file: Option<&Path>,
    base_dir: &Path,
    host_var: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded, ConfigErrors> {
    parse_all_in(text, file, base_dir, host_var, None, Scope::Everything)
}

/// `parse_in`, with `data_dir` defaulting to `host_data_dir` when given
/// (host mode) instead of `.orchestrator` beside the file.
fn parse_all_in(
    text: &str,
    file: Option<&Path>,
    base_dir: &Path,
    host_var: &dyn Fn(&str) -> Option<String>,
    host_data_dir: Option<&Path>,
    scope: Scope,
) -> Result<Loaded, ConfigErrors> {
    let base_dir = absolute_dir(base_dir);
    let mut cx = Cx::new(text, file, host_var);
    cx.scope = scope;
    // A client parses the file without its service tables (same lines and
    // offsets, so same positions); if that fails, it parses the whole file,
    // so a syntax error reads as it would to the daemon.
    let skimmed = match scope {
        Scope::DaemonOnly => skim::blank_service_tables(text),
        Scope::Everything => None,
    };
    let parsed = match skimmed.as_deref().map(DeTable::parse) {
        Some(Ok(root)) => Ok(root),
        _ => DeTable::parse(text),
    };
    let root = match parsed {
        Ok(root) => root,
        Err(err) => {
            cx.syntax_error(&err);
            return Err(cx.into_errors());
        }
    };
    let config = document(&mut cx, root.get_ref(), &base_dir, host_data_dir);
    let locations = std::mem::take(&mut cx.locations);
    Ok(Loaded {
        config,
        locations,
        problems: cx.into_errors().problems,
    })
}

/// Find and load the configuration: `explicit` (from `--config`), else
/// `$ORCHESTRATOR_CONFIG`, else `./orchestrator.toml`, else, for root only,
/// `/etc/orchestrator/orchestrator.toml`. Only those last two may be
/// missing, which means zero-config: defaults in the current directory and
/// `source: None`. The file named in `Config::source` and in problems is
/// absolute, canonicalised when possible. Whatever chose the standard file,
/// it means host mode (see `HostPaths`).
pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigErrors> {
    let loaded = load_all(explicit)?;
    if loaded.problems.is_empty() {
        Ok(loaded.config)
    } else {
        Err(ConfigErrors {
            problems: loaded.problems,
        })
    }
}

/// `load`, keeping the configuration beside its schema problems (see
/// `parse_all`); where each key was found is empty for zero-config.
pub fn load_all(explicit: Option<&Path>) -> Result<Loaded, ConfigErrors> {
    load_scoped(explicit, Scope::Everything)
}

/// [`load_all`] for a client: the file found the same way, `[orchestrator]`
/// read and checked, the service sections skipped (`services` is empty).
pub fn load_daemon_settings(explicit: Option<&Path>) -> Result<Loaded, ConfigErrors> {
    load_scoped(explicit, Scope::DaemonOnly)
}

fn load_scoped(explicit: Option<&Path>, scope: Scope) -> Result<Loaded, ConfigErrors> {
    let cwd = std::env::current_dir().map_err(|err| {
        single_problem(
            None,
            None,
            format!(
                "cannot determine the current directory: {err}; \
                 run orchestrator from an existing directory"
            ),
        )
    })?;
    let host = HostPaths::standard();
    let euid = nix::unistd::geteuid().as_raw();
    load_from(
        explicit,
        std::env::var_os(CONFIG_ENV),
        &cwd,
        &host,
        euid,
        &HostEnv::process_var,
        scope,
    )
}

/// Where a daemon run as a host service keeps its files ("host mode"): the
/// configuration in use is the standard file, however it was chosen.
/// Passed in rather than read from constants so that tests need neither
/// root nor /etc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPaths {
    /// Looked for when root names no file and the current directory has none.
    pub config: PathBuf,
    /// data_dir's default in host mode (the file's `data_dir` still wins).
    pub data_dir: PathBuf,
    /// The control socket in host mode, whatever data_dir is.
    pub socket: PathBuf,
}

impl HostPaths {
    /// The paths systemd's RuntimeDirectory=, StateDirectory= and
    /// ConfigurationDirectory= give a unit named orchestrator.
    pub fn standard() -> Self {
        HostPaths {
            config: PathBuf::from("/etc/orchestrator/orchestrator.toml"),
            data_dir: PathBuf::from("/var/lib/orchestrator"),
            socket: PathBuf::from("/run/orchestrator/orchestrator.sock"),
        }
    }

    /// Whether `source` (a loaded `Config::source`, canonical) is the
    /// standard file: also when it was reached through a symlink, or named
    /// through one (`--config` is canonicalised, the standard path may not be).
    pub fn is_host_config(&self, source: &Path) -> bool {
        source == self.config
            || fs::canonicalize(&self.config).is_ok_and(|canonical| canonical == source)
    }

    /// The control socket of the daemon run with `config`: the standard one
    /// in host mode, else `data_dir/orchestrator.sock`.
    pub fn socket_of(&self, config: &Config) -> PathBuf {
        match &config.source {
            Some(source) if self.is_host_config(source) => self.socket.clone(),
            _ => config.orchestrator.data_dir.join("orchestrator.sock"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Flag,
    Env,
    Default,
    Host,
}

/// `load` with its process-global inputs passed in, so tests need neither
/// `set_var` nor `set_current_dir` (both would race other tests), nor root.
fn load_from(
    explicit: Option<&Path>,
    env: Option<OsString>,
    cwd: &Path,
    host: &HostPaths,
    euid: u32,
    host_var: &dyn Fn(&str) -> Option<String>,
    scope: Scope,
) -> Result<Loaded, ConfigErrors> {
    let (mut path, mut origin) = match (explicit, env.filter(|value| !value.is_empty())) {
        (Some(path), _) => (cwd.join(path), Origin::Flag),
        (None, Some(value)) => (cwd.join(PathBuf::from(value)), Origin::Env),
        (None, None) => (cwd.join(DEFAULT_FILE), Origin::Default),
    };
    // A root daemon started from anywhere (a unit, a shell in /) finds the
    // host's file, as sshd or nginx would; a project folder's own file
    // still comes first.
    if origin == Origin::Default && euid == 0 && !normalize(&path).exists() {
        (path, origin) = (host.config.clone(), Origin::Host);
    }
    let path = normalize(&path);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err)
            if err.kind() == io::ErrorKind::NotFound
                && matches!(origin, Origin::Default | Origin::Host) =>
        {
            tracing::debug!(
                path = %path.display(),
                "no configuration file; using zero-config defaults"
            );
            let config = Config {
                source: None,
                orchestrator: OrchestratorConfig::defaults_in(cwd),
                services: BTreeMap::new(),
            };
            return Ok(Loaded {
                config,
                locations: Locations::default(),
                problems: Vec::new(),
            });
        }
        Err(err) => {
            let message = match origin {
                Origin::Env => format!(
                    "cannot read: {err} (named by ${CONFIG_ENV}); \
                     pass an existing file with --config or fix ${CONFIG_ENV}"
                ),
                Origin::Host => format!(
                    "cannot read: {err} (the standard configuration of a daemon run as root); \
                     make it readable, or pass another file with --config"
                ),
                Origin::Flag | Origin::Default => {
                    format!("cannot read: {err}; pass an existing file with --config")
                }
            };
            return Err(single_problem(Some(path), None, message));
        }
    };
    let path = fs::canonicalize(&path).unwrap_or(path);
    let host_data_dir = host
        .is_host_config(&path)
        .then_some(host.data_dir.as_path());
    let base_dir = path.parent().unwrap_or(cwd).to_path_buf();
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(err) => {
            let valid = &err.as_bytes()[..err.utf8_error().valid_up_to()];
            let line = valid.iter().filter(|&&byte| byte == b'\n').count() + 1;
            return Err(single_problem(
                Some(path),
                Some(line),
                "the file is not valid UTF-8; save it as UTF-8 text".to_owned(),
            ));
        }
    };
    parse_all_in(
        &text,
        Some(&path),
        &base_dir,
        host_var,
        host_data_dir,
        scope,
    )
}

fn single_problem(file: Option<PathBuf>, line: Option<usize>, message: String) -> ConfigErrors {
    ConfigErrors {
        problems: vec![ConfigProblem {
            file,
            line,
            column: None,
            key: String::new(),
            message,
        }],
    }
}

/// The whole file: its defaults, then whatever its sections say.
fn document(
    cx: &mut Cx<'_>,
    root: &DeTable<'_>,
    base_dir: &Path,
    host_data_dir: Option<&Path>,
) -> Config {
    let mut config = Config {
        source: cx.file.clone(),
        orchestrator: OrchestratorConfig::defaults_in(base_dir),
        services: BTreeMap::new(),
    };
    // Before the sections are read, so that a data_dir in the file wins.
    if let Some(dir) = host_data_dir {
        config.orchestrator.data_dir = dir.to_path_buf();
    }
    cx.section(
        root,
        "",
        "at the top level",
        TOP_KEYS,
        base_dir,
        &mut config,
    );
    config
}

fn absolute_dir(dir: &Path) -> PathBuf {
    normalize(&std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()))
}

/// What the tests of every section share: parsing a text as if it were
/// `/base/dir/orchestrator.toml`.
#[cfg(test)]
mod test_support {
    pub(super) use std::path::Path;

    pub(super) use super::parse;
    pub(super) use crate::config::ConfigProblem;
    pub(super) use crate::config::model::*;

    pub(super) const BASE: &str = "/base/dir";

    pub(super) fn ok(text: &str) -> Config {
        match parse(
            text,
            Some(Path::new("/base/dir/orchestrator.toml")),
            Path::new(BASE),
        ) {
            Ok(config) => config,
            Err(errors) => panic!("unexpected problems:\n{errors}"),
        }
    }

    pub(super) fn problems(text: &str) -> Vec<ConfigProblem> {
        match parse(
            text,
            Some(Path::new("/base/dir/orchestrator.toml")),
            Path::new(BASE),
        ) {
            Ok(config) => panic!("expected problems, got {config:#?}"),
            Err(errors) => errors.problems,
        }
    }

    /// The only problem of `text`, which must be at `line` and name `key`.
    pub(super) fn one_problem(text: &str, line: usize, key: &str) -> String {
        let found = problems(text);
        assert_eq!(
            found.len(),
            1,
            "expected exactly one problem, got {found:#?}"
        );
        assert_eq!(found[0].line, Some(line), "{found:#?}");
        assert_eq!(found[0].key, key, "{found:#?}");
        found[0].message.clone()
    }

    pub(super) fn service(text: &str) -> ServiceConfig {
        let mut config = ok(text);
        config.services.remove("api").expect("service api")
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn a_client_reads_the_daemon_settings_and_skips_every_service() {
        let text = "[orchestrator]\ndata_dir = \"state\"\nshutdown_timeout = \"7s\"\n\
                    [services.api]\nnot_a_key = 1\n[services.web]\ncommand = [\"/bin/true\"]\n";
        let file = Path::new("/base/dir/orchestrator.toml");
        let host = |_: &str| None;
        let everything = parse_all_in(
            text,
            Some(file),
            Path::new(BASE),
            &host,
            None,
            Scope::Everything,
        )
        .unwrap();
        assert_eq!(everything.problems.len(), 1, "{:?}", everything.problems);
        let client = parse_all_in(
            text,
            Some(file),
            Path::new(BASE),
            &host,
            None,
            Scope::DaemonOnly,
        )
        .unwrap();
        assert!(client.problems.is_empty(), "{:?}", client.problems);
        assert!(client.config.services.is_empty());
        assert_eq!(client.config.orchestrator, everything.config.orchestrator);
        assert_eq!(
            client.config.orchestrator.data_dir,
            Path::new("/base/dir/state")
        );
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config = ok("");
        assert_eq!(
            config.source.as_deref(),
            Some(Path::new("/base/dir/orchestrator.toml"))
        );
        assert_eq!(
            config.orchestrator,
            OrchestratorConfig::defaults_in(Path::new(BASE))
        );
        assert!(config.services.is_empty());
    }

    #[test]
    fn relative_paths_resolve_against_base_dir() {
        let config = parse(
            "[orchestrator]\nservices_dir = \"./s\"\ndata_dir = \"../d\"\n[services.api]\nbinary_path = \"/abs/x\"\n",
            None,
            Path::new("/etc/orch/"),
        )
        .unwrap();
        assert_eq!(config.orchestrator.services_dir, Path::new("/etc/orch/s"));
        assert_eq!(config.orchestrator.data_dir, Path::new("/etc/orch/../d"));
        assert_eq!(
            config.services["api"].binary_path.as_deref(),
            Some(Path::new("/abs/x"))
        );
        assert_eq!(config.source, None);
    }

    #[test]
    fn relative_base_dir_becomes_absolute() {
        let config = parse("", None, Path::new("conf")).unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(config.orchestrator.services_dir, cwd.join("conf/services"));
        assert!(config.orchestrator.data_dir.is_absolute());
    }

    #[test]
    fn syntax_error_is_one_problem_with_position() {
        let found = problems("[orchestrator]\nauto_restart = true\nauto_restart = false\n");
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].line, found[0].column), (Some(3), Some(1)));
        assert!(
            found[0].message.starts_with("invalid TOML: "),
            "{}",
            found[0].message
        );
        assert_eq!(
            found[0].message,
            "invalid TOML: duplicate key \"auto_restart\" in [orchestrator], at lines 2 and 3; \
             keep one of them"
        );

        let found = problems("[orchestrator]\nlog_level = info\n");
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].line, found[0].column), (Some(2), Some(13)));
    }

    #[test]
    fn duplicate_table_names_the_table_and_both_lines() {
        let found = problems(
            "[services.api]\nenabled = true\n\n[orchestrator]\n[ services.api ]\nargs = []\n",
        );
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].line, Some(5));
        assert_eq!(
            found[0].message,
            "invalid TOML: duplicate key: the table [services.api] is defined twice, \
             at lines 1 and 5; merge them into one section"
        );

        let found = problems("services.api.enabled = true\n[services.api]\n");
        assert!(
            found[0]
                .message
                .contains("the table [services.api] at line 2 is already defined above"),
            "{}",
            found[0].message
        );

        let found = problems("log = 1\nlog = 2\n");
        assert!(
            found[0]
                .message
                .contains("duplicate key \"log\" at the top level, at lines 1 and 2"),
            "{}",
            found[0].message
        );
    }

    #[test]
    fn unknown_key_column_counts_characters() {
        let found =
            problems("[services.api]\nenvironment = { \"é\" = \"x\" }\n[orchestrator]\n  zz = 1\n");
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].line, found[0].column), (Some(4), Some(3)));
    }

    #[test]
    fn every_problem_is_reported_sorted_by_line() {
        let text = r#"
[services.web]
restart = "sometimes"
bogus = 1

[orchestrator]
log_level = "loud"
http_token_file = "t"

[services."a/b"]
stop_timeout = "5x"
backoff = { initial = "10s", max = "1s" }
"#;
        let found = problems(text);
        let got: Vec<(Option<usize>, &str)> = found
            .iter()
            .map(|problem| (problem.line, problem.key.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (Some(3), "services.web.restart"),
                (Some(4), "services.web.bogus"),
                (Some(7), "orchestrator.log_level"),
                (Some(8), "orchestrator.http_token_file"),
                (Some(10), "services.\"a/b\""),
                (Some(11), "services.\"a/b\".stop_timeout"),
                (Some(12), "services.\"a/b\".backoff.max"),
            ]
        );
        for problem in &found {
            assert_eq!(
                problem.file.as_deref(),
                Some(Path::new("/base/dir/orchestrator.toml"))
            );
        }
        let shown = ConfigErrors { problems: found }.to_string();
        assert!(
            shown.contains("/base/dir/orchestrator.toml:3:11: services.web.restart: invalid value"),
            "{shown}"
        );
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "orchestrator-load-{tag}-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            TempDir(fs::canonicalize(&path).unwrap())
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn zero_config_without_a_file() {
        let dir = TempDir::new("zero");
        let config = load_from(None, None, &dir.0).unwrap().config;
        assert_eq!(config.source, None);
        assert_eq!(config.orchestrator, OrchestratorConfig::defaults_in(&dir.0));
        assert_eq!(config.orchestrator.services_dir, dir.0.join("services"));
        assert!(config.services.is_empty());
        // An empty variable counts as unset.
        assert!(load_from(None, Some(OsString::new()), &dir.0).is_ok());
    }

    /// The search as a user (not root): the standard file is never looked
    /// for; without the daemon's environment (these tests are about the file).
    fn load_from(
        explicit: Option<&Path>,
        env: Option<OsString>,
        cwd: &Path,
    ) -> Result<Loaded, ConfigErrors> {
        load_as(
            explicit,
            env,
            cwd,
            &host_in(Path::new("/nonexistent")),
            1000,
        )
    }

    /// The search as `euid` with the stand-in `host` layout; without the
    /// daemon's environment.
    fn load_as(
        explicit: Option<&Path>,
        env: Option<OsString>,
        cwd: &Path,
        host: &HostPaths,
        euid: u32,
    ) -> Result<Loaded, ConfigErrors> {
        super::load_from(explicit, env, cwd, host, euid, &|_| None, Scope::Everything)
    }

    /// Stand-ins for /etc, /var/lib and /run below `root`.
    fn host_in(root: &Path) -> HostPaths {
        HostPaths {
            config: root.join("etc/orchestrator/orchestrator.toml"),
            data_dir: root.join("var/lib/orchestrator"),
            socket: root.join("run/orchestrator/orchestrator.sock"),
        }
    }

    /// A host layout under a temp dir, with its standard file written, and
    /// an empty "current directory" beside it.
    fn host_layout(tag: &str, text: &str) -> (TempDir, HostPaths, PathBuf) {
        let dir = TempDir::new(tag);
        let host = host_in(&dir.0);
        fs::create_dir_all(host.config.parent().unwrap()).unwrap();
        fs::write(&host.config, text).unwrap();
        let cwd = dir.0.join("somewhere");
        fs::create_dir(&cwd).unwrap();
        (dir, host, cwd)
    }

    #[test]
    fn root_without_a_file_here_loads_the_standard_one_in_host_mode() {
        let (dir, host, cwd) = host_layout("host-root", "[services.api]\nbinary_path = \"api\"\n");
        let config = load_as(None, None, &cwd, &host, 0).unwrap().config;
        assert_eq!(config.source.as_deref(), Some(host.config.as_path()));
        assert_eq!(config.orchestrator.data_dir, host.data_dir);
        // Relative to the file, as everywhere else.
        let etc = dir.0.join("etc/orchestrator");
        assert_eq!(config.orchestrator.services_dir, etc.join("services"));
        assert_eq!(config.services["api"].binary_path, Some(etc.join("api")));
        assert_eq!(host.socket_of(&config), host.socket);
    }

    #[test]
    fn a_user_or_a_project_file_never_falls_back_to_the_standard_file() {
        let (_dir, host, cwd) = host_layout("host-user", "[services.api]\n");
        // Not root: zero-config in the current directory.
        let config = load_as(None, None, &cwd, &host, 1000).unwrap().config;
        assert_eq!(config.source, None);
        assert_eq!(config.orchestrator.data_dir, cwd.join(".orchestrator"));
        assert_eq!(
            host.socket_of(&config),
            cwd.join(".orchestrator/orchestrator.sock")
        );
        // Root in a project folder: the folder's file.
        fs::write(cwd.join(DEFAULT_FILE), "").unwrap();
        let config = load_as(None, None, &cwd, &host, 0).unwrap().config;
        assert_eq!(config.source, Some(cwd.join(DEFAULT_FILE)));
        assert_eq!(config.orchestrator.data_dir, cwd.join(".orchestrator"));
        assert_eq!(
            host.socket_of(&config),
            cwd.join(".orchestrator/orchestrator.sock")
        );
    }

    #[test]
    fn root_without_any_file_is_zero_config_here() {
        let dir = TempDir::new("host-none");
        let host = host_in(&dir.0);
        let config = load_as(None, None, &dir.0, &host, 0).unwrap().config;
        assert_eq!(config.source, None);
        assert_eq!(config.orchestrator.data_dir, dir.0.join(".orchestrator"));
    }

    #[test]
    fn the_standard_file_named_any_way_is_host_mode_and_its_keys_win() {
        let (dir, host, cwd) = host_layout("host-named", "[orchestrator]\ndata_dir = \"state\"\n");
        let link = dir.0.join("link.toml");
        std::os::unix::fs::symlink(&host.config, &link).unwrap();
        let etc = dir.0.join("etc/orchestrator");
        for (explicit, env) in [
            (Some(host.config.as_path()), None),
            (Some(link.as_path()), None),
            (None, Some(host.config.clone().into_os_string())),
        ] {
            // As a user too: host mode is about the file, not who reads it.
            let config = load_as(explicit, env.clone(), &cwd, &host, 1000)
                .unwrap()
                .config;
            assert_eq!(config.source.as_deref(), Some(host.config.as_path()));
            assert_eq!(
                config.orchestrator.data_dir,
                etc.join("state"),
                "{explicit:?} {env:?}"
            );
            assert_eq!(host.socket_of(&config), host.socket);
        }
        // Without the key, the host default.
        fs::write(&host.config, "").unwrap();
        let config = load_as(Some(&link), None, &cwd, &host, 1000)
            .unwrap()
            .config;
        assert_eq!(config.orchestrator.data_dir, host.data_dir);
    }

    #[test]
    fn an_unreadable_standard_file_is_an_error_not_zero_config() {
        let dir = TempDir::new("host-dir");
        let host = host_in(&dir.0);
        // A directory where the file should be: reading fails, not NotFound.
        fs::create_dir_all(&host.config).unwrap();
        let errors = load_as(None, None, &dir.0, &host, 0).unwrap_err();
        let message = &errors.problems[0].message;
        assert!(message.contains("standard configuration"), "{message}");
        assert!(message.contains("--config"), "{message}");
    }

    #[test]
    fn default_file_in_cwd_is_loaded() {
        let dir = TempDir::new("default");
        fs::write(
            dir.0.join(DEFAULT_FILE),
            "[orchestrator]\nservices_dir = \"bin\"\n",
        )
        .unwrap();
        let config = load_from(None, None, &dir.0).unwrap().config;
        assert_eq!(config.source, Some(dir.0.join(DEFAULT_FILE)));
        assert_eq!(config.orchestrator.services_dir, dir.0.join("bin"));
    }

    #[test]
    fn explicit_and_env_paths() {
        let dir = TempDir::new("explicit");
        fs::create_dir(dir.0.join("etc")).unwrap();
        fs::write(
            dir.0.join("etc/a.toml"),
            "[services.api]\nbinary_path = \"api\"\n",
        )
        .unwrap();
        fs::write(dir.0.join("b.toml"), "[services.b]\n").unwrap();
        fs::write(dir.0.join(DEFAULT_FILE), "[services.c]\n").unwrap();

        // Relative to the current directory, and relative paths inside the
        // file against the file's own directory.
        let Loaded { config, .. } = load_from(
            Some(Path::new("./etc/a.toml")),
            Some("b.toml".into()),
            &dir.0,
        )
        .unwrap();
        assert_eq!(config.source, Some(dir.0.join("etc/a.toml")));
        assert_eq!(
            config.services["api"].binary_path,
            Some(dir.0.join("etc/api"))
        );
        assert_eq!(config.orchestrator.services_dir, dir.0.join("etc/services"));

        let config = load_from(None, Some("b.toml".into()), &dir.0)
            .unwrap()
            .config;
        assert!(config.services.contains_key("b"));
        let config = load_from(None, None, &dir.0).unwrap().config;
        assert!(config.services.contains_key("c"));
    }

    #[test]
    fn missing_explicit_or_env_file_is_an_error() {
        let dir = TempDir::new("missing");
        let errors = load_from(Some(Path::new("nope.toml")), None, &dir.0).unwrap_err();
        assert_eq!(errors.problems.len(), 1);
        let problem = &errors.problems[0];
        assert_eq!(problem.file, Some(dir.0.join("nope.toml")));
        assert!(
            problem.message.starts_with("cannot read: "),
            "{}",
            problem.message
        );
        assert!(
            problem
                .message
                .ends_with("pass an existing file with --config"),
            "{}",
            problem.message
        );

        let errors = load_from(None, Some("gone.toml".into()), &dir.0).unwrap_err();
        let problem = &errors.problems[0];
        assert_eq!(problem.file, Some(dir.0.join("gone.toml")));
        assert!(
            problem.message.contains("$ORCHESTRATOR_CONFIG"),
            "{}",
            problem.message
        );
    }

    #[test]
    fn problems_name_the_canonical_file() {
        let dir = TempDir::new("canon");
        fs::create_dir(dir.0.join("real")).unwrap();
        fs::write(dir.0.join("real/o.toml"), "bad = 1\n").unwrap();
        std::os::unix::fs::symlink(dir.0.join("real/o.toml"), dir.0.join("link.toml")).unwrap();
        let loaded = load_from(Some(Path::new("link.toml")), None, &dir.0).unwrap();
        assert_eq!(loaded.problems[0].file, Some(dir.0.join("real/o.toml")));
        assert_eq!(loaded.problems[0].line, Some(1));
    }

    #[test]
    fn invalid_utf8_is_reported_with_its_line() {
        let dir = TempDir::new("utf8");
        fs::write(dir.0.join("o.toml"), b"[orchestrator]\n# \xff\n").unwrap();
        let errors = load_from(Some(Path::new("o.toml")), None, &dir.0).unwrap_err();
        assert_eq!(errors.problems[0].line, Some(2));
        assert!(errors.problems[0].message.contains("UTF-8"));
    }
}

/// The dotted key of service `name`'s section, quoted as in problems.
pub fn service_key(name: &str) -> String {
    keys::join_key("services", name)
}

/// The dotted key of entry `index` of service `name`'s depends_on, which
/// names `dependency`, as the file wrote it: `depends_on.DEPENDENCY` for
/// the table form (which `locations` knows), else `depends_on[INDEX]`.
pub fn depends_on_key(locations: &Locations, name: &str, index: usize, dependency: &str) -> String {
    let field = keys::join_key(&service_key(name), "depends_on");
    let in_table = keys::join_key(&field, dependency);
    if locations.get(&in_table).is_some() {
        in_table
    } else {
        format!("{field}[{index}]")
    }
}
