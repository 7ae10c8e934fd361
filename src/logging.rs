//! Logs on stderr, filterable with `RUST_LOG`: one line per event as text, or one JSON object per
//! line (`--log-format json`) with `timestamp`, `level`, `message`, `lease`, `namespace`,
//! `identity`, `holder` and the event's own fields.
//!
//! No log line ever blocks the runtime: lines are queued and written by a thread of their own
//! ([`Lines`]). stderr is a pipe the command shares and a log collector drains; when nobody reads
//! it, a write blocks, and a runtime blocked on a log line would stop renewing, stop watching its
//! own Lease (an overwrite would go unseen) and stop everything else but the watchdog. While the
//! pipe is full, lines past [`QUEUE_BYTES`] are dropped and counted, and a line saying how many
//! precedes the next one written.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::{Context as LayerContext, Layer};
use tracing_subscriber::prelude::*;

use crate::cli::LogFormat;

/// What every JSON line carries besides the event.
#[derive(Debug, Default, Clone)]
struct Context {
    lease: Option<String>,
    namespace: Option<String>,
    identity: Option<String>,
    holder: Option<String>,
}

static CONTEXT: RwLock<Context> = RwLock::new(Context {
    lease: None,
    namespace: None,
    identity: None,
    holder: None,
});

/// Sets the lease, namespace and identity every JSON line carries.
pub fn set_context(lease: &str, namespace: &str, identity: &str) {
    let mut context = CONTEXT.write().unwrap_or_else(|e| e.into_inner());
    context.lease = Some(lease.to_string());
    context.namespace = Some(namespace.to_string());
    context.identity = Some(identity.to_string());
}

/// Records the current holder of the Lease as last seen (`None`: released or absent).
pub fn set_holder(holder: Option<&str>) {
    let mut context = CONTEXT.write().unwrap_or_else(|e| e.into_inner());
    context.holder = holder.map(str::to_string);
}

// kube_client::client logs every failed request at ERROR; lease-exec reports the same failure
// itself, with what it will do about it, so that line is only noise.
const DEFAULT_FILTER: &str =
    "info,kube=warn,kube_client::client=off,hyper=warn,tower=warn,rustls=warn";

/// Installs the global subscriber, and starts the thread that writes its lines.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    if let Ok(queue) = Queue::start(std::io::stderr(), format) {
        let _ = QUEUE.set(queue);
    }
    match format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(|| Lines)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(JsonLines)
            .init(),
    }
}

/// Writes each event as one JSON object on stderr.
struct JsonLines;

impl<S: Subscriber> Layer<S> for JsonLines {
    fn on_event(&self, event: &Event<'_>, _: LayerContext<'_, S>) {
        let mut fields = Fields(Map::new());
        event.record(&mut fields);
        let fields = fields.0;
        let context = CONTEXT.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            Value::String(
                k8s_openapi::jiff::Timestamp::now()
                    .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
                    .to_string(),
            ),
        );
        line.insert(
            "level".into(),
            Value::String(event.metadata().level().as_str().to_lowercase()),
        );
        line.insert(
            "message".into(),
            fields
                .get("message")
                .cloned()
                .unwrap_or(Value::String(String::new())),
        );
        for (key, value) in [
            ("lease", context.lease),
            ("namespace", context.namespace),
            ("identity", context.identity),
            ("holder", context.holder),
        ] {
            line.insert(key.into(), value.map(Value::String).unwrap_or(Value::Null));
        }
        for (key, value) in fields {
            if key != "message" {
                line.insert(key, value);
            }
        }
        let mut text = Value::Object(line).to_string();
        text.push('\n');
        let _ = Lines.write_all(text.as_bytes());
    }
}

/// How many bytes of log lines wait for stderr at most (about a thousand lines): past that, while
/// nobody reads stderr, lines are dropped.
pub const QUEUE_BYTES: usize = 256 * 1024;

/// How long [`flush`] waits for queued lines to reach stderr at exit.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

static QUEUE: OnceLock<Arc<Queue>> = OnceLock::new();

/// Writes the log's lines: queued for the writer thread once [`init`] has started it (directly to
/// stderr before). A write never blocks on stderr.
pub struct Lines;

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match QUEUE.get() {
            Some(queue) => queue.push(buf),
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Waits until every queued line has been written, for [`FLUSH_TIMEOUT`] at most (stderr may be
/// what is stuck): at exit.
pub fn flush() {
    if let Some(queue) = QUEUE.get() {
        queue.flush(Instant::now() + FLUSH_TIMEOUT);
    }
}

/// lease-exec's last words on stderr (a usage error, why it exits): queued after every line
/// before them, written by the writer thread, and waited for [`FLUSH_TIMEOUT`] at most, as
/// [`flush`] does. Never written by the caller itself: a stderr pipe that is full and that nobody
/// reads would block it for good, and so would the lock on stderr that the writer thread holds
/// while it is stuck on an earlier line. So every exit comes within [`FLUSH_TIMEOUT`] of deciding
/// it, whatever stderr does. Starts the writer thread if [`init`] has not (the command line is
/// parsed before the log starts).
pub fn last_words(text: &str) {
    let queue = match QUEUE.get() {
        Some(queue) => Some(queue),
        None => Queue::start(std::io::stderr(), LogFormat::Text)
            .ok()
            .map(|queue| QUEUE.get_or_init(|| queue)),
    };
    match queue {
        Some(queue) => {
            // Past the cap too: these lines say why lease-exec exits.
            queue.push_anyway(text.as_bytes());
            queue.flush(Instant::now() + FLUSH_TIMEOUT);
        }
        // No thread could be started to write it: written here, as the log's lines are then.
        None => {
            let _ = std::io::stderr().write_all(text.as_bytes());
        }
    }
}

/// Lines waiting for their writer thread.
struct Queue {
    state: Mutex<Pending>,
    changed: Condvar,
    cap: usize,
}

#[derive(Default)]
struct Pending {
    lines: VecDeque<Entry>,
    bytes: usize,
    /// The writer holds lines it took and has not written yet.
    writing: bool,
}

/// A queued line, or how many lines were dropped at that point.
enum Entry {
    Line(Vec<u8>),
    Dropped(u64),
}

impl Queue {
    /// Starts the writer thread on `sink`; a notice of dropped lines is written in `format`.
    fn start(sink: impl Write + Send + 'static, format: LogFormat) -> std::io::Result<Arc<Queue>> {
        Self::with_cap(sink, format, QUEUE_BYTES)
    }

    fn with_cap(
        mut sink: impl Write + Send + 'static,
        format: LogFormat,
        cap: usize,
    ) -> std::io::Result<Arc<Queue>> {
        let queue = Arc::new(Queue {
            state: Mutex::default(),
            changed: Condvar::new(),
            cap,
        });
        let shared = queue.clone();
        std::thread::Builder::new()
            .name("lease-exec-log".into())
            .spawn(move || {
                loop {
                    let lines = {
                        let mut state = shared.lock();
                        state.writing = false;
                        shared.changed.notify_all();
                        while state.lines.is_empty() {
                            state = shared
                                .changed
                                .wait(state)
                                .unwrap_or_else(|e| e.into_inner());
                        }
                        state.writing = true;
                        state.bytes = 0;
                        std::mem::take(&mut state.lines)
                    };
                    // Errors (stderr closed) are ignored, as eprintln! would panic on them.
                    for entry in lines {
                        let _ = match entry {
                            Entry::Line(line) => sink.write_all(&line),
                            Entry::Dropped(n) => {
                                sink.write_all(dropped_notice(n, format).as_bytes())
                            }
                        };
                    }
                    let _ = sink.flush();
                }
            })?;
        Ok(queue)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, line: &[u8]) {
        self.push_within(line, self.cap);
    }

    /// Queues `line` whatever the cap (the lines before it may have been dropped).
    fn push_anyway(&self, line: &[u8]) {
        self.push_within(line, usize::MAX);
    }

    fn push_within(&self, line: &[u8], cap: usize) {
        let mut state = self.lock();
        if state.bytes.saturating_add(line.len()) > cap {
            match state.lines.back_mut() {
                Some(Entry::Dropped(n)) => *n += 1,
                _ => state.lines.push_back(Entry::Dropped(1)),
            }
            return;
        }
        state.bytes += line.len();
        state.lines.push_back(Entry::Line(line.to_vec()));
        self.changed.notify_all();
    }

    /// Whether everything queued was written by `deadline`.
    fn flush(&self, deadline: Instant) -> bool {
        let mut state = self.lock();
        while !state.lines.is_empty() || state.writing {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

/// The line that says how many lines were dropped, in the log's format.
fn dropped_notice(dropped: u64, format: LogFormat) -> String {
    let message = format!("{dropped} log lines dropped: nobody read stderr for a while");
    match format {
        LogFormat::Text => format!(
            "{}  WARN {message}\n",
            k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        ),
        LogFormat::Json => {
            let mut line = serde_json::json!({
                "timestamp": k8s_openapi::jiff::Timestamp::now()
                    .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
                    .to_string(),
                "level": "warn",
                "message": message,
                "dropped": dropped,
            })
            .to_string();
            line.push('\n');
            line
        }
    }
}

struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().into(), Value::String(value.into()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::Bool(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that blocks every write while its gate is shut, as a pipe nobody reads does.
    #[derive(Clone, Default)]
    struct Pipe {
        open: Arc<(Mutex<bool>, Condvar)>,
        out: Arc<Mutex<Vec<u8>>>,
    }

    impl Pipe {
        fn set_open(&self, open: bool) {
            *self.open.0.lock().unwrap() = open;
            self.open.1.notify_all();
        }

        fn text(&self) -> String {
            String::from_utf8(self.out.lock().unwrap().clone()).unwrap()
        }
    }

    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut open = self.open.0.lock().unwrap();
            while !*open {
                open = self.open.1.wait(open).unwrap();
            }
            self.out.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_stderr_never_blocks_a_log_line_and_the_dropped_ones_are_counted() {
        let pipe = Pipe::default();
        let queue = Queue::with_cap(pipe.clone(), LogFormat::Text, 100).unwrap();
        // The writer takes the first line and blocks on it; the next ones queue up to 100 bytes.
        queue.push(b"first\n");
        assert!(!queue.flush(Instant::now() + Duration::from_millis(50)));
        let started = Instant::now();
        for i in 0..100 {
            queue.push(format!("line {i:02} ......\n").as_bytes());
        }
        // 100 pushes with the sink stuck, none of them waiting on it.
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!queue.flush(Instant::now() + Duration::from_millis(50)));
        pipe.set_open(true);
        assert!(queue.flush(Instant::now() + Duration::from_secs(10)));
        // Nothing is dropped once the sink drains.
        queue.push(b"after\n");
        assert!(queue.flush(Instant::now() + Duration::from_secs(10)));
        let text = pipe.text();
        let lines: Vec<&str> = text.lines().collect();
        // 100 bytes hold six 16-byte lines; 94 were dropped, and said so before what came next.
        assert_eq!(lines[0], "first");
        assert_eq!(
            lines[1..7],
            (0..6)
                .map(|i| format!("line {i:02} ......"))
                .collect::<Vec<_>>()
        );
        assert!(
            lines[7].ends_with("WARN 94 log lines dropped: nobody read stderr for a while"),
            "{text}"
        );
        assert_eq!(lines[8], "after");
        assert_eq!(lines.len(), 9, "{text}");
    }

    #[test]
    fn the_dropped_line_notice_is_json_in_json_mode() {
        let notice = dropped_notice(3, LogFormat::Json);
        let value: Value = serde_json::from_str(&notice).unwrap();
        assert_eq!(value["level"], "warn");
        assert_eq!(value["dropped"], 3);
        assert!(notice.ends_with('\n'));
    }
}
