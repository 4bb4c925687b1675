#!/usr/bin/env python3
"""How long an in-place upgrade's switch takes (issue 15; BENCHMARKS.md).

    bench/upgrade.py [--services 1000] [--repeats 5]

Runs one daemon with SERVICES fixture services (each `--ready --sleep`),
waits until every one runs, then upgrades it REPEATS times to the same
binary (`POST /v1/upgrade`), while a client sends `GET /v1/daemon` on fresh
connections without pause. Printed per run and as medians (min-max):

- switch: from the 202 (dry run passed) to the first answer of the new
  daemon (its `upgrades` count grew): the time commands wait;
- longest wait: the slowest single request of the polling client;
- failures: requests that failed rather than waited (must be 0).

The dry run (`--version`, `check`) happens before the switch, with the old
daemon still answering, and is not counted. Build first:
`cargo build --release -p orchestrator -p orchestrator-e2e`.
BENCH_ORCHESTRATOR names another build (or a wrapper that execs one).
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "release")
ORCH = os.environ.get("BENCH_ORCHESTRATOR", os.path.join(RELEASE, "orchestrator"))
FIXTURE = os.path.join(RELEASE, "fixture-service")


def http(path, method, url, body=b"", timeout=120.0):
    """One request on a fresh connection; (status, body)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        head = (
            f"{method} {url} HTTP/1.1\r\nHost: localhost\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        s.sendall(head.encode() + body)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


def daemon_info(sock):
    status, body = http(sock, "GET", "/v1/daemon")
    assert status == 200, body
    return json.loads(body)


def workspace(services, log_level):
    dir = tempfile.mkdtemp(prefix="orch-bench-upgrade-")
    lines = [f'[orchestrator]\nshutdown_timeout = "30s"\nlog_level = "{log_level}"\n']
    for i in range(services):
        lines.append(f'[services.s{i}]\nbinary_path = "{FIXTURE}"\nargs = ["--ready", "--sleep"]\n')
    with open(os.path.join(dir, "orchestrator.toml"), "w") as f:
        f.write("\n".join(lines))
    return dir


class Poller(threading.Thread):
    def __init__(self, sock, interval):
        super().__init__(daemon=True)
        self.sock = sock
        self.interval = interval
        self.stop = False
        self.longest = 0.0
        self.failures = []
        self.answers = 0

    def run(self):
        while not self.stop:
            began = time.monotonic()
            try:
                status, body = http(self.sock, "GET", "/v1/daemon")
                if status != 200:
                    self.failures.append(f"{status}: {body[:200]!r}")
                else:
                    self.answers += 1
            except OSError as error:
                self.failures.append(repr(error))
            self.longest = max(self.longest, time.monotonic() - began)
            if self.interval:
                time.sleep(self.interval)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--log-level",
        default="warn",
        help="the daemon's log_level; `info` times each step of the switch in daemon.log",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the workspace (and daemon.log) afterwards"
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=0.0,
        help="seconds between the polling client's requests (0: none, a busy client taking a core)",
    )
    args = parser.parse_args()
    dir = workspace(args.services, args.log_level)
    sock = os.path.join(dir, ".orchestrator", "orchestrator.sock")
    daemon = subprocess.Popen(
        [ORCH, "-c", "orchestrator.toml", "run"],
        cwd=dir,
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(dir, "daemon.log"), "w"),
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                status, body = http(sock, "GET", "/v1/services")
                services = json.loads(body) if status == 200 else []
                if len(services) == args.services and all(
                    s["state"] == "running" for s in services
                ):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.exit(f"the services did not all start; see {dir}/daemon.log")
            time.sleep(0.2)
        switches, waits = [], []
        for run in range(args.repeats):
            before = daemon_info(sock)["upgrades"]
            poller = Poller(sock, args.poll_interval)
            poller.start()
            status, body = http(sock, "POST", "/v1/upgrade")
            accepted = time.monotonic()
            if status != 202:
                sys.exit(f"upgrade refused: {status} {body!r}")
            while True:
                try:
                    info = daemon_info(sock)
                    if info["upgrades"] > before:
                        break
                    if info["upgrade_failures"]:
                        sys.exit(f"upgrade failed: {info['last_upgrade_error']}")
                except OSError:
                    pass
            switch = time.monotonic() - accepted
            poller.stop = True
            poller.join()
            if poller.failures:
                print(f"  run {run + 1}: {len(poller.failures)} failed requests: {poller.failures[:3]}")
            print(
                f"  run {run + 1}: switch {switch * 1000:.1f} ms, longest wait "
                f"{poller.longest * 1000:.1f} ms, {poller.answers} answers, "
                f"{len(poller.failures)} failures"
            )
            switches.append(switch * 1000)
            waits.append(poller.longest * 1000)
        def summary(values):
            return f"{statistics.median(values):.1f} ms ({min(values):.1f}-{max(values):.1f})"
        print(f"{args.services} services, {args.repeats} upgrades:")
        print(f"  switch        {summary(switches)}")
        print(f"  longest wait  {summary(waits)}")
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=120)
        except subprocess.TimeoutExpired:
            daemon.kill()
        if args.keep:
            print(f"workspace kept: {dir}")
        else:
            shutil.rmtree(dir, ignore_errors=True)


if __name__ == "__main__":
    main()
