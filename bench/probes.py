"""What health checks cost the daemon (issue 13): N `sleep` services, each
with a check every `--interval`, so N/interval checks a second; the daemon's
CPU time (utime + stime from /proc) over a window once every service is
healthy, as a share of one core. Beside it, the same fleet without checks
(the floor the checks add to).

    bench/probes.py [--n 1000] [--interval 1s] [--seconds 20] [--kind http|tcp|exec]

http and tcp checks go to one fixture-service (`--http-health`, or
`--tcp-listen`) outside the daemon; exec checks run /bin/true. Not a test:
it asserts nothing, and .ci/run never runs it. Build first:
    cargo build --release -p orchestrator -p orchestrator-e2e
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import CLK_TCK, DEVNULL, FIXTURE, ORCH, SLEEP, run_daemon, stat_fields, wait_for, workspace  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def statuses(dir):
    out = subprocess.run(
        [ORCH, "-c", os.path.join(dir, "orchestrator.toml"), "status", "--json"],
        capture_output=True, text=True, cwd=dir, timeout=60,
    )
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return []


def measure(n, interval, seconds, kind, port):
    services = []
    for i in range(n):
        services.append(f'[services.s{i}]\ncommand = ["{SLEEP}", "100000"]\nstart_grace = "0s"\n')
        if kind == "http":
            services.append(f'[services.s{i}.health]\nhttp = "http://127.0.0.1:{port}/healthz"\ninterval = "{interval}"\n')
        elif kind == "tcp":
            services.append(f'[services.s{i}.health]\ntcp = "127.0.0.1:{port}"\ninterval = "{interval}"\n')
        elif kind == "exec":
            services.append(f'[services.s{i}.health]\nexec = ["/bin/true"]\ninterval = "{interval}"\n')
    dir = workspace("".join(services), 'log_level = "warn"\nshutdown_timeout = "10s"\n')
    daemon = run_daemon(dir)
    try:
        want = "running"

        def ready():
            s = statuses(dir)
            ok = [x for x in s if x["state"] == want and (kind == "none" or x.get("health") == "healthy")]
            return len(ok) == n

        if not wait_for(ready, 120, interval=0.5):
            raise RuntimeError(f"not all {n} services healthy within 120 s")
        time.sleep(2)
        def user_system():
            fields = stat_fields(daemon.pid)
            return int(fields[11]), int(fields[12])

        (u0, s0), t0 = user_system(), time.monotonic()
        time.sleep(seconds)
        (u1, s1), t1 = user_system(), time.monotonic()
        share = lambda ticks: ticks / CLK_TCK / (t1 - t0) * 100  # noqa: E731
        return share(u1 - u0), share(s1 - s0)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
        shutil.rmtree(dir, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--interval", default="1s")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--kind", default="http", choices=["http", "tcp", "exec"])
    args = parser.parse_args()
    port = free_port()
    server = None
    if args.kind in ("http", "tcp"):
        flag = "--http-health" if args.kind == "http" else "--tcp-listen"
        server = subprocess.Popen([FIXTURE, flag, str(port), "--sleep"], stdout=DEVNULL, stderr=DEVNULL)
        if not wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 10):
            raise RuntimeError("the fixture's server did not listen")
    try:
        floor = measure(args.n, args.interval, args.seconds, "none", port)
        with_checks = measure(args.n, args.interval, args.seconds, args.kind, port)
    finally:
        if server:
            server.kill()
    print(f"{args.n} services, {args.kind} checks every {args.interval} over {args.seconds} s (% of one core):")
    for label, (user, system) in (("without checks", floor), ("with checks", with_checks)):
        print(f"  daemon CPU {label:15} user {user:5.2f}  system {system:5.2f}  total {user + system:5.2f}")
    cost = sum(with_checks) - sum(floor)
    print(f"  the checks' cost: {cost:.2f} % of one core")


if __name__ == "__main__":
    main()
