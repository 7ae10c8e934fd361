//! `lease-exec --check LEASE`: "will this work here?", answered before anything is touched.
//!
//! Reads only: the cluster configuration, SelfSubjectAccessReviews (the API server's own answer to
//! "may I?", which are not stored), one GET of the Lease, one short watch of it, and the API
//! server's `Date` header. Each line is one check: `ok`, `warn` (lease-exec works, with a
//! limitation named on the line) or `FAIL` (it would not work). Exit 0 unless something fails,
//! 125 otherwise, as for any other refusal.

use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use serde_json::{Value, json};

use crate::cli::OutputFormat;
use crate::config::Config;
use crate::error::{Error, Outcome};
use crate::lease::api;
use crate::status::Status;
use crate::timing::Timing;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// As it should be.
    Ok,
    /// lease-exec works, with the limitation the line names.
    Warn,
    /// lease-exec would not work: the line says why and what to do.
    Fail,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        }
    }
}

/// One line of the checklist.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// What was checked.
    pub name: String,
    pub verdict: Verdict,
    /// What was found, and what to do about it when it is not ok.
    pub detail: String,
}

fn check(name: impl Into<String>, verdict: Verdict, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        verdict,
        detail: detail.into(),
    }
}

/// The verbs lease-exec uses: (API group, resource, verb, on the Lease by name, needed).
/// Events are optional: without them lease-exec warns once and leads all the same.
const VERBS: [(&str, &str, &str, bool, bool); 6] = [
    ("coordination.k8s.io", "leases", "get", true, true),
    ("coordination.k8s.io", "leases", "create", false, true),
    ("coordination.k8s.io", "leases", "update", true, true),
    ("coordination.k8s.io", "leases", "watch", true, false),
    ("events.k8s.io", "events", "create", false, false),
    ("events.k8s.io", "events", "patch", false, false),
];

/// Runs every check and prints the list; 0 when nothing failed, else 125.
pub async fn run(config: &Config, format: OutputFormat) -> Result<Outcome, Error> {
    let checks = checks(config).await;
    let failed = checks.iter().any(|c| c.verdict == Verdict::Fail);
    match format {
        OutputFormat::Text => print!("{}", to_text(config, &checks)),
        OutputFormat::Json => println!("{}", to_json(config, &checks)),
    }
    if failed {
        let n = checks.iter().filter(|c| c.verdict == Verdict::Fail).count();
        Err(Error::Check(n))
    } else {
        Ok(Outcome::Child(crate::exit::ChildStatus::Exited(0)))
    }
}

fn to_text(config: &Config, checks: &[Check]) -> String {
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let mut out = format!("lease-exec --check {}\n", config.lease);
    for c in checks {
        out.push_str(&format!(
            "  {:<4}  {:<width$}  {}\n",
            c.verdict.label(),
            c.name,
            c.detail
        ));
    }
    let failed = checks.iter().filter(|c| c.verdict == Verdict::Fail).count();
    let warned = checks.iter().filter(|c| c.verdict == Verdict::Warn).count();
    out.push_str(&match (failed, warned) {
        (0, 0) => "all checks passed\n".to_string(),
        (0, w) => format!("all checks passed, {w} with a warning\n"),
        (f, _) => format!("{f} check(s) failed: lease-exec would not work here as configured\n"),
    });
    out
}

fn to_json(config: &Config, checks: &[Check]) -> Value {
    json!({
        "lease": config.lease,
        "ok": !checks.iter().any(|c| c.verdict == Verdict::Fail),
        "checks": checks.iter().map(|c| json!({
            "name": c.name,
            "verdict": c.verdict.label().to_lowercase(),
            "detail": c.detail,
        })).collect::<Vec<_>>(),
    })
}

async fn checks(config: &Config) -> Vec<Check> {
    let mut checks = Vec::new();
    let timeout = config.timing.request_timeout();
    let (source, server, context_namespace) = describe_access(config).await;
    let connected = api::connect_slots(config).await;
    let (client, slots) = match connected {
        Ok(connected) => {
            checks.push(check(
                "cluster",
                Verdict::Ok,
                format!("{source}, server {server}"),
            ));
            connected
        }
        Err(e) => {
            checks.push(check("cluster", Verdict::Fail, e.to_string()));
            checks.push(identity(config));
            checks.push(timing(&config.timing));
            return checks;
        }
    };
    checks.push(identity(config));
    let namespace = slots[0].namespace().to_string();
    let from = match (config.namespace_from, context_namespace) {
        (Some(from), _) => from,
        (None, Some(_)) => "the kubeconfig context's",
        (None, None) => "the default: -n, POD_NAMESPACE and the kubeconfig context name none",
    };
    checks.push(check(
        "namespace",
        Verdict::Ok,
        format!("{namespace} ({from})"),
    ));

    // Reachability and the clock, from one request.
    let clock = clock(&client, timeout).await;
    let reachable = clock.is_ok();
    match clock {
        Ok(skew) => checks.push(clock_check(skew, &config.timing)),
        Err(e) => checks.push(check(
            "api server",
            Verdict::Fail,
            format!("cannot reach {server}: {e}"),
        )),
    }
    if !reachable {
        checks.push(timing(&config.timing));
        return checks;
    }

    // Permissions, as the API server's authorizer answers them.
    // A verb on a named Lease is asked for every slot's name (a Role's `resourceNames` may list
    // some of them only); the first refusal is the one reported.
    let slot_names = config.slot_names();
    for (group, resource, verb, by_name, needed) in VERBS {
        let names: Vec<Option<String>> = if by_name {
            slot_names.iter().cloned().map(Some).collect()
        } else {
            vec![None]
        };
        let mut answer = Ok(());
        let mut name = names[0].clone();
        for n in &names {
            name = n.clone();
            answer = access_review(
                &client,
                &namespace,
                group,
                resource,
                verb,
                n.clone(),
                timeout,
            )
            .await;
            if answer.is_err() {
                break;
            }
        }
        if answer.is_ok() {
            name = names[0].clone();
        }
        let more = match names.len() {
            n if n > 1 => format!(" (and the {} other slots)", n - 1),
            _ => String::new(),
        };
        checks.push(
            match answer {
                Ok(()) => check(
                    verb_name(resource, verb),
                    Verdict::Ok,
                    format!("{resource}.{group}{}{more} allowed", on(&name)),
                ),
                Err(Denied::No(reason)) => {
                    let (verdict, consequence) = match (needed, resource, verb) {
                        (true, _, _) => (Verdict::Fail, "lease-exec cannot work without it"),
                        (false, "leases", _) => (
                            Verdict::Warn,
                            "lease-exec polls every retry period instead of watching (slower handoffs, more requests)",
                        ),
                        _ if !config.observability.events => {
                            (Verdict::Ok, "not needed with --no-events")
                        }
                        _ => (
                            Verdict::Warn,
                            "lease-exec warns once and records no Events (or pass --no-events)",
                        ),
                    };
                    let detail = if verdict == Verdict::Ok {
                        format!("{resource}.{group}: not allowed, {consequence}")
                    } else {
                        format!(
                            "{resource}.{group}{} not allowed{}: {consequence}; grant it with a Role like deploy/rbac.yaml's",
                            on(&name),
                            if reason.is_empty() {
                                String::new()
                            } else {
                                format!(" ({reason})")
                            }
                        )
                    };
                    check(verb_name(resource, verb), verdict, detail)
                }
                Err(Denied::Unknown(e)) => check(
                    verb_name(resource, verb),
                    Verdict::Warn,
                    format!(
                        "cannot ask the API server whether {verb} on {resource}.{group} is allowed ({e}); it is tried when needed"
                    ),
                ),
            },
        );
    }

    // The Lease, and what a new candidate would do with it.
    for lease_api in &slots {
        let name = format!("lease {}", lease_api.name());
        match lease_api.get(timeout).await {
            Ok(lease) => {
                let status = Status::of(
                    lease_api.name(),
                    lease_api.namespace(),
                    lease.as_ref(),
                    &config.identity,
                    &config.timing,
                    Timestamp::now(),
                );
                let held = match (&status.holder, status.state) {
                    (Some(h), state) => format!("{state} by {h}"),
                    (None, state) => state.to_string(),
                };
                let outlook = status.to_text(&config.identity);
                let outlook = outlook
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                checks.push(check(name, Verdict::Ok, format!("{held}; {outlook}")));
            }
            Err(e) => checks.push(check(name, Verdict::Fail, format!("cannot read it: {e}"))),
        }
    }

    // A watch through whatever sits between us and the API server.
    checks.push(watch(&client, &namespace, &config.slot_names()[0]).await);
    checks.push(timing(&config.timing));
    checks
}

fn on(name: &Option<String>) -> String {
    name.as_ref().map_or(String::new(), |n| format!(" {n:?}"))
}

fn verb_name(resource: &str, verb: &str) -> String {
    match resource {
        "events" => format!("may {verb} events"),
        _ => format!("may {verb}"),
    }
}

fn identity(config: &Config) -> Check {
    check(
        "identity",
        Verdict::Ok,
        format!("{} ({})", config.identity, config.identity_from),
    )
}

/// Where the cluster configuration comes from, the server it names, and the namespace its
/// context names (or the service account's, in a cluster).
async fn describe_access(config: &Config) -> (String, String, Option<String>) {
    let options = kube::config::KubeConfigOptions {
        context: config.access.context.clone(),
        ..Default::default()
    };
    let kubeconfig = match &config.access.kubeconfig {
        Some(path) => kube::config::Kubeconfig::read_from(path)
            .ok()
            .map(|k| (k, format!("kubeconfig {} (--kubeconfig)", path.display()))),
        None => kube::config::Kubeconfig::read().ok().map(|k| {
            let from = match std::env::var_os("KUBECONFIG").filter(|p| !p.is_empty()) {
                Some(p) => format!("kubeconfig {} (KUBECONFIG)", p.to_string_lossy()),
                None => "kubeconfig ~/.kube/config".to_string(),
            };
            (k, from)
        }),
    };
    match kubeconfig {
        Some((kubeconfig, from)) => {
            let context = config
                .access
                .context
                .clone()
                .or_else(|| kubeconfig.current_context.clone())
                .unwrap_or_default();
            let namespace = kubeconfig
                .contexts
                .iter()
                .find(|c| c.name == context)
                .and_then(|c| c.context.as_ref())
                .and_then(|c| c.namespace.clone())
                .filter(|n| !n.is_empty());
            let server = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map(|c| c.cluster_url.to_string())
                .unwrap_or_else(|_| "?".into());
            (format!("{from}, context {context:?}"), server, namespace)
        }
        None => {
            let config = kube::Config::incluster();
            let server = config
                .as_ref()
                .map(|c| c.cluster_url.to_string())
                .unwrap_or_else(|_| "?".into());
            let namespace = config.ok().map(|c| c.default_namespace);
            ("in-cluster service account".to_string(), server, namespace)
        }
    }
}

/// This machine's clock minus the API server's (from its `Date` header, whole seconds), and the
/// uncertainty of that estimate.
#[derive(Debug, Clone, Copy)]
struct Skew {
    ahead: SignedDuration,
    plus_minus: SignedDuration,
}

async fn clock(client: &kube::Client, timeout: Duration) -> Result<Skew, String> {
    let request = http::Request::get("/version")
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    let sent = Timestamp::now();
    let response = tokio::time::timeout(timeout, client.send(request.map(Into::into)))
        .await
        .map_err(|_| format!("no answer within {}", humantime::format_duration(timeout)))?
        .map_err(|e| e.to_string())?;
    let received = Timestamp::now();
    let date = response
        .headers()
        .get(http::header::DATE)
        .and_then(|d| d.to_str().ok())
        .ok_or("its answer has no Date header")?;
    let server = k8s_openapi::jiff::fmt::rfc2822::parse(date)
        .map_err(|e| format!("its Date header {date:?} is unreadable: {e}"))?
        .timestamp();
    let round_trip = received.duration_since(sent);
    let middle = sent + round_trip / 2;
    // The header is truncated to the second: the server's clock read somewhere in [date, date+1s).
    let server_middle = server + SignedDuration::from_millis(500);
    Ok(Skew {
        ahead: middle.duration_since(server_middle),
        plus_minus: SignedDuration::from_millis(500) + round_trip / 2,
    })
}

/// lease-exec judges expiry on its own monotonic clock, so a wrong wall clock cannot make it
/// claim early; it matters to whoever compares `renewTime` with their own clock.
fn clock_check(skew: Skew, timing: &Timing) -> Check {
    let margin = SignedDuration::try_from(timing.lease_duration - timing.renew_deadline)
        .unwrap_or(SignedDuration::MAX);
    let secs = skew.ahead.as_secs_f64();
    let side = if secs >= 0.0 { "ahead of" } else { "behind" };
    let detail = format!(
        "this machine is {:.1}s {side} the API server (±{:.1}s, from its Date header)",
        secs.abs(),
        skew.plus_minus.as_secs_f64()
    );
    if skew.ahead.abs() - skew.plus_minus > margin {
        check(
            "clock",
            Verdict::Warn,
            format!(
                "{detail}: more than lease-duration - renew-deadline ({}); lease-exec counts time on its own clock and is not misled, but renewTime and --status' expiry read against this clock are off by that much: fix the clock (NTP)",
                humantime::format_duration(timing.lease_duration - timing.renew_deadline)
            ),
        )
    } else {
        check("clock", Verdict::Ok, detail)
    }
}

enum Denied {
    /// The authorizer said no, with its reason.
    No(String),
    /// The question could not be asked.
    Unknown(String),
}

async fn access_review(
    client: &kube::Client,
    namespace: &str,
    group: &str,
    resource: &str,
    verb: &str,
    name: Option<String>,
    timeout: Duration,
) -> Result<(), Denied> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.to_string()),
                group: Some(group.to_string()),
                resource: Some(resource.to_string()),
                verb: Some(verb.to_string()),
                name,
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let answer = tokio::time::timeout(timeout, api.create(&PostParams::default(), &review))
        .await
        .map_err(|_| Denied::Unknown("no answer in time".into()))?
        .map_err(|e| Denied::Unknown(e.to_string()))?;
    let status = answer.status.unwrap_or_default();
    if status.allowed {
        Ok(())
    } else {
        Err(Denied::No(status.reason.unwrap_or_default()))
    }
}

/// How long the test watch may stay open (the server closes it after this).
const WATCH_PROBE: Duration = Duration::from_secs(2);

/// Opens one watch of the Lease, reads what comes through, and lets the server close it.
async fn watch(client: &kube::Client, namespace: &str, name: &str) -> Check {
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let exists = matches!(
        tokio::time::timeout(Duration::from_secs(5), api.get_opt(name)).await,
        Ok(Ok(Some(_)))
    );
    let params = WatchParams::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(WATCH_PROBE.as_secs() as u32);
    let polled = "lease-exec polls every retry period instead (slower handoffs, more requests)";
    let stream = match tokio::time::timeout(Duration::from_secs(10), api.watch(&params, "0")).await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            return check(
                "watch",
                Verdict::Warn,
                format!("cannot open a watch ({e}): {polled}"),
            );
        }
        Err(_) => {
            return check(
                "watch",
                Verdict::Warn,
                format!("opening a watch got no answer within 10s: {polled}"),
            );
        }
    };
    let opened = std::time::Instant::now();
    let mut stream = std::pin::pin!(stream);
    let mut first_event = None;
    let mut error = None;
    let deadline = WATCH_PROBE + Duration::from_secs(5);
    let ended = tokio::time::timeout(deadline, async {
        while let Some(item) = stream.next().await {
            match item {
                Ok(WatchEvent::Error(e)) => error = Some(e.message),
                Ok(_) => {
                    first_event.get_or_insert(opened.elapsed());
                }
                Err(e) => error = Some(e.to_string()),
            }
        }
    })
    .await
    .is_ok();
    match (ended, error, first_event) {
        (_, Some(e), _) => check(
            "watch",
            Verdict::Warn,
            format!("the watch failed ({e}): {polled}"),
        ),
        (false, None, _) => check(
            "watch",
            Verdict::Warn,
            format!(
                "the server did not end a {}s watch within {}s: something in between holds streams open; lease-exec's idle timeout re-opens them",
                WATCH_PROBE.as_secs(),
                deadline.as_secs()
            ),
        ),
        (true, None, None) if exists => check(
            "watch",
            Verdict::Warn,
            "the watch opened and closed, but the Lease's state never came through: something in between buffers the stream; pass --no-watch to poll instead",
        ),
        (true, None, first) => check(
            "watch",
            Verdict::Ok,
            match first {
                Some(at) => format!(
                    "opened; the Lease's state came through in {:.0} ms; closed by the server",
                    at.as_secs_f64() * 1000.0
                ),
                None => "opened and closed by the server".to_string(),
            },
        ),
    }
}

/// The timing the options give, with what follows from them.
fn timing(t: &Timing) -> Check {
    let d = |d: Duration| humantime::format_duration(d).to_string();
    check(
        "timing",
        Verdict::Ok,
        format!(
            "lease {}, renew deadline {}, renewals every {} (each attempt {} before a second on a new connection), retry period {}, grace {}; the command is dead by {} after the last renewal began, {} before anyone else may take over",
            d(t.lease_duration),
            d(t.renew_deadline),
            d(t.renew_interval),
            d(t.renew_timeout()),
            d(t.retry_period),
            d(t.grace_period),
            d(t.kill_by()),
            d(t.safety_margin()),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skew_beyond_the_margin_warns_and_within_it_passes() {
        let timing = Timing::default();
        let near = Skew {
            ahead: SignedDuration::from_millis(-1200),
            plus_minus: SignedDuration::from_millis(510),
        };
        let c = clock_check(near, &timing);
        assert_eq!(c.verdict, Verdict::Ok, "{c:?}");
        assert!(c.detail.contains("1.2s behind"), "{c:?}");
        let far = Skew {
            ahead: SignedDuration::from_secs(9),
            plus_minus: SignedDuration::from_millis(510),
        };
        let c = clock_check(far, &timing);
        assert_eq!(c.verdict, Verdict::Warn, "{c:?}");
        assert!(c.detail.contains("9.0s ahead of"), "{c:?}");
        assert!(c.detail.contains("NTP"), "{c:?}");
        // The uncertainty counts in the machine's favour: 5.4 ± 0.6 is not surely beyond 5.
        let edge = Skew {
            ahead: SignedDuration::from_millis(5400),
            plus_minus: SignedDuration::from_millis(600),
        };
        assert_eq!(clock_check(edge, &timing).verdict, Verdict::Ok);
    }

    #[test]
    fn the_summary_counts_failures_and_warnings() {
        let config = crate::config::Config::from_cli(
            <crate::cli::Cli as clap::Parser>::parse_from(["lease-exec", "--check", "job"]),
            &|_| None,
        )
        .unwrap();
        let ok = check("a", Verdict::Ok, "fine");
        let warn = check("b", Verdict::Warn, "hm");
        let fail = check("c", Verdict::Fail, "no");
        assert!(to_text(&config, std::slice::from_ref(&ok)).ends_with("all checks passed\n"));
        assert!(
            to_text(&config, &[ok.clone(), warn.clone()])
                .ends_with("all checks passed, 1 with a warning\n")
        );
        let text = to_text(&config, &[ok, warn, fail]);
        assert!(text.contains("  FAIL  c  no\n"), "{text}");
        assert!(
            text.ends_with("1 check(s) failed: lease-exec would not work here as configured\n")
        );
        let json = to_json(&config, &[check("c", Verdict::Fail, "no")]);
        assert_eq!(json["ok"], false);
        assert_eq!(json["checks"][0]["verdict"], "fail");
    }
}
