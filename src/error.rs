//! How a run ends: a normal [`Outcome`] or an [`Error`], and the one mapping onto exit codes.

use std::time::Duration;

use crate::config::ConfigError;
use crate::exit::{self, ChildStatus};
use crate::lease::api::{AccessError, ApiError};

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
    Lost(String),
    /// The command could not be started.
    #[error("cannot start {program}: {error}")]
    Spawn {
        /// What we tried to run.
        program: String,
        /// Why it failed.
        error: std::io::Error,
    },
    /// `--check`: this many checks failed (each printed with what to do).
    #[error("{0} check(s) failed")]
    Check(usize),
    /// Anything else that stops lease-exec before the command runs.
    #[error("{0}")]
    Fatal(String),
}

/// The one mapping from a run's end onto the exit-code table in [`crate::exit`].
pub fn exit_code(result: &Result<Outcome, Error>) -> u8 {
    match result {
        Ok(Outcome::Child(status)) => exit::for_child(*status),
        Ok(Outcome::Interrupted(signal)) => exit::for_signal(*signal),
        Err(Error::Config(ConfigError::CommandNotFound(_))) => exit::NOT_FOUND,
        Err(Error::Config(ConfigError::CommandNotExecutable { .. })) => exit::NOT_EXECUTABLE,
        Err(Error::Config(_)) => exit::USAGE,
        Err(Error::Access(_) | Error::Api(_) | Error::Fatal(_) | Error::Check(_)) => exit::FAILED,
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
            (Err(Error::Lost("x".into())), exit::LOST),
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
}
