//! `lease-exec --status LEASE`: the Lease as a person (or a script, with `--output json`) wants to
//! read it.
//!
//! "Renewed N s ago" and "expires in N s" compare `renewTime` with this machine's wall clock: fine
//! for reading, and the only thing that can be said from a single read, but never used to decide
//! anything (see [`crate::lease::decide`]).

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use crate::cli::OutputFormat;
use crate::config::Config;
use crate::error::{Error, Outcome};
use crate::lease::api;
use crate::lease::campaign::{Action, Campaign, Input};
use crate::lease::{Decision, Record};
use crate::timing::Timing;

/// The facts shown.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// Lease name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// `held`, `expired`, `released` or `absent`.
    pub state: &'static str,
    /// `spec.holderIdentity`.
    pub holder: Option<String>,
    /// Whether the holder is this process's `--identity`.
    pub is_this_identity: bool,
    /// `spec.acquireTime`.
    pub acquired: Option<Timestamp>,
    /// `spec.renewTime`.
    pub renewed: Option<Timestamp>,
    /// Seconds since `renewTime` by the local clock.
    pub renewed_ago: Option<f64>,
    /// Seconds until `renewTime + leaseDurationSeconds` by the local clock (negative: past).
    pub expires_in: Option<f64>,
    /// `spec.leaseDurationSeconds`.
    pub duration_secs: Option<i32>,
    /// `spec.leaseTransitions`.
    pub transitions: i32,
    /// The owner Pod's name.
    pub owner_pod: Option<String>,
    /// `spec.preferredHolder`: a handover is pending to this identity (or `*`, any other).
    pub preferred: Option<String>,
    /// `spec.strategy`.
    pub strategy: Option<String>,
    /// What a candidate with this identity and these timings would do if it started now.
    pub outlook: Outlook,
}

/// What a new candidate would do with the Lease as read, by the acquisition state machine's own
/// rules ([`Campaign`]): a candidate counts time from its own first read, so this is also what a
/// waiting candidate does once it has seen the Lease as it is now.
#[derive(Debug, Clone, PartialEq)]
pub struct Outlook {
    /// `create`, `claim`, `wait` (for a holder or a handover) or `wait-then-create`.
    pub action: &'static str,
    /// Seconds until it would act (0: at once; `None`: not while the holder renews).
    pub in_secs: Option<f64>,
    /// Why, in a sentence.
    pub why: String,
}

impl Outlook {
    /// Feeds `lease` (or its absence) to a fresh campaign for `identity` and reads its answer.
    pub fn of(lease: Option<&Lease>, identity: &str, timing: &Timing) -> Outlook {
        let now = tokio::time::Instant::now();
        let mut campaign = Campaign::new(identity, *timing);
        let action = campaign.step(Input::Read(lease.cloned()), now);
        let duration = humantime::format_duration(timing.lease_duration);
        let secs = |at: tokio::time::Instant| {
            Some(round1(at.saturating_duration_since(now).as_secs_f64()))
        };
        match action {
            Action::Create { .. } => Outlook {
                action: "create",
                in_secs: Some(0.0),
                why: "it is absent: created at once".into(),
            },
            Action::Claim {
                decision: Decision::Resume,
                ..
            } => Outlook {
                action: "claim",
                in_secs: Some(0.0),
                why: "it names this identity: resumed at once".into(),
            },
            Action::Claim { .. } => Outlook {
                action: "claim",
                in_secs: Some(0.0),
                why: "it is free: claimed at once".into(),
            },
            Action::Wait { until } if lease.is_none() => Outlook {
                action: "wait-then-create",
                in_secs: until.and_then(secs),
                why: format!(
                    "a Lease that cannot be found may have been deleted while held, and its holder could still run, so a candidate creates it only after one --lease-duration ({duration}) of absence; to start at once, create it released (deploy/lease.yaml), or give a name used only for testing a short --lease-duration"
                ),
            },
            Action::Wait { until } => {
                if let Some((to, _)) = campaign.deferring(now) {
                    let to = if to == crate::lease::record::ANY_OTHER {
                        "any other candidate".to_string()
                    } else {
                        to
                    };
                    Outlook {
                        action: "wait",
                        in_secs: until.and_then(secs),
                        why: format!(
                            "it is being handed over to {to}: left to them until then, then competed for"
                        ),
                    }
                } else {
                    let holder = campaign
                        .waiting_on()
                        .and_then(|r| r.holder.clone())
                        .unwrap_or_default();
                    Outlook {
                        action: "wait",
                        in_secs: until.and_then(secs),
                        why: format!(
                            "held by {holder}: a candidate takes over only once the record has stayed unchanged for its lease duration from its own first read of it (never counted from renewTime: clocks differ), so at the earliest then, if it is not renewed"
                        ),
                    }
                }
            }
            Action::Read { .. } => Outlook {
                action: "read",
                in_secs: Some(0.0),
                why: "the Lease could not be judged from one read".into(),
            },
        }
    }

    fn to_json(&self) -> Value {
        json!({"action": self.action, "inSeconds": self.in_secs, "why": self.why})
    }

    fn to_text(&self, identity: &str) -> String {
        let when = match (self.action, self.in_secs) {
            ("wait-then-create", Some(s)) => format!("creates it in {}", secs(s)),
            ("wait", Some(s)) => format!("competes for it in {}", secs(s)),
            ("wait", None) => "waits while the holder renews".to_string(),
            (action, _) => format!("{action}s it at once"),
        };
        format!("  a new candidate ({identity}) {when}: {}\n", self.why)
    }
}

impl Status {
    /// What `lease` says at `now`, from the point of view of `identity`.
    pub fn of(
        name: &str,
        namespace: &str,
        lease: Option<&Lease>,
        identity: &str,
        timing: &Timing,
        now: Timestamp,
    ) -> Status {
        let outlook = Outlook::of(lease, identity, timing);
        let Some(lease) = lease else {
            return Status {
                name: name.into(),
                namespace: namespace.into(),
                state: "absent",
                holder: None,
                is_this_identity: false,
                acquired: None,
                renewed: None,
                renewed_ago: None,
                expires_in: None,
                duration_secs: None,
                transitions: 0,
                owner_pod: None,
                preferred: None,
                strategy: None,
                outlook,
            };
        };
        let record = Record::of(lease);
        let renewed_ago = record
            .renew_time
            .map(|t| now.duration_since(t).as_secs_f64());
        let expires_in = match (renewed_ago, record.duration_secs) {
            (Some(ago), Some(d)) => Some(f64::from(d) - ago),
            _ => None,
        };
        let state = match (&record.holder, expires_in) {
            (None, _) => "released",
            (Some(_), Some(left)) if left <= 0.0 => "expired",
            _ => "held",
        };
        Status {
            name: name.into(),
            namespace: namespace.into(),
            state,
            is_this_identity: record.holder.as_deref() == Some(identity),
            holder: record.holder,
            acquired: record.acquire_time,
            renewed: record.renew_time,
            renewed_ago,
            expires_in,
            duration_secs: record.duration_secs,
            transitions: record.transitions,
            owner_pod: lease
                .metadata
                .owner_references
                .iter()
                .flatten()
                .find(|r| r.kind == "Pod")
                .map(|r| r.name.clone()),
            preferred: record.preferred,
            strategy: lease
                .spec
                .as_ref()
                .and_then(|s| s.strategy.clone())
                .filter(|s| !s.is_empty()),
            outlook,
        }
    }

    /// For scripts.
    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "namespace": self.namespace,
            "state": self.state,
            "holder": self.holder,
            "isThisIdentity": self.is_this_identity,
            "acquireTime": self.acquired.map(|t| t.to_string()),
            "renewTime": self.renewed.map(|t| t.to_string()),
            "renewedSecondsAgo": self.renewed_ago.map(round1),
            "expiresInSeconds": self.expires_in.map(round1),
            "leaseDurationSeconds": self.duration_secs,
            "leaseTransitions": self.transitions,
            "ownerPod": self.owner_pod,
            "preferredHolder": self.preferred,
            "strategy": self.strategy,
            "newCandidate": self.outlook.to_json(),
        })
    }

    /// For people; `identity` is the one a new candidate would use.
    pub fn to_text(&self, identity: &str) -> String {
        let mut out = format!("Lease {}/{}: {}\n", self.namespace, self.name, self.state);
        if self.state == "absent" {
            out.push_str("  it does not exist yet\n");
            out.push_str(&self.outlook.to_text(identity));
            return out;
        }
        let holder = match &self.holder {
            Some(h) if self.is_this_identity => format!("{h} (this identity)"),
            Some(h) => h.clone(),
            None => "none (released)".into(),
        };
        out.push_str(&format!("  holder:       {holder}\n"));
        if let Some(t) = self.acquired {
            out.push_str(&format!("  acquired at:  {t}\n"));
        }
        match (self.renewed, self.renewed_ago) {
            (Some(t), Some(ago)) => {
                out.push_str(&format!("  renewed:      {} ago ({t})\n", secs(ago)))
            }
            _ => out.push_str("  renewed:      never\n"),
        }
        let expiry = match (self.state, self.expires_in) {
            ("released", _) => "released: the next candidate takes over at once".to_string(),
            (_, Some(left)) if left > 0.0 => format!("in {}", secs(left)),
            (_, Some(left)) => format!("expired {} ago", secs(-left)),
            _ => "unknown (no renewTime or leaseDurationSeconds)".to_string(),
        };
        out.push_str(&format!("  expires:      {expiry}\n"));
        if let Some(d) = self.duration_secs {
            out.push_str(&format!("  duration:     {d}s\n"));
        }
        out.push_str(&format!("  transitions:  {}\n", self.transitions));
        out.push_str(&format!(
            "  owner Pod:    {}\n",
            self.owner_pod.as_deref().unwrap_or("none")
        ));
        if let Some(preferred) = &self.preferred {
            let to = if preferred == crate::lease::record::ANY_OTHER {
                "any other candidate".to_string()
            } else {
                preferred.clone()
            };
            let state = if self.holder.is_some() && self.holder.as_ref() != Some(preferred) {
                "pending"
            } else {
                "released for it"
            };
            out.push_str(&format!(
                "  handover:     to {to}, {state} (strategy {})\n",
                self.strategy.as_deref().unwrap_or("none")
            ));
        }
        out.push_str(&self.outlook.to_text(identity));
        out
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn secs(x: f64) -> String {
    format!("{:.1}s", x.max(0.0))
}

/// Reads the Lease once and prints it; with `--holders` N > 1, every slot's Lease (JSON: an array).
pub async fn run(config: &Config, format: OutputFormat) -> Result<Outcome, Error> {
    let (_, slots) = api::connect_slots(config).await.map_err(Error::Access)?;
    let mut all = Vec::new();
    for lease_api in &slots {
        let lease = lease_api
            .get(config.timing.request_timeout())
            .await
            .map_err(Error::Api)?;
        all.push(Status::of(
            lease_api.name(),
            lease_api.namespace(),
            lease.as_ref(),
            &config.identity,
            &config.timing,
            Timestamp::now(),
        ));
    }
    match (format, all.as_slice()) {
        (OutputFormat::Text, _) => {
            if let [first, ..] = all.as_slice()
                && all.len() > 1
            {
                let held = all.iter().filter(|s| s.state == "held").count();
                println!(
                    "Semaphore {}/{}: {held} of {} slots held",
                    first.namespace,
                    config.lease,
                    all.len()
                );
            }
            for status in &all {
                print!("{}", status.to_text(&config.identity));
            }
        }
        (OutputFormat::Json, [one]) => println!("{}", one.to_json()),
        (OutputFormat::Json, _) => println!(
            "{}",
            Value::Array(all.iter().map(Status::to_json).collect())
        ),
    }
    Ok(Outcome::Child(crate::exit::ChildStatus::Exited(0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn lease(holder: Option<&str>, renewed: i64, duration: i32) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
                lease_duration_seconds: Some(duration),
                lease_transitions: Some(3),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }
    }

    #[test]
    fn held_expired_released_and_absent() {
        let now = Timestamp::from_second(1000).unwrap();
        let held = Status::of(
            "l",
            "ns",
            Some(&lease(Some("a"), 995, 15)),
            "me",
            &Timing::default(),
            now,
        );
        assert_eq!(held.state, "held");
        assert_eq!(held.expires_in, Some(10.0));
        assert!(held.to_text("me").contains("in 10.0s"));
        let expired = Status::of(
            "l",
            "ns",
            Some(&lease(Some("a"), 900, 15)),
            "me",
            &Timing::default(),
            now,
        );
        assert_eq!(expired.state, "expired");
        assert!(expired.to_text("me").contains("expired 85.0s ago"));
        let released = Status::of(
            "l",
            "ns",
            Some(&lease(None, 999, 1)),
            "me",
            &Timing::default(),
            now,
        );
        assert_eq!(released.state, "released");
        let mine = Status::of(
            "l",
            "ns",
            Some(&lease(Some("me"), 999, 15)),
            "me",
            &Timing::default(),
            now,
        );
        assert!(mine.is_this_identity);
        assert!(mine.to_text("me").contains("me (this identity)"));
        let absent = Status::of("l", "ns", None, "me", &Timing::default(), now);
        assert_eq!(absent.to_json()["state"], "absent");
    }

    #[test]
    fn the_outlook_is_the_campaigns_answer() {
        let now = Timestamp::from_second(1000).unwrap();
        let timing = Timing::default();
        // Absent: one lease duration of absence, and how to avoid the wait.
        let absent = Status::of("l", "ns", None, "me", &timing, now);
        assert_eq!(absent.outlook.action, "wait-then-create");
        assert_eq!(absent.outlook.in_secs, Some(15.0));
        let text = absent.to_text("me");
        assert!(
            text.contains("a new candidate (me) creates it in 15.0s"),
            "{text}"
        );
        assert!(text.contains("deploy/lease.yaml"), "{text}");
        assert_eq!(absent.to_json()["newCandidate"]["inSeconds"], 15.0);
        // Held by another: its duration from the first read, whatever renewTime says.
        let held = Status::of(
            "l",
            "ns",
            Some(&lease(Some("a"), 100, 20)),
            "me",
            &timing,
            now,
        );
        assert_eq!(held.state, "expired");
        assert_eq!(held.outlook.action, "wait");
        assert_eq!(held.outlook.in_secs, Some(20.0));
        assert!(held.to_text("me").contains("competes for it in 20.0s"));
        // Released, or naming this identity: at once.
        let released = Status::of("l", "ns", Some(&lease(None, 999, 1)), "me", &timing, now);
        assert_eq!(
            (released.outlook.action, released.outlook.in_secs),
            ("claim", Some(0.0))
        );
        let mine = Status::of(
            "l",
            "ns",
            Some(&lease(Some("me"), 999, 15)),
            "me",
            &timing,
            now,
        );
        assert_eq!(mine.outlook.action, "claim");
        assert!(mine.outlook.why.contains("resumed"));
    }

    #[test]
    fn a_pending_handover_is_shown() {
        let now = Timestamp::from_second(1000).unwrap();
        let mut l = lease(Some("a"), 995, 15);
        let spec = l.spec.as_mut().unwrap();
        spec.preferred_holder = Some("b".into());
        spec.strategy = Some(crate::lease::record::HANDOVER_STRATEGY.into());
        let status = Status::of("l", "ns", Some(&l), "me", &Timing::default(), now);
        assert!(
            status
                .to_text("me")
                .contains("handover:     to b, pending (strategy lease-exec/handover)"),
            "{}",
            status.to_text("me")
        );
        assert_eq!(status.to_json()["preferredHolder"], "b");
        let plain = Status::of(
            "l",
            "ns",
            Some(&lease(Some("a"), 995, 15)),
            "me",
            &Timing::default(),
            now,
        );
        assert!(!plain.to_text("me").contains("handover"));
        assert!(plain.to_json()["preferredHolder"].is_null());
    }
}
