//! The control API under hostile or careless clients (issue 10): silent and
//! slow connections are closed, a flood is capped per listener and leaves
//! the services (and `status` on the other listener) their descriptors, and
//! an answer nobody reads does not hold a connection forever.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use orchestrator_e2e::*;
use serde_json::Value;

const TOKEN: &str = "t0ken";

/// A workspace with `extra` in `[orchestrator]`, a TCP listener on a free
/// port with a token, and `services` as `(name, args)` of the fixture (50 ms
/// backoff, restarts without end).
fn workspace(label: &str, extra: &str, services: &[(&str, &[&str])]) -> (TestDir, String) {
    let dir = TestDir::new(label);
    dir.write_file("token", TOKEN, 0o600);
    let addr = free_tcp_addr();
    let mut toml = format!(
        "[orchestrator]\nshutdown_timeout = \"5s\"\nhttp_listen = \"{addr}\"\n\
         http_token_file = \"token\"\n{extra}\n"
    );
    for (name, args) in services {
        dir.add_fixture_service(name);
        toml.push_str(&format!(
            "\n[services.{name}]\nargs = {args:?}\nstop_timeout = \"1s\"\n\
             max_restarts = 1000000\nbackoff = {{ initial = \"50ms\", max = \"100ms\" }}\n"
        ));
    }
    dir.write_file(CONFIG, &toml, 0o644);
    (dir, addr)
}

fn free_tcp_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

fn socket(dir: &TestDir) -> PathBuf {
    dir.data_dir().join("orchestrator.sock")
}

/// One request with `Connection: close`; the whole answer as text, or
/// `None` when the daemon could not be reached or did not answer in time.
fn exchange(mut stream: impl Read + Write, request: &str) -> Option<String> {
    stream.write_all(request.as_bytes()).ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).ok()?;
    Some(String::from_utf8_lossy(&answer).into_owned())
}

fn unix_get(socket: &Path, path: &str) -> Option<String> {
    let stream = UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    exchange(
        stream,
        &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
    )
}

fn tcp_request(addr: &str, method: &str, path: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

/// The services as JSON from `GET /v1/services` on the Unix socket.
fn services(socket: &Path) -> Option<Vec<Value>> {
    let answer = unix_get(socket, "/v1/services")?;
    if !answer.starts_with("HTTP/1.1 200") {
        return None;
    }
    let body = answer.split_once("\r\n\r\n")?.1;
    serde_json::from_str(body).ok()
}

fn service(socket: &Path, name: &str) -> Option<Value> {
    services(socket)?.into_iter().find(|s| s["name"] == name)
}

fn start(dir: &TestDir, prelude: Option<&str>, running: &[&str]) -> Daemon {
    let args = ["-c", CONFIG, "run"];
    let daemon = match prelude {
        Some(prelude) => Daemon::start_after_shell(dir.path(), prelude, &args),
        None => Daemon::start(dir.path(), &args),
    };
    let socket = socket(dir);
    let up = wait_until(DEADLINE, || {
        unix_get(&socket, "/healthz").is_some_and(|a| a.starts_with("HTTP/1.1 200"))
            && running.iter().all(|name| {
                service(&socket, name).is_some_and(|s| s["state"] == "running" && s["pid"].is_u64())
            })
    });
    assert!(up, "the daemon did not come up:\n{}", daemon.stderr_text());
    daemon
}

/// Whether the peer closes `stream` before `deadline`, reading (and
/// dropping) whatever it sends; `tick` runs between reads (a slow client
/// sends its next byte there).
fn closed_by_peer(
    stream: &mut (impl Read + Write),
    deadline: Duration,
    mut tick: impl FnMut(&mut dyn Write),
) -> bool {
    let start = Instant::now();
    let mut buffer = [0u8; 64 * 1024];
    while start.elapsed() < deadline {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(e) => panic!("reading the connection: {e}"),
        }
        tick(stream);
    }
    false
}

#[test]
fn silent_slow_and_half_sent_requests_are_closed_after_the_header_timeout() {
    let (dir, addr) = workspace("api-header-timeout", "api_header_timeout = \"1s\"", &[]);
    let _daemon = start(&dir, None, &[]);
    let socket = socket(&dir);
    let poll = Some(Duration::from_millis(200));

    let silent_unix = UnixStream::connect(&socket).unwrap();
    let mut half_unix = UnixStream::connect(&socket).unwrap();
    half_unix
        .write_all(b"GET /v1/services HTTP/1.1\r\nHost: loc")
        .unwrap();
    let silent_tcp = TcpStream::connect(&addr).unwrap();
    let mut slow_tcp = TcpStream::connect(&addr).unwrap();
    // A keep-alive connection, idle after its first answer.
    let mut idle_tcp = TcpStream::connect(&addr).unwrap();
    idle_tcp
        .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .unwrap();

    let mut streams: Vec<(&str, Box<dyn ReadWrite>)> = vec![
        ("silent unix", Box::new(silent_unix)),
        ("half-sent unix", Box::new(half_unix)),
        ("silent tcp", Box::new(silent_tcp)),
        ("idle keep-alive tcp", Box::new(idle_tcp)),
    ];
    for (what, stream) in &mut streams {
        stream.set_timeout(poll);
        assert!(
            closed_by_peer(stream, DEADLINE, |_| {}),
            "the {what} connection was still open after {DEADLINE:?}"
        );
    }
    // Slowloris: a byte of headers every 200 ms never completes them.
    slow_tcp.set_read_timeout(poll).unwrap();
    let mut request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nX-Slow: ")
        .into_bytes()
        .into_iter()
        .chain(std::iter::repeat(b'a'));
    let started = Instant::now();
    let closed = closed_by_peer(&mut slow_tcp, DEADLINE, |stream| {
        let _ = stream.write_all(&[request.next().unwrap()]);
    });
    assert!(closed, "a slowloris client kept its connection");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the slow client was closed only after {:?}",
        started.elapsed()
    );
    // And the API still answers.
    assert!(unix_get(&socket, "/healthz").is_some_and(|a| a.starts_with("HTTP/1.1 200")));
}

trait ReadWrite: Read + Write {
    fn set_timeout(&self, timeout: Option<Duration>);
}

impl ReadWrite for UnixStream {
    fn set_timeout(&self, timeout: Option<Duration>) {
        self.set_read_timeout(timeout).unwrap();
    }
}

impl ReadWrite for TcpStream {
    fn set_timeout(&self, timeout: Option<Duration>) {
        self.set_read_timeout(timeout).unwrap();
    }
}

#[test]
fn connections_over_the_cap_are_refused_at_once_and_the_cap_frees_up() {
    let (dir, addr) = workspace(
        "api-cap",
        "api_max_connections = 3\napi_header_timeout = \"1m\"",
        &[],
    );
    let _daemon = start(&dir, None, &[]);
    let socket = socket(&dir);
    let held: Vec<UnixStream> = (0..3)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    // The daemon accepts in its own time: the fourth is refused once the
    // three are counted.
    let mut refused = String::new();
    let counted = wait_until(DEADLINE, || {
        refused = unix_get(&socket, "/healthz").unwrap_or_default();
        refused.starts_with("HTTP/1.1 503")
    });
    assert!(counted, "a fourth connection was not refused: {refused:?}");
    assert!(refused.contains("too many connections"), "{refused}");
    // TCP has a cap of its own, untouched by the Unix socket's.
    let answer = exchange(
        TcpStream::connect(&addr).unwrap(),
        &tcp_request(&addr, "GET", "/v1/services"),
    )
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(held);
    assert!(
        wait_until(DEADLINE, || unix_get(&socket, "/healthz")
            .is_some_and(|a| a.starts_with("HTTP/1.1 200"))),
        "the cap did not free up once the connections closed"
    );
}

/// A configuration that needs more descriptors than the daemon may have:
/// with CAP_SYS_RESOURCE the daemon raises its hard limit to what it
/// needs; without it, it says at once how many it needs and what to raise,
/// instead of letting services fail one by one later.
#[test]
fn a_limit_too_low_for_the_services_is_raised_or_named_at_start() {
    let sections: String = (0..60)
        .map(|i| format!("\n[services.idle{i}]\ncommand = [\"/bin/true\"]\nenabled = false\n"))
        .collect();
    let (dir, _addr) = workspace("nofile-low", &sections, &[("steady", &["--sleep"])]);
    let daemon = start(&dir, Some("ulimit -n 256"), &["steady"]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).unwrap();
    let soft: u64 = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3)?.parse().ok())
        .expect("Max open files in /proc/PID/limits");
    let log = daemon.stderr_text();
    // 61 services at five descriptors each, and a margin of 64.
    let needed = 61 * 5 + 64;
    if soft >= needed {
        assert!(
            !log.contains("open files but"),
            "raised to {soft}, yet warned:\n{log}"
        );
    } else {
        assert_eq!(soft, 256, "{limits}");
        assert!(
            log.contains(&format!(
                "61 services need up to {needed} open files but the daemon's limit is 256 (hard 256)"
            )) && log.contains("LimitNOFILE="),
            "{log}"
        );
    }
}

/// 400 idle TCP connections (and some half-sent requests on the Unix
/// socket) against a daemon limited to 256 descriptors: `status` still
/// answers and a crashing service is still restarted, while the flood
/// lasts (the header timeout is long here, so only the cap can help).
#[test]
fn a_connection_flood_leaves_room_for_status_and_restarts() {
    let (dir, addr) = workspace(
        "api-flood",
        "api_header_timeout = \"5m\"",
        &[
            ("crashy", &["--sleep-ms", "20", "--exit", "1"]),
            ("steady", &["--ready", "--sleep"]),
        ],
    );
    let daemon = start(&dir, Some("ulimit -n 256"), &["steady"]);
    let socket = socket(&dir);
    let mut flood: Vec<TcpStream> = Vec::new();
    for _ in 0..400 {
        match TcpStream::connect(&addr) {
            Ok(stream) => flood.push(stream),
            // The kernel's accept queue is full: that is a flood too.
            Err(_) => break,
        }
    }
    let half_open: Vec<UnixStream> = (0..20)
        .map(|_| {
            let mut stream = UnixStream::connect(&socket).unwrap();
            let _ = stream.write_all(b"GET /v1/serv");
            stream
        })
        .collect();
    // Wait until the daemon has dealt with the flood: its accept queue is
    // empty, or it is out of descriptors (which is the bug).
    let port = addr.rsplit_once(':').unwrap().1.parse::<u16>().unwrap();
    let dealt = wait_until(DEADLINE, || {
        accept_queue(port) == Some(0) || fd_count(daemon.pid()).is_some_and(|n| n >= 250)
    });
    assert!(dealt, "the daemon did not take the flood in");

    let restarts = |deadline| {
        let mut found = None;
        wait_until(deadline, || {
            found = service(&socket, "crashy").and_then(|s| s["restarts"].as_u64());
            found.is_some()
        });
        found
    };
    let before = restarts(DEADLINE).unwrap_or_else(|| {
        panic!(
            "status did not answer during the flood; daemon log:\n{}",
            daemon.stderr_text()
        )
    });
    let mut after = before;
    let restarted = wait_until(DEADLINE, || {
        after = restarts(Duration::from_secs(5)).unwrap_or(after);
        after >= before + 3
    });
    assert!(
        restarted,
        "crashy was not restarted during the flood ({before} → {after}); daemon log:\n{}",
        daemon.stderr_text()
    );
    // TCP itself is full, and says so cheaply.
    let answer = exchange(
        TcpStream::connect(&addr).unwrap(),
        &tcp_request(&addr, "GET", "/healthz"),
    );
    assert!(
        answer.as_deref().unwrap_or("").starts_with("HTTP/1.1 503") || answer.is_none(),
        "{answer:?}"
    );
    let log = daemon.stderr_text();
    assert!(!log.contains("Too many open files"), "{log}");
    drop(flood);
    drop(half_open);
    // Once the flood ends, TCP answers again.
    assert!(wait_until(DEADLINE, || {
        TcpStream::connect(&addr)
            .ok()
            .and_then(|s| exchange(s, &tcp_request(&addr, "GET", "/v1/services")))
            .is_some_and(|a| a.starts_with("HTTP/1.1 200"))
    }));
}

/// A follower that stops reading is cut once its answer has been stuck for
/// `api_idle_timeout`; a follower that simply has nothing to read is not.
#[test]
fn a_client_that_stops_reading_is_cut_but_a_quiet_follower_is_not() {
    let (dir, addr) = workspace("api-idle", "api_idle_timeout = \"1s\"", &[]);
    let go = dir.join("go");
    let chatty_args = [
        "--ready",
        "--until-file",
        go.to_str().unwrap(),
        "--flood",
        "200000",
        "--sleep",
    ];
    let toml = std::fs::read_to_string(dir.join(CONFIG)).unwrap()
        + &format!(
            "\n[services.chatty]\nargs = {chatty_args:?}\nstop_timeout = \"1s\"\n\
             \n[services.steady]\nargs = [\"--ready\", \"--sleep\"]\nstop_timeout = \"1s\"\n"
        );
    dir.add_fixture_service("chatty");
    dir.add_fixture_service("steady");
    dir.write_file(CONFIG, &toml, 0o644);
    let daemon = start(&dir, None, &["chatty", "steady"]);

    // The quiet follower: events, read as they come.
    let mut quiet = TcpStream::connect(&addr).unwrap();
    quiet
        .write_all(tcp_request(&addr, "GET", "/v1/events?follow=true").as_bytes())
        .unwrap();
    quiet
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut seen = Vec::new();
    let mut read_quiet = |seen: &mut Vec<u8>| {
        let mut buffer = [0u8; 8192];
        match quiet.read(&mut buffer) {
            Ok(0) => panic!("the quiet follower was closed"),
            Ok(n) => seen.extend_from_slice(&buffer[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("the quiet follower: {e}"),
        }
    };
    assert!(wait_until(DEADLINE, || {
        read_quiet(&mut seen);
        String::from_utf8_lossy(&seen).contains("\"started\"")
    }));
    // The stuck follower: chatty's logs, never read.
    let mut stuck = TcpStream::connect(&addr).unwrap();
    stuck
        .write_all(tcp_request(&addr, "GET", "/v1/services/chatty/logs?follow=true").as_bytes())
        .unwrap();
    let stuck_port = stuck.local_addr().unwrap().port();
    assert!(wait_until(DEADLINE, || holds_connection(
        daemon.pid(),
        stuck_port
    )));
    std::fs::write(&go, "").unwrap();
    let cut = wait_until(Duration::from_secs(60), || {
        read_quiet(&mut seen);
        !holds_connection(daemon.pid(), stuck_port)
    });
    assert!(cut, "a follower that does not read was not cut");
    stuck
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(
        closed_by_peer(&mut stuck, DEADLINE, |_| {}),
        "the stuck follower's connection did not end"
    );

    // The quiet follower, idle far longer than 1 s, still gets news.
    seen.clear();
    let answer = exchange(
        TcpStream::connect(&addr).unwrap(),
        &tcp_request(&addr, "POST", "/v1/services/steady/restart"),
    )
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        wait_until(DEADLINE, || {
            read_quiet(&mut seen);
            String::from_utf8_lossy(&seen).contains("\"steady\"")
        }),
        "the quiet follower missed the restart: {}",
        String::from_utf8_lossy(&seen)
    );
}

/// How many connections wait in the accept queue of the IPv4 TCP listener
/// on `port` (`rx_queue` of a LISTEN socket in /proc/net/tcp).
fn accept_queue(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local_port = fields.get(1)?.rsplit_once(':')?.1;
        let listening = fields.get(3) == Some(&"0A");
        if !listening || u16::from_str_radix(local_port, 16).ok()? != port {
            return None;
        }
        let queue = fields.get(4)?.split_once(':')?.1;
        u64::from_str_radix(queue, 16).ok()
    })
}

/// Not a check but a measurement (issue 10 item 12): the daemon's RSS
/// before and after rounds of 2000-connection floods (half full requests,
/// half headers left unfinished), on TCP. Run it by hand:
/// `cargo test -p orchestrator --test api_hardening measure_rss -- --ignored --nocapture`
/// (`RSS_CONFIG="api_max_connections = 4000"` lets the whole flood in).
#[test]
#[ignore = "a measurement, run by hand"]
fn measure_rss_after_connection_floods() {
    // Extra [orchestrator] lines, e.g. "api_max_connections = 4000".
    let extra = std::env::var("RSS_CONFIG").unwrap_or_default();
    let (dir, addr) = workspace("api-rss", &extra, &[("steady", &["--ready", "--sleep"])]);
    let daemon = start(&dir, None, &["steady"]);
    let rss = || status_kib(daemon.pid(), "VmRSS").unwrap_or(0);
    let fds = fd_count(daemon.pid()).unwrap();
    println!("baseline: {} KiB", rss());
    for round in 1..=5 {
        let mut streams: Vec<TcpStream> = (0..2000)
            .filter_map(|_| TcpStream::connect(&addr).ok())
            .collect();
        for (i, stream) in streams.iter_mut().enumerate() {
            let request = tcp_request(&addr, "GET", "/v1/services");
            let sent = if i % 2 == 0 {
                &request[..]
            } else {
                &request[..20]
            };
            let _ = stream.write_all(sent.as_bytes());
        }
        let peak = wait_until(DEADLINE, || fd_count(daemon.pid()).unwrap_or(0) > fds + 100);
        let during = rss();
        drop(streams);
        wait_until(DEADLINE, || fd_count(daemon.pid()).unwrap_or(0) <= fds);
        // The lowest RSS seen over the next 2 s: trimming is asynchronous.
        let mut lowest = u64::MAX;
        wait_until(Duration::from_secs(2), || {
            lowest = lowest.min(rss());
            false
        });
        println!(
            "round {round}: {during} KiB with the flood open (took it in: {peak}), {lowest} KiB after"
        );
    }
}

/// Whether process `pid` holds the TCP connection whose other end is our
/// local port `port` (its socket inode is among the process's descriptors).
fn holds_connection(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote = u16::from_str_radix(fields.get(2)?.rsplit_once(':')?.1, 16).ok()?;
            let inode = fields.get(9)?;
            (remote == port).then(|| format!("socket:[{inode}]"))
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| {
            inodes
                .iter()
                .any(|inode| target.as_os_str() == inode.as_str())
        })
}
