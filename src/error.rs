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
        Err(Error::Access(_) | Error::Api(_) | Error::Fatal(_)) => exit::FAILED,
        Err(Error::WaitTimeout(_)) => exit::WAIT_TIMEOUT,
        Err(Error::Lost(_)) => exit::LOST,
        Err(Error::Spawn { error, .. }) => match error.kind() {
            std::io::ErrorKind::NotFound => exit::NOT_FOUND,
            _ => exit::NOT_EXECUTABLE,
        },
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
        for (result, code) in cases {
            assert_eq!(exit_code(&result), code, "{result:?}");
        }
    }
}
