//! One watch of one Lease, for every caller: the waiting follower ([`super::acquire`]), the
//! leader's guard ([`super::renew::guard`]) and `--handover`'s follower ([`crate::handover`]).
//! Each says where to watch from; this module opens the stream, turns what it delivers into one
//! [`Seen`] type, and owns the rules every caller needs alike:
//!
//! - **Re-open floor**: a stream is never opened sooner than [`reopen_floor`] after the last one
//!   was, so a server (or a proxy) that ends every watch at once cannot turn any caller into a
//!   busy loop.
//! - **Backoff**: after a failure to open or a broken stream, the next open waits
//!   [`super::backoff::resync_delay`] (jittered, up to 1 s) while the server does not answer at
//!   all, and [`super::backoff::backoff`] (doubling from the retry period) once it answers with
//!   errors more than [`super::backoff::FAST_TRIES`] times in a row: the same schedule as the
//!   waiting follower's reads.
//! - **Idle timeout**: the server ends every watch after [`super::api::WATCH_SECONDS`] and sends bookmarks
//!   meanwhile, so a stream silent for [`WATCH_IDLE`] is a dead (half-open) connection: it is
//!   dropped and re-opened.
//! - **410 Gone** ends the stream with [`Seen::Expired`]: the position is too old. A caller then
//!   watches from the current state (`""`: the server sends the Lease as it is first, then what
//!   follows), never from a GET's resourceVersion, which is the object's last change and can be
//!   as old as the one that expired.
//! - **Refused** (403) or not served (404): [`Unwatchable`]; the caller polls instead.

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::WatchEvent;
use tokio::time::{Instant, sleep_until};

use super::api::{ApiError, LeaseApi, WATCH_IDLE};
use super::backoff::{FAST_TRIES, backoff, jitter, resync_delay};
use crate::timing::Timing;

/// What a watch delivered.
#[derive(Debug)]
pub enum Seen {
    /// The Lease was added or modified: its new state.
    Changed(Lease),
    /// The Lease was deleted: its last state.
    Deleted(Lease),
    /// The server says it has sent everything up to this resourceVersion.
    Bookmark(String),
    /// 410 Gone: the position watched from is too old; watch from the current state.
    Expired,
    /// The stream ended (the server's timeout, or silence past [`WATCH_IDLE`]); the next call
    /// re-opens it from where the caller says.
    Ended,
}

/// Watching this Lease is refused (403) or not served (404): poll instead.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unwatchable(pub String);

/// Why [`LeaseWatch::next`] delivered nothing.
#[derive(Debug)]
pub enum Failure {
    /// Refused or not served: poll instead.
    Unwatchable(Unwatchable),
    /// The stream could not be opened, or broke: the next call re-opens it after a backoff.
    Failed(ApiError),
}

type EventStream = BoxStream<'static, Result<WatchEvent<Lease>, ApiError>>;

/// The shortest time between two opens of a watch: the retry period, at most 1 s.
pub fn reopen_floor(timing: &Timing) -> Duration {
    timing.retry_period.min(Duration::from_secs(1))
}

/// One watch of one Lease, re-opened as needed. See the module documentation for the rules.
#[derive(Default)]
pub struct LeaseWatch {
    stream: Option<EventStream>,
    /// When a stream was last opened (or an open attempted).
    opened: Option<Instant>,
    /// Not before this after a failure.
    reopen_at: Option<Instant>,
    /// Failures in a row (an event resets it).
    failures: u32,
    /// State of the jitter's random sequence (xorshift64; never 0).
    rng: u64,
}

impl LeaseWatch {
    /// Whether a stream is open now.
    pub fn is_open(&self) -> bool {
        self.stream.is_some()
    }

    /// Drops the open stream, if any (the caller reads the Lease instead, say).
    pub fn close(&mut self) {
        self.stream = None;
    }

    /// When the next open may happen (now, if it may at once).
    pub fn open_at(&self, timing: &Timing) -> Option<Instant> {
        let floor = self.opened.map(|at| at + reopen_floor(timing));
        floor.max(self.reopen_at)
    }

    /// The next thing the watch delivers. Opens a stream from `from` (a resourceVersion, or `""`
    /// for the current state first) when none is open, waiting for the re-open floor and any
    /// backoff first.
    pub async fn next(
        &mut self,
        api: &LeaseApi,
        from: &str,
        timing: &Timing,
    ) -> Result<Seen, Failure> {
        if self.stream.is_none() {
            if let Some(at) = self.open_at(timing) {
                sleep_until(at).await;
            }
            self.opened = Some(Instant::now());
            match api.watch(from, timing.request_timeout()).await {
                Ok(stream) => {
                    tracing::debug!(from, "watch opened");
                    self.stream = Some(stream);
                    self.reopen_at = None;
                }
                Err(e @ ApiError::Denied { .. }) => {
                    return Err(Failure::Unwatchable(Unwatchable(e.to_string())));
                }
                Err(ApiError::NotFound) => {
                    return Err(Failure::Unwatchable(Unwatchable(
                        "the API server does not serve watches".into(),
                    )));
                }
                Err(e) => return Err(self.failed(e, timing)),
            }
        }
        let stream = self.stream.as_mut().expect("opened above");
        let event = match tokio::time::timeout(WATCH_IDLE, stream.next()).await {
            Ok(event) => event,
            Err(_) => {
                tracing::debug!(
                    "the watch was silent past the server's timeout; re-opening it on a new connection"
                );
                self.stream = None;
                return Ok(Seen::Ended);
            }
        };
        match event {
            Some(Ok(WatchEvent::Added(lease) | WatchEvent::Modified(lease))) => {
                self.failures = 0;
                Ok(Seen::Changed(lease))
            }
            Some(Ok(WatchEvent::Deleted(lease))) => {
                self.failures = 0;
                Ok(Seen::Deleted(lease))
            }
            Some(Ok(WatchEvent::Bookmark(bookmark))) => {
                self.failures = 0;
                Ok(Seen::Bookmark(bookmark.metadata.resource_version))
            }
            Some(Ok(WatchEvent::Error(status))) if status.code == 410 => {
                tracing::debug!("watch expired (410 Gone); watching from the current state");
                self.stream = None;
                Ok(Seen::Expired)
            }
            Some(Ok(WatchEvent::Error(status))) => {
                let e = api.classify("watch", kube::Error::Api(status));
                Err(self.failed(e, timing))
            }
            Some(Err(e)) => Err(self.failed(e, timing)),
            None => {
                self.stream = None;
                Ok(Seen::Ended)
            }
        }
    }

    /// A failure: the stream is dropped and the next open backs off.
    fn failed(&mut self, e: ApiError, timing: &Timing) -> Failure {
        self.stream = None;
        self.failures += 1;
        let delay = if !e.answered() || self.failures <= FAST_TRIES {
            if self.rng == 0 {
                self.rng = rand::random::<u64>() | 1;
            }
            resync_delay(timing, self.failures, jitter(&mut self.rng))
        } else {
            backoff(timing, self.failures - FAST_TRIES)
        };
        self.reopen_at = Some(Instant::now() + delay);
        Failure::Failed(e)
    }
}
