//! Turning a configuration and a services-directory scan into the concrete
//! definitions the service actors run: argv, environment, paths, policy.

use crate::name::ServiceName;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{Config, RestartPolicy, ServiceConfig};
use crate::discovery::Discovered;
use crate::process::{EnvVar, Limits, SpawnSpec, StrictCheck, UserSpec};
use crate::service::{Policy, ReadyWhen, ServiceDefinition};

/// PATH for children when the daemon itself has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the children inherit from the daemon's own environment: PATH and
/// TMPDIR only, read once, so a test can pass its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEnv {
    pub path: String,
    pub tmpdir: String,
}

impl HostEnv {
    pub fn from_process() -> Self {
        HostEnv {
            path: Self::process_var("PATH")
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| DEFAULT_PATH.to_owned()),
            tmpdir: Self::process_var("TMPDIR")
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "/tmp".to_owned()),
        }
    }
}

impl HostEnv {
    /// One variable of the daemon's own environment: the one place it is
    /// read (PATH and TMPDIR above, `${VAR}` when the configuration is
    /// loaded), so that tests pass a lookup of their own instead of
    /// mutating the process's environment.
    pub fn process_var(name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// Which file a path named when it was planned: a binary replaced on disk
/// (a new inode, or new content written in place) compares unequal, so a
/// reload restarts its service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BinaryId {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl BinaryId {
    /// `None` when the file cannot be read: its start reports why, and a
    /// binary that disappears alone is no reason to stop a running service.
    pub fn of(path: &Path) -> Option<BinaryId> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some(BinaryId {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        })
    }
}

/// Every service the daemon knows: configured sections and discovered
/// binaries, by name. A discovered binary without a section runs with the
/// defaults when `start_discovered` is set, and is listed (disabled)
/// otherwise.
pub fn plan(config: &Config, discovered: &[Discovered], host: &HostEnv) -> Vec<ServiceDefinition> {
    let found: BTreeMap<&ServiceName, &Path> = discovered
        .iter()
        .map(|d| (&d.name, d.binary.as_path()))
        .collect();
    let mut definitions = Vec::new();
    let mut binaries = HashMap::new();
    let common = CommonEnv::of(host);
    for (name, service) in &config.services {
        definitions.push(define(
            config,
            name,
            service,
            true,
            service.enabled,
            &common,
            &mut binaries,
        ));
    }
    let defaults = ServiceConfig::default();
    // A section with instances runs its binary as those, not also alone.
    let sections: Vec<&str> = config
        .services
        .values()
        .filter_map(|service| Some(service.instance.as_ref()?.section.as_str()))
        .collect();
    for name in found.keys() {
        if !config.services.contains_key(name.as_str()) && !sections.contains(&name.as_str()) {
            let enabled = config.orchestrator.start_discovered;
            definitions.push(define(
                config,
                name,
                &defaults,
                false,
                enabled,
                &common,
                &mut binaries,
            ));
        }
    }
    definitions.sort_by(|a, b| a.name.cmp(&b.name));
    definitions
}

/// The binary a service runs when it has no `command`: every instance of
/// a section runs the section's.
pub fn binary_of(config: &Config, name: &str, service: &ServiceConfig) -> PathBuf {
    let name = section_of(name, service);
    service
        .binary_path
        .clone()
        .unwrap_or_else(|| config.orchestrator.services_dir.join(name).join(name))
}

fn section_of<'a>(name: &'a str, service: &'a ServiceConfig) -> &'a str {
    service
        .instance
        .as_ref()
        .map_or(name, |instance| instance.section.as_str())
}

/// Where a service runs without `data_dir`: `services_dir/NAME/data`, and
/// for instance I of NAME `services_dir/NAME/data/I`.
pub fn default_data_dir(config: &Config, name: &str, service: &ServiceConfig) -> PathBuf {
    let data = config
        .orchestrator
        .services_dir
        .join(section_of(name, service))
        .join("data");
    match &service.instance {
        Some(instance) => data.join(instance.index.to_string()),
        None => data,
    }
}

/// The variables every service of a plan has alike, made once: each
/// service's environment shares them instead of holding copies (with the
/// names: ~0.45 KB and 16 allocations a service, `bench/heap.py`).
struct CommonEnv {
    /// PATH, TMPDIR, TEMP and TMP with the host's values.
    vars: [EnvVar; 4],
    /// The name only: each service's HOME is its own directory.
    home: Arc<str>,
}

impl CommonEnv {
    fn of(host: &HostEnv) -> Self {
        let tmpdir: Arc<str> = host.tmpdir.as_str().into();
        CommonEnv {
            vars: [
                ("PATH".into(), host.path.as_str().into()),
                ("TMPDIR".into(), Arc::clone(&tmpdir)),
                ("TEMP".into(), Arc::clone(&tmpdir)),
                ("TMP".into(), tmpdir),
            ],
            home: "HOME".into(),
        }
    }
}

fn define(
    config: &Config,
    name: &ServiceName,
    service: &ServiceConfig,
    configured: bool,
    enabled: bool,
    common: &CommonEnv,
    binaries: &mut HashMap<PathBuf, Option<BinaryId>>,
) -> ServiceDefinition {
    let orchestrator = &config.orchestrator;
    let (program, args) = match &service.command {
        Some(command) => (PathBuf::from(&command[0]), command[1..].to_vec()),
        None => {
            let mut args = vec![
                "--service".to_owned(),
                name.to_string(),
                "--log-level".to_owned(),
                orchestrator.log_level.as_str().to_owned(),
            ];
            args.extend(service.args.iter().cloned());
            (binary_of(config, name, service), args)
        }
    };
    let cwd = service
        .data_dir
        .clone()
        .unwrap_or_else(|| default_data_dir(config, name, service));
    let cwd_text = cwd.to_string_lossy().into_owned();
    // Later entries win: the service's own environment may override PATH
    // or TMPDIR, and GOMEMLIMIT follows memory_limit whatever it says.
    let mut env: BTreeMap<Arc<str>, Arc<str>> = BTreeMap::new();
    env.extend(common.vars.iter().cloned());
    env.insert(Arc::clone(&common.home), cwd_text.into());
    env.extend(
        service
            .environment
            .iter()
            .map(|(key, value)| (Arc::from(key.as_str()), Arc::from(value.as_str()))),
    );
    if let Some(mib) = service.memory_limit {
        env.insert("GOMEMLIMIT".into(), format!("{mib}MiB").into());
    }
    let restart = service.restart.unwrap_or(if orchestrator.auto_restart {
        RestartPolicy::Always
    } else {
        RestartPolicy::Never
    });
    // A bare command name is looked up in PATH by the spawn; only a path
    // names one file that can be watched for replacement.
    // Looked at once per file: instances (and fleets) share one.
    let binary = (orchestrator.restart_on_binary_change && program.is_absolute())
        .then(|| {
            *binaries
                .entry(program.clone())
                .or_insert_with(|| BinaryId::of(&program))
        })
        .flatten();
    ServiceDefinition {
        name: name.clone(),
        configured,
        binary,
        enabled,
        spawn: SpawnSpec {
            service: name.to_string(),
            program,
            args,
            env: env.into_iter().collect(),
            cwd,
            limits: Limits {
                memory_mib: service.memory_limit,
                // Thousandths of a core: finer than any quota a period takes.
                cpu_millicores: service
                    .cpu_limit
                    .map(|cores| (cores * 1000.0).round().max(1.0) as u64),
                pids: service.pids_limit,
            },
            rlimits: service.rlimits.iter().map(|(&r, &v)| (r, v)).collect(),
            user: service.user.as_ref().map(|user| UserSpec {
                user: user.clone(),
                group: service.group.clone(),
                owns_working_dir: service.data_dir.is_none(),
            }),
            sha256: service.sha256,
            strict: service.strict.then(|| StrictCheck {
                services_dir: orchestrator.services_dir.clone(),
            }),
        },
        policy: Policy {
            restart,
            max_restarts: service.max_restarts,
            backoff: service.backoff,
            start_limit: service.start_limit,
            stop_signal: service.stop_signal,
            stop_timeout: service
                .stop_timeout
                .unwrap_or(orchestrator.shutdown_timeout),
            ready: if service.notify || service.health.is_some() {
                ReadyWhen::Signalled {
                    timeout: service.start_timeout,
                }
            } else {
                ReadyWhen::Grace(service.start_grace)
            },
        },
        log_path: orchestrator
            .data_dir
            .join("logs")
            .join(format!("{name}.log")),
        log_max_bytes: orchestrator.log_max_bytes,
        log_max_files: orchestrator.log_max_files,
        log_file: crate::output::FileOptions {
            timestamps: service
                .log_timestamps
                .unwrap_or(orchestrator.log_timestamps),
            max_age: service.log_max_age.or(orchestrator.log_max_age),
            compress: orchestrator.log_compress,
        },
        notify: service.notify,
        watchdog: service.watchdog.filter(|_| service.notify),
        health: service.health.clone().map(Box::new),
        depends_on: service.depends_on.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OrchestratorConfig;
    use crate::name::ServiceName;

    fn host() -> HostEnv {
        HostEnv {
            path: "/bin".into(),
            tmpdir: "/tmp".into(),
        }
    }

    fn name(text: &str) -> ServiceName {
        ServiceName::parse(text).unwrap()
    }

    fn config(services: BTreeMap<ServiceName, ServiceConfig>) -> Config {
        Config {
            source: None,
            orchestrator: OrchestratorConfig::defaults_in(Path::new("/srv")),
            services,
        }
    }

    #[test]
    fn injects_the_blackhole_flags_before_args() {
        let mut services = BTreeMap::new();
        services.insert(
            name("api"),
            ServiceConfig {
                args: vec!["--port".into(), "8080".into()],
                memory_limit: Some(256),
                environment: BTreeMap::from([("MODE".into(), "prod".into())]),
                ..ServiceConfig::default()
            },
        );
        let defs = plan(&config(services), &[], &host());
        let spawn = &defs[0].spawn;
        assert_eq!(spawn.program, PathBuf::from("/srv/services/api/api"));
        assert_eq!(
            spawn.args,
            ["--service", "api", "--log-level", "info", "--port", "8080"]
        );
        assert_eq!(spawn.cwd, PathBuf::from("/srv/services/api/data"));
        let env: BTreeMap<_, _> = spawn.env.iter().cloned().collect();
        assert_eq!(&*env["HOME"], "/srv/services/api/data");
        assert_eq!(&*env["GOMEMLIMIT"], "256MiB");
        assert_eq!(&*env["MODE"], "prod");
        assert_eq!(&*env["PATH"], "/bin");
        assert_eq!(&*env["TMPDIR"], "/tmp");
        assert_eq!(env.len(), 7, "nothing else: {env:?}");
        assert_eq!(
            defs[0].log_path,
            PathBuf::from("/srv/.orchestrator/logs/api.log")
        );
    }

    /// Only the default data_dir, which the daemon makes, may be handed to
    /// the service's user; a configured one is the operator's.
    #[test]
    fn only_the_default_working_dir_is_handed_to_the_user() {
        let mut services = BTreeMap::new();
        let user = |data_dir: Option<&str>| ServiceConfig {
            user: Some("nobody".into()),
            data_dir: data_dir.map(PathBuf::from),
            ..ServiceConfig::default()
        };
        services.insert(name("own"), user(None));
        services.insert(name("given"), user(Some("/var/empty")));
        let defs = plan(&config(services), &[], &host());
        let owns = |n: &str| {
            let def = defs.iter().find(|d| d.name.as_str() == n).unwrap();
            def.spawn.user.as_ref().unwrap().owns_working_dir
        };
        assert!(owns("own"));
        assert!(!owns("given"));
    }

    #[test]
    fn instances_run_their_section_binary_each_in_its_own_data_dir() {
        use crate::config::Instance;
        let mut services = BTreeMap::new();
        for index in 0..2 {
            services.insert(
                name("web").instance(index),
                ServiceConfig {
                    instance: Some(Instance {
                        section: name("web"),
                        index,
                    }),
                    ..ServiceConfig::default()
                },
            );
        }
        // Its binary is discovered under the section's name: it runs as
        // the instances only, not also as a plain "web".
        let found = [Discovered {
            name: name("web"),
            binary: PathBuf::from("/srv/services/web/web"),
        }];
        let defs = plan(&config(services), &found, &host());
        let names: Vec<&str> = defs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["web@0", "web@1"]);
        for (index, def) in defs.iter().enumerate() {
            assert_eq!(def.spawn.program, PathBuf::from("/srv/services/web/web"));
            assert_eq!(def.spawn.args[..2], ["--service", &format!("web@{index}")]);
            assert_eq!(
                def.spawn.cwd,
                PathBuf::from(format!("/srv/services/web/data/{index}"))
            );
            assert_eq!(
                def.log_path,
                PathBuf::from(format!("/srv/.orchestrator/logs/web@{index}.log"))
            );
            assert_eq!(def.spawn.service, format!("web@{index}"));
        }
    }

    #[test]
    fn command_is_exact_argv() {
        let mut services = BTreeMap::new();
        services.insert(
            name("web"),
            ServiceConfig {
                command: Some(vec!["python3".into(), "-m".into(), "http.server".into()]),
                ..ServiceConfig::default()
            },
        );
        let defs = plan(&config(services), &[], &host());
        assert_eq!(defs[0].spawn.program, PathBuf::from("python3"));
        assert_eq!(defs[0].spawn.args, ["-m", "http.server"]);
    }

    #[test]
    fn discovered_binaries_follow_start_discovered() {
        let found = [Discovered {
            name: name("extra"),
            binary: PathBuf::from("/srv/services/extra/extra"),
        }];
        let mut cfg = config(BTreeMap::new());
        let defs = plan(&cfg, &found, &host());
        assert_eq!(defs.len(), 1);
        assert!(defs[0].enabled && !defs[0].configured);
        assert_eq!(defs[0].policy.restart, RestartPolicy::Always);
        cfg.orchestrator.start_discovered = false;
        cfg.orchestrator.auto_restart = false;
        let defs = plan(&cfg, &found, &host());
        assert!(!defs[0].enabled);
        assert_eq!(defs[0].policy.restart, RestartPolicy::Never);
    }

    #[test]
    fn readiness_follows_notify_and_health() {
        use crate::config::{Condition, Dependency, HealthCheck, OnUnhealthy, Probe};
        use std::time::Duration;

        let check = HealthCheck {
            probe: Probe::Exec {
                argv: vec!["true".into()],
            },
            interval: HealthCheck::DEFAULT_INTERVAL,
            timeout: HealthCheck::DEFAULT_TIMEOUT,
            retries: HealthCheck::DEFAULT_RETRIES,
            start_period: HealthCheck::DEFAULT_START_PERIOD,
            on_unhealthy: OnUnhealthy::Nothing,
        };
        let depends_on = vec![Dependency {
            name: name("db"),
            condition: Condition::Healthy,
        }];
        let base = ServiceConfig {
            start_grace: Duration::from_millis(250),
            start_timeout: Duration::from_secs(7),
            ..ServiceConfig::default()
        };
        let mut services = BTreeMap::new();
        services.insert(name("plain"), base.clone());
        services.insert(
            name("notifying"),
            ServiceConfig {
                notify: true,
                watchdog: Some(Duration::from_secs(2)),
                ..base.clone()
            },
        );
        services.insert(
            name("checked"),
            ServiceConfig {
                health: Some(check.clone()),
                depends_on: depends_on.clone(),
                ..base.clone()
            },
        );
        let defs = plan(&config(services), &[], &host());
        let def = |n: &str| defs.iter().find(|d| d.name.as_str() == n).unwrap();
        let signalled = ReadyWhen::Signalled {
            timeout: Duration::from_secs(7),
        };
        assert_eq!(
            def("plain").policy.ready,
            ReadyWhen::Grace(Duration::from_millis(250))
        );
        assert_eq!(def("notifying").policy.ready, signalled);
        assert!(def("notifying").notify);
        assert_eq!(def("notifying").watchdog, Some(Duration::from_secs(2)));
        assert_eq!(def("checked").policy.ready, signalled);
        assert_eq!(def("checked").health, Some(Box::new(check)));
        assert_eq!(def("checked").depends_on, depends_on);
        assert!(!def("checked").notify);
    }
}
