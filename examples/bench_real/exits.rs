//! Process exit times stamped by the kernel: the proc connector (netlink) reports every process
//! exit with `ktime_get_ns()`, i.e. CLOCK_MONOTONIC at the moment the process exits, however late
//! this process reads the event. Needs CAP_NET_ADMIN (root) and the initial network namespace;
//! [`Exits::start`] fails otherwise and the caller falls back to the workers' own last stamp.

use std::collections::HashMap;
use std::io;
use std::mem::size_of;
use std::sync::{Arc, Mutex};

use nix::libc;

const NETLINK_CONNECTOR: libc::c_int = 11;
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;
const NLMSG_HDR: usize = 16;
const CN_MSG: usize = 20;

#[derive(Clone, Default)]
pub struct Exits {
    /// pid → exit times (CLOCK_MONOTONIC ns), of whole processes only (pid == tgid).
    seen: Arc<Mutex<HashMap<u32, Vec<u64>>>>,
    /// Datagrams lost to a full socket buffer (ENOBUFS); their exits are missing.
    lost: Arc<Mutex<u64>>,
}

impl Exits {
    pub fn start() -> io::Result<Exits> {
        // SAFETY: plain socket calls on a descriptor this function owns; every pointer passed
        // points at a live local of the stated size.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM, NETLINK_CONNECTOR) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let size: libc::c_int = 16 << 20;
        unsafe {
            if libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as u32,
            ) != 0
            {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    (&size as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as u32,
                );
            }
        }
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = CN_IDX_PROC;
        let bound = unsafe {
            libc::bind(
                fd,
                (&addr as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if bound != 0 {
            let e = io::Error::last_os_error();
            unsafe { libc::close(fd) };
            return Err(e);
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
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        kernel.nl_groups = CN_IDX_PROC;
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
            let e = io::Error::last_os_error();
            unsafe { libc::close(fd) };
            return Err(e);
        }
        let exits = Exits::default();
        let feed = exits.clone();
        std::thread::Builder::new()
            .name("proc-connector".into())
            .spawn(move || feed.read_loop(fd))?;
        Ok(exits)
    }

    fn read_loop(&self, fd: libc::c_int) {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            // SAFETY: reads into a buffer of the stated length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::ENOBUFS) => *self.lost.lock().unwrap() += 1,
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
                data = &data[(len + 3) & !3..];
            }
        }
    }

    /// One cn_msg carrying a proc_event: what, cpu, timestamp_ns, then for an exit
    /// process_pid, process_tgid, exit_code, exit_signal, parent_pid, parent_tgid.
    fn event(&self, cn: &[u8]) {
        let event = &cn[CN_MSG.min(cn.len())..];
        if event.len() < 24 || u32_at(event, 0) != PROC_EVENT_EXIT {
            return;
        }
        let at = u64::from_ne_bytes(event[8..16].try_into().unwrap());
        let (pid, tgid) = (u32_at(event, 16), u32_at(event, 20));
        if pid == tgid {
            self.seen.lock().unwrap().entry(pid).or_default().push(at);
        }
    }

    /// The first exit of `pid` after `after` (CLOCK_MONOTONIC ns).
    pub fn exit_of(&self, pid: u32, after: u64) -> Option<u64> {
        let seen = self.seen.lock().unwrap();
        seen.get(&pid)?.iter().copied().find(|&t| t > after)
    }

    pub fn lost(&self) -> u64 {
        *self.lost.lock().unwrap()
    }
}

fn u32_at(data: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(data[at..at + 4].try_into().unwrap())
}
