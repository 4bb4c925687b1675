//! A service for tests, driven by flags. It accepts the injected
//! `--service NAME --log-level LEVEL` and then, in order of the flags:
//!
//!   --arg VALUE           do nothing with VALUE (for argv tests)
//!   --ready               print `READY pid=P pgid=G` on stdout
//!   --pid-file PATH       append `PID\n` to PATH (counts spawns)
//!   --print-args          print `ARG <each argv element>`
//!   --print-env           print `ENV K=V` per environment variable
//!   --print-cwd           print `CWD <dir>`
//!   --print-fds           print `FD <n> <target>` per open descriptor
//!   --print-cgroup        print `CGROUP <line>` per line of /proc/self/cgroup
//!   --touch PATH          create the file PATH (a side effect to look for)
//!   --stamp PATH          write the wall-clock time (ns since the epoch) to
//!                         PATH: when this service reached the flag, for a
//!                         benchmark's clock (bench/bench.py's log capture)
//!   --lines N             print N numbered lines, alternating stdout/stderr
//!   --flood N             print N numbered 100-byte lines on stdout, fast
//!                         (in writes of 64 KiB, or of --flood-write-bytes B:
//!                         4096 is what C stdio writes to a pipe)
//!   --long-line N         print one line of N bytes `x`
//!   --invalid-utf8        print a line holding bytes that are not UTF-8
//!   --spew-bytes N        print N bytes holding every byte value but `\n`
//!                         (NUL, `\r`, ESC, invalid UTF-8...), then one `\n`
//!   --partial TEXT        print TEXT without a newline
//!   --print TEXT          print TEXT and a newline
//!   --grandchild          start a child of our own that sleeps forever,
//!                         and print `GRANDCHILD pid=P`
//!   --orphan-life-ms MS   processes started by later --orphan and
//!                         --setsid-child flags live MS ms (default 100)
//!   --orphan-until PATH   ... or live until PATH exists (polled every 10 ms)
//!   --orphan N            start N processes that are orphaned at once (the
//!                         helper that started each one exits), so they are
//!                         reparented to the nearest subreaper; print
//!                         `ORPHAN pid=P` for each, then `ORPHANS n=N`. They
//!                         stay in our process group; their output goes to
//!                         /dev/null
//!   --setsid-child        start a child of our own in a new session (it
//!                         escapes our process group) and print
//!                         `SETSID_CHILD pid=P`; it lives as --orphan ones do
//!   --until-file PATH     wait until PATH exists (polled every 10 ms)
//!   --ignore-term         ignore SIGTERM from now on
//!   --close-stdout        close stdout and stderr: descriptors 1 and 2 are
//!                         pointed at /dev/null, so the pipes see EOF
//!   --sleep-ms N          sleep N ms
//!   --sleep               sleep forever
//!   --tick-ms N           forever: print `tick K` on stdout (K = 0, 1, ...)
//!                         every N ms
//!   --exit CODE           exit with CODE
//!   --eprint TEXT         print TEXT and a newline on stderr
//!
//! Readiness (sd_notify, probes). The background ones start a thread and
//! go on with the next flag; they keep running while later flags (--sleep,
//! --until-file...) do.
//!
//!   --notify TEXT         send TEXT as one datagram to $NOTIFY_SOCKET (a
//!                         path, or `@name` for an abstract socket), e.g.
//!                         `--notify READY=1`, `--notify "STATUS=warming up"`
//!   --notify-from-child TEXT
//!                         the same, sent by a child process of ours, in our
//!                         process group, that exits at once. It is left
//!                         unreaped (a zombie) until we exit: so its pid
//!                         still names a member of our group whenever the
//!                         daemon looks the sender up
//!   --watchdog-ping-ms N  background: send WATCHDOG=1 every N ms (the first
//!                         at once)
//!   --watchdog-stop-file PATH
//!                         the pinger stops for good once PATH exists
//!                         (looked at before each ping; applies wherever
//!                         it is among the flags)
//!   --http-health PORT    background: serve HTTP on 127.0.0.1:PORT (0 =
//!                         any free port) and print `HTTP port=P`. GET of
//!                         any path: 200 `ok`, or 500 `unhealthy` while the
//!                         --unhealthy-file exists; other methods: 405
//!   --unhealthy-file PATH looked at per request (applies wherever it is
//!                         among the flags)
//!   --tcp-listen PORT     background: listen on 127.0.0.1:PORT (0 = any free
//!                         port), print `TCP port=P`, accept and drop
//!                         connections
//!
//! No flags after the injected ones: sleep forever.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Whether `path` is set and exists.
fn exists(path: Option<&PathBuf>) -> bool {
    path.is_some_and(|p| p.exists())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Internal: the helper of --orphan. Start `ME REST...`, print its pid and
    // exit at once without waiting for it.
    if args.first().map(String::as_str) == Some("--spawn-orphan") {
        // Not waited for: orphaning it is the point.
        #[allow(clippy::zombie_processes)]
        let child = orphan_command(&args[1..]).spawn().unwrap();
        println!("{}", child.id());
        return;
    }
    // Internal: the child of --notify-from-child.
    if args.first().map(String::as_str) == Some("--send-notify") {
        notify(args.get(1).expect("--send-notify needs a value"));
        return;
    }
    let mut out = std::io::stdout().lock();
    let mut i = 0;
    let mut acted = false;
    // What --orphan and --setsid-child processes run.
    let mut orphan_args: Vec<String> = vec![
        "--sleep-ms".to_owned(),
        "100".to_owned(),
        "--exit".to_owned(),
        "0".to_owned(),
    ];
    // Settings rather than actions: read before the first flag runs, so
    // that a background thread started earlier sees them at once.
    let setting = |flag: &str| -> Option<PathBuf> {
        args.windows(2)
            .find(|pair| pair[0] == flag)
            .map(|pair| PathBuf::from(&pair[1]))
    };
    let flood_write_bytes: usize = setting("--flood-write-bytes")
        .map_or(1 << 16, |bytes| bytes.to_str().unwrap().parse().unwrap());
    let watchdog_stop_file = setting("--watchdog-stop-file");
    let unhealthy_file = setting("--unhealthy-file");
    let value = |i: usize| -> String {
        args.get(i + 1)
            .cloned()
            .unwrap_or_else(|| panic!("{} needs a value", args[i]))
    };
    while i < args.len() {
        let flag = args[i].as_str();
        match flag {
            "--service" | "--log-level" => {
                i += 2;
                continue;
            }
            _ => acted = true,
        }
        match flag {
            "--arg" => i += 1,
            "--ready" => {
                let pid = std::process::id();
                let pgid = std::fs::read_to_string("/proc/self/stat")
                    .ok()
                    .and_then(|stat| {
                        let after = stat.rsplit_once(')')?.1.to_owned();
                        after.split_whitespace().nth(2).map(str::to_owned)
                    })
                    .unwrap_or_default();
                writeln!(out, "READY pid={pid} pgid={pgid}").unwrap();
            }
            "--pid-file" => {
                let path = value(i);
                i += 1;
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .unwrap();
                writeln!(file, "{}", std::process::id()).unwrap();
            }
            "--print-args" => {
                for arg in std::env::args() {
                    writeln!(out, "ARG {arg}").unwrap();
                }
            }
            "--print-env" => {
                for (key, val) in std::env::vars_os() {
                    writeln!(
                        out,
                        "ENV {}={}",
                        key.to_string_lossy(),
                        val.to_string_lossy()
                    )
                    .unwrap();
                }
            }
            "--print-cwd" => {
                let cwd = std::env::current_dir().unwrap();
                writeln!(out, "CWD {}", cwd.display()).unwrap();
            }
            "--print-fds" => {
                let mut fds: Vec<(i32, String)> = std::fs::read_dir("/proc/self/fd")
                    .unwrap()
                    .filter_map(|e| {
                        let e = e.ok()?;
                        let fd = e.file_name().to_str()?.parse().ok()?;
                        let target = std::fs::read_link(e.path()).ok()?;
                        Some((fd, target.display().to_string()))
                    })
                    .collect();
                fds.sort();
                for (fd, target) in fds {
                    writeln!(out, "FD {fd} {target}").unwrap();
                }
            }
            "--print-cgroup" => {
                for line in std::fs::read_to_string("/proc/self/cgroup")
                    .unwrap()
                    .lines()
                {
                    writeln!(out, "CGROUP {line}").unwrap();
                }
                out.flush().unwrap();
            }
            "--touch" => {
                std::fs::write(value(i), "").unwrap();
                i += 1;
            }
            "--stamp" => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| since.as_nanos());
                std::fs::write(value(i), nanos.to_string()).unwrap();
                i += 1;
            }
            "--lines" => {
                let n: u64 = value(i).parse().unwrap();
                i += 1;
                let mut err = std::io::stderr().lock();
                for k in 0..n {
                    if k % 2 == 0 {
                        writeln!(out, "line {k} on stdout").unwrap();
                    } else {
                        writeln!(err, "line {k} on stderr").unwrap();
                    }
                }
            }
            "--flood" => {
                let n: u64 = value(i).parse().unwrap();
                i += 1;
                let mut buf =
                    std::io::BufWriter::with_capacity(flood_write_bytes, std::io::stdout());
                // 100 bytes with the newline; only the number changes, so
                // the generator costs about what `yes | head` does and the
                // benchmark measures the reader, not our formatting.
                let mut line = [b'y'; 100];
                line[..6].copy_from_slice(b"flood ");
                line[18] = b' ';
                line[99] = b'\n';
                for k in 0..n {
                    let mut rest = k;
                    for digit in line[6..18].iter_mut().rev() {
                        *digit = b'0' + (rest % 10) as u8;
                        rest /= 10;
                    }
                    buf.write_all(&line).unwrap();
                }
                buf.flush().unwrap();
            }
            "--long-line" => {
                let n: usize = value(i).parse().unwrap();
                i += 1;
                out.write_all(&vec![b'x'; n]).unwrap();
                out.write_all(b"\n").unwrap();
            }
            "--invalid-utf8" => {
                out.write_all(b"bad \xff\xfe bytes\n").unwrap();
            }
            "--spew-bytes" => {
                let n: usize = value(i).parse().unwrap();
                i += 1;
                let pattern: Vec<u8> = (0..=255u8).filter(|&b| b != b'\n').collect();
                let mut left = n;
                while left > 0 {
                    let take = left.min(pattern.len());
                    out.write_all(&pattern[..take]).unwrap();
                    left -= take;
                }
                out.write_all(b"\n").unwrap();
            }
            "--orphan-life-ms" => {
                let ms: u64 = value(i).parse().unwrap();
                i += 1;
                orphan_args = vec![
                    "--sleep-ms".to_owned(),
                    ms.to_string(),
                    "--exit".to_owned(),
                    "0".to_owned(),
                ];
            }
            "--orphan-until" => {
                let path = value(i);
                i += 1;
                orphan_args = vec![
                    "--until-file".to_owned(),
                    path,
                    "--exit".to_owned(),
                    "0".to_owned(),
                ];
            }
            "--orphan" => {
                let n: u64 = value(i).parse().unwrap();
                i += 1;
                let me = std::env::current_exe().unwrap();
                for _ in 0..n {
                    let helper = Command::new(&me)
                        .arg("--spawn-orphan")
                        .args(&orphan_args)
                        .stdin(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .output()
                        .unwrap();
                    assert!(helper.status.success(), "the orphan helper failed");
                    let pid = String::from_utf8_lossy(&helper.stdout).trim().to_owned();
                    writeln!(out, "ORPHAN pid={pid}").unwrap();
                }
                writeln!(out, "ORPHANS n={n}").unwrap();
                out.flush().unwrap();
            }
            "--setsid-child" => {
                let mut command = orphan_command(&orphan_args);
                // SAFETY: setsid is async-signal-safe and touches no memory
                // of ours; the new process is alone in its group, so it
                // cannot fail with EPERM.
                unsafe {
                    command.pre_exec(|| {
                        unsafe extern "C" {
                            fn setsid() -> i32;
                        }
                        if setsid() < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                #[allow(clippy::zombie_processes)]
                let child = command.spawn().unwrap();
                writeln!(out, "SETSID_CHILD pid={}", child.id()).unwrap();
                out.flush().unwrap();
            }
            "--until-file" => {
                let path = std::path::PathBuf::from(value(i));
                i += 1;
                out.flush().unwrap();
                while !path.exists() {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            "--print" => {
                let text = value(i);
                i += 1;
                writeln!(out, "{text}").unwrap();
                out.flush().unwrap();
            }
            "--partial" => {
                let text = value(i);
                i += 1;
                out.write_all(text.as_bytes()).unwrap();
            }
            "--grandchild" => {
                let me = std::env::current_exe().unwrap();
                #[allow(clippy::zombie_processes)]
                let child = Command::new(me).arg("--sleep").spawn().unwrap();
                writeln!(out, "GRANDCHILD pid={}", child.id()).unwrap();
                // Dropping the handle leaves it running: that is the point.
            }
            "--ignore-term" => ignore_sigterm(),
            "--close-stdout" => {
                out.flush().unwrap();
                close_stdout_and_stderr();
            }
            "--sleep-ms" => {
                let ms: u64 = value(i).parse().unwrap();
                i += 1;
                out.flush().unwrap();
                std::thread::sleep(Duration::from_millis(ms));
            }
            "--sleep" => sleep_forever(&mut out),
            "--tick-ms" => {
                let ms: u64 = value(i).parse().unwrap();
                for k in 0u64.. {
                    writeln!(out, "tick {k}").unwrap();
                    out.flush().unwrap();
                    std::thread::sleep(Duration::from_millis(ms));
                }
            }
            "--eprint" => {
                eprintln!("{}", value(i));
                i += 1;
            }
            "--notify" => {
                notify(&value(i));
                i += 1;
            }
            "--notify-from-child" => {
                // Not waited for: see the header.
                #[allow(clippy::zombie_processes)]
                let mut child = Command::new(std::env::current_exe().unwrap())
                    .args(["--send-notify", &value(i)])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                i += 1;
                // EOF once it has exited: its datagram is queued before any
                // we send after this flag.
                let mut sink = Vec::new();
                child.stdout.take().unwrap().read_to_end(&mut sink).unwrap();
            }
            // Read before the loop.
            "--watchdog-stop-file" | "--unhealthy-file" | "--flood-write-bytes" => i += 1,
            "--watchdog-ping-ms" => {
                let ms: u64 = value(i).parse().unwrap();
                i += 1;
                let stop = watchdog_stop_file.clone();
                let socket = notify_socket();
                std::thread::spawn(move || {
                    while !exists(stop.as_ref()) {
                        // A daemon that is restarting us may have closed the
                        // socket already: not our failure.
                        let _ = socket.send(b"WATCHDOG=1");
                        std::thread::sleep(Duration::from_millis(ms));
                    }
                });
            }
            "--http-health" => {
                let listener = listen(&value(i));
                i += 1;
                let port = listener.local_addr().unwrap().port();
                writeln!(out, "HTTP port={port}").unwrap();
                out.flush().unwrap();
                let unhealthy = unhealthy_file.clone();
                std::thread::spawn(move || {
                    for stream in listener.incoming().flatten() {
                        let unhealthy = unhealthy.clone();
                        // One thread each: a client that sends nothing must
                        // not hold up the next probe.
                        std::thread::spawn(move || answer_http(stream, unhealthy.as_ref()));
                    }
                });
            }
            "--tcp-listen" => {
                let listener = listen(&value(i));
                i += 1;
                let port = listener.local_addr().unwrap().port();
                writeln!(out, "TCP port={port}").unwrap();
                out.flush().unwrap();
                std::thread::spawn(move || {
                    for stream in listener.incoming() {
                        drop(stream);
                    }
                });
            }
            "--exit" => {
                let code: i32 = value(i).parse().unwrap();
                out.flush().unwrap();
                std::process::exit(code);
            }
            other => panic!("fixture-service: unknown flag {other}"),
        }
        i += 1;
    }
    if !acted {
        sleep_forever(&mut out);
    }
    out.flush().unwrap();
}

/// A socket connected to $NOTIFY_SOCKET: a path, or `@name` for an
/// abstract one, as sd_notify takes it.
fn notify_socket() -> UnixDatagram {
    let address = std::env::var("NOTIFY_SOCKET").expect("NOTIFY_SOCKET is not set");
    let socket = UnixDatagram::unbound().unwrap();
    match address.strip_prefix('@') {
        Some(name) => socket
            .connect_addr(&SocketAddr::from_abstract_name(name).unwrap())
            .unwrap_or_else(|e| panic!("cannot reach NOTIFY_SOCKET={address}: {e}")),
        None => socket
            .connect(&address)
            .unwrap_or_else(|e| panic!("cannot reach NOTIFY_SOCKET={address}: {e}")),
    }
    socket
}

fn notify(text: &str) {
    notify_socket().send(text.as_bytes()).unwrap();
}

fn listen(port: &str) -> TcpListener {
    let port: u16 = port.parse().unwrap();
    TcpListener::bind(("127.0.0.1", port)).unwrap()
}

/// One HTTP/1.0-style exchange: the request head, then a response that
/// closes the connection.
fn answer_http(mut stream: TcpStream, unhealthy: Option<&PathBuf>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let (status, body) = if !head.starts_with(b"GET ") {
        ("405 Method Not Allowed", "method not allowed")
    } else if exists(unhealthy) {
        ("500 Internal Server Error", "unhealthy")
    } else {
        ("200 OK", "ok")
    };
    let response = format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}

/// `ME ARGS...` with stdio on /dev/null, so that it holds none of our pipes.
fn orphan_command(args: &[String]) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    command
}

fn sleep_forever(out: &mut impl Write) -> ! {
    out.flush().unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn ignore_sigterm() {
    // The fixture has no dependencies; `trap '' TERM` through a shell would
    // replace this process, so ask the kernel directly.
    unsafe extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    const SIGTERM: i32 = 15;
    const SIG_IGN: usize = 1;
    // SAFETY: installing SIG_IGN for SIGTERM has no preconditions and
    // touches no memory of ours.
    unsafe {
        signal(SIGTERM, SIG_IGN);
    }
}

fn close_stdout_and_stderr() {
    use std::os::fd::AsRawFd;
    unsafe extern "C" {
        fn dup2(old: i32, new: i32) -> i32;
    }
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .unwrap();
    // SAFETY: dup2 onto 1 and 2 closes our ends of the output pipes and
    // reuses the numbers; no Rust object owns descriptors 1 and 2, and
    // `null` stays open for both calls.
    unsafe {
        assert_eq!(dup2(null.as_raw_fd(), 1), 1);
        assert_eq!(dup2(null.as_raw_fd(), 2), 2);
    }
}
