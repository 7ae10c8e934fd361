//! Exit codes: one table, named constants, one mapping function.
//!
//! The same table ([`TABLE`]) appears in `--help`, the man page (EXIT STATUS) and the README.

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

/// What a row of [`TABLE`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The command's own exit status, passed on.
    Command,
    /// One of lease-exec's own codes.
    Own(u8),
}

impl Code {
    /// How `--help`, the man page and the README name it: `the command's`, or the number.
    pub fn label(self) -> String {
        match self {
            Code::Command => "the command's".to_string(),
            Code::Own(code) => code.to_string(),
        }
    }
}

/// One exit code and what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// The code.
    pub code: Code,
    /// What it means, one sentence without a final stop.
    pub meaning: &'static str,
}

/// The exit-code table: the one copy in the code, from which `--help` and the man page are built
/// ([`crate::cli`]) and against which a test checks the README's.
pub const TABLE: [Row; 7] = [
    Row {
        code: Code::Command,
        meaning: "the command's own exit code; 128+N if it was killed by signal N",
    },
    Row {
        code: Code::Own(USAGE),
        meaning: "usage or configuration error (nothing was touched)",
    },
    Row {
        code: Code::Own(LOST),
        meaning: "leadership lost, or API server unreachable past --renew-deadline (the command was \
                  stopped)",
    },
    Row {
        code: Code::Own(WAIT_TIMEOUT),
        meaning: "--wait-timeout reached before the Lease was acquired (--handover: before the \
                  handover)",
    },
    Row {
        code: Code::Own(FAILED),
        meaning: "lease-exec failed before starting the command (authorization, unusable \
                  kubeconfig; --handover: refused; --check: a check failed)",
    },
    Row {
        code: Code::Own(NOT_EXECUTABLE),
        meaning: "the command is not executable",
    },
    Row {
        code: Code::Own(NOT_FOUND),
        meaning: "the command was not found",
    },
];

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
            assert_eq!(
                TABLE
                    .iter()
                    .filter(|row| row.code == Code::Own(code))
                    .count(),
                1,
                "exit code {code} is not in the table once"
            );
        }
        assert_eq!(TABLE[0].code, Code::Command);
    }
}
