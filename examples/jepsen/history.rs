//! The Lease's history as the API servers committed it, for the judge's blame: which of two
//! overlapping workers broke the rules. Two watches, one per API server (a nemesis stops at most
//! one at a time), merged by resourceVersion; each re-opens from its last resourceVersion when it
//! ends, and reads the Lease again after a 410.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, WatchEvent, WatchParams};

/// One committed version of the Lease.
#[derive(Debug, Clone, PartialEq)]
pub struct Version {
    pub holder: String,
    /// `acquireTime` and `renewTime`, µs since the epoch (CLOCK_REALTIME of the writer; every
    /// process here runs on one machine).
    pub acquire_us: Option<i64>,
    pub renew_us: Option<i64>,
    pub duration_s: i64,
    /// The object was deleted at this version.
    pub deleted: bool,
}

impl Version {
    fn of(lease: &Lease, deleted: bool) -> Version {
        let spec = lease.spec.clone().unwrap_or_default();
        Version {
            holder: if deleted {
                String::new()
            } else {
                spec.holder_identity.unwrap_or_default()
            },
            acquire_us: spec.acquire_time.map(|t| t.0.as_microsecond()),
            renew_us: spec.renew_time.map(|t| t.0.as_microsecond()),
            duration_s: spec.lease_duration_seconds.unwrap_or(0).into(),
            deleted,
        }
    }
}

type Versions = Arc<Mutex<BTreeMap<u64, Version>>>;

pub struct History {
    versions: Versions,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for History {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl History {
    pub fn start(clients: &[kube::Client], ns: &str, name: &str) -> History {
        let versions: Versions = Arc::default();
        let tasks = clients
            .iter()
            .map(|client| {
                let api: Api<Lease> = Api::namespaced(client.clone(), ns);
                tokio::spawn(record(api, name.to_string(), versions.clone()))
            })
            .collect();
        History { versions, tasks }
    }

    /// Every version either watch saw, in resourceVersion order.
    pub fn versions(&self) -> Vec<(u64, Version)> {
        let v = self.versions.lock().unwrap();
        v.iter().map(|(rv, v)| (*rv, v.clone())).collect()
    }
}

async fn record(api: Api<Lease>, name: String, versions: Versions) {
    let put = |lease: &Lease, deleted: bool| {
        if let Some(rv) = lease
            .metadata
            .resource_version
            .as_deref()
            .and_then(|rv| rv.parse::<u64>().ok())
        {
            versions
                .lock()
                .unwrap()
                .insert(rv, Version::of(lease, deleted));
        }
    };
    let mut from: Option<String> = None;
    loop {
        let Some(rv) = from.clone() else {
            match tokio::time::timeout(Duration::from_secs(2), api.get(&name)).await {
                Ok(Ok(lease)) => {
                    put(&lease, false);
                    from = lease.metadata.resource_version;
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
            continue;
        };
        let params = WatchParams::default()
            .fields(&format!("metadata.name={name}"))
            .timeout(60);
        let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_secs(2), api.watch(&params, &rv)).await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut stream = std::pin::pin!(stream);
        // A frozen API server keeps its stream open and silent: the other watch covers that time;
        // this one reads the Lease again once it has heard nothing for 70 s.
        while let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_secs(70), stream.next()).await
        {
            match event {
                Ok(WatchEvent::Added(l) | WatchEvent::Modified(l)) => {
                    put(&l, false);
                    from = l.metadata.resource_version.clone();
                }
                Ok(WatchEvent::Deleted(l)) => {
                    put(&l, true);
                    from = l.metadata.resource_version.clone();
                }
                Ok(WatchEvent::Bookmark(b)) => from = Some(b.metadata.resource_version),
                Ok(WatchEvent::Error(status)) => {
                    if status.code == 410 {
                        from = None;
                    }
                    break;
                }
                Err(_) => break,
            }
        }
    }
}

/// Which of two overlapping workers broke the rules: `earlier` (its holder's worker still ran at
/// `later_exec_us`) and `later` (started then).
#[derive(Debug, Clone, PartialEq)]
pub enum Blame {
    /// The later one's claim came after the term it replaced had ended (or after a release or a
    /// deletion): the earlier worker ran past its holder's term.
    RanPastItsTerm,
    /// The later one claimed `early_ms` before the term it replaced had ended.
    ClaimedEarly { early_ms: f64 },
    /// The history has no claim by the later one before its worker started.
    Unknown,
}

/// The blame for an overlap: finds `later`'s claim (the last version where the holder became
/// `later`, acquired before its worker started at `later_exec_us`) and the version it replaced.
/// A claim is within the rules when the record it replaced was released or deleted, or when its
/// `acquireTime` is at least the replaced `renewTime` + `leaseDurationSeconds`: every candidate
/// (lease-exec and client-go alike) counts a term from when it saw the record, which is after
/// the writer stamped `renewTime`, and stamps `acquireTime` before its claim is written.
pub fn blame(versions: &[(u64, Version)], later: &str, later_exec_us: i64) -> Blame {
    let claim = versions.windows(2).rfind(|w| {
        let (prev, this) = (&w[0].1, &w[1].1);
        this.holder == later
            && prev.holder != later
            && this.acquire_us.is_some_and(|a| a <= later_exec_us)
    });
    let Some(w) = claim else {
        return Blame::Unknown;
    };
    let (prev, this) = (&w[0].1, &w[1].1);
    if prev.deleted || prev.holder.is_empty() {
        return Blame::RanPastItsTerm;
    }
    let (Some(acquired), Some(renewed)) = (this.acquire_us, prev.renew_us) else {
        return Blame::Unknown;
    };
    let ends = renewed + prev.duration_s * 1_000_000;
    if acquired >= ends {
        Blame::RanPastItsTerm
    } else {
        Blame::ClaimedEarly {
            early_ms: (ends - acquired) as f64 / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(holder: &str, acquire: i64, renew: i64) -> Version {
        Version {
            holder: holder.into(),
            acquire_us: Some(acquire),
            renew_us: Some(renew),
            duration_s: 6,
            deleted: false,
        }
    }

    #[test]
    fn a_claim_after_the_term_blames_the_worker_that_ran_on() {
        let h = vec![(1, v("a", 0, 1_000_000)), (2, v("b", 7_000_000, 7_000_000))];
        assert_eq!(blame(&h, "b", 7_100_000), Blame::RanPastItsTerm);
    }

    #[test]
    fn a_claim_inside_the_term_blames_the_claimant() {
        let h = vec![(1, v("a", 0, 1_000_000)), (2, v("b", 6_000_000, 6_000_000))];
        assert_eq!(
            blame(&h, "b", 6_100_000),
            Blame::ClaimedEarly { early_ms: 1000.0 }
        );
    }

    #[test]
    fn the_last_claim_before_the_exec_counts_and_a_release_frees() {
        let released = Version {
            holder: String::new(),
            ..v("", 0, 2_000_000)
        };
        let h = vec![
            (1, v("b", 0, 0)),
            (2, v("a", 1_000_000, 1_000_000)),
            (3, released),
            (4, v("b", 2_000_100, 2_000_100)),
        ];
        assert_eq!(blame(&h, "b", 2_000_200), Blame::RanPastItsTerm);
        assert_eq!(blame(&h, "c", 2_000_200), Blame::Unknown);
    }
}
