//! The worker the tests run under lease-exec: a small compiled program whose running interval is
//! known to the millisecond, so the tests' overlap check can see overlaps far shorter than a
//! handoff.
//!
//!     journal_worker JOURNAL SECONDS EXIT [ignore-term]
//!
//! - `start <pid> <CLOCK_MONOTONIC ns> <identity> <transitions> <lease>` is appended to JOURNAL
//!   first thing, before the arguments are even parsed (identity, transitions and the Lease held,
//!   a slot's with `--holders`, come from the variables lease-exec gives the command).
//! - It runs for SECONDS (forever if negative), then appends `stop <pid> <ns>` and exits with EXIT.
//! - SIGTERM or SIGINT: appends `stop` and exits 128+N at once; with `ignore-term`, SIGTERM only
//!   appends `ignored`. SIGKILL leaves no `stop` line: the tests then watch the process from outside.
//!
//! Each line is one `write` to a file opened with O_APPEND, so concurrent workers' lines never mix.
//! `stop` is written immediately before `_exit`, microseconds before the process is gone.

use std::io::Write;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use nix::time::{ClockId, clock_gettime};

fn now_ns() -> u64 {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("clock_gettime");
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

/// The last stop signal received (0: none); set by the handler, acted on by the main loop.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: i32) {
    RECEIVED.store(signal, Ordering::SeqCst);
}

fn main() {
    let started = now_ns();
    let args: Vec<String> = std::env::args().collect();
    let (journal, seconds, code, ignore_term) = match &args[..] {
        [_, journal, seconds, code, rest @ ..] => (
            journal.clone(),
            seconds.parse::<f64>().expect("SECONDS is a number"),
            code.parse::<i32>().expect("EXIT is a number"),
            rest.first().is_some_and(|f| f == "ignore-term"),
        ),
        _ => {
            eprintln!("usage: journal_worker JOURNAL SECONDS EXIT [ignore-term]");
            std::process::exit(2);
        }
    };
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| "-".into());
    let pid = std::process::id();
    append(
        &journal,
        &format!(
            "start {pid} {started} {} {} {}\n",
            env("LEASE_EXEC_HELD_IDENTITY"),
            env("LEASE_EXEC_TRANSITIONS"),
            env("LEASE_EXEC_HELD_LEASE")
        ),
    );
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action) }.expect("sigaction");
    }
    let end = (seconds >= 0.0).then(|| now_ns() + (seconds * 1e9) as u64);
    loop {
        match RECEIVED.swap(0, Ordering::SeqCst) {
            0 => {}
            15 if ignore_term => append(&journal, &format!("ignored {pid} {}\n", now_ns())),
            signal => {
                append(&journal, &format!("stop {pid} {}\n", now_ns()));
                std::process::exit(128 + signal);
            }
        }
        if end.is_some_and(|end| now_ns() >= end) {
            append(&journal, &format!("stop {pid} {}\n", now_ns()));
            std::process::exit(code);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
