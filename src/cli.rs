//! The command-line definition (clap derive). Nothing past [`crate::config`] sees these types.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

const ABOUT: &str = "Run a command only while holding a Kubernetes Lease";

const LONG_ABOUT: &str = "\
Run a command only while holding a Kubernetes Lease (coordination.k8s.io/v1).

lease-exec waits until it holds the Lease, then starts the command in its own process group and \
keeps renewing the Lease. If leadership is lost, or the API server cannot be reached before \
--renew-deadline, it stops the command (SIGTERM, then SIGKILL before the Lease can expire in \
anyone else's eyes) and exits 75. When the command exits by itself, the Lease is released so the \
next candidate takes over at once, and lease-exec exits with the command's code.";

const EXAMPLES: &str = "\
Examples:
  Run one copy of a worker across all replicas of a Deployment:
    lease-exec my-worker -- ./worker --flag

  Debug by hand against a kubeconfig context, giving up after a minute of waiting:
    lease-exec -n jobs --context staging --wait-timeout 1m my-worker -- ./worker

  Faster failover with shorter durations (retry < renew deadline < lease duration):
    lease-exec --lease-duration 6s --renew-deadline 4s --retry-period 1s my-worker -- ./worker";

/// One item of a list in `--help` and the man page: a name and what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    /// What the item is about (a signal, a variable).
    pub name: &'static str,
    /// What it means, in sentences.
    pub meaning: &'static str,
}

/// The SIGNALS section of `--help` and the man page.
pub const SIGNALS: [Item; 7] = [
    Item {
        name: "SIGTERM, SIGINT",
        meaning: "Forwarded to the command's process group, followed by SIGCONT so that a stopped \
                  command can act on it. The command then has --grace-period before what is left \
                  of its group is SIGKILLed; a second SIGTERM or SIGINT kills it at once. The \
                  Lease is then released and lease-exec exits with the command's status. While \
                  waiting for the Lease, lease-exec stops waiting and exits 128+N (130 for \
                  SIGINT, 143 for SIGTERM).",
    },
    Item {
        name: "SIGHUP, SIGQUIT",
        meaning: "Forwarded to the command's process group. While waiting for the Lease: exit \
                  128+N.",
    },
    Item {
        name: "SIGUSR1, SIGUSR2",
        meaning: "Forwarded to the command's process group; ignored while waiting.",
    },
    Item {
        name: "Ctrl-C in a terminal",
        meaning: "When stdin is a terminal and lease-exec is in its foreground, the command's \
                  process group is the terminal's foreground group: Ctrl-C and Ctrl-\\ reach the \
                  command directly, as without lease-exec.",
    },
    Item {
        name: "leadership lost",
        meaning: "SIGTERM to the command's group once renewals have failed for --renew-deadline \
                  (counted from the start of the last renewal that succeeded), SIGKILL at the \
                  latest --lease-duration minus a safety margin (200ms + 2% of --lease-duration) \
                  after that start, before anyone else can take the Lease over; SIGKILL at once \
                  when another holder took the Lease. Then exit 75 (with --recampaign, wait for \
                  the Lease again).",
    },
    Item {
        name: "the command's end",
        meaning: "Once the command has exited, SIGKILL to what is left of its process group and \
                  to every descendant that left it (as PID 1: every other process in the PID \
                  namespace), before the Lease is released.",
    },
    Item {
        name: "SIGKILL to lease-exec",
        meaning: "The command gets SIGKILL too (its parent-death signal); the Lease is not \
                  released and expires. Only as PID 1 of a container does everything the command \
                  started die with lease-exec.",
    },
];

/// Variables lease-exec reads besides its options: the ENVIRONMENT section of `--help` and the man
/// page.
pub const ENVIRONMENT_READ: [Item; 6] = [
    Item {
        name: "POD_NAME",
        meaning: "The holder identity's prefix (else the hostname); with --owner-pod, the Pod \
                  named as the Lease's owner. Set it from the downward API.",
    },
    Item {
        name: "POD_NAMESPACE",
        meaning: "The Lease's namespace when -n is not given.",
    },
    Item {
        name: "POD_UID",
        meaning: "With --owner-pod, the uid of the owner reference.",
    },
    Item {
        name: "KUBECONFIG",
        meaning: "The kubeconfig file(s) when --kubeconfig is not given (else ~/.kube/config, \
                  else in a Pod the in-cluster configuration: KUBERNETES_SERVICE_HOST, \
                  KUBERNETES_SERVICE_PORT and the service account's files).",
    },
    Item {
        name: "HTTPS_PROXY, HTTP_PROXY, NO_PROXY",
        meaning: "As kubectl takes them (upper case first, then lower case), unless the \
                  kubeconfig's cluster names a proxy-url; loopback addresses and localhost never \
                  go through them.",
    },
    Item {
        name: "RUST_LOG",
        meaning: "The log filter (default: info).",
    },
];

/// Variables lease-exec gives the command: the ENVIRONMENT section of `--help` and the man page.
pub const ENVIRONMENT_GIVEN: [Item; 5] = [
    Item {
        name: HELD_LEASE,
        meaning: "The Lease held (with --holders, the slot's Lease).",
    },
    Item {
        name: HELD_NAMESPACE,
        meaning: "The Lease's namespace.",
    },
    Item {
        name: HELD_IDENTITY,
        meaning: "The holder identity.",
    },
    Item {
        name: HELD_TRANSITIONS,
        meaning: "The Lease's leaseTransitions after acquiring: new for every command started, \
                  and never repeating nor decreasing for any process that saw the earlier value, \
                  so usable as a fencing token.",
    },
    Item {
        name: HELD_SLOT,
        meaning: "With --holders N > 1: the slot held, 0 to N-1.",
    },
];

const ENVIRONMENT_OPTIONS: &str = "Every option can also be set from its environment variable \
    (LEASE_EXEC_LEASE_DURATION=6s), so that a pod spec can configure it: --help shows each with its \
    option, the man page lists them below. The option variables are removed from the command's \
    environment, so a lease-exec it starts is an ordinary new candidate with its own identity.";

/// Width of the lists laid out here: under clap's 100 columns, so `--help` does not re-wrap them
/// on a wide terminal.
const WIDTH: usize = 98;

/// `text` broken into lines of at most [`WIDTH`] columns, each starting with `indent` spaces.
fn wrap(text: &str, indent: usize) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && indent + line.len() + 1 + word.len() > WIDTH {
            out.push_str(&format!("{:indent$}{line}\n", ""));
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        out.push_str(&format!("{:indent$}{line}\n", ""));
    }
    out
}

/// The items as (name, meaning) pairs.
fn items(list: &[Item]) -> impl Iterator<Item = (String, String)> + '_ {
    list.iter()
        .map(|item| (item.name.to_string(), item.meaning.to_string()))
}

/// A list as clap lays out long help: the name, then its meaning indented below it.
fn help_list(out: &mut String, items: impl IntoIterator<Item = (String, String)>) {
    for (name, meaning) in items {
        out.push_str(&format!("  {name}\n"));
        out.push_str(&wrap(&meaning, 10));
    }
}

/// What `--help` shows after the options: examples, exit status, signals and environment, built
/// from [`crate::exit::TABLE`], [`SIGNALS`] and the environment lists.
pub fn after_long_help() -> String {
    let mut out = format!("{EXAMPLES}\n\nExit status:\n");
    help_list(
        &mut out,
        crate::exit::TABLE
            .iter()
            .map(|row| (row.code.label(), row.meaning.to_string())),
    );
    out.push_str("\nSignals:\n");
    help_list(&mut out, items(&SIGNALS));
    out.push_str("\nEnvironment:\n");
    out.push_str(&wrap(ENVIRONMENT_OPTIONS, 2));
    help_list(&mut out, items(&ENVIRONMENT_READ));
    out.push_str("\nGiven to the command:\n");
    help_list(&mut out, items(&ENVIRONMENT_GIVEN));
    out.trim_end().to_string()
}

/// Given to the command: the Lease held.
pub const HELD_LEASE: &str = "LEASE_EXEC_HELD_LEASE";
/// Given to the command: the Lease's namespace.
pub const HELD_NAMESPACE: &str = "LEASE_EXEC_HELD_NAMESPACE";
/// Given to the command: the holder identity.
pub const HELD_IDENTITY: &str = "LEASE_EXEC_HELD_IDENTITY";
/// Given to the command: `leaseTransitions` when acquired (a fencing token).
pub const HELD_TRANSITIONS: &str = "LEASE_EXEC_TRANSITIONS";
/// Given to the command with `--holders` N > 1: the slot held, 0 to N-1.
pub const HELD_SLOT: &str = "LEASE_EXEC_SLOT";
/// Every variable lease-exec gives the command.
pub const GIVEN_TO_COMMAND: [&str; 5] = [
    HELD_LEASE,
    HELD_NAMESPACE,
    HELD_IDENTITY,
    HELD_TRANSITIONS,
    HELD_SLOT,
];

/// The environment variables read as options: removed from the command's environment.
pub fn option_variables() -> Vec<String> {
    use clap::CommandFactory;
    Cli::command()
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|env| env.to_string_lossy().into_owned())
        .collect()
}

/// Raw command-line arguments. Validated into a [`crate::config::Config`].
#[derive(Debug, Parser)]
#[command(
    name = "lease-exec",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_long_help = after_long_help(),
    max_term_width = 100
)]
pub struct Cli {
    /// Name of the Lease to hold (a DNS subdomain, e.g. `my-worker`)
    #[arg(value_name = "LEASE", env = "LEASE_EXEC_LEASE")]
    pub lease: Option<String>,

    /// The command to run while holding the Lease, after `--`
    #[arg(value_name = "COMMAND", last = true, num_args = 0..)]
    pub command: Vec<OsString>,

    /// Namespace of the Lease [default: POD_NAMESPACE, else the in-cluster service-account
    /// namespace, else the kubeconfig context's namespace, else `default`]
    #[arg(short, long, env = "LEASE_EXEC_NAMESPACE", help_heading = "Lease")]
    pub namespace: Option<String>,

    /// Holder identity written to the Lease [default: POD_NAME (else the hostname) plus a random
    /// suffix, unique per process]. A stable identity lets a restarted process resume its
    /// leadership at once; it is then your promise that no two live processes share it.
    #[arg(long, env = "LEASE_EXEC_IDENTITY", help_heading = "Lease")]
    pub identity: Option<String>,

    /// Keep the Lease claimed at exit instead of releasing it for the next candidate
    #[arg(long, env = "LEASE_EXEC_NO_RELEASE", help_heading = "Lease")]
    pub no_release: bool,

    /// Name this Pod (POD_NAME, POD_UID) as the Lease's owner while holding it, so the garbage
    /// collector deletes the Lease with the Pod. Off by default: a force-deleted Pod's container
    /// may still run while its Lease is collected, so candidates then wait a lease duration before
    /// creating it again. Only in the Pod's own namespace.
    #[arg(long, env = "LEASE_EXEC_OWNER_POD", help_heading = "Lease")]
    pub owner_pod: bool,

    /// After leadership is lost and the command stopped, wait for the Lease again and re-run the
    /// command when it is won, instead of exiting 75 (for runs outside a kubelet's restart loop:
    /// by hand, under systemd, in a script). The command's own exit still ends lease-exec
    #[arg(long, env = "LEASE_EXEC_RECAMPAIGN", help_heading = "Lease")]
    pub recampaign: bool,

    /// Let up to N copies of the command run at once (a semaphore): N Leases LEASE-0 to
    /// LEASE-(N-1), each held by one process at a time; a candidate waits for all of them and takes
    /// whichever frees first, never more than one. The command gets LEASE_EXEC_SLOT. 1: the one
    /// Lease LEASE
    #[arg(
        long,
        env = "LEASE_EXEC_HOLDERS",
        value_name = "N",
        default_value_t = 1,
        help_heading = "Lease"
    )]
    pub holders: u32,

    /// Send no watch request at all (for API servers or proxies that break watches): poll the Lease
    /// every retry period while waiting; while leading, read it every retry period to notice a
    /// takeover or an edit
    #[arg(long, env = "LEASE_EXEC_NO_WATCH", help_heading = "Lease")]
    pub no_watch: bool,

    /// leaseDurationSeconds written to the Lease: how long others wait after the last renewal
    /// (whole seconds)
    #[arg(long, env = "LEASE_EXEC_LEASE_DURATION", default_value = "15s", value_parser = parse_duration, help_heading = "Timing")]
    pub lease_duration: Duration,

    /// How long renewals may keep failing before leadership counts as lost
    #[arg(long, env = "LEASE_EXEC_RENEW_DEADLINE", default_value = "10s", value_parser = parse_duration, help_heading = "Timing")]
    pub renew_deadline: Duration,

    /// Retry interval: between renewals after the server answered one with an error, and between
    /// polls while waiting (with --no-watch); a broken watch is re-established sooner (within 1 s,
    /// at most this). At least 100ms
    #[arg(long, env = "LEASE_EXEC_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration, help_heading = "Timing")]
    pub retry_period: Duration,

    /// Interval between renewals while they succeed [default: a third of --lease-duration, at most
    /// half of --renew-deadline, at least --retry-period]. At least 100ms, and at least 200ms
    /// before --renew-deadline: each renewal attempt gets half the time between them, so two fit.
    /// The deadlines do not depend on it.
    #[arg(long, env = "LEASE_EXEC_RENEW_INTERVAL", value_parser = parse_duration, help_heading = "Timing")]
    pub renew_interval: Option<Duration>,

    /// Time the command gets between SIGTERM and SIGKILL. On lost leadership it is cut short so the
    /// command is dead before the Lease can expire for others.
    #[arg(long, env = "LEASE_EXEC_GRACE_PERIOD", default_value = "5s", value_parser = parse_duration, help_heading = "Timing")]
    pub grace_period: Duration,

    /// Give up (exit 124) if not leader by then; with --handover, if not handed over by then
    /// [default: wait forever]
    #[arg(long, env = "LEASE_EXEC_WAIT_TIMEOUT", value_parser = parse_duration, help_heading = "Timing")]
    pub wait_timeout: Option<Duration>,

    /// Print the Lease as a person wants to read it (holder, renewed, expires, transitions, owner)
    /// and what a new candidate with this identity would do with it, and exit 0; no command is run
    #[arg(long, env = "LEASE_EXEC_STATUS", help_heading = "Debugging")]
    pub status: bool,

    /// Check that lease-exec would work here, touching nothing, and exit: the cluster
    /// configuration and server, identity, namespace, each permission the Role must grant (asked
    /// of the API server), the Lease and what a new candidate would do with it, a watch through
    /// whatever is in between, the clock against the API server's, and the timing. Exit 0 when
    /// nothing fails, 125 otherwise
    #[arg(
        long,
        env = "LEASE_EXEC_CHECK",
        conflicts_with_all = ["status", "handover"],
        help_heading = "Debugging"
    )]
    pub check: bool,

    /// Ask the Lease's holder to hand it over (sets spec.preferredHolder, as Kubernetes'
    /// coordinated leader election does), wait for the new holder, and print who took over and how
    /// long the Lease stayed free; no command is run. Exit 0, 124 after --wait-timeout (the request
    /// is then withdrawn), 125 if refused
    #[arg(
        long,
        env = "LEASE_EXEC_HANDOVER",
        conflicts_with = "status",
        help_heading = "Handover"
    )]
    pub handover: bool,

    /// With --handover: the identity to hand the Lease over to [default: any other candidate]
    #[arg(
        long,
        env = "LEASE_EXEC_HANDOVER_TO",
        value_name = "IDENTITY",
        requires = "handover",
        help_heading = "Handover"
    )]
    pub to: Option<String>,

    /// Output of --status, --check and --handover
    #[arg(
        short,
        long,
        value_enum,
        default_value = "text",
        env = "LEASE_EXEC_OUTPUT",
        help_heading = "Debugging"
    )]
    pub output: OutputFormat,

    /// Serve Prometheus metrics on /metrics, liveness on /healthz and leadership on /leader at this
    /// address (e.g. `0.0.0.0:9090`) [default: off]
    #[arg(
        long,
        env = "LEASE_EXEC_METRICS_ADDR",
        value_name = "ADDR",
        help_heading = "Observability"
    )]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Send the statsd counter `<prefix>.leader_running` every retry period while leading
    /// [default: off]
    #[arg(
        long,
        env = "LEASE_EXEC_STATSD_ADDR",
        value_name = "HOST:PORT",
        help_heading = "Observability"
    )]
    pub statsd_addr: Option<String>,

    /// Prefix of statsd metric names
    #[arg(
        long,
        env = "LEASE_EXEC_STATSD_PREFIX",
        default_value = "lease_exec",
        help_heading = "Observability"
    )]
    pub statsd_prefix: String,

    /// Do not record Kubernetes Events on the Lease when it is acquired, lost or released
    #[arg(long, env = "LEASE_EXEC_NO_EVENTS", help_heading = "Observability")]
    pub no_events: bool,

    /// Log format on stderr; filter with RUST_LOG
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "LEASE_EXEC_LOG_FORMAT",
        help_heading = "Observability"
    )]
    pub log_format: LogFormat,

    /// Write the man page or a shell completion script to stdout and exit
    #[arg(long, value_enum, hide = true)]
    pub generate: Option<Generate>,

    /// Path to a kubeconfig file [default: KUBECONFIG, else ~/.kube/config; in a pod, the
    /// in-cluster config]
    #[arg(long, env = "LEASE_EXEC_KUBECONFIG", help_heading = "Cluster access")]
    pub kubeconfig: Option<PathBuf>,

    /// Kubeconfig context to use [default: the current context]
    #[arg(long, env = "LEASE_EXEC_CONTEXT", help_heading = "Cluster access")]
    pub context: Option<String>,
}

/// Output format of `--status` and `--handover`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// For people.
    Text,
    /// One JSON object, for scripts.
    Json,
}

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line per event.
    Text,
    /// One JSON object per line.
    Json,
}

/// Generated artefacts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Generate {
    /// The man page (roff).
    Man,
    /// bash completion.
    Bash,
    /// zsh completion.
    Zsh,
    /// fish completion.
    Fish,
}

/// Writes a generated artefact (man page, completion script) for the clap definition.
pub fn generate(what: Generate, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    use clap::CommandFactory;
    let mut command = Cli::command();
    match what {
        Generate::Man => {
            command.build();
            let sections = man_sections(&command);
            let man = clap_mangen::Man::new(command);
            man.render_title(out)?;
            man.render_name_section(out)?;
            man.render_synopsis_section(out)?;
            man.render_description_section(out)?;
            man.render_options_section(out)?;
            out.write_all(sections.as_bytes())?;
            man.render_version_section(out)
        }
        Generate::Bash => {
            clap_complete::generate(clap_complete::Shell::Bash, &mut command, "lease-exec", out);
            Ok(())
        }
        Generate::Zsh => {
            clap_complete::generate(clap_complete::Shell::Zsh, &mut command, "lease-exec", out);
            Ok(())
        }
        Generate::Fish => {
            clap_complete::generate(clap_complete::Shell::Fish, &mut command, "lease-exec", out);
            Ok(())
        }
    }
}

/// Text escaped for roff.
fn roff(text: &str) -> String {
    text.replace('\\', "\\\\").replace('-', "\\-")
}

/// A list in roff: each name in bold, its meaning indented below it.
fn man_list(out: &mut String, items: impl IntoIterator<Item = (String, String)>) {
    for (name, meaning) in items {
        out.push_str(&format!(
            ".TP\n\\fB{}\\fR\n{}\n",
            roff(&name),
            roff(&meaning)
        ));
    }
}

/// The man page's sections after OPTIONS, from the same sources as `--help`'s: EXIT STATUS,
/// SIGNALS, ENVIRONMENT (with each option's variable, which clap_mangen leaves out) and EXAMPLES.
fn man_sections(command: &clap::Command) -> String {
    let mut out = String::from(".SH \"EXIT STATUS\"\n");
    man_list(
        &mut out,
        crate::exit::TABLE
            .iter()
            .map(|row| (row.code.label(), row.meaning.to_string())),
    );
    out.push_str(".SH SIGNALS\n");
    man_list(&mut out, items(&SIGNALS));
    out.push_str(&format!(".SH ENVIRONMENT\n{}\n", roff(ENVIRONMENT_OPTIONS)));
    man_list(
        &mut out,
        command.get_arguments().filter_map(|arg| {
            let env = arg.get_env()?.to_string_lossy().into_owned();
            Some(match arg.get_long() {
                Some(long) => (env, format!("--{long}")),
                None => (env, arg.get_id().to_string().to_uppercase()),
            })
        }),
    );
    man_list(&mut out, items(&ENVIRONMENT_READ));
    out.push_str(".PP\nGiven to the command:\n");
    man_list(&mut out, items(&ENVIRONMENT_GIVEN));
    // The examples are laid out by hand: keep them unfilled.
    let examples = EXAMPLES.strip_prefix("Examples:\n").unwrap_or(EXAMPLES);
    out.push_str(&format!(".SH EXAMPLES\n.nf\n{}\n.fi\n", roff(examples)));
    out
}

/// Parses human durations (`500ms`, `15s`, `2m`) with `humantime`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{e}: use a duration such as 500ms, 15s or 2m"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn no_variable_given_to_the_command_is_read_as_an_option() {
        let options = option_variables();
        assert!(options.contains(&"LEASE_EXEC_IDENTITY".to_string()));
        assert!(options.contains(&"LEASE_EXEC_LEASE".to_string()));
        for given in GIVEN_TO_COMMAND {
            assert!(
                !options.iter().any(|o| o == given),
                "{given} is an option variable"
            );
        }
    }

    /// Words only, one space between them.
    fn words(text: &str) -> String {
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn help_and_man_page_carry_the_exit_code_table() {
        let help = words(&after_long_help());
        let mut man = Vec::new();
        generate(Generate::Man, &mut man).unwrap();
        let man = String::from_utf8(man).unwrap();
        for row in crate::exit::TABLE {
            let label = row.code.label();
            assert!(
                help.contains(&format!("{label} {}", words(row.meaning))),
                "--help lacks exit code {label}"
            );
            assert!(
                man.contains(&format!(".TP\n\\fB{label}\\fR\n{}\n", roff(row.meaning))),
                "the man page lacks exit code {label}"
            );
        }
    }

    #[test]
    fn every_forwarded_signal_is_described() {
        for signal in crate::child::FORWARDED {
            assert!(
                SIGNALS
                    .iter()
                    .any(|item| item.name.split(", ").any(|name| name == signal.as_str())),
                "{signal} is not in SIGNALS"
            );
        }
    }

    #[test]
    fn the_signals_state_the_safety_margin_the_code_uses() {
        use crate::timing::Timing;
        let margin = format!(
            "safety margin ({}ms + {}% of --lease-duration)",
            Timing::KILL_LATENCY.as_millis(),
            Timing::DRIFT_PER_MILLE / 10
        );
        assert!(
            SIGNALS
                .iter()
                .any(|item| words(item.meaning).contains(&margin)),
            "no item says {margin}"
        );
    }

    #[test]
    fn the_environment_lists_what_the_code_gives() {
        // What the code reads is checked against ENVIRONMENT_READ where it is read (config).
        let given: Vec<&str> = ENVIRONMENT_GIVEN.iter().map(|item| item.name).collect();
        assert_eq!(given, GIVEN_TO_COMMAND);
    }

    #[test]
    fn human_durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("fast").is_err());
    }
}
