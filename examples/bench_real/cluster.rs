//! The real control plane of `testenv/` (embedded etcd and kube-apiserver), the bench's own API
//! client, and the API server's request counters.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::mono_ns;

pub struct Cluster {
    script: PathBuf,
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
}

impl Cluster {
    /// `testenv/cluster up DIR [--ha] [-- FLAGS]`: builds testenv/bin if needed and waits for
    /// /readyz. `apiserver_flags` go to every API server.
    pub fn up(root: &Path, dir: &Path, ha: bool, apiserver_flags: &[String]) -> Cluster {
        let script = root.join("testenv/cluster");
        let status = Command::new(&script)
            .arg("up")
            .arg(dir)
            .args(ha.then_some("--ha"))
            .args((!apiserver_flags.is_empty()).then_some("--"))
            .args(apiserver_flags)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run testenv/cluster");
        assert!(status.success(), "testenv/cluster up failed");
        Cluster {
            script,
            dir: dir.to_owned(),
            kubeconfig: dir.join("kubeconfig"),
        }
    }

    pub fn down(script: &Path, dir: &Path) {
        let _ = Command::new(script).arg("down").arg(dir).status();
    }

    pub fn script(&self) -> &Path {
        &self.script
    }

    /// Stops the controller-manager (only the garbage collector runs): its metadata informer
    /// re-opens a watch on Leases every 5 to 10 minutes at random, requests no contender makes.
    pub fn stop_controller_manager(dir: &Path) {
        let Ok(pid) = std::fs::read_to_string(dir.join("controller-manager.pid")) else {
            return;
        };
        let Ok(pid) = pid.trim().parse::<i32>() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..100 {
            if nix::sys::signal::kill(pid, None).is_err() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }

    /// The API server's port, from the kubeconfig's `server: https://127.0.0.1:PORT`.
    pub fn port(&self) -> u16 {
        let text = std::fs::read_to_string(&self.kubeconfig).expect("read the kubeconfig");
        text.lines()
            .find_map(|l| l.trim().strip_prefix("server: "))
            .and_then(|url| url.rsplit(':').next())
            .and_then(|port| port.trim_end_matches('/').parse().ok())
            .expect("a server: https://127.0.0.1:PORT line")
    }

    pub async fn client(&self) -> kube::Client {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).expect("read the kubeconfig");
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .expect("kubeconfig");
        kube::Client::try_from(config).expect("API client")
    }
}

/// What the API server's `/metrics` says about Leases: `apiserver_request_total` summed over
/// codes, by verb, and `apiserver_longrunning_requests` for WATCH, the watches open now. The admin
/// kubeconfig carries the admin token and the CA of the serving certificate, and names
/// https://127.0.0.1:PORT.
pub async fn lease_metrics(client: &kube::Client) -> (BTreeMap<String, f64>, f64) {
    let request = hyper::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(request).await.expect("scrape /metrics");
    let mut by_verb = BTreeMap::new();
    let mut open_watches = 0.0;
    for line in text.lines() {
        let (total, rest) = if let Some(rest) = line.strip_prefix("apiserver_request_total{") {
            (true, rest)
        } else if let Some(rest) = line.strip_prefix("apiserver_longrunning_requests{") {
            (false, rest)
        } else {
            continue;
        };
        if !rest.contains(r#"resource="leases""#) {
            continue;
        }
        let (labels, value) = rest.rsplit_once("} ").expect("a sample");
        let value: f64 = value.parse().unwrap();
        let verb = labels
            .split(',')
            .find_map(|l| l.strip_prefix("verb=\""))
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or("?");
        if total {
            *by_verb.entry(verb.to_string()).or_insert(0.0) += value;
        } else if verb == "WATCH" {
            open_watches += value;
        }
    }
    (by_verb, open_watches)
}

/// The API server's requests to etcd about Leases (`etcd_requests_total`), summed by operation.
pub async fn etcd_lease_requests(client: &kube::Client) -> BTreeMap<String, f64> {
    let request = hyper::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(request).await.expect("scrape /metrics");
    let mut by_operation = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("etcd_requests_total{") else {
            continue;
        };
        if !rest.contains(r#"resource="leases""#) {
            continue;
        }
        let (labels, value) = rest.rsplit_once("} ").expect("a sample");
        let operation = labels
            .split(',')
            .find_map(|l| l.strip_prefix("operation=\""))
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or("?");
        *by_operation.entry(operation.to_string()).or_insert(0.0) += value.parse::<f64>().unwrap();
    }
    by_operation
}

fn leases(client: &kube::Client, namespace: &str) -> Api<Lease> {
    Api::namespaced(client.clone(), namespace)
}

/// Creates the Lease released (no holder), as a Lease looks after its first handoff: every
/// contender then starts from the same state, and lease-exec does not wait out a lease duration
/// for a name it has never seen (its rule for a Lease found absent).
pub async fn create_released(client: &kube::Client, namespace: &str, name: &str) {
    create(client, namespace, name, LeaseSpec::default()).await;
}

/// Creates the Lease held by an identity that never renews, for `seconds`: an idle follower
/// waits on it for the whole window, with no leader's requests counted alongside.
pub async fn create_held(client: &kube::Client, namespace: &str, name: &str, seconds: i32) {
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let spec = LeaseSpec {
        holder_identity: Some("bench-holder".into()),
        lease_duration_seconds: Some(seconds),
        acquire_time: Some(now.clone()),
        renew_time: Some(now),
        ..LeaseSpec::default()
    };
    create(client, namespace, name, spec).await;
}

async fn create(client: &kube::Client, namespace: &str, name: &str, spec: LeaseSpec) {
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
    };
    leases(client, namespace)
        .create(&PostParams::default(), &lease)
        .await
        .expect("create the lease");
}

/// The Lease's holder and renewTime (ns since the epoch).
pub async fn renewal(client: &kube::Client, namespace: &str, name: &str) -> (String, i128) {
    let lease = leases(client, namespace)
        .get(name)
        .await
        .expect("read the lease");
    let spec = lease.spec.unwrap_or_default();
    let renewed = spec.renew_time.expect("renewTime").0.as_nanosecond();
    (spec.holder_identity.unwrap_or_default(), renewed)
}

/// Writes to Leases in kube-system (the API server's own identity Lease, renewed every ~10 s),
/// each seen on a watch and stamped with CLOCK_MONOTONIC on arrival, so that they can be taken out
/// of a window's counts one by one rather than as an average rate.
#[derive(Clone, Default)]
pub struct SystemWrites {
    at: Arc<Mutex<Vec<u64>>>,
    /// Times the watch ended and was re-opened: each is one more WATCH request of ours.
    reopened: Arc<Mutex<Vec<u64>>>,
}

impl SystemWrites {
    pub async fn watch(client: &kube::Client) -> SystemWrites {
        let writes = SystemWrites::default();
        let feed = writes.clone();
        let api = leases(client, "kube-system");
        let ready = Arc::new(tokio::sync::Notify::new());
        let opened = ready.clone();
        tokio::spawn(async move {
            let mut version = api
                .list_metadata(&Default::default())
                .await
                .expect("list kube-system leases")
                .metadata
                .resource_version
                .unwrap_or_default();
            let mut first = true;
            loop {
                let stream = match api.watch(&WatchParams::default(), &version).await {
                    Ok(stream) => stream,
                    Err(e) if first => panic!("watch kube-system leases: {e}"),
                    // The control plane is stopped at the end.
                    Err(_) => return,
                };
                let mut stream = stream.boxed();
                if std::mem::take(&mut first) {
                    opened.notify_one();
                }
                while let Some(event) = stream.next().await {
                    match event {
                        Ok(WatchEvent::Added(l) | WatchEvent::Modified(l)) => {
                            feed.at.lock().unwrap().push(mono_ns());
                            version = l.metadata.resource_version.unwrap_or(version);
                        }
                        Ok(WatchEvent::Deleted(l)) => {
                            version = l.metadata.resource_version.unwrap_or(version);
                        }
                        Ok(WatchEvent::Bookmark(b)) => version = b.metadata.resource_version,
                        Ok(WatchEvent::Error(_)) | Err(_) => break,
                    }
                }
                feed.reopened.lock().unwrap().push(mono_ns());
            }
        });
        ready.notified().await;
        writes
    }

    /// Writes seen, and watches of ours that ended, in (from, to].
    pub fn between(&self, from: u64, to: u64) -> (usize, usize) {
        let count = |v: &Mutex<Vec<u64>>| {
            v.lock()
                .unwrap()
                .iter()
                .filter(|&&t| t > from && t <= to)
                .count()
        };
        (count(&self.at), count(&self.reopened))
    }
}

/// The API server's audit policy for `bench_real --audit`: Leases in `namespace` only, metadata
/// only (no bodies), no RequestReceived stage (each request is one line, with both stamps).
pub fn audit_flags(dir: &Path, namespace: &str) -> Vec<String> {
    let policy = dir.join("audit-policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [\"RequestReceived\"]\nrules:\n\
             - level: Metadata\n  resources:\n  - group: coordination.k8s.io\n    resources: [\"leases\"]\n  namespaces: [\"{namespace}\"]\n\
             - level: None\n"
        ),
    )
    .expect("write the audit policy");
    vec![
        format!("--audit-policy-file={}", policy.display()),
        format!("--audit-log-path={}", dir.join("audit.log").display()),
        // Written off the request path; one event per write (the log backend's default batch
        // size), so the stamps are the API server's and the log costs the requests little.
        "--audit-log-mode=batch".into(),
    ]
}

/// One successful or refused write of a Lease, as the API server's audit log stamped it
/// (CLOCK_REALTIME, microseconds).
#[derive(Clone, Copy, Debug)]
pub struct AuditedWrite {
    /// When the API server received the request, ns on CLOCK_MONOTONIC.
    pub received: u64,
    /// When it had answered, ns on CLOCK_MONOTONIC.
    pub answered: u64,
    pub code: u16,
}

/// The updates of Lease `name` in the audit log at `path`, by arrival.
pub fn audited_updates(path: &Path, name: &str, real_minus_mono: i128) -> Vec<AuditedWrite> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mono = |v: &serde_json::Value| -> Option<u64> {
        let t = v.as_str()?.parse::<k8s_openapi::jiff::Timestamp>().ok()?;
        Some((t.as_nanosecond() - real_minus_mono) as u64)
    };
    let mut writes: Vec<AuditedWrite> = text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|e| e["verb"] == "update" && e["objectRef"]["name"] == name)
        .filter_map(|e| {
            Some(AuditedWrite {
                received: mono(&e["requestReceivedTimestamp"])?,
                answered: mono(&e["stageTimestamp"])?,
                code: e["responseStatus"]["code"].as_u64()? as u16,
            })
        })
        .collect();
    writes.sort_by_key(|w| w.received);
    writes
}
