//! Logs on stderr, filterable with `RUST_LOG`: one line per event as text, or one JSON object per
//! line (`--log-format json`) with `timestamp`, `level`, `message`, `lease`, `namespace`,
//! `identity`, `holder` and the event's own fields.

use std::io::Write;
use std::sync::RwLock;

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

/// Installs the global subscriber.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    match format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
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
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
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
