//! `[services.NAME.health]`: exactly one probe (http, tcp, exec or grpc),
//! and how often and how patiently it runs.

use std::net::Ipv6Addr;
use std::ops::Range;
use std::time::Duration;

use super::cx::{Cx, Value};
use super::keys::{Field, Key, join_key};
use super::values::set;
use crate::config::model::ServiceConfig;
use crate::health::{HealthCheck, OnUnhealthy, Probe};

const ON_UNHEALTHY: &[(&str, OnUnhealthy)] = &[
    ("restart", OnUnhealthy::Restart),
    ("none", OnUnhealthy::Nothing),
];

const URL_EXAMPLE: &str = "http://127.0.0.1:8080/healthz";

/// The table as read, before its keys are checked against each other.
pub(super) struct Draft {
    /// Each probe key that is set: its name, where, and its probe when
    /// the value was valid.
    probes: Vec<(&'static str, Range<usize>, Option<Probe>)>,
    status: Option<(u16, Range<usize>)>,
    grpc_service: Option<(String, Range<usize>)>,
    interval: Duration,
    timeout: Duration,
    retries: u32,
    start_period: Duration,
    on_unhealthy: OnUnhealthy,
}

impl Default for Draft {
    fn default() -> Self {
        Draft {
            probes: Vec::new(),
            status: None,
            grpc_service: None,
            interval: HealthCheck::DEFAULT_INTERVAL,
            timeout: HealthCheck::DEFAULT_TIMEOUT,
            retries: HealthCheck::DEFAULT_RETRIES,
            start_period: HealthCheck::DEFAULT_START_PERIOD,
            on_unhealthy: OnUnhealthy::default(),
        }
    }
}

pub(super) const HEALTH_KEYS: &[Key<Draft>] = &[
    Key::new(
        "http",
        "an HTTP probe: the URL to GET, e.g. \"http://127.0.0.1:8080/healthz\"",
        |cx, f, out| {
            let probe = probe_text(cx, f, http_url).map(|url| Probe::Http {
                url,
                expect_status: None,
            });
            out.probes.push(("http", f.key.span(), probe));
        },
    ),
    Key::new(
        "tcp",
        "a TCP probe: the host:port to connect to",
        |cx, f, out| {
            let probe = probe_text(cx, f, address).map(|address| Probe::Tcp { address });
            out.probes.push(("tcp", f.key.span(), probe));
        },
    ),
    Key::new(
        "exec",
        "a command probe: the argv to run, healthy when it exits 0",
        |cx, f, out| {
            let probe = exec_argv(cx, &f.path, f.value).map(|argv| Probe::Exec { argv });
            out.probes.push(("exec", f.key.span(), probe));
        },
    ),
    Key::new(
        "grpc",
        "a gRPC probe: the host:port of a grpc.health.v1 server",
        |cx, f, out| {
            let probe = probe_text(cx, f, address).map(|address| Probe::Grpc {
                address,
                service: String::new(),
            });
            out.probes.push(("grpc", f.key.span(), probe));
        },
    ),
    Key::new("interval", "the pause between two checks", |cx, f, out| {
        let interval = cx.positive_duration(&f.path, f.value, "would probe without pause", "5s");
        set(&mut out.interval, interval);
    }),
    Key::new("timeout", "each check's deadline", |cx, f, out| {
        let timeout = cx.positive_duration(&f.path, f.value, "would fail every check", "1s");
        set(&mut out.timeout, timeout);
    }),
    Key::new(
        "retries",
        "consecutive failed checks before the service is unhealthy",
        |cx, f, out| {
            let retries = cx.integer_in(
                &f.path,
                f.value,
                1,
                u32::MAX.into(),
                "1 or more consecutive failures",
            );
            set(
                &mut out.retries,
                retries.and_then(|retries| u32::try_from(retries).ok()),
            );
        },
    ),
    Key::new(
        "start_period",
        "how long after a start failed checks do not count",
        |cx, f, out| set(&mut out.start_period, cx.duration(&f.path, f.value)),
    ),
    Key::new(
        "on_unhealthy",
        "what an unhealthy service gets: restart or none",
        |cx, f, out| {
            set(
                &mut out.on_unhealthy,
                cx.choice(&f.path, f.value, ON_UNHEALTHY),
            )
        },
    ),
    Key::new(
        "status",
        "the HTTP status the http probe expects (default: any 2xx or 3xx)",
        |cx, f, out| {
            let status = cx.integer_in(
                &f.path,
                f.value,
                100,
                599,
                "an HTTP status from 100 to 599, e.g. 200",
            );
            if let Some(status) = status.and_then(|status| u16::try_from(status).ok()) {
                out.status = Some((status, f.key.span()));
            }
        },
    ),
    Key::new(
        "grpc_service",
        "the service the grpc probe asks about (default \"\": the whole server)",
        |cx, f, out| {
            if let Some(service) = cx.string(&f.path, f.value) {
                out.grpc_service = Some((service.to_owned(), f.key.span()));
            }
        },
    ),
];

/// `health`: a `[services.NAME.health]` section or an inline table.
pub(super) fn read(cx: &mut Cx<'_>, f: &Field<'_, '_>, out: &mut ServiceConfig) {
    let Some(table) = f.value.get_ref().as_table() else {
        cx.mismatch(
            &f.path,
            f.value,
            &format!(
                "a table like {{ http = {URL_EXAMPLE:?} }}, or a [{}] section",
                f.path
            ),
        );
        return;
    };
    let before = cx.problems.len();
    let mut draft = Draft::default();
    let place = format!("in [{}]", f.path);
    cx.section(table, &f.path, &place, HEALTH_KEYS, f.base_dir, &mut draft);
    // The walk goes in key order; problems read better in the file's.
    draft.probes.sort_by_key(|(_, span, _)| span.start);
    let kind = match draft.probes.as_slice() {
        [] => {
            cx.report(
                f.key.span(),
                &f.path,
                format!(
                    "no probe: set exactly one of http, tcp, exec or grpc, e.g. \
                     http = {URL_EXAMPLE:?}"
                ),
            );
            None
        }
        [(kind, ..)] => Some(*kind),
        [_, (second, span, _), ..] => {
            let kinds: Vec<&str> = draft.probes.iter().map(|(kind, ..)| *kind).collect();
            cx.report(
                span.clone(),
                &join_key(&f.path, second),
                format!(
                    "{} each set a probe, and a health check has exactly one; keep one of them \
                     (to check several things, use an exec probe running a script that checks \
                     them all)",
                    kinds.join(" and ")
                ),
            );
            None
        }
    };
    // Only beside a single probe: without one, what to fix is the probe.
    if let (Some(kind), Some((_, span))) = (kind, &draft.status)
        && kind != "http"
    {
        cx.report(
            span.clone(),
            &join_key(&f.path, "status"),
            format!(
                "status is the HTTP status an http probe expects, and this check's probe is \
                 {kind}; remove status"
            ),
        );
    }
    if let (Some(kind), Some((_, span))) = (kind, &draft.grpc_service)
        && kind != "grpc"
    {
        cx.report(
            span.clone(),
            &join_key(&f.path, "grpc_service"),
            format!(
                "grpc_service names what a grpc probe asks about, and this check's probe is \
                 {kind}; remove grpc_service"
            ),
        );
    }
    if cx.problems.len() != before {
        return;
    }
    let Some((_, _, Some(mut probe))) = draft.probes.pop() else {
        return;
    };
    match &mut probe {
        Probe::Http { expect_status, .. } => {
            *expect_status = draft.status.map(|(status, _)| status)
        }
        Probe::Grpc { service, .. } => {
            if let Some((name, _)) = draft.grpc_service {
                *service = name;
            }
        }
        Probe::Tcp { .. } | Probe::Exec { .. } => {}
    }
    out.health = Some(HealthCheck {
        probe,
        interval: draft.interval,
        timeout: draft.timeout,
        retries: draft.retries,
        start_period: draft.start_period,
        on_unhealthy: draft.on_unhealthy,
    });
}

/// A probe's string value, checked by `check` (which says what is wrong).
fn probe_text(
    cx: &mut Cx<'_>,
    f: &Field<'_, '_>,
    check: fn(&str) -> Result<(), String>,
) -> Option<String> {
    let text = cx.string(&f.path, f.value)?;
    // `{instance}` (a port per instance, say) becomes a number later:
    // checked as one.
    match check(&text.replace("{instance}", "0")) {
        Ok(()) => Some(text.to_owned()),
        Err(message) => {
            cx.report(f.value.span(), &f.path, message);
            None
        }
    }
}

fn exec_argv(cx: &mut Cx<'_>, path: &str, value: &Value<'_>) -> Option<Vec<String>> {
    let argv = cx.strings(path, value)?;
    let problem = match argv.first() {
        None => "empty exec; give the program and its arguments, e.g. [\"pg_isready\", \"-q\"]",
        Some(program) if program.is_empty() => {
            "the program (first element of exec) is empty; name the program to run"
        }
        Some(_) => return Some(argv),
    };
    cx.report(value.span(), path, problem);
    None
}

/// What is wrong with `text` as the http probe's URL: plain HTTP to a host
/// and an optional port.
fn http_url(text: &str) -> Result<(), String> {
    let scheme = text.split_once("://").map(|(scheme, _)| scheme);
    if scheme.is_some_and(|scheme| scheme.eq_ignore_ascii_case("https")) {
        return Err(format!(
            "https is not supported: the http probe speaks plain HTTP, without TLS; for TLS \
             use an exec probe with curl instead, e.g. exec = [\"curl\", \"-fsS\", \"-o\", \
             \"/dev/null\", {text:?}]"
        ));
    }
    let rest = match text.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        _ => {
            return Err(format!(
                "invalid URL {text:?}: it must start with http://, e.g. {URL_EXAMPLE:?}"
            ));
        }
    };
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "invalid URL {text:?}: it contains a space or a control character; percent-encode \
             it (a space is %20)"
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(format!(
            "invalid URL {text:?}: a user name or password is not supported by the http \
             probe; use an exec probe with curl -u instead"
        ));
    }
    if authority.is_empty() {
        return Err(format!(
            "invalid URL {text:?}: it has no host, e.g. {URL_EXAMPLE:?}"
        ));
    }
    host_port(authority, false).map_err(|reason| format!("invalid URL {text:?}: {reason}"))
}

/// What is wrong with `text` as a tcp or grpc probe's "host:port".
fn address(text: &str) -> Result<(), String> {
    if let Some((_, rest)) = text.split_once("://") {
        return Err(format!(
            "invalid address {text:?}: write host:port without a scheme, e.g. {rest:?}"
        ));
    }
    host_port(text, true).map_err(|reason| format!("invalid address {text:?}: {reason}"))
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`; a port is a number from 1.
fn host_port(text: &str, port_required: bool) -> Result<(), String> {
    const SHAPE: &str = "write host:port, e.g. \"127.0.0.1:8080\"";
    let (host, port) = match text.strip_prefix('[') {
        Some(bracketed) => {
            let Some((v6, after)) = bracketed.split_once(']') else {
                return Err("the IPv6 address lacks its closing ']'".to_owned());
            };
            if v6.parse::<Ipv6Addr>().is_err() {
                return Err(format!("{v6:?} in brackets is not an IPv6 address"));
            }
            match after {
                "" => (v6, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (v6, Some(port)),
                    None => return Err(format!("{after:?} after the address; {SHAPE}")),
                },
            }
        }
        None => match text.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => {
                return Err(
                    "an IPv6 address goes in brackets, the port after them, e.g. \"[::1]:8080\""
                        .to_owned(),
                );
            }
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        },
    };
    if host.is_empty() {
        return Err(format!("no host; {SHAPE}"));
    }
    let name_like = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    if !text.starts_with('[') && !host.chars().all(name_like) {
        return Err(format!(
            "{host:?} is neither a host name nor an IP address; {SHAPE}"
        ));
    }
    match port {
        None if port_required => Err(format!("no port; write {host}:PORT, e.g. \"{host}:8080\"")),
        None => Ok(()),
        Some(port) => match port.parse::<u16>() {
            Ok(1..) => Ok(()),
            _ => Err(format!(
                "{port:?} is not a port; use a number from 1 to 65535"
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::test_support::*;

    fn health(text: &str) -> HealthCheck {
        service(text).health.expect("a health check")
    }

    /// Each (file text, line, key, parts of the message) yields exactly
    /// that one problem.
    fn each_problem(cases: &[(&str, usize, &str, &[&str])]) {
        for &(text, line, key, parts) in cases {
            let message = one_problem(text, line, key);
            for part in parts {
                assert!(message.contains(part), "{text}:\n{message}\nlacks {part:?}");
            }
        }
    }

    #[test]
    fn each_probe_kind_with_the_defaults() {
        let check = health(
            "[services.api]\n[services.api.health]\nhttp = \"http://127.0.0.1:8080/healthz\"\n",
        );
        assert_eq!(
            check,
            HealthCheck {
                probe: Probe::Http {
                    url: "http://127.0.0.1:8080/healthz".into(),
                    expect_status: None
                },
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(1),
                retries: 3,
                start_period: Duration::ZERO,
                on_unhealthy: OnUnhealthy::Restart,
            }
        );
        assert_eq!(
            health("[services.api]\nhealth = { tcp = \"localhost:5432\" }\n").probe,
            Probe::Tcp {
                address: "localhost:5432".into()
            }
        );
        assert_eq!(
            health("[services.api.health]\nexec = [\"pg_isready\", \"-q\"]\n").probe,
            Probe::Exec {
                argv: vec!["pg_isready".into(), "-q".into()]
            }
        );
        assert_eq!(
            health("[services.api.health]\ngrpc = \"[::1]:50051\"\n").probe,
            Probe::Grpc {
                address: "[::1]:50051".into(),
                service: String::new()
            }
        );
        assert_eq!(service("[services.api]\n").health, None);
    }

    #[test]
    fn every_key_of_a_full_check_is_read() {
        let check = health(
            r#"
[services.api.health]
http = "HTTP://api.internal/ready?full=1"
status = 204
interval = "10s"
timeout = 2
retries = 5
start_period = "1m"
on_unhealthy = "none"
"#,
        );
        assert_eq!(
            check,
            HealthCheck {
                probe: Probe::Http {
                    url: "HTTP://api.internal/ready?full=1".into(),
                    expect_status: Some(204)
                },
                interval: Duration::from_secs(10),
                timeout: Duration::from_secs(2),
                retries: 5,
                start_period: Duration::from_secs(60),
                on_unhealthy: OnUnhealthy::Nothing,
            }
        );
        let check =
            health("[services.api.health]\ngrpc = \"db:1\"\ngrpc_service = \"db.v1.Store\"\n");
        assert_eq!(
            check.probe,
            Probe::Grpc {
                address: "db:1".into(),
                service: "db.v1.Store".into()
            }
        );
    }

    #[test]
    fn exactly_one_probe() {
        each_problem(&[
            (
                "[services.api]\n\n[services.api.health]\ninterval = \"1s\"\n",
                3,
                "services.api.health",
                &["no probe: set exactly one of http, tcp, exec or grpc"],
            ),
            (
                "[services.api]\nhealth = {}\n",
                2,
                "services.api.health",
                &["no probe"],
            ),
            (
                "[services.api.health]\ntcp = \"a:1\"\nhttp = \"http://a\"\n",
                3,
                "services.api.health.http",
                &[
                    "tcp and http each set a probe",
                    "exactly one; keep one of them",
                ],
            ),
            (
                "[services.api.health]\nexec = [\"true\"]\ngrpc = \"a:1\"\ntcp = \"a:1\"\n",
                3,
                "services.api.health.grpc",
                &["exec and grpc and tcp each set a probe"],
            ),
        ]);
    }

    #[test]
    fn http_urls_are_plain_http_to_a_host() {
        let key = "services.api.health.http";
        let at = |url: &str| format!("[services.api.health]\nhttp = {url:?}\n");
        let cases = [
            (
                "https://api/healthz",
                "https is not supported: the http probe speaks plain HTTP, without TLS; for TLS use an exec probe with curl instead, e.g. exec = [\"curl\", \"-fsS\", \"-o\", \"/dev/null\", \"https://api/healthz\"]",
            ),
            ("HTTPS://api/", "https is not supported"),
            ("127.0.0.1:8080/healthz", "it must start with http://"),
            ("ftp://x/", "it must start with http://"),
            ("http://", "it has no host"),
            ("http:///healthz", "it has no host"),
            ("http://a b/", "percent-encode"),
            ("http://u:p@a/", "curl -u"),
            ("http://a:0/", "\"0\" is not a port"),
            ("http://a:99999/", "use a number from 1 to 65535"),
            ("http://a:/", "\"\" is not a port"),
            ("http://::1/", "goes in brackets"),
            ("http://[::1/", "lacks its closing ']'"),
            ("http://[nope]:80/", "is not an IPv6 address"),
            ("http://a%2f/", "neither a host name nor an IP address"),
        ];
        for (url, part) in cases {
            let message = one_problem(&at(url), 2, key);
            assert!(message.contains(part), "{url}: {message}");
        }
        for url in [
            "http://a",
            "http://10.0.0.1:80",
            "http://[::1]/x",
            "http://[fe80::1]:8080/x?y#z",
            "http://svc_1.local:65535/",
        ] {
            assert!(service(&at(url)).health.is_some(), "{url}");
        }
    }

    #[test]
    fn tcp_and_grpc_addresses_are_host_and_port() {
        for kind in ["tcp", "grpc"] {
            let key = format!("services.api.health.{kind}");
            let at = |address: &str| format!("[services.api.health]\n{kind} = {address:?}\n");
            for (address, part) in [
                (
                    "localhost",
                    "no port; write localhost:PORT, e.g. \"localhost:8080\"",
                ),
                (":80", "no host"),
                ("", "no host"),
                ("a:x", "\"x\" is not a port"),
                ("::1:80", "goes in brackets"),
                ("[::1]", "no port"),
                ("[::1]80", "after the address"),
                ("tcp://a:1", "without a scheme, e.g. \"a:1\""),
                ("a/b:1", "neither a host name nor an IP address"),
            ] {
                let message = one_problem(&at(address), 2, &key);
                assert!(message.contains(part), "{kind} {address}: {message}");
                assert!(message.starts_with("invalid address"), "{message}");
            }
            assert!(service(&at("[::1]:9")).health.is_some());
            assert!(service(&at("db-1.example:5432")).health.is_some());
        }
        let message = one_problem(
            "[services.api.health]\ntcp = 8080\n",
            2,
            "services.api.health.tcp",
        );
        assert!(
            message.contains("expected a string, found integer"),
            "{message}"
        );
    }

    #[test]
    fn exec_is_a_non_empty_argv() {
        each_problem(&[
            (
                "[services.api.health]\nexec = []\n",
                2,
                "services.api.health.exec",
                &["empty exec; give the program and its arguments"],
            ),
            (
                "[services.api.health]\nexec = [\"\", \"x\"]\n",
                2,
                "services.api.health.exec",
                &["the program (first element of exec) is empty"],
            ),
            (
                "[services.api.health]\nexec = \"curl -f x\"\n",
                2,
                "services.api.health.exec",
                &["expected an array of strings, found string"],
            ),
            (
                "[services.api.health]\nexec = [\"a\", 1]\n",
                2,
                "services.api.health.exec[1]",
                &["expected a string, found integer"],
            ),
        ]);
    }

    #[test]
    fn timing_and_policy_values_are_checked() {
        let key = |name: &str| format!("services.api.health.{name}");
        let text = |line: &str| format!("[services.api.health]\ntcp = \"a:1\"\n{line}\n");
        let cases: &[(&str, &str, &str)] = &[
            (
                "interval = 0",
                "interval",
                "0 would probe without pause; use a positive duration, e.g. \"5s\"",
            ),
            ("interval = \"0ms\"", "interval", "positive duration"),
            ("timeout = \"0s\"", "timeout", "0 would fail every check"),
            ("timeout = \"soon\"", "timeout", "invalid duration"),
            (
                "retries = 0",
                "retries",
                "0 is out of range; use 1 or more consecutive failures",
            ),
            ("retries = 4294967296", "retries", "out of range"),
            ("retries = \"3\"", "retries", "expected an integer"),
            ("start_period = -1", "start_period", "negative"),
            (
                "on_unhealthy = \"stop\"",
                "on_unhealthy",
                "invalid value \"stop\"; use one of restart, none",
            ),
        ];
        for (line, name, part) in cases {
            let message = one_problem(&text(line), 3, &key(name));
            assert!(message.contains(part), "{line}: {message}");
        }
        assert_eq!(
            health(&text("start_period = 0\nretries = 1")).start_period,
            Duration::ZERO
        );
    }

    #[test]
    fn status_goes_with_http_and_grpc_service_with_grpc() {
        each_problem(&[
            (
                "[services.api.health]\ntcp = \"a:1\"\nstatus = 200\n",
                3,
                "services.api.health.status",
                &["this check's probe is tcp; remove status"],
            ),
            (
                "[services.api.health]\nhttp = \"http://a\"\ngrpc_service = \"x\"\n",
                3,
                "services.api.health.grpc_service",
                &["this check's probe is http; remove grpc_service"],
            ),
            (
                "[services.api.health]\nhttp = \"http://a\"\nstatus = 99\n",
                3,
                "services.api.health.status",
                &["99 is out of range; use an HTTP status from 100 to 599"],
            ),
            (
                "[services.api.health]\nhttp = \"http://a\"\nstatus = 600\n",
                3,
                "services.api.health.status",
                &["out of range"],
            ),
        ]);
        // Without a probe, the probe is what to fix: one problem.
        let found = problems("[services.api.health]\nstatus = 200\n");
        assert_eq!(found.len(), 1, "{found:#?}");
    }

    #[test]
    fn unknown_keys_in_the_check_get_a_suggestion() {
        each_problem(&[
            (
                "[services.api.health]\ntcp = \"a:1\"\nretrys = 3\n",
                3,
                "services.api.health.retrys",
                &[
                    "unknown key \"retrys\" in [services.api.health]",
                    "did you mean \"retries\"? (consecutive failed checks before the service is unhealthy)",
                    "valid keys: http, tcp, exec, grpc, interval, timeout, retries",
                ],
            ),
            (
                "[services.api]\nhealth = { htp = \"http://a\", tcp = \"a:1\" }\n",
                2,
                "services.api.health.htp",
                &["did you mean \"http\"?"],
            ),
            (
                "[services.api]\nhealth = \"http://a\"\n",
                2,
                "services.api.health",
                &[
                    "expected a table like { http = \"http://127.0.0.1:8080/healthz\" }, or a [services.api.health] section, found string",
                ],
            ),
        ]);
    }
}
