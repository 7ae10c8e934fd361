//! Exit codes: one table, named constants, one mapping function.
//!
//! The same table appears in `--help` ([`TABLE`]), the man page and the README.

/// Usage or configuration error: nothing was touched.
pub const USAGE: u8 = 2;
/// Leadership lost, or the API server unreachable past the renew deadline. The child was stopped.
pub const LOST: u8 = 75;
/// `--wait-timeout` reached before the lease was acquired (or, with `--handover`, the handover).
pub const WAIT_TIMEOUT: u8 = 124;
/// lease-exec failed before starting the child (authorization, unusable kubeconfig, ...), or a
/// `--handover` was refused.
pub const FAILED: u8 = 125;
/// The command exists but cannot be executed.
pub const NOT_EXECUTABLE: u8 = 126;
/// The command was not found.
pub const NOT_FOUND: u8 = 127;
/// A process killed by signal N reports 128 + N.
pub const SIGNAL_BASE: u8 = 128;

/// The exit-code table's text, as a macro so that `--help` is built from it (`concat!` takes
/// literals only): the one copy of the table in the code.
#[macro_export]
macro_rules! exit_table {
    () => {
        "\
Exit codes:
  <child's>  the command's own exit code; 128+N if it was killed by signal N
  2          usage or configuration error (nothing was touched)
  75         leadership lost, or API server unreachable past --renew-deadline (the command was stopped)
  124        --wait-timeout reached before the lease was acquired (--handover: before the handover)
  125        lease-exec failed before starting the command (authorization, unusable kubeconfig;
             --handover: refused; --check: a check failed)
  126        the command is not executable
  127        the command was not found"
    };
}

/// The exit-code table as shown in `--help`.
pub const TABLE: &str = exit_table!();

/// The exit code that reports a signal death, as shells do.
pub fn for_signal(signal: i32) -> u8 {
    SIGNAL_BASE.saturating_add(u8::try_from(signal).unwrap_or(127))
}

/// The exit code that passes on a child's wait status.
pub fn for_child(status: ChildStatus) -> u8 {
    match status {
        ChildStatus::Exited(code) => u8::try_from(code & 0xff).unwrap_or(1),
        ChildStatus::Signaled(signal) => for_signal(signal),
    }
}

/// How a child ended, as reported by `waitpid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildStatus {
    /// Exited with this code.
    Exited(i32),
    /// Killed by this signal number.
    Signaled(i32),
}

impl std::fmt::Display for ChildStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChildStatus::Exited(code) => write!(f, "exit code {code}"),
            ChildStatus::Signaled(signal) => {
                let name = nix::sys::signal::Signal::try_from(*signal)
                    .map(|s| s.as_str())
                    .unwrap_or("unknown signal");
                write!(f, "signal {signal} ({name})")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_deaths_map_to_128_plus_n() {
        assert_eq!(for_child(ChildStatus::Signaled(15)), 143);
        assert_eq!(for_child(ChildStatus::Signaled(9)), 137);
        assert_eq!(for_signal(2), 130);
    }

    #[test]
    fn exit_codes_pass_through() {
        assert_eq!(for_child(ChildStatus::Exited(0)), 0);
        assert_eq!(for_child(ChildStatus::Exited(3)), 3);
        assert_eq!(for_child(ChildStatus::Exited(256 + 7)), 7);
    }

    #[test]
    fn table_lists_every_constant() {
        for code in [USAGE, LOST, WAIT_TIMEOUT, FAILED, NOT_EXECUTABLE, NOT_FOUND] {
            assert!(
                TABLE
                    .lines()
                    .any(|l| l.trim_start().starts_with(&code.to_string())),
                "exit code {code} missing from the table"
            );
        }
    }
}
