//! How a run ends: a normal [`Outcome`] or an [`Error`], and the one mapping onto exit codes.

use std::time::Duration;

use crate::config::ConfigError;
use crate::exit::{self, ChildStatus};
use crate::lease::api::{AccessError, ApiError};
use crate::lease::record::describe_preferred;
use crate::term::Reason;

/// A run that went as intended.
#[derive(Debug)]
pub enum Outcome {
    /// The command ran and ended with this status.
    Child(ChildStatus),
    /// Stopped by this signal before the lease was acquired.
    Interrupted(i32),
}

/// A run that could not do its job. Each variant has one exit code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad arguments or configuration.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The kubeconfig or in-cluster config is unusable.
    #[error("{0}")]
    Access(AccessError),
    /// The API refused us (401/403) or answered something unusable while waiting.
    #[error("{0}")]
    Api(ApiError),
    /// `--wait-timeout` passed.
    #[error("not leader after {} (--wait-timeout)", humantime::format_duration(*.0))]
    WaitTimeout(Duration),
    /// `--handover`: `--wait-timeout` passed before another identity held the Lease.
    #[error("no handover within {} (--wait-timeout): {holder} still holds the lease; {}", humantime::format_duration(*.waited), if *.withdrawn { "the request was withdrawn" } else { "the request could not be withdrawn" })]
    HandoverTimeout {
        /// How long we waited.
        waited: Duration,
        /// The holder that did not step down.
        holder: String,
        /// Whether the request was taken back.
        withdrawn: bool,
    },
    /// Leadership lost; the command was stopped.
    #[error("leadership lost: {0}; the command was stopped")]
    Lost(Reason),
    /// The command could not be started.
    #[error("cannot start {program}: {error}")]
    Spawn {
        /// What we tried to run.
        program: String,
        /// Why it failed.
        error: std::io::Error,
    },
    /// `--handover` could not request the handover, or the request was dropped or superseded.
    #[error("{0}")]
    Handover(#[from] HandoverError),
    /// `--check`: this many checks failed (each printed with what to do).
    #[error("{0} check(s) failed")]
    Check(usize),
    /// Anything else that stops lease-exec before the command runs.
    #[error("{0}")]
    Fatal(String),
}

/// Why a handover could not be requested, or was given up: each a one-line message saying what to
/// do instead (exit code 125).
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The Lease does not exist.
    #[error("lease {lease} does not exist: nothing to hand over")]
    Missing {
        /// `namespace/name`.
        lease: String,
    },
    /// Nobody holds the Lease.
    #[error(
        "lease {lease} is not held (released): nothing to hand over, the next candidate takes it at once"
    )]
    NotHeld {
        /// `namespace/name`.
        lease: String,
    },
    /// The identity asked for holds it already.
    #[error("{preferred} already holds lease {lease}: nothing to hand over")]
    AlreadyHeld {
        /// The identity asked for.
        preferred: String,
        /// `namespace/name`.
        lease: String,
    },
    /// Another handover is pending.
    #[error(
        "a handover of lease {lease} to {} is pending already: wait for it (lease-exec --status), or clear spec.preferredHolder first",
        describe_preferred(.pending)
    )]
    Pending {
        /// `namespace/name`.
        lease: String,
        /// `spec.preferredHolder` as found.
        pending: String,
    },
    /// The API server dropped the request: the feature gate is off.
    #[error(
        "the API server dropped spec.preferredHolder: its CoordinatedLeaderElection feature gate is off (kube-apiserver --feature-gates=CoordinatedLeaderElection=true); without it, stop the holder with SIGTERM instead"
    )]
    GateOff,
    /// The Lease was deleted while the request was written.
    #[error("lease {lease} was deleted meanwhile: nothing to hand over")]
    Deleted {
        /// `namespace/name`.
        lease: String,
    },
    /// Every conditional write of the request met a newer Lease.
    #[error("lease {lease} kept changing under the request; try again")]
    KeptChanging {
        /// `namespace/name`.
        lease: String,
    },
    /// Someone asked for a handover to another identity meanwhile.
    #[error("the request was superseded by a handover to {}", describe_preferred(.to))]
    Superseded {
        /// `spec.preferredHolder` now.
        to: String,
    },
    /// The holder (or someone) cleared the request and the holder stays.
    #[error(
        "{holder} still holds the lease and dropped the handover request: it does not take part in handovers (a lease-exec holder does; client-go does with Coordinated=true), or someone withdrew it; stop the holder with SIGTERM instead"
    )]
    Dropped {
        /// The holder.
        holder: String,
    },
}

/// The one mapping from a run's end onto the exit-code table in [`crate::exit`].
pub fn exit_code(result: &Result<Outcome, Error>) -> u8 {
    match result {
        Ok(Outcome::Child(status)) => exit::for_child(*status),
        Ok(Outcome::Interrupted(signal)) => exit::for_signal(*signal),
        Err(Error::Config(ConfigError::CommandNotFound(_))) => exit::NOT_FOUND,
        Err(Error::Config(ConfigError::CommandNotExecutable { .. })) => exit::NOT_EXECUTABLE,
        Err(Error::Config(_)) => exit::USAGE,
        Err(
            Error::Access(_)
            | Error::Api(_)
            | Error::Handover(_)
            | Error::Fatal(_)
            | Error::Check(_),
        ) => exit::FAILED,
        Err(Error::WaitTimeout(_) | Error::HandoverTimeout { .. }) => exit::WAIT_TIMEOUT,
        Err(Error::Lost(_)) => exit::LOST,
        Err(Error::Spawn { error, .. }) => spawn_failure(error),
    }
}

/// The exit code for a command that could not be started, as a shell reports it: 127 when exec
/// found nothing to run (the file, or its `#!` interpreter, is missing), 126 when what it found
/// cannot be executed (permissions, no `#!` line, another architecture, a directory); anything
/// else (no memory, no processes left, the spawner gone) is lease-exec's own failure, 125.
fn spawn_failure(error: &std::io::Error) -> u8 {
    use nix::errno::Errno;
    match error.raw_os_error().map(Errno::from_raw) {
        Some(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP | Errno::ENAMETOOLONG) => {
            exit::NOT_FOUND
        }
        Some(
            Errno::EACCES
            | Errno::EPERM
            | Errno::ENOEXEC
            | Errno::EISDIR
            | Errno::ETXTBSY
            | Errno::ELIBBAD
            | Errno::E2BIG,
        ) => exit::NOT_EXECUTABLE,
        _ => exit::FAILED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_documented_code() {
        let cases: Vec<(Result<Outcome, Error>, u8)> = vec![
            (Ok(Outcome::Child(ChildStatus::Exited(3))), 3),
            (Ok(Outcome::Interrupted(15)), 143),
            (
                Err(Error::HandoverTimeout {
                    waited: Duration::from_secs(1),
                    holder: "a".into(),
                    withdrawn: true,
                }),
                exit::WAIT_TIMEOUT,
            ),
            (Err(ConfigError::Usage("x".into()).into()), exit::USAGE),
            (
                Err(ConfigError::CommandNotFound("x".into()).into()),
                exit::NOT_FOUND,
            ),
            (
                Err(ConfigError::CommandNotExecutable {
                    path: "x".into(),
                    why: "y",
                }
                .into()),
                exit::NOT_EXECUTABLE,
            ),
            (Err(Error::Access(AccessError("x".into()))), exit::FAILED),
            (
                Err(Error::WaitTimeout(Duration::from_secs(1))),
                exit::WAIT_TIMEOUT,
            ),
            (Err(Error::Lost(Reason::Suspended)), exit::LOST),
            (Err(Error::Lost(Reason::Late)), exit::LOST),
            (Err(HandoverError::GateOff.into()), exit::FAILED),
        ];
        let spawn = |error: std::io::Error| {
            Err(Error::Spawn {
                program: "x".into(),
                error,
            })
        };
        let cases = cases.into_iter().chain([
            (spawn(std::io::Error::from_raw_os_error(2)), exit::NOT_FOUND),
            (
                spawn(std::io::Error::from_raw_os_error(8)),
                exit::NOT_EXECUTABLE,
            ),
            (
                spawn(std::io::Error::from_raw_os_error(13)),
                exit::NOT_EXECUTABLE,
            ),
            (spawn(std::io::Error::from_raw_os_error(11)), exit::FAILED),
            (
                spawn(std::io::Error::other("the spawner thread is gone")),
                exit::FAILED,
            ),
        ]);
        for (result, code) in cases {
            assert_eq!(exit_code(&result), code, "{result:?}");
        }
    }

    #[test]
    fn a_lost_term_says_why_and_that_the_command_was_stopped() {
        assert_eq!(
            Error::Lost(Reason::RenewDeadline(Duration::from_secs(10))).to_string(),
            "leadership lost: no successful renewal for 10s (--renew-deadline); the command was stopped"
        );
        assert_eq!(
            Error::Lost(Reason::Taken("the lease is now held by b".into())).to_string(),
            "leadership lost: the lease is now held by b; the command was stopped"
        );
    }

    #[test]
    fn a_handover_error_names_the_lease_and_what_to_do() {
        let pending = HandoverError::Pending {
            lease: "ns/l".into(),
            pending: crate::lease::record::ANY_OTHER.into(),
        };
        assert_eq!(
            Error::from(pending).to_string(),
            "a handover of lease ns/l to any other candidate is pending already: wait for it (lease-exec --status), or clear spec.preferredHolder first"
        );
        let superseded = HandoverError::Superseded { to: "c".into() };
        assert_eq!(
            superseded.to_string(),
            "the request was superseded by a handover to c"
        );
    }
}
