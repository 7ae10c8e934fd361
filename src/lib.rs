//! lease-exec: run a command only while holding a Kubernetes Lease.
//!
//! # Theory of operation
//!
//! 1. **Configure** ([`config`]): raw arguments ([`cli`]) become a validated [`config::Config`]:
//!    durations checked against each other and against the safety rule, the lease name checked,
//!    the command resolved in `PATH`. Any error here exits 2, 126 or 127 before the API is touched.
//! 2. **Wait** ([`lease::acquire`], rules in [`lease::campaign`]): read the Lease, then watch it
//!    (or poll). Claim it with a write conditioned on its `resourceVersion` once released or expired,
//!    resume it if it names us, create it once it has been absent long enough (a deleted holder may
//!    still run); leave it to the preferred candidate of a handover for one term. Expiry is judged
//!    on our monotonic clock from when we first saw the current record, never from `renewTime`.
//!    With `--holders`, one such campaign per slot Lease, sharing a gate so only one slot is won.
//! 3. **Lead** ([`supervise`], deadlines in [`term`]): spawn the command in its own process group
//!    ([`child`]), never past the term's renew deadline (checked right before exec); renew every
//!    `--renew-interval` ([`lease::renew`]), each attempt bounded so two fit before the renew
//!    deadline, and watch the Lease for a takeover, a handover request or an edit to undo at once
//!    (unless `--no-watch`). The fencing token (`leaseTransitions`) only rises: a process carries
//!    the highest value it has seen of the Lease across its terms ([`lease::record::Memory`]). If no renewal succeeds for the renew deadline, SIGTERM the
//!    group; on a handover request, SIGTERM it with the grace period (renewals go on); if another
//!    holder shows up, SIGKILL it at once; in every case SIGKILL it at the latest at
//!    `last renewal start + lease duration - safety margin`, before anyone else can take over, also
//!    from a watchdog thread that does not depend on the async runtime.
//! 4. **Stop**: when the command exits (or after forwarding SIGTERM and waiting out the grace
//!    period), kill what is left of its group and every leftover descendant, then release the Lease
//!    so the next candidate takes over at once, and exit with the command's status ([`exit`]).

#![deny(unsafe_code)]

pub mod check;
// The one exception: fork, exec and raw process control (see the module's safety comments).
#[allow(unsafe_code)]
pub mod child;
pub mod cli;
pub mod clock;
pub mod config;
pub mod error;
pub mod exit;
pub mod handover;
pub mod lease;
pub mod logging;
pub mod status;
pub mod supervise;
pub mod telemetry;
pub mod term;
pub mod timing;

use clap::Parser;

pub use error::{Error, Outcome, exit_code};

/// The whole program: parse, validate, run, and return the exit code.
pub fn main() -> u8 {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    if let Some(what) = cli.generate {
        return match cli::generate(what, &mut std::io::stdout().lock()) {
            Ok(()) => 0,
            Err(e) => {
                logging::last_words(&format!("lease-exec: cannot write to stdout: {e}\n"));
                exit::FAILED
            }
        };
    }
    let log_format = cli.log_format;
    logging::init(log_format);
    let config = match config::Config::from_cli(cli, &|key| std::env::var(key).ok()) {
        Ok(config) => config,
        Err(e) => {
            let result = Err(Error::Config(e));
            report(&result, log_format);
            return exit_code(&result);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            logging::last_words(&format!(
                "lease-exec: cannot start the async runtime: {e}\n"
            ));
            return exit::FAILED;
        }
    };
    let result = runtime.block_on(async {
        match &config.action {
            config::Action::Run(command) => supervise::run(&config, command).await,
            config::Action::Status(format) => status::run(&config, *format).await,
            config::Action::Check(format) => check::run(&config, *format).await,
            config::Action::Handover { to, format } => {
                handover::run(&config, to.as_deref(), *format).await
            }
        }
    });
    report(&result, log_format);
    let code = exit_code(&result);
    // Do not wait for in-flight API requests to wind down.
    runtime.shutdown_background();
    code
}

/// Prints clap's help and version as usual; any other parse error becomes one line and exit 2.
fn usage_error(error: clap::Error) -> u8 {
    use clap::error::ErrorKind;
    match error.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            if error.use_stderr() {
                // The help shown for a missing argument goes to stderr: bounded like any last words.
                let rendered = error.render();
                let text = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                    rendered.ansi().to_string()
                } else {
                    rendered.to_string()
                };
                logging::last_words(&text);
            } else {
                let _ = error.print();
            }
            if error.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                exit::USAGE
            } else {
                0
            }
        }
        _ => {
            // clap renders several lines (the error, a tip, the usage); keep the error itself,
            // joining a list that follows a colon ("required arguments were not provided:").
            let rendered = error.render().to_string();
            let mut lines = rendered.lines().skip_while(|l| l.trim().is_empty());
            let mut message = lines
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ")
                .to_string();
            if message.ends_with(':') {
                let items: Vec<&str> = lines
                    .take_while(|l| !l.trim().is_empty())
                    .map(str::trim)
                    .collect();
                message = format!("{} {}", message, items.join(", "));
            }
            logging::last_words(&format!("lease-exec: {message} (see lease-exec --help)\n"));
            exit::USAGE
        }
    }
}

/// The last word on stderr: one plain line (`lease-exec: ...`), or a JSON log line with
/// `--log-format json` so that log collectors parse every line; after every queued log line, and
/// waited for [`logging::FLUSH_TIMEOUT`] at most, once: stderr may be what is stuck, and the exit
/// must come all the same.
fn report(result: &Result<Outcome, Error>, format: cli::LogFormat) {
    match (result, format) {
        (Err(e), cli::LogFormat::Json) | (Err(e @ Error::Lost(_)), _) => {
            tracing::error!(exit_code = exit_code(result), "{e}");
            logging::flush();
        }
        (Err(e), cli::LogFormat::Text) => logging::last_words(&format!("lease-exec: {e}\n")),
        (Ok(_), _) => logging::flush(),
    }
}
