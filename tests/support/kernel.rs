//! Process exec and exit times stamped by the kernel, from the proc connector (netlink): every
//! `PROC_EVENT_EXEC` and `PROC_EVENT_EXIT` carries `timestamp_ns = ktime_get_ns()`, CLOCK_MONOTONIC
//! at the moment the process executed or exited, however late this process reads the event. A
//! worker's span is therefore exact: from the exec that made it the worker binary to the moment
//! the kernel tore it down, whatever the worker itself managed to write.
//!
//! Processes are followed by their executable: at each exec event `/proc/PID/exe` is read, and a
//! process running the followed binary gets a [`Span`] with its arguments and environment as the
//! exec gave them (also read from /proc at once). A span is keyed by (pid, exec time), so a reused
//! pid starts a new span and can never merge two processes. Its end is the first exit of that pid
//! after its exec: a pid is free for reuse only once its process has exited and been reaped, and
//! the kernel queues the exit event before that. (The exit is that of the thread-group leader; the
//! followed workers are single-threaded.)
//!
//! Needs CAP_NET_ADMIN (root) in the initial network namespace: [`Kernel::start`] fails otherwise.
//! Shared by the tests (`tests/support`) and `examples/bench_real`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io;
use std::mem::size_of;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::libc;

const NETLINK_CONNECTOR: libc::c_int = 11;
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_EVENT_EXEC: u32 = 0x0000_0002;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;
const NLMSG_HDR: usize = 16;
const CN_MSG: usize = 20;

/// One run of the followed executable: one process image, from its exec to its exit.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub pid: u32,
    /// CLOCK_MONOTONIC ns of the exec that made it the followed binary. With `pid`, the key.
    pub exec_ns: u64,
    /// CLOCK_MONOTONIC ns of its exit; `None` while it runs (or if the event was lost, see
    /// [`Kernel::lost`]).
    pub exit_ns: Option<u64>,
    /// Its arguments, `args[0]` first, as read at the exec event.
    pub args: Vec<String>,
    /// Its environment as the exec gave it.
    pub env: HashMap<String, String>,
    /// False if the process was gone before /proc could be read: the exec of a pid the caller
    /// knows to be a worker (see [`Kernel::span_at`]), nothing else known.
    pub read: bool,
}

impl Span {
    /// The value of an environment variable the exec gave it.
    pub fn env(&self, key: &str) -> Option<&str> {
        self.env.get(key).map(String::as_str)
    }

    /// Whether it was running at `at_ns`.
    pub fn contains(&self, at_ns: u64) -> bool {
        self.exec_ns <= at_ns && self.exit_ns.is_none_or(|exit| at_ns <= exit)
    }
}

#[derive(Default)]
struct Seen {
    /// Execs of the followed binary, in arrival order (exit not filled in).
    spans: Vec<Span>,
    /// pid → execs whose executable could not be read: the process had exited (or exec'd again)
    /// before the event was read.
    unread: HashMap<u32, Vec<u64>>,
    /// pid → exit times of every thread-group leader, in order.
    exits: HashMap<u32, Vec<u64>>,
    /// Datagrams lost to a full socket buffer (ENOBUFS): some events are missing.
    lost: u64,
}

/// The proc connector's events about one executable, read on a thread of their own.
#[derive(Clone)]
pub struct Kernel {
    seen: Arc<Mutex<Seen>>,
    exe: PathBuf,
}

impl Kernel {
    /// Subscribes to the proc connector and follows processes running `exe`.
    pub fn start(exe: &Path) -> io::Result<Kernel> {
        let exe = exe.canonicalize()?;
        let fd = subscribe()?;
        let kernel = Kernel {
            seen: Arc::default(),
            exe,
        };
        let feed = kernel.clone();
        std::thread::Builder::new()
            .name("proc-connector".into())
            .spawn(move || feed.read_loop(fd))?;
        Ok(kernel)
    }

    /// The followed executable.
    pub fn exe(&self) -> &Path {
        &self.exe
    }

    /// Every span of the followed executable so far, by exec time.
    pub fn spans(&self) -> Vec<Span> {
        let seen = self.seen.lock().unwrap();
        let mut spans: Vec<Span> = seen
            .spans
            .iter()
            .map(|s| Span {
                exit_ns: first_after(&seen.exits, s.pid, s.exec_ns),
                ..s.clone()
            })
            .collect();
        spans.sort_by_key(|s| s.exec_ns);
        spans
    }

    /// The span of `pid` running at `at_ns`: a followed one, else an exec whose executable could
    /// not be read (for a pid the caller knows ran the binary then, e.g. from its own journal).
    pub fn span_at(&self, pid: u32, at_ns: u64) -> Option<Span> {
        if let Some(span) = self
            .spans()
            .into_iter()
            .rev()
            .find(|s| s.pid == pid && s.contains(at_ns))
        {
            return Some(span);
        }
        let seen = self.seen.lock().unwrap();
        let exec_ns = seen
            .unread
            .get(&pid)?
            .iter()
            .copied()
            .filter(|&t| t <= at_ns)
            .max()?;
        let span = Span {
            pid,
            exec_ns,
            exit_ns: first_after(&seen.exits, pid, exec_ns),
            args: Vec::new(),
            env: HashMap::new(),
            read: false,
        };
        span.contains(at_ns).then_some(span)
    }

    /// The first exit of `pid` after `after` (CLOCK_MONOTONIC ns), of any process.
    pub fn exit_of(&self, pid: u32, after: u64) -> Option<u64> {
        first_after(&self.seen.lock().unwrap().exits, pid, after)
    }

    /// Datagrams lost to a full socket buffer: when not 0, some exec or exit is missing.
    pub fn lost(&self) -> u64 {
        self.seen.lock().unwrap().lost
    }

    fn read_loop(&self, fd: libc::c_int) {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            // SAFETY: reads into a buffer of the stated length, on a descriptor this thread owns.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::ENOBUFS) => self.seen.lock().unwrap().lost += 1,
                    Some(libc::EINTR) => {}
                    _ => return,
                }
                continue;
            }
            let mut data = &buf[..n as usize];
            while data.len() >= NLMSG_HDR {
                let len = u32_at(data, 0) as usize;
                if len < NLMSG_HDR || len > data.len() {
                    break;
                }
                self.event(&data[NLMSG_HDR..len]);
                data = &data[((len + 3) & !3).min(data.len())..];
            }
        }
    }

    /// One cn_msg carrying a proc_event: what, cpu, timestamp_ns, then for an exec
    /// process_pid, process_tgid; for an exit process_pid, process_tgid, exit_code, ….
    fn event(&self, cn: &[u8]) {
        let event = &cn[CN_MSG.min(cn.len())..];
        if event.len() < 24 {
            return;
        }
        let what = u32_at(event, 0);
        let at = u64::from_ne_bytes(event[8..16].try_into().unwrap());
        let (pid, tgid) = (u32_at(event, 16), u32_at(event, 20));
        if pid != tgid {
            // A thread other than the leader; an exec always leaves the leader.
            return;
        }
        match what {
            PROC_EVENT_EXIT => {
                let mut seen = self.seen.lock().unwrap();
                seen.exits.entry(pid).or_default().push(at);
            }
            PROC_EVENT_EXEC => self.exec(pid, at),
            _ => {}
        }
    }

    fn exec(&self, pid: u32, at: u64) {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let Ok(exe) = std::fs::read_link(proc.join("exe")) else {
            let mut seen = self.seen.lock().unwrap();
            seen.unread.entry(pid).or_default().push(at);
            return;
        };
        // A binary replaced while it runs reads as "PATH (deleted)".
        let exe = exe.to_string_lossy();
        if Path::new(exe.strip_suffix(" (deleted)").unwrap_or(&exe)) != self.exe {
            return;
        }
        let split = |name: &str| -> Vec<String> {
            std::fs::read(proc.join(name))
                .unwrap_or_default()
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        };
        let args = split("cmdline");
        let env = split("environ")
            .into_iter()
            .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.into(), v.into())))
            .collect();
        let mut seen = self.seen.lock().unwrap();
        // /proc read at an earlier exec of this pid may already have shown this image: that span
        // stays, starting at the earlier exec (earlier, so overlaps can only be over-reported).
        let open = seen
            .spans
            .iter()
            .any(|s| s.pid == pid && first_after(&seen.exits, pid, s.exec_ns).is_none());
        if !open {
            seen.spans.push(Span {
                pid,
                exec_ns: at,
                exit_ns: None,
                args,
                env,
                read: true,
            });
        }
    }
}

/// Opens a netlink connector socket and asks the kernel for process events.
fn subscribe() -> io::Result<libc::c_int> {
    // SAFETY: plain socket calls on a descriptor this function owns (closed on every error path);
    // every pointer passed points at a live local of the stated size.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM, NETLINK_CONNECTOR) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fail = |fd| {
        let e = io::Error::last_os_error();
        // SAFETY: closes the descriptor opened above, once.
        unsafe { libc::close(fd) };
        Err(e)
    };
    let size: libc::c_int = 16 << 20;
    let set = |option| unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&size as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
    // A large buffer, so a busy machine's events do not overflow it while the reader is late.
    if set(libc::SO_RCVBUFFORCE) != 0 {
        set(libc::SO_RCVBUF);
    }
    // SAFETY: an all-zero sockaddr_nl is valid.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = CN_IDX_PROC;
    // SAFETY: as above.
    let bound = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if bound != 0 {
        return fail(fd);
    }
    // nlmsghdr + cn_msg + PROC_CN_MCAST_LISTEN, to the kernel.
    let mut msg = Vec::with_capacity(NLMSG_HDR + CN_MSG + 4);
    msg.extend_from_slice(&((NLMSG_HDR + CN_MSG + 4) as u32).to_ne_bytes());
    msg.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
    msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
    msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&std::process::id().to_ne_bytes());
    msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
    msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
    msg.extend_from_slice(&4u16.to_ne_bytes()); // len
    msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
    msg.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
    // SAFETY: as above.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    kernel.nl_groups = CN_IDX_PROC;
    // SAFETY: `msg` is live for the call and of the stated length.
    let sent = unsafe {
        libc::sendto(
            fd,
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return fail(fd);
    }
    Ok(fd)
}

/// The first time in `times[pid]` after `after`.
fn first_after(times: &HashMap<u32, Vec<u64>>, pid: u32, after: u64) -> Option<u64> {
    times.get(&pid)?.iter().copied().find(|&t| t > after)
}

fn u32_at(data: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(data[at..at + 4].try_into().unwrap())
}
