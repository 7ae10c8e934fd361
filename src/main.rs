//! `lease-exec`: see the library crate for the theory of operation.
#![deny(unsafe_code)]

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(lease_exec::main())
}
