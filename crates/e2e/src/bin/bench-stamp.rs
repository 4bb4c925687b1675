//! A service for the restart-latency benchmark (bench/run): appends
//! `start NANOS` to the file named by `--stamp FILE` the moment it runs,
//! sleeps `--run-ms MS`, appends `exit NANOS` and exits 1. Wall-clock
//! nanoseconds, so stamps of successive processes compare.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn stamp(path: &str, what: &str) {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("cannot open the stamp file");
    writeln!(file, "{what} {nanos}").expect("cannot write the stamp file");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let path = value("--stamp").expect("--stamp FILE is required");
    stamp(&path, "start");
    let run_ms: u64 = value("--run-ms").and_then(|v| v.parse().ok()).unwrap_or(50);
    std::thread::sleep(Duration::from_millis(run_ms));
    stamp(&path, "exit");
    std::process::exit(1);
}
