"""Measures orchestrator on the workloads of issue 5 (see BENCHMARKS.md).

Only public tools: /proc, the orchestrator's own CLI, and the processes'
own timestamps. Each workload runs --repeats times; medians with min-max are
printed, beside a floor measured in the same run (xargs -P0 for starting
and stopping, a shell loop for restarts, `cat` for logs).
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "release")
# BENCH_ORCHESTRATOR: another build (or a wrapper that execs one) to compare.
ORCH = os.environ.get("BENCH_ORCHESTRATOR", os.path.join(RELEASE, "orchestrator"))
FIXTURE = os.path.join(RELEASE, "fixture-service")
STAMP = os.path.join(RELEASE, "bench-stamp")
SLEEP = shutil.which("sleep")
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEVNULL = subprocess.DEVNULL


def stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rindex(")") + 2 :].split()


def start_ticks(pid):
    return int(stat_fields(pid)[19])


def cpu_ticks(pid):
    fields = stat_fields(pid)
    return int(fields[11]) + int(fields[12])


def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def children(pid):
    pids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids.extend(int(p) for p in f.read().split())
        except OSError:
            pass
    return pids


def context_switches(pid):
    """Per thread: a thread that ends inside the window must not make the
    difference negative, so windows compare thread by thread."""
    counts = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                counts[task] = sum(
                    int(line.split()[1]) for line in f if "ctxt_switches" in line
                )
        except OSError:
            pass
    return counts


def switches_between(before, after):
    """Wake-ups in the window: growth of threads alive at both ends, all of
    a thread born inside it, and one for each thread that ended in it."""
    total = 0
    for task, count in after.items():
        total += count - before.get(task, 0)
    total += sum(1 for task in before if task not in after)
    return total


def pss_kib(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def wait_for(predicate, timeout, interval=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def summary(values, unit, digits=2):
    if not values:
        return "n/a"
    med = statistics.median(values)
    return f"{med:.{digits}f} {unit} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def workspace(services_toml, orchestrator_toml=""):
    dir = tempfile.mkdtemp(prefix="orchestrator-bench-")
    with open(os.path.join(dir, "orchestrator.toml"), "w") as f:
        f.write("[orchestrator]\n" + orchestrator_toml + "\n" + services_toml)
    return dir


def run_daemon(dir, stderr=DEVNULL):
    return subprocess.Popen(
        [ORCH, "-c", os.path.join(dir, "orchestrator.toml"), "run"],
        stdout=DEVNULL,
        stderr=stderr,
        cwd=dir,
    )


# ---- start, idle, memory, stop ----


def bench_fleet(n, idle_seconds, limits=False):
    """Start n `sleep` services; measure start, idle CPU/wake-ups, PSS, stop.
    With `limits`, each has a memory, CPU and pids limit: a cgroup in every
    hierarchy (v1) and its limit files written at each start."""
    extra = 'memory_limit = 64\ncpu_limit = 0.5\npids_limit = 100\n' if limits else ""
    services = "".join(
        f'[services.s{i}]\ncommand = ["{SLEEP}", "100000"]\n{extra}' for i in range(n)
    )
    dir = workspace(services, 'log_level = "warn"\nshutdown_timeout = "10s"\n')
    daemon = run_daemon(dir)
    try:
        launched = start_ticks(daemon.pid)
        if not wait_for(lambda: len(children(daemon.pid)) >= n, 60):
            raise RuntimeError(f"only {len(children(daemon.pid))} of {n} children")
        start = (max(start_ticks(p) for p in children(daemon.pid)) - launched) / CLK_TCK
        time.sleep(2)  # let the start-up settle before the idle window
        cpu0, ctx0 = cpu_ticks(daemon.pid), context_switches(daemon.pid)
        time.sleep(idle_seconds)
        cpu1, ctx1 = cpu_ticks(daemon.pid), context_switches(daemon.pid)
        pss = pss_kib(daemon.pid) / 1024
        t0 = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        stop = time.monotonic() - t0
        return {
            "start": start,
            "idle_cpu_ms": (cpu1 - cpu0) * 1000 / CLK_TCK,
            "idle_wakeups": switches_between(ctx0, ctx1),
            "pss_mib": pss,
            "stop": stop,
        }
    finally:
        if daemon.poll() is None:
            daemon.kill()
        shutil.rmtree(dir, ignore_errors=True)


def bench_reload(n, rounds=5, running=None):
    """n `sleep` services; one changes per round: the time from `orchestrator
    reload` to its reply, and whether any of the others lost its pid. With
    `running`, only that many run and the rest are `enabled = false`: a
    reload does the same work for them (read, validate, plan, diff), and a
    machine whose descriptor limit stops short of n running services (3
    descriptors each) can still measure a reload of n."""
    running = n if running is None else min(running, n)

    def config(version):
        services = "".join(
            f'[services.s{i}]\ncommand = ["{SLEEP}", "100000"]\n'
            + ("" if i < running else "enabled = false\n")
            for i in range(n)
        )
        # Its environment is what changes: a restart of that one service.
        # A reload answers once what it restarted is up again, which for a
        # plain service is its start_grace (1 s by default): 0 here, so
        # the time is the daemon's own work.
        return services + f'\n[services.changed]\ncommand = ["{SLEEP}", "100000"]\nstart_grace = "0s"\nenvironment = {{ V = "{version}" }}\n'

    dir = workspace(config(0), 'log_level = "warn"\nshutdown_timeout = "10s"\nwatch = false\n')
    path = os.path.join(dir, "orchestrator.toml")
    daemon = run_daemon(dir)
    try:
        # Every service's sleep running (the guardian is a child too, and a
        # child between its fork and its exec is not yet one).
        def sleeping():
            return sum(1 for pid in children(daemon.pid) if comm(pid) == os.path.basename(SLEEP))

        if not wait_for(lambda: sleeping() >= running + 1, 60):
            raise RuntimeError("the fleet did not start")
        before = set(children(daemon.pid))
        times = []
        for version in range(1, rounds + 1):
            with open(path) as f:
                text = f.read()
            with open(path, "w") as f:
                f.write(text.replace(f'V = "{version - 1}"', f'V = "{version}"'))
            t0 = time.monotonic()
            subprocess.run([ORCH, "-c", path, "reload"], stdout=DEVNULL, check=True, cwd=dir)
            times.append((time.monotonic() - t0) * 1000)
        after = set(children(daemon.pid))
        # Only the changed service's process differs: n untouched. The
        # daemon's own helpers (the guardian) are not services.
        untouched = sum(1 for pid in before & after if comm(pid) == os.path.basename(SLEEP))
        return {"ms": times, "untouched": untouched}
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        shutil.rmtree(dir, ignore_errors=True)


def bench_fleet_floor(n):
    """xargs -P0 starting and then losing n sleeps: the fork/exec floor."""
    feeder = subprocess.Popen(
        ["xargs", "-P0", "-n1", SLEEP], stdin=subprocess.PIPE, stdout=DEVNULL
    )
    launched = start_ticks(feeder.pid)
    feeder.stdin.write(b"100000\n" * n)
    feeder.stdin.close()
    if not wait_for(lambda: len(children(feeder.pid)) >= n, 60):
        raise RuntimeError("xargs did not start every sleep")
    pids = children(feeder.pid)
    start = (max(start_ticks(p) for p in pids) - launched) / CLK_TCK
    t0 = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    feeder.wait(60)
    return {"start": start, "stop": time.monotonic() - t0}


# ---- restart latency ----


def bench_restart(restarts):
    """Gap between a child's exit and its successor's start, backoff 0. Each
    run lives 120 ms: past the 100 ms under which a death counts as "at
    once" for the start limit, which would otherwise (rightly) slow it."""
    dir = workspace(
        "[services.r]\n"
        f'command = ["{STAMP}", "--stamp", "{{dir}}/stamps", "--run-ms", "120"]\n'
        'restart = "always"\nmax_restarts = 1000000\n'
        'backoff = { initial = "0ms", max = "0ms" }\n',
        'log_level = "warn"\n',
    )
    config = os.path.join(dir, "orchestrator.toml")
    with open(config) as f:
        text = f.read().replace("{dir}", dir)
    with open(config, "w") as f:
        f.write(text)
    stamps = os.path.join(dir, "stamps")
    daemon = run_daemon(dir)
    try:
        def enough():
            try:
                with open(stamps) as f:
                    return sum(1 for line in f if line.startswith("start")) > restarts
            except OSError:
                return False

        if not wait_for(enough, 120, 0.05):
            raise RuntimeError("too few restarts")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    gaps = gaps_ms(stamps)
    shutil.rmtree(dir, ignore_errors=True)
    return gaps[:restarts]


def gaps_ms(path):
    gaps, last_exit = [], None
    with open(path) as f:
        for line in f:
            what, nanos = line.split()
            if what == "exit":
                last_exit = int(nanos)
            elif last_exit is not None:
                gaps.append((int(nanos) - last_exit) / 1e6)
                last_exit = None
    return gaps


def bench_restart_floor(restarts):
    dir = tempfile.mkdtemp(prefix="orchestrator-bench-")
    stamps = os.path.join(dir, "stamps")
    subprocess.run(
        ["bash", "-c", f'for i in $(seq {restarts + 1}); do "{STAMP}" --stamp "{stamps}" --run-ms 120; done'],
        check=False,
    )
    gaps = gaps_ms(stamps)
    shutil.rmtree(dir, ignore_errors=True)
    return gaps


# ---- crash loops ----


def bench_crashloops(n, seconds):
    """n services that exit 1 at once, restarted with a 100 ms-1 s backoff
    (the default log_level): once every one is looping, the daemon's CPU
    over a window, the restarts it made in it, and how long `status` takes
    meanwhile (one every 200 ms)."""
    services = "".join(
        f'[services.c{i:03}]\ncommand = ["{FIXTURE}", "--exit", "1"]\n'
        'max_restarts = 1000000\nbackoff = { initial = "100ms", max = "1s" }\n'
        for i in range(n)
    )
    dir = workspace(services, 'shutdown_timeout = "10s"\n')
    config = os.path.join(dir, "orchestrator.toml")
    daemon = run_daemon(dir)

    def restarts():
        out = subprocess.run(
            [ORCH, "-c", config, "status", "--json"],
            capture_output=True, cwd=dir, timeout=30,
        )
        if out.returncode != 0:
            return None
        services = json.loads(out.stdout)
        counts = [s["restarts"] for s in services]
        return counts if len(counts) == n else None

    try:
        # Past the backoff's ramp (100+200+400+800 ms): each loop is at its
        # 1 s maximum, the steady state a crash loop stays in.
        if not wait_for(lambda: (r := restarts()) is not None and min(r) >= 5, 120, 0.2):
            raise RuntimeError("not every service is looping")
        before, cpu0, t0 = sum(restarts()), cpu_ticks(daemon.pid), time.monotonic()
        latencies = []
        while time.monotonic() - t0 < seconds:
            asked = time.monotonic()
            subprocess.run([ORCH, "-c", config, "status"], stdout=DEVNULL, cwd=dir, check=True, timeout=30)
            latencies.append((time.monotonic() - asked) * 1000)
            time.sleep(0.2)
        cpu1, t1 = cpu_ticks(daemon.pid), time.monotonic()
        made = sum(restarts()) - before
        cpu_ms = (cpu1 - cpu0) * 1000 / CLK_TCK
        return {
            "cpu_ms_per_s": cpu_ms / (t1 - t0),
            "restarts_per_s": made / (t1 - t0),
            "cpu_ms_per_restart": cpu_ms / made if made else float("nan"),
            "status_ms": statistics.median(latencies),
            "status_max_ms": max(latencies),
        }
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        shutil.rmtree(dir, ignore_errors=True)


# ---- log capture ----


def check_flood(path, lines):
    """Every numbered line once, in order, intact."""
    expected = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.startswith(b"flood "):
                return f"unexpected line {line[:40]!r}"
            if int(line[6:18]) != expected or len(line) != 100:
                return f"line {expected} damaged or out of order: {line[:40]!r}"
            expected += 1
    return None if expected == lines else f"{expected} of {lines} lines"


def read_stamp(path):
    """The wall-clock second the fixture's `--stamp` wrote, or None yet."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    return int(text) / 1e9 if text else None


def generator_argv(lines, write_bytes, stamp, pipeline):
    """The flood's generator. With `pipeline`, its lines pass through
    `head -c` first, as peers.py's `yes | head -c` does: two busy processes
    on the machine's cores instead of one (which changes who wins on two
    cores: see BENCHMARKS.md, round five)."""
    flood = [FIXTURE, "--flood-write-bytes", str(write_bytes), "--stamp", stamp, "--flood", str(lines)]
    if not pipeline:
        return flood
    return ["/bin/sh", "-c", " ".join(flood) + f" | head -c {lines * 100}"]


def bench_log(megabytes, log_level, write_bytes, pipeline=False):
    """Capture throughput, clocked as peers.py does: the generator's own
    start stamp -> the last byte in the log file. The daemon's start-up
    before the generator runs is returned apart (launch -> that stamp): it
    is a start latency, which the fleet workloads measure, not capture."""
    lines = megabytes * 1_000_000 // 100
    argv = generator_argv(lines, write_bytes, "{dir}/stamp", pipeline)
    if pipeline:
        # Stays up once done, as the fixture's --sleep does.
        argv[-1] += f"; exec {SLEEP} 100000"
    else:
        argv.append("--sleep")
    dir = workspace(
        f"[services.flood]\ncommand = {json.dumps(argv)}\n",
        f'log_level = "{log_level}"\nlog_max_bytes = {megabytes * 4_000_000}\n',
    )
    config = os.path.join(dir, "orchestrator.toml")
    with open(config) as f:
        text = f.read().replace("{dir}", dir)
    with open(config, "w") as f:
        f.write(text)
    path = os.path.join(dir, ".orchestrator", "logs", "flood.log")
    stamp = os.path.join(dir, "stamp")
    size = lines * 100
    os.sync()  # no writeback of an earlier run's files during this one
    launched = time.time()
    daemon = run_daemon(dir)
    try:
        def complete():
            try:
                return os.path.getsize(path) >= size
            except OSError:
                return False

        if not wait_for(complete, 300, 0.002):
            raise RuntimeError("the log file never got every byte")
        done = time.time()
        cpu_ms = cpu_ticks(daemon.pid) * 1000 / CLK_TCK
        started = read_stamp(stamp)
        problem = check_flood(path, lines)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        shutil.rmtree(dir, ignore_errors=True)
    if problem:
        raise RuntimeError(f"log capture lost or damaged lines: {problem}")
    return size / (done - started) / 1e6, cpu_ms, (started - launched) * 1000


def bench_log_floor(megabytes, write_bytes, pipeline=False):
    lines = megabytes * 1_000_000 // 100
    dir = tempfile.mkdtemp(prefix="orchestrator-bench-")
    out = os.path.join(dir, "out")
    stamp = os.path.join(dir, "stamp")
    os.sync()  # no writeback of an earlier run's files during this one
    with open(out, "wb") as sink:
        generator = subprocess.Popen(
            generator_argv(lines, write_bytes, stamp, pipeline),
            stdout=subprocess.PIPE,
        )
        cat = subprocess.Popen(["cat"], stdin=generator.stdout, stdout=sink)
        generator.stdout.close()
        _, status, usage = os.wait4(cat.pid, 0)
        done = time.time()
        cat.returncode = os.waitstatus_to_exitcode(status)
        generator.wait()
    cpu_ms = (usage.ru_utime + usage.ru_stime) * 1000
    elapsed = done - read_stamp(stamp)
    problem = check_flood(out, lines)
    shutil.rmtree(dir, ignore_errors=True)
    if problem:
        raise RuntimeError(problem)
    return lines * 100 / elapsed / 1e6, cpu_ms


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--idle-seconds", type=int, default=20)
    parser.add_argument("--log-mb", type=int, default=200)
    # What the generator writes at a time: 4096 is what a C program's stdio
    # writes to a pipe (and `head -c`, the generator of peers.py); 65536
    # was this script's until issue 16, and flattered the daemon (a sixteenth
    # of the wake-ups).
    parser.add_argument("--log-write-bytes", type=int, default=4096)
    # The generator's lines through `head -c` (8 KiB writes), as in peers.py.
    parser.add_argument("--log-pipeline", action="store_true")
    # The fleet with memory, CPU and pids limits on every service: what
    # cgroups cost at start and stop.
    parser.add_argument("--fleet-limits", action="store_true")
    # Run only this many of the reload's n services (the rest disabled).
    parser.add_argument("--reload-running", type=int, default=None)
    parser.add_argument("--restarts", type=int, default=200)
    parser.add_argument("--crash-services", type=int, default=50)
    parser.add_argument("--crash-seconds", type=int, default=10)
    parser.add_argument("--only", default="fleet,reload,restart,crashloops,log")
    args = parser.parse_args()
    only = set(args.only.split(","))
    print(f"machine: {os.cpu_count()} cores, {os.uname().release}; repeats {args.repeats}")
    rows = []

    if "fleet" in only:
        runs = [bench_fleet(args.n, args.idle_seconds, args.fleet_limits) for _ in range(args.repeats)]
        floors = [bench_fleet_floor(args.n) for _ in range(args.repeats)]
        rows += [
            (f"start {args.n} services{' with limits' if args.fleet_limits else ''} (launch → last fork)", summary([r["start"] for r in runs], "s"), summary([f["start"] for f in floors], "s")),
            (f"idle {args.idle_seconds} s, {args.n} children: daemon CPU", summary([r["idle_cpu_ms"] for r in runs], "ms", 0), "0"),
            (f"idle {args.idle_seconds} s, {args.n} children: context switches", summary([r["idle_wakeups"] for r in runs], "", 0), "0"),
            (f"idle, {args.n} children: daemon PSS", summary([r["pss_mib"] for r in runs], "MiB", 1), "–"),
            (f"stop {args.n} services", summary([r["stop"] for r in runs], "s", 3), summary([f["stop"] for f in floors], "s", 3)),
        ]
    if "reload" in only:
        running = args.reload_running if args.reload_running is not None else args.n
        runs = [bench_reload(args.n, running=running) for _ in range(args.repeats)]
        times = [t for r in runs for t in r["ms"]]
        shown = f"{args.n} + 1 services" + (f" ({running} running)" if running < args.n else "")
        rows.append((f"reload, {shown}, 1 changed: verb → reply ({len(times)} reloads)", summary(times, "ms", 1), "–"))
        rows.append((f"  services untouched by those reloads (of {running})", summary([r["untouched"] for r in runs], "", 0), "–"))
    if "restart" in only:
        gaps, floor = [], []
        for _ in range(args.repeats):
            gaps += bench_restart(args.restarts)
            floor += bench_restart_floor(args.restarts)
        rows.append((f"restart latency, exit → next start ({len(gaps)} restarts)", summary(gaps, "ms"), summary(floor, "ms")))
    if "crashloops" in only:
        runs = [bench_crashloops(args.crash_services, args.crash_seconds) for _ in range(args.repeats)]
        n, secs = args.crash_services, args.crash_seconds
        rows += [
            (f"{n} crash loops, {secs} s: daemon CPU", summary([r["cpu_ms_per_s"] for r in runs], "ms/s", 1), "–"),
            ("  restarts made by the daemon", summary([r["restarts_per_s"] for r in runs], "/s", 1), "–"),
            ("  daemon CPU per restart", summary([r["cpu_ms_per_restart"] for r in runs], "ms", 2), "–"),
            ("  `status` meanwhile: median", summary([r["status_ms"] for r in runs], "ms", 1), "–"),
            ("  `status` meanwhile: slowest", summary([r["status_max_ms"] for r in runs], "ms", 1), "–"),
        ]
    if "log" in only:
        # The machine's speed drifts between runs (page cache, writeback,
        # neighbours): each repeat measures cat and both levels back to back,
        # and the ratio is taken within the repeat.
        levels = ("warn", "info")
        floor, floor_cpu = [], []
        rates, ratios, cpus, startups = ({level: [] for level in levels} for _ in range(4))
        for _ in range(args.repeats):
            cat, cat_cpu = bench_log_floor(args.log_mb, args.log_write_bytes, args.log_pipeline)
            floor.append(cat)
            floor_cpu.append(cat_cpu)
            for level in levels:
                rate, cpu, startup = bench_log(args.log_mb, level, args.log_write_bytes, args.log_pipeline)
                startups[level].append(startup)
                rates[level].append(rate)
                ratios[level].append(rate / cat)
                cpus[level].append(cpu)
        for level in levels:
            rows.append((f"log capture {args.log_mb} MB, 100-byte lines in writes of {args.log_write_bytes} B{' through head -c' if args.log_pipeline else ''} (generator start → last byte), log_level={level}", summary(rates[level], "MB/s", 0) + " = " + summary(ratios[level], "× cat"), summary(floor, "MB/s", 0)))
        for level in levels:
            rows.append((f"  its CPU time (daemon; floor: cat), log_level={level}", summary(cpus[level], "ms", 0), summary(floor_cpu, "ms", 0)))
        rows.append(("  daemon launch → the generator runs (not in the above)", summary(startups["warn"] + startups["info"], "ms", 1), "–"))

    width = max(len(r[0]) for r in rows)
    print(f"\n{'workload':{width}}  {'orchestrator (median, min–max)':44}  floor")
    for name, ours, floor in rows:
        print(f"{name:{width}}  {ours:44}  {floor}")


if __name__ == "__main__":
    sys.exit(main())
