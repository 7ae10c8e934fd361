//! The Lease's history as the API servers committed it, for the judge's blame: which of two
//! overlapping workers broke the rules. Two watches, one per API server (a nemesis stops at most
//! one at a time), merged by resourceVersion; each re-opens from its last resourceVersion when it
//! ends, and reads the Lease again after a 410. Two versions count as consecutive commits only
//! when one watch saw both with nothing missed between them (no 410 and re-read in between).

use std::collections::{BTreeMap, BTreeSet};
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
    /// The object was deleted at this version (the other fields are its last state).
    pub deleted: bool,
}

impl Version {
    fn of(lease: &Lease, deleted: bool) -> Version {
        let spec = lease.spec.clone().unwrap_or_default();
        Version {
            holder: spec.holder_identity.unwrap_or_default(),
            acquire_us: spec.acquire_time.map(|t| t.0.as_microsecond()),
            renew_us: spec.renew_time.map(|t| t.0.as_microsecond()),
            duration_s: spec.lease_duration_seconds.unwrap_or(0).into(),
            deleted,
        }
    }
}

#[derive(Default)]
struct Seen {
    versions: BTreeMap<u64, Version>,
    /// (a, b): one watch saw version b right after version a, with nothing missed between.
    links: BTreeSet<(u64, u64)>,
}

type Shared = Arc<Mutex<Seen>>;

/// Pairs of resourceVersions one watch saw one right after the other.
pub type Links = BTreeSet<(u64, u64)>;

pub struct History {
    seen: Shared,
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
        let seen: Shared = Arc::default();
        let tasks = clients
            .iter()
            .map(|client| {
                let api: Api<Lease> = Api::namespaced(client.clone(), ns);
                tokio::spawn(record(api, name.to_string(), seen.clone()))
            })
            .collect();
        History { seen, tasks }
    }

    /// Every version either watch saw, in resourceVersion order, and the pairs known to be
    /// consecutive.
    pub fn snapshot(&self) -> (Vec<(u64, Version)>, Links) {
        let seen = self.seen.lock().unwrap();
        let versions = seen
            .versions
            .iter()
            .map(|(rv, v)| (*rv, v.clone()))
            .collect();
        (versions, seen.links.clone())
    }
}

async fn record(api: Api<Lease>, name: String, seen: Shared) {
    // The last version this watch saw, while nothing has been missed since.
    let mut last: Option<u64> = None;
    let mut put = |lease: &Lease, deleted: bool, read: bool| {
        let Some(rv) = lease
            .metadata
            .resource_version
            .as_deref()
            .and_then(|rv| rv.parse::<u64>().ok())
        else {
            return;
        };
        let mut seen = seen.lock().unwrap();
        seen.versions.insert(rv, Version::of(lease, deleted));
        if let (Some(prev), false) = (last, read) {
            seen.links.insert((prev, rv));
        }
        last = Some(rv);
    };
    let mut from: Option<String> = None;
    loop {
        let Some(rv) = from.clone() else {
            match tokio::time::timeout(Duration::from_secs(2), api.get(&name)).await {
                Ok(Ok(lease)) => {
                    // A fresh read: whatever came between the last version seen and this one
                    // is unknown.
                    put(&lease, false, true);
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
                    put(&l, false, false);
                    from = l.metadata.resource_version.clone();
                }
                Ok(WatchEvent::Deleted(l)) => {
                    put(&l, true, false);
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
    /// The history has no claim by the later one before its worker started, or cannot say
    /// which version the claim replaced (a watch missed versions there).
    Unknown,
}

/// The blame for an overlap: finds `later`'s claim (the last version where the holder became
/// `later`, acquired before its worker started at `later_exec_us`) and the version it replaced.
/// A claim is within the rules when the record it replaced was released, or when its
/// `acquireTime` is at least the replaced `renewTime` + `leaseDurationSeconds` (a deleted record
/// is judged by its last state): every candidate (lease-exec and client-go alike) counts a term
/// from when it saw the record, which is after the writer stamped `renewTime`, and stamps
/// `acquireTime` before its claim is written. Both are CLOCK_REALTIME of this one machine.
pub fn blame(versions: &[(u64, Version)], links: &Links, later: &str, later_exec_us: i64) -> Blame {
    let claim = versions.windows(2).rfind(|w| {
        let (prev, this) = (&w[0].1, &w[1].1);
        this.holder == later
            && prev.holder != later
            && this.acquire_us.is_some_and(|a| a <= later_exec_us)
    });
    let Some(w) = claim else {
        return Blame::Unknown;
    };
    if !links.contains(&(w[0].0, w[1].0)) {
        return Blame::Unknown;
    }
    let (prev, this) = (&w[0].1, &w[1].1);
    if prev.holder.is_empty() {
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

    fn all_linked(h: &[(u64, Version)]) -> BTreeSet<(u64, u64)> {
        h.windows(2).map(|w| (w[0].0, w[1].0)).collect()
    }

    #[test]
    fn a_claim_after_the_term_blames_the_worker_that_ran_on() {
        let h = vec![(1, v("a", 0, 1_000_000)), (2, v("b", 7_000_000, 7_000_000))];
        assert_eq!(
            blame(&h, &all_linked(&h), "b", 7_100_000),
            Blame::RanPastItsTerm
        );
    }

    #[test]
    fn a_claim_inside_the_term_blames_the_claimant() {
        let h = vec![(1, v("a", 0, 1_000_000)), (2, v("b", 6_000_000, 6_000_000))];
        assert_eq!(
            blame(&h, &all_linked(&h), "b", 6_100_000),
            Blame::ClaimedEarly { early_ms: 1000.0 }
        );
    }

    #[test]
    fn versions_not_seen_consecutively_by_one_watch_blame_nobody() {
        // A renewal by a at 5 s may have been missed between the two: nothing can be said.
        let h = vec![(1, v("a", 0, 1_000_000)), (5, v("b", 7_000_000, 7_000_000))];
        assert_eq!(blame(&h, &BTreeSet::new(), "b", 7_100_000), Blame::Unknown);
    }

    #[test]
    fn a_deleted_record_is_judged_by_its_last_state() {
        let deleted = Version {
            deleted: true,
            ..v("a", 0, 1_000_000)
        };
        let h = vec![(1, deleted), (2, v("b", 2_000_000, 2_000_000))];
        assert_eq!(
            blame(&h, &all_linked(&h), "b", 2_100_000),
            Blame::ClaimedEarly { early_ms: 5000.0 }
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
        let links = all_linked(&h);
        assert_eq!(blame(&h, &links, "b", 2_000_200), Blame::RanPastItsTerm);
        assert_eq!(blame(&h, &links, "c", 2_000_200), Blame::Unknown);
    }
}
