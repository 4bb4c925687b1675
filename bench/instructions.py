#!/usr/bin/env python3
"""User-space instructions the daemon spends capturing a log flood, counted
by valgrind's callgrind: unlike seconds on a shared 2-core machine, the count
repeats to within a fraction of a percent, so it shows what a change to the
output path costs or saves.

    bench/instructions.py [--mb 20] [BINARY ...]

Each BINARY (default: target/release/orchestrator) runs one service that
writes MB megabytes of 100-byte lines, once with log_level "warn" (log file
only) and once with "info" (log file and the daemon's console, here
/dev/null). The count covers the daemon's whole life (start-up, the flood,
shutdown), not the service, and not the kernel's share (the pipe reads and
file writes, as for `cat`). Build first:
`cargo build --release -p orchestrator -p orchestrator-e2e`.
"""

import argparse
import os
import shutil
import signal
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "target", "release", "fixture-service")


def instructions(binary, level, megabytes):
    lines = megabytes * 1_000_000 // 100
    dir = tempfile.mkdtemp(prefix="orchestrator-instructions-")
    try:
        with open(os.path.join(dir, "orchestrator.toml"), "w") as f:
            f.write(
                f'[orchestrator]\nlog_level = "{level}"\n'
                f'[services.flood]\ncommand = ["{FIXTURE}", "--flood", "{lines}", "--sleep"]\n'
            )
        out = os.path.join(dir, "callgrind.out")
        daemon = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             binary, "-c", "orchestrator.toml", "run"],
            cwd=dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        log = os.path.join(dir, ".orchestrator", "logs", "flood.log")
        deadline = time.monotonic() + 600
        while not (os.path.exists(log) and os.path.getsize(log) >= lines * 100):
            if time.monotonic() > deadline or daemon.poll() is not None:
                daemon.kill()
                raise RuntimeError(f"{binary}: the log file never got every byte")
            time.sleep(0.05)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(120)
        with open(out) as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1])
        raise RuntimeError(f"{binary}: no total in the callgrind output")
    finally:
        shutil.rmtree(dir, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=20)
    parser.add_argument("binaries", nargs="*",
                        default=[os.path.join(ROOT, "target", "release", "orchestrator")])
    args = parser.parse_args()
    print(f"daemon user-space instructions for {args.mb} MB of 100-byte lines")
    for binary in map(os.path.abspath, args.binaries):
        for level in ("warn", "info"):
            count = instructions(binary, level, args.mb)
            print(f"{binary}  log_level={level:5}  {count / 1e6:8.1f} M  "
                  f"({count / (args.mb * 1e6):.2f} per byte)", flush=True)


if __name__ == "__main__":
    main()
