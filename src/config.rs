//! The validated configuration: raw [`Cli`] arguments become a [`Config`] here, or a one-line
//! [`ConfigError`] that names the option and the rule. Nothing is touched before this succeeds.

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::cli::{Cli, LogFormat, OutputFormat};
use crate::lease::record::{ANY_OTHER, PodOwner};
use crate::timing::{Timing, TimingError};

/// The downward-API variables lease-exec reads: the Pod's name (identity prefix and owner), its
/// namespace (the Lease's default namespace) and its uid (owner reference).
pub const POD_ENV: [&str; 3] = [POD_NAME, POD_NAMESPACE, POD_UID];
const POD_NAME: &str = "POD_NAME";
const POD_NAMESPACE: &str = "POD_NAMESPACE";
const POD_UID: &str = "POD_UID";

/// Where the in-cluster service-account namespace is mounted.
pub const SERVICE_ACCOUNT_NAMESPACE: &str =
    "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// Everything lease-exec needs to run, checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// Name of the Lease (with `holders` > 1, the prefix of the slots' Leases).
    pub lease: String,
    /// How many processes may hold it at once (`--holders`): 1, or that many slot Leases.
    pub holders: u32,
    /// Namespace of the Lease, if decided before the kubeconfig is read.
    pub namespace: Option<String>,
    /// Holder identity written to the Lease.
    pub identity: String,
    /// Where the identity came from (for `--check`).
    pub identity_from: &'static str,
    /// Where the namespace came from, when decided before the kubeconfig is read.
    pub namespace_from: Option<&'static str>,
    /// Durations, checked against each other.
    pub timing: Timing,
    /// Release the Lease at exit.
    pub release: bool,
    /// Watch the Lease while waiting (else poll).
    pub watch: bool,
    /// Campaign again after a loss instead of exiting.
    pub recampaign: bool,
    /// What to do: run the command, or show the Lease.
    pub action: Action,
    /// Metrics, statsd, events and logs.
    pub observability: Observability,
    /// How to reach the API server.
    pub access: Access,
    /// The Pod that owns the Lease while this process holds it (`POD_NAME` and `POD_UID`).
    pub owner: Option<PodOwner>,
}

/// What lease-exec was asked to do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Hold the Lease and run this command.
    Run(Command),
    /// Print the Lease and exit (`--status`).
    Status(OutputFormat),
    /// Check that lease-exec would work here, touching nothing (`--check`).
    Check(OutputFormat),
    /// Ask the holder to hand the Lease over, wait for the new holder (`--handover`).
    Handover {
        /// The identity preferred (`--to`); `None`: any other candidate.
        to: Option<String>,
        /// How to print the outcome.
        format: OutputFormat,
    },
}

/// Metrics, statsd, events and logs.
#[derive(Debug, Clone)]
pub struct Observability {
    /// `--metrics-addr`.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// `--statsd-addr` and `--statsd-prefix`.
    pub statsd: Option<(String, String)>,
    /// Record Kubernetes Events.
    pub events: bool,
    /// `--log-format`.
    pub log_format: LogFormat,
}

/// How to reach the API server.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Explicit kubeconfig path.
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context.
    pub context: Option<String>,
}

/// The resolved command.
#[derive(Debug, Clone)]
pub struct Command {
    /// The executable found (after the PATH lookup).
    pub program: PathBuf,
    /// Arguments, `argv[0]` being the name as the user gave it.
    pub args: Vec<OsString>,
    /// The name as the user gave it.
    pub name: OsString,
}

/// A configuration error: one line naming the problem and the fix. Exit code 2, or 126/127 for the
/// command.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Bad command-line usage.
    #[error("{0}")]
    Usage(String),
    /// Durations that break a rule.
    #[error(transparent)]
    Timing(#[from] TimingError),
    /// The lease name is not a DNS subdomain.
    #[error(
        "invalid lease name {0:?}: it must be a DNS subdomain (lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters)"
    )]
    LeaseName(String),
    /// The namespace is not a DNS label.
    #[error(
        "invalid namespace {0:?}: it must be a DNS label (lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters)"
    )]
    Namespace(String),
    /// The identity is empty or unusable.
    #[error("invalid --identity {0:?}: {1}")]
    Identity(String, &'static str),
    /// The command was not found.
    #[error("command not found: {0:?} (not a file, and not found in PATH)")]
    CommandNotFound(OsString),
    /// The command is not executable.
    #[error("command not executable: {path} ({why})")]
    CommandNotExecutable {
        /// The path found.
        path: PathBuf,
        /// Why it cannot run.
        why: &'static str,
    },
}

/// Reads an environment variable; abstracted so tests need not touch the process environment.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

impl Config {
    /// Validates raw arguments. `env` reads the environment (`POD_NAME`, `POD_NAMESPACE`, `PATH`...).
    /// Each concern is checked in turn, in this order, so the first problem found is the one
    /// named.
    pub fn from_cli(mut cli: Cli, env: EnvLookup<'_>) -> Result<Config, ConfigError> {
        let lease = lease_name(cli.lease.take())?;
        let timing = timing(&cli)?;
        let (namespace, namespace_from) = namespace(cli.namespace.take(), env)?;
        let (identity, identity_from) = identity(cli.identity.take(), env)?;
        let owner = if cli.owner_pod {
            Some(pod_owner(namespace.as_deref(), env)?)
        } else {
            None
        };
        let action = action(&mut cli, &lease, env)?;
        let observability = observability(&mut cli)?;
        check_holders(&lease, cli.holders)?;

        Ok(Config {
            lease,
            holders: cli.holders,
            namespace,
            identity,
            identity_from,
            namespace_from,
            timing,
            release: !cli.no_release,
            watch: !cli.no_watch,
            recampaign: cli.recampaign,
            action,
            observability,
            access: Access {
                kubeconfig: cli.kubeconfig,
                context: cli.context,
            },
            owner,
        })
    }
}

/// The Lease's name (`<LEASE>`): given, and a DNS subdomain.
fn lease_name(lease: Option<String>) -> Result<String, ConfigError> {
    let Some(lease) = lease else {
        return Err(ConfigError::Usage(
            "no lease name given: `lease-exec <LEASE> -- <COMMAND>...`, e.g. `lease-exec my-lease -- ./worker`".into(),
        ));
    };
    if !is_dns_subdomain(&lease) {
        return Err(ConfigError::LeaseName(lease));
    }
    Ok(lease)
}

/// The timing options, checked against each other (see [`Timing::validate`]).
fn timing(cli: &Cli) -> Result<Timing, ConfigError> {
    let timing = Timing {
        lease_duration: cli.lease_duration,
        renew_deadline: cli.renew_deadline,
        retry_period: cli.retry_period,
        renew_interval: cli.renew_interval.unwrap_or_else(|| {
            Timing::default_renew_interval(cli.lease_duration, cli.renew_deadline, cli.retry_period)
        }),
        grace_period: cli.grace_period,
        wait_timeout: cli.wait_timeout,
    };
    timing.validate()?;
    Ok(timing)
}

/// The Lease's namespace, if decided before the kubeconfig is read, and where it came from:
/// `-n`, else `POD_NAMESPACE`, else the service account's namespace file.
fn namespace(
    namespace: Option<String>,
    env: EnvLookup<'_>,
) -> Result<(Option<String>, Option<&'static str>), ConfigError> {
    let (namespace, namespace_from) = match namespace {
        Some(ns) => (Some(ns), Some("-n, --namespace or LEASE_EXEC_NAMESPACE")),
        None => match non_empty(env(POD_NAMESPACE)) {
            Some(ns) => (Some(ns), Some("POD_NAMESPACE")),
            None => {
                let mounted = std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE)
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty());
                let from = mounted
                    .as_ref()
                    .map(|_| "the service account's namespace file");
                (mounted, from)
            }
        },
    };
    if let Some(ns) = &namespace
        && !is_dns_label(ns)
    {
        return Err(ConfigError::Namespace(ns.clone()));
    }
    Ok((namespace, namespace_from))
}

/// The holder identity and where it came from: `--identity`, else `POD_NAME` (or the host name)
/// and a random suffix.
fn identity(
    identity: Option<String>,
    env: EnvLookup<'_>,
) -> Result<(String, &'static str), ConfigError> {
    let (identity, identity_from) = match identity {
        Some(identity) => {
            validate_identity(&identity)?;
            (identity, "--identity or LEASE_EXEC_IDENTITY")
        }
        None if non_empty(env(POD_NAME)).is_some() => {
            (default_identity(env), "POD_NAME and a random suffix")
        }
        None => (default_identity(env), "the host name and a random suffix"),
    };
    Ok((identity, identity_from))
}

/// What to do: hand over, show, check, or run the command (found in `PATH`). Only running takes a
/// command.
fn action(cli: &mut Cli, lease: &str, env: EnvLookup<'_>) -> Result<Action, ConfigError> {
    let action = if cli.handover {
        if cli.holders > 1 {
            return Err(ConfigError::Usage(format!(
                "--handover hands over one Lease: name the slot instead of --holders, e.g. `lease-exec --handover {}`",
                slot_name(lease, cli.holders, 0)
            )));
        }
        if !cli.command.is_empty() {
            return Err(ConfigError::Usage(
                "--handover asks the holder to hand the lease over and runs nothing: drop the command after `--`".into(),
            ));
        }
        if let Some(to) = &cli.to {
            if to.trim().is_empty() || to == ANY_OTHER {
                return Err(ConfigError::Usage(format!(
                    "invalid --to {to:?}: name the identity to hand the lease over to, or leave --to out for any other candidate"
                )));
            }
            if validate_identity(to).is_err() {
                return Err(ConfigError::Usage(format!(
                    "invalid --to {to:?}: an identity has at most 253 characters and no control characters"
                )));
            }
        }
        Action::Handover {
            to: cli.to.take(),
            format: cli.output,
        }
    } else if cli.status {
        if !cli.command.is_empty() {
            return Err(ConfigError::Usage(
                "--status shows the lease and runs nothing: drop the command after `--`".into(),
            ));
        }
        Action::Status(cli.output)
    } else if cli.check {
        if !cli.command.is_empty() {
            return Err(ConfigError::Usage(
                "--check checks that lease-exec would work here and runs nothing: drop the command after `--`".into(),
            ));
        }
        Action::Check(cli.output)
    } else {
        let mut argv = std::mem::take(&mut cli.command).into_iter();
        let Some(name) = argv.next() else {
            return Err(ConfigError::Usage(
                "no command given: put the command after `--`, e.g. `lease-exec my-lease -- ./worker`".into(),
            ));
        };
        let program = resolve_command(&name, env("PATH").as_deref())?;
        Action::Run(Command {
            program,
            args: argv.collect(),
            name,
        })
    };
    Ok(action)
}

/// Metrics, statsd, events and logs; the statsd prefix and address checked.
fn observability(cli: &mut Cli) -> Result<Observability, ConfigError> {
    if cli.statsd_prefix.is_empty() || cli.statsd_prefix.contains([':', '|', '@', ' ']) {
        return Err(ConfigError::Usage(format!(
            "invalid --statsd-prefix {:?}: use letters, digits, '.', '_' or '-'",
            cli.statsd_prefix
        )));
    }
    if let Some(addr) = &cli.statsd_addr {
        let port = addr
            .rsplit_once(':')
            .map(|(host, port)| (host, port.parse::<u16>()));
        if !matches!(port, Some((host, Ok(p))) if !host.is_empty() && p != 0) {
            return Err(ConfigError::Usage(format!(
                "invalid --statsd-addr {addr:?}: use HOST:PORT, e.g. statsd.monitoring:8125"
            )));
        }
    }
    let observability = Observability {
        metrics_addr: cli.metrics_addr,
        statsd: cli
            .statsd_addr
            .take()
            .map(|addr| (addr, std::mem::take(&mut cli.statsd_prefix))),
        events: !cli.no_events,
        log_format: cli.log_format,
    };
    Ok(observability)
}

/// `--holders`: from 1 to [`MAX_HOLDERS`], and every slot's Lease name valid.
fn check_holders(lease: &str, holders: u32) -> Result<(), ConfigError> {
    if holders == 0 || holders > MAX_HOLDERS {
        return Err(ConfigError::Usage(format!(
            "invalid --holders {}: it must be from 1 to {MAX_HOLDERS}",
            holders
        )));
    }
    let last = slot_name(lease, holders, holders - 1);
    if !is_dns_subdomain(&last) {
        return Err(ConfigError::Usage(format!(
            "--holders {} makes the Lease names {lease}-0 to {last}, and {last:?} is not a valid name (at most 63 characters between dots): choose a shorter lease name",
            holders
        )));
    }
    Ok(())
}

/// Most slots `--holders` accepts: each is a Lease, and a candidate watches every one.
pub const MAX_HOLDERS: u32 = 100;

/// The Lease of slot `slot` of `holders` for `lease`: the Lease itself for one holder, else
/// `lease-<slot>`.
pub fn slot_name(lease: &str, holders: u32, slot: u32) -> String {
    if holders <= 1 {
        lease.to_string()
    } else {
        format!("{lease}-{slot}")
    }
}

impl Config {
    /// The Leases a candidate contends for, by slot.
    pub fn slot_names(&self) -> Vec<String> {
        (0..self.holders)
            .map(|slot| slot_name(&self.lease, self.holders, slot))
            .collect()
    }
}

/// The Pod named as the Lease's owner with `--owner-pod`, checked: an ownerReference names an
/// object in the owner's own namespace, so a Lease in another namespace would point at a Pod that
/// does not exist there, and the garbage collector would delete the Lease over and over.
fn pod_owner(lease_namespace: Option<&str>, env: EnvLookup<'_>) -> Result<PodOwner, ConfigError> {
    let (Some(name), Some(uid)) = (non_empty(env(POD_NAME)), non_empty(env(POD_UID))) else {
        return Err(ConfigError::Usage(
            "--owner-pod needs POD_NAME and POD_UID from the downward API (fieldRef metadata.name and metadata.uid, see deploy/deployment.yaml)".into(),
        ));
    };
    let pod_namespace = non_empty(env(POD_NAMESPACE)).or_else(|| {
        std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    });
    let Some(pod_namespace) = pod_namespace else {
        return Err(ConfigError::Usage(
            "--owner-pod needs the Pod's namespace: set POD_NAMESPACE from the downward API (fieldRef metadata.namespace)".into(),
        ));
    };
    if let Some(lease_namespace) = lease_namespace
        && lease_namespace != pod_namespace
    {
        return Err(ConfigError::Usage(format!(
            "--owner-pod: the Lease's namespace {lease_namespace:?} is not the Pod's ({pod_namespace:?}); an owner reference cannot cross namespaces: drop --owner-pod or -n"
        )));
    }
    Ok(PodOwner { name, uid })
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

/// `POD_NAME` (else the hostname) plus a random suffix, so that a second process in the same pod
/// (say, started with `kubectl exec`) never shares the identity of the first.
fn default_identity(env: EnvLookup<'_>) -> String {
    let base = non_empty(env(POD_NAME))
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "lease-exec".to_string());
    let suffix: u32 = rand::random();
    format!("{base}_{suffix:08x}")
}

fn validate_identity(identity: &str) -> Result<(), ConfigError> {
    if identity.trim().is_empty() {
        return Err(ConfigError::Identity(
            identity.to_string(),
            "it must not be empty; leave --identity unset for a unique default",
        ));
    }
    if identity.chars().any(char::is_control) {
        return Err(ConfigError::Identity(
            identity.to_string(),
            "it must not contain control characters",
        ));
    }
    if identity == ANY_OTHER {
        return Err(ConfigError::Identity(
            identity.to_string(),
            "it means \"any other candidate\" in a handover (spec.preferredHolder); choose another",
        ));
    }
    if identity.len() > 253 {
        return Err(ConfigError::Identity(
            identity.to_string(),
            "it must be at most 253 characters",
        ));
    }
    Ok(())
}

/// RFC 1123 DNS label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
pub fn is_dns_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// RFC 1123 DNS subdomain: dot-separated DNS labels, at most 253 characters.
pub fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty() && name.len() <= 253 && name.split('.').all(is_dns_label)
}

/// Finds the command as a shell would: a name with a `/` is a path, anything else is looked up in
/// `PATH`. Reports 127 (not found) or 126 (found but not executable) before the Lease is touched.
pub fn resolve_command(name: &OsStr, path: Option<&str>) -> Result<PathBuf, ConfigError> {
    let as_path = Path::new(name);
    if name.is_empty() {
        return Err(ConfigError::CommandNotFound(name.to_owned()));
    }
    if as_path.as_os_str().as_encoded_bytes().contains(&b'/') {
        return check_executable(as_path, name);
    }
    let mut found_not_executable = None;
    for dir in path.unwrap_or("/usr/local/bin:/usr/bin:/bin").split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(dir).join(as_path);
        match check_executable(&candidate, name) {
            Ok(found) => return Ok(found),
            Err(e @ ConfigError::CommandNotExecutable { .. }) => {
                found_not_executable.get_or_insert(e);
            }
            Err(_) => {}
        }
    }
    Err(found_not_executable.unwrap_or_else(|| ConfigError::CommandNotFound(name.to_owned())))
}

fn check_executable(path: &Path, name: &OsStr) -> Result<PathBuf, ConfigError> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(_) => return Err(ConfigError::CommandNotFound(name.to_owned())),
    };
    if meta.is_dir() {
        return Err(ConfigError::CommandNotExecutable {
            path: path.to_owned(),
            why: "it is a directory",
        });
    }
    if meta.permissions().mode() & 0o111 == 0
        || nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_err()
    {
        return Err(ConfigError::CommandNotExecutable {
            path: path.to_owned(),
            why: "permission denied: it lacks the executable bit",
        });
    }
    if is_foreign_elf(path) {
        return Err(ConfigError::CommandNotExecutable {
            path: path.to_owned(),
            why: "it is a program for another processor architecture",
        });
    }
    Ok(path.to_owned())
}

/// Whether `path` is an ELF program for another machine. exec would fail with ENOEXEC, and
/// execvp would then hand the binary to `/bin/sh` as if it were a script.
fn is_foreign_elf(path: &Path) -> bool {
    use std::io::Read;
    // e_machine of the programs this build runs (and of those its kernel commonly also runs).
    let native: &[u16] = if cfg!(target_arch = "x86_64") {
        &[62, 3] // EM_X86_64, EM_386
    } else if cfg!(target_arch = "aarch64") {
        &[183, 40] // EM_AARCH64, EM_ARM
    } else {
        return false;
    };
    let mut header = [0u8; 20];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut header));
    if read.is_err() || header[..4] != *b"\x7fELF" {
        return false;
    }
    let machine = match header[5] {
        1 => u16::from_le_bytes([header[18], header[19]]),
        2 => u16::from_be_bytes([header[18], header[19]]),
        _ => return true,
    };
    !native.contains(&machine)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::time::Duration;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("lease-exec").chain(args.iter().copied())).unwrap()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn config(args: &[&str]) -> Result<Config, ConfigError> {
        Config::from_cli(cli(args), &|k| {
            (k == "PATH").then(|| "/usr/bin:/bin".to_string())
        })
    }

    #[test]
    fn the_environment_list_names_what_the_code_reads() {
        for name in POD_ENV {
            assert!(
                crate::cli::ENVIRONMENT_READ
                    .iter()
                    .any(|item| item.name == name),
                "{name} is not in ENVIRONMENT_READ"
            );
        }
    }

    #[test]
    fn defaults_follow_client_go() {
        let c = config(&["my-lease", "--", "true"]).unwrap();
        assert_eq!(c.timing, Timing::default());
        assert_eq!(c.timing.safety_margin(), Duration::from_millis(500));
        assert_eq!(c.timing.kill_by(), Duration::from_millis(14_500));
        assert!(c.release);
        let Action::Run(command) = &c.action else {
            panic!("runs a command")
        };
        assert!(command.program.ends_with("true"));
    }

    #[test]
    fn timing_rules_are_enforced() {
        let bad = [
            &["--retry-period", "10s"][..],
            &["--renew-deadline", "15s"],
            &["--renew-deadline", "16s"],
            &[
                "--lease-duration",
                "1500ms",
                "--renew-deadline",
                "1s",
                "--retry-period",
                "100ms",
            ],
            &["--lease-duration", "0s"],
            &["--retry-period", "0s"],
            &["--lease-duration", "1000h"],
            &["--wait-timeout", "0s"],
            // 14.6s > 15s - 500ms: no time left to stop the command.
            &["--renew-deadline", "14600ms"],
            // Renewing less often than retrying, or not before the deadline.
            &["--renew-interval", "1s"],
            &["--renew-interval", "10s"],
        ];
        for extra in bad {
            let mut args = extra.to_vec();
            args.extend(["l", "--", "true"]);
            let err = config(&args).expect_err(&format!("{extra:?} should be rejected"));
            assert!(matches!(err, ConfigError::Timing(_)), "{err}");
            assert!(
                err.to_string().contains("--"),
                "message names the option: {err}"
            );
        }
        let ok = config(&[
            "--lease-duration",
            "1s",
            "--renew-deadline",
            "700ms",
            "--retry-period",
            "100ms",
            "l",
            "--",
            "true",
        ]);
        assert!(ok.is_ok());
    }

    #[test]
    fn intervals_have_a_floor() {
        for extra in [
            &["--retry-period", "2ms", "--no-watch"][..],
            &["--retry-period", "99ms"],
            &["--retry-period", "50ms", "--renew-interval", "50ms"],
            // 1s - 850ms leaves 75 ms per renewal attempt.
            &[
                "--renew-deadline",
                "1s",
                "--retry-period",
                "100ms",
                "--renew-interval",
                "850ms",
            ],
        ] {
            let mut args = extra.to_vec();
            args.extend(["l", "--", "true"]);
            let err = config(&args).expect_err(&format!("{extra:?} should be rejected"));
            assert!(matches!(err, ConfigError::Timing(_)), "{err}");
            assert!(err.to_string().contains("100ms"), "names the floor: {err}");
        }
        assert!(config(&["--retry-period", "100ms", "l", "--", "true"]).is_ok());
    }

    #[test]
    fn two_renewal_attempts_fit_before_the_renew_deadline_at_any_valid_timing() {
        let ms = Duration::from_millis;
        let mut checked = 0;
        for lease in [1u64, 2, 3, 15, 60, 3600] {
            for deadline_pct in [10u64, 30, 50, 66, 90, 96] {
                for retry_pct in [1u64, 10, 33, 50, 90] {
                    for interval_pct in [1u64, 20, 33, 50, 75, 99] {
                        let lease_duration = Duration::from_secs(lease);
                        let renew_deadline = lease_duration * deadline_pct as u32 / 100;
                        let retry_period = renew_deadline * retry_pct as u32 / 100;
                        let renew_interval = renew_deadline * interval_pct as u32 / 100;
                        let t = Timing {
                            lease_duration,
                            renew_deadline,
                            retry_period,
                            renew_interval,
                            ..Timing::default()
                        };
                        if t.validate().is_err() {
                            continue;
                        }
                        checked += 1;
                        let attempt = t.renew_timeout();
                        assert!(attempt >= Timing::FLOOR, "{t:?}");
                        assert!(
                            t.renew_interval + attempt * 2 <= t.renew_deadline,
                            "{t:?}: two attempts of {attempt:?} do not fit"
                        );
                    }
                }
            }
        }
        assert!(checked > 100, "only {checked} valid timings");
        assert_eq!(Timing::default().renew_timeout(), ms(2500));
    }

    #[test]
    fn leaders_renew_every_third_of_the_lease_by_default() {
        let c = config(&["l", "--", "true"]).unwrap();
        assert_eq!(c.timing.renew_interval, Duration::from_secs(5));
        // Never later than half the renew deadline, never more often than the retry period.
        let c = config(&["--renew-deadline", "4s", "l", "--", "true"]).unwrap();
        assert_eq!(c.timing.renew_interval, Duration::from_secs(2));
        let c = config(&[
            "--lease-duration",
            "3s",
            "--renew-deadline",
            "2s",
            "--retry-period",
            "900ms",
            "l",
            "--",
            "true",
        ])
        .unwrap();
        assert_eq!(c.timing.renew_interval, Duration::from_millis(1000));
        let c = config(&["--renew-interval", "2s", "l", "--", "true"]).unwrap();
        assert_eq!(c.timing.renew_interval, Duration::from_secs(2));
    }

    #[test]
    fn short_leases_keep_a_margin() {
        let t = Timing {
            lease_duration: Duration::from_secs(1),
            renew_deadline: Duration::from_millis(700),
            retry_period: Duration::from_millis(100),
            renew_interval: Duration::from_millis(333),
            ..Timing::default()
        };
        assert_eq!(t.safety_margin(), Duration::from_millis(220));
        assert_eq!(t.kill_by(), Duration::from_millis(780));
        assert!(t.validate().is_ok());
        assert!(
            Timing {
                renew_deadline: Duration::from_millis(800),
                ..t
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn request_timeout_fits_inside_the_deadline() {
        let t = Timing::default();
        assert_eq!(t.request_timeout(), Duration::from_secs(5));
        assert!(t.request_timeout() < t.renew_deadline);
    }

    #[test]
    fn lease_names_must_be_dns_subdomains() {
        for good in ["a", "my-lease", "a.b-c.d", "0abc"] {
            assert!(is_dns_subdomain(good), "{good}");
        }
        for bad in [
            "",
            "My-Lease",
            "-a",
            "a-",
            "a..b",
            "a_b",
            &"x".repeat(254),
            "a/b",
        ] {
            assert!(!is_dns_subdomain(bad), "{bad}");
        }
        assert!(matches!(
            config(&["Bad_Name", "--", "true"]),
            Err(ConfigError::LeaseName(_))
        ));
    }

    #[test]
    fn missing_command_is_a_usage_error() {
        assert!(matches!(config(&["l"]), Err(ConfigError::Usage(_))));
        assert!(matches!(config(&["l", "--"]), Err(ConfigError::Usage(_))));
    }

    #[test]
    fn commands_resolve_like_a_shell() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("script");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
        let path = dir.path().to_str().unwrap();
        assert!(matches!(
            resolve_command(OsStr::new("script"), Some(path)),
            Err(ConfigError::CommandNotExecutable { .. })
        ));
        assert!(matches!(
            resolve_command(OsStr::new("no-such-command-here"), Some(path)),
            Err(ConfigError::CommandNotFound(_))
        ));
        assert!(matches!(
            resolve_command(dir.path().as_os_str(), Some(path)),
            Err(ConfigError::CommandNotExecutable { .. })
        ));
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            resolve_command(OsStr::new("script"), Some(path)).unwrap(),
            script
        );
    }

    #[test]
    fn identity_defaults_are_unique_per_process() {
        let env = |k: &str| (k == "POD_NAME").then(|| "worker-0".to_string());
        let a = default_identity(&env);
        let b = default_identity(&env);
        assert!(a.starts_with("worker-0_"), "{a}");
        assert_ne!(a, b);
        assert!(default_identity(&no_env).len() > 9);
    }

    #[test]
    fn empty_identity_is_rejected() {
        assert!(matches!(
            config(&["--identity", " ", "l", "--", "true"]),
            Err(ConfigError::Identity(..))
        ));
    }

    #[test]
    fn the_pod_owner_is_opt_in_and_never_crosses_namespaces() {
        let env = |k: &str| match k {
            "POD_NAME" => Some("p".to_string()),
            "POD_UID" => Some("u".to_string()),
            "POD_NAMESPACE" => Some("jobs".to_string()),
            "PATH" => Some("/usr/bin:/bin".to_string()),
            _ => None,
        };
        let c = Config::from_cli(cli(&["l", "--", "true"]), &env).unwrap();
        assert_eq!(c.owner, None, "off by default");
        let c = Config::from_cli(cli(&["--owner-pod", "l", "--", "true"]), &env).unwrap();
        assert_eq!(
            c.owner,
            Some(PodOwner {
                name: "p".into(),
                uid: "u".into()
            })
        );
        let c = Config::from_cli(cli(&["--owner-pod", "-n", "jobs", "l", "--", "true"]), &env);
        assert!(c.is_ok());
        let e = Config::from_cli(
            cli(&["--owner-pod", "-n", "other", "l", "--", "true"]),
            &env,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cannot cross namespaces"), "{e}");
        let no_uid = |k: &str| if k == "POD_UID" { None } else { env(k) };
        let e = Config::from_cli(cli(&["--owner-pod", "l", "--", "true"]), &no_uid)
            .unwrap_err()
            .to_string();
        assert!(e.contains("POD_UID"), "{e}");
    }
}
