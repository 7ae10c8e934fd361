//! The worker `bench_real` runs under each contender: a small compiled program that stamps the
//! clocks first thing, so a handoff is measured up to the moment the next worker really runs.
//!
//!     stamp_worker JOURNAL SECONDS
//!
//! Appends `start <pid> <CLOCK_MONOTONIC ns> <CLOCK_REALTIME ns>` to JOURNAL before anything else
//! (even before reading its arguments), runs for SECONDS (forever if negative), then appends
//! `stop <pid> <CLOCK_MONOTONIC ns>` and exits 0 at once. Each line is one `write` to a file opened
//! with O_APPEND, so the lines of concurrent workers never mix. Signals keep their default actions:
//! SIGTERM or SIGKILL end it without a `stop` line.

use std::io::Write;
use std::time::Duration;

use nix::time::{ClockId, clock_gettime};

fn ns(clock: ClockId) -> u64 {
    let t = clock_gettime(clock).expect("clock_gettime");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

fn append(journal: &str, line: &str) {
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(journal)
        .expect("open the journal");
    file.write_all(line.as_bytes()).expect("write the journal");
}

fn main() {
    let started = ns(ClockId::CLOCK_MONOTONIC);
    let wall = ns(ClockId::CLOCK_REALTIME);
    let args: Vec<String> = std::env::args().collect();
    let [_, journal, seconds] = &args[..] else {
        eprintln!("usage: stamp_worker JOURNAL SECONDS");
        std::process::exit(2);
    };
    let seconds: f64 = seconds.parse().expect("SECONDS is a number");
    let pid = std::process::id();
    append(journal, &format!("start {pid} {started} {wall}\n"));
    if seconds < 0.0 {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    std::thread::sleep(Duration::from_secs_f64(seconds));
    append(
        journal,
        &format!("stop {pid} {}\n", ns(ClockId::CLOCK_MONOTONIC)),
    );
    std::process::exit(0);
}
