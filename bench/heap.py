#!/usr/bin/env python3
"""Where the idle daemon's heap goes, per service, byte by byte.

    bench/heap.py [--n 1000] [--top 25] [--keep] [BINARY]

Runs BINARY (default target/release/orchestrator) under heaptrack with n
`sleep` services, waits until every one runs and the start-up has settled,
then kills the daemon with SIGKILL: what heaptrack counts as "leaked" then
is exactly what was allocated at that moment, the idle heap. Prints the
allocation sites holding the most, in bytes per service (requested bytes,
without malloc's own headers and rounding), and their sum.

Needs heaptrack (Debian: `apt-get install heaptrack`). Not a test, and
never run by .ci/run. valgrind's massif, used before, no longer runs the
daemon (it does not know pidfd_open nor the spawn's clone flags).
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from bench import children  # of every thread: the services are spawned from the runtime's workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLEEP = shutil.which("sleep")
SIZE = re.compile(r"^([0-9.]+)([KMG]?)B? leaked over (\d+) calls from$")
UNITS = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3}


def daemon_pid(launcher, binary):
    """The daemon: the process running BINARY below heaptrack's script
    (its guardian runs the same binary, as the daemon's child)."""
    todo = [launcher]
    while todo:
        pid = todo.pop()
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            exe = ""
        if exe == os.path.realpath(binary):
            return pid
        todo.extend(children(pid))
    return None


def wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return None


def clean(site):
    site = re.sub(r"::h[0-9a-f]{16}$", "", site)
    for old, new in (("$LT$", "<"), ("$GT$", ">"), ("$u20$", " "), ("$C$", ","),
                     ("_$u7b$$u7b$closure$u7d$$u7d$", "{closure}"), ("..", "::")):
        site = site.replace(old, new)
    return site


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--keep", action="store_true",
                        help="keep heaptrack's data (for heaptrack_print's call stacks)")
    parser.add_argument("binary", nargs="?",
                        default=os.path.join(ROOT, "target", "release", "orchestrator"))
    args = parser.parse_args()
    if not shutil.which("heaptrack"):
        sys.exit("heaptrack is not installed (apt-get install heaptrack)")
    dir = tempfile.mkdtemp(prefix="orchestrator-heap-")
    config = os.path.join(dir, "orchestrator.toml")
    with open(config, "w") as f:
        f.write('[orchestrator]\nlog_level = "warn"\n')
        for i in range(args.n):
            f.write(f'[services.s{i}]\ncommand = ["{SLEEP}", "100000"]\n')
    out = os.path.join(dir, "heap")
    launcher = subprocess.Popen(
        ["heaptrack", "-o", out, args.binary, "-c", config, "run"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=dir,
    )
    services = []
    daemon = None
    try:
        daemon = wait_for(lambda: daemon_pid(launcher.pid, args.binary), 30)
        if daemon is None:
            sys.exit("the daemon did not start under heaptrack")
        # The guardian is a child too.
        if not wait_for(lambda: len(children(daemon)) > args.n, 120):
            sys.exit(f"only {len(children(daemon))} children of {args.n} services")
        services = children(daemon)
        time.sleep(5)  # the start-up's blocking threads retire, events settle
        with open(f"/proc/{daemon}/smaps_rollup") as f:
            pss = next(line for line in f if line.startswith("Pss:"))
        os.kill(daemon, signal.SIGKILL)
        launcher.wait(120)
    finally:
        if daemon is not None:
            services = services or children(daemon)
            try:
                os.kill(daemon, signal.SIGKILL)
            except OSError:
                pass
        for pid in services:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if launcher.poll() is None:
            launcher.kill()
    data = next(os.path.join(dir, f) for f in os.listdir(dir) if f.startswith("heap"))
    report = subprocess.run(
        ["heaptrack_print", "-f", data, "--print-peaks", "0", "--print-allocators", "0",
         "--print-temporary", "0", "--print-leaks", "1", "--peak-limit", "400",
         "--sub-peak-limit", "0"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    sites = []
    for i, line in enumerate(report):
        match = SIZE.match(line.strip())
        if match and i + 1 < len(report):
            size = float(match.group(1)) * UNITS[match.group(2)]
            sites.append((size, int(match.group(3)), clean(report[i + 1].strip())))
    total = sum(size for size, _, _ in sites)
    print(f"{args.n} idle services; daemon under heaptrack: {pss.split(':')[1].strip()} PSS "
          "(heaptrack's own pages included)")
    print(f"live heap at idle: {total / 1e6:.2f} MB = {total / args.n:.0f} B per service\n")
    print(f"{'B/service':>10} {'allocs/service':>15}  site")
    for size, calls, site in sorted(sites, reverse=True)[: args.top]:
        print(f"{size / args.n:10.0f} {calls / args.n:15.1f}  {site}")
    if args.keep:
        print(f"\nheaptrack's data: {data}")
    else:
        shutil.rmtree(dir, ignore_errors=True)


if __name__ == "__main__":
    main()
