//! Which control socket a client verb talks to, and how it was chosen (for
//! the message when nothing answers there).

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use orchestrator_core::config::{Config, HostPaths};

pub const SOCKET_ENV: &str = "ORCHESTRATOR_SOCKET";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketOrigin {
    Flag,
    Env,
    /// The socket of the daemon run with this file.
    Config(PathBuf),
    /// No file here, but a zero-config daemon runs in this folder.
    ZeroConfigHere,
    /// Nothing here: a root daemon's.
    Standard,
}

impl fmt::Display for SocketOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocketOrigin::Flag => f.write_str("from --socket"),
            SocketOrigin::Env => write!(f, "from ${SOCKET_ENV}"),
            SocketOrigin::Config(file) => write!(f, "the socket of {}", file.display()),
            SocketOrigin::ZeroConfigHere => f.write_str("the zero-config daemon's in this folder"),
            SocketOrigin::Standard => f.write_str(
                "the standard socket, as no orchestrator.toml or daemon is in this folder",
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSocket {
    pub path: PathBuf,
    pub origin: SocketOrigin,
}

/// The socket a client verb uses: `--socket`, else `$ORCHESTRATOR_SOCKET`,
/// else the socket of the configuration found (`--config`,
/// `$ORCHESTRATOR_CONFIG`, `./orchestrator.toml`, or a root's standard
/// file), else that of a zero-config daemon in this folder if one runs,
/// else a root daemon's standard socket. `config` is `None` only when the
/// flag or the variable made loading it unnecessary.
pub fn client_socket(
    flag: Option<&Path>,
    env: Option<OsString>,
    config: Option<&Config>,
    host: &HostPaths,
    exists: impl Fn(&Path) -> bool,
) -> ClientSocket {
    let chosen = |path: PathBuf, origin| ClientSocket { path, origin };
    if let Some(path) = flag {
        return chosen(path.to_owned(), SocketOrigin::Flag);
    }
    if let Some(value) = env.filter(|value| !value.is_empty()) {
        return chosen(PathBuf::from(value), SocketOrigin::Env);
    }
    let Some(config) = config else {
        return chosen(host.socket.clone(), SocketOrigin::Standard);
    };
    let own = host.socket_of(config);
    match &config.source {
        Some(file) => chosen(own, SocketOrigin::Config(file.clone())),
        None if exists(&own) => chosen(own, SocketOrigin::ZeroConfigHere),
        None => chosen(host.socket.clone(), SocketOrigin::Standard),
    }
}

/// Whether the client needs the configuration at all to find its socket.
pub fn socket_given(flag: Option<&Path>, env: Option<&OsString>) -> bool {
    flag.is_some() || env.is_some_and(|value| !value.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use orchestrator_core::config::OrchestratorConfig;

    fn host() -> HostPaths {
        HostPaths {
            config: PathBuf::from("/nonexistent/etc/orchestrator.toml"),
            data_dir: PathBuf::from("/nonexistent/var/lib/orchestrator"),
            socket: PathBuf::from("/nonexistent/run/orchestrator.sock"),
        }
    }

    fn config(source: Option<&str>, data_dir: &str) -> Config {
        let mut orchestrator = OrchestratorConfig::defaults_in(Path::new("/x"));
        orchestrator.data_dir = PathBuf::from(data_dir);
        Config {
            source: source.map(PathBuf::from),
            orchestrator,
            services: Default::default(),
        }
    }

    #[test]
    fn the_flag_then_the_variable_then_the_config() {
        let file = config(Some("/p/orchestrator.toml"), "/p/.orchestrator");
        let env = || Some(OsString::from("/e.sock"));
        let any = |_: &Path| true;
        let found = client_socket(Some(Path::new("/f.sock")), env(), Some(&file), &host(), any);
        assert_eq!(
            (found.path.as_path(), &found.origin),
            (Path::new("/f.sock"), &SocketOrigin::Flag)
        );
        let found = client_socket(None, env(), Some(&file), &host(), any);
        assert_eq!(
            (found.path.as_path(), &found.origin),
            (Path::new("/e.sock"), &SocketOrigin::Env)
        );
        // An empty variable is no variable, as for ORCHESTRATOR_CONFIG.
        let found = client_socket(None, Some(OsString::new()), Some(&file), &host(), any);
        assert_eq!(found.path, Path::new("/p/.orchestrator/orchestrator.sock"));
        assert_eq!(
            found.origin,
            SocketOrigin::Config(PathBuf::from("/p/orchestrator.toml"))
        );
        assert!(
            found.origin.to_string().contains("/p/orchestrator.toml"),
            "{}",
            found.origin
        );
    }

    #[test]
    fn the_host_config_means_the_standard_socket() {
        let host = host();
        let file = config(Some("/nonexistent/etc/orchestrator.toml"), "/srv/state");
        let found = client_socket(None, None, Some(&file), &host, |_| false);
        assert_eq!(found.path, host.socket);
        assert!(matches!(found.origin, SocketOrigin::Config(_)));
    }

    #[test]
    fn zero_config_uses_a_daemon_here_else_the_standard_socket() {
        let host = host();
        let here = config(None, "/proj/.orchestrator");
        let own = PathBuf::from("/proj/.orchestrator/orchestrator.sock");
        let found = client_socket(None, None, Some(&here), &host, |path| path == own);
        assert_eq!(found.path, own);
        assert_eq!(found.origin, SocketOrigin::ZeroConfigHere);
        let found = client_socket(None, None, Some(&here), &host, |_| false);
        assert_eq!(found.path, host.socket);
        assert_eq!(found.origin, SocketOrigin::Standard);
        assert!(found.origin.to_string().starts_with("the standard socket"));
    }

    #[test]
    fn a_socket_is_given_by_the_flag_or_a_non_empty_variable() {
        assert!(socket_given(Some(Path::new("/s")), None));
        assert!(socket_given(None, Some(&OsString::from("/s"))));
        assert!(!socket_given(None, Some(&OsString::new())));
        assert!(!socket_given(None, None));
    }
}
