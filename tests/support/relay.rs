//! A TCP relay for the real tier: a port on 127.0.0.1 that forwards each connection to a target
//! address byte for byte (TLS passes through untouched), with the faults of the network between
//! one client and its server: [`Fault::HalfOpen`], [`Fault::LoseAnswers`], [`Fault::Partition`],
//! [`Fault::Heal`].
//!
//! Give one client a kubeconfig whose server is the relay's address and the real API server's
//! certificate still matches (both are `127.0.0.1`); the other clients keep the direct address.
//! It is the real tier's counterpart of the in-memory server's doors (`apiserver::Door`), for a
//! server that cannot act the faults itself. Each accepted connection is one task pumping both
//! ways; a fault stops the pumping (one way or both) and holds (or resets) the two sockets. It
//! stops when dropped. It keeps its own accounting of each connection: when it was accepted and
//! when it last passed bytes ([`Relay::passages`]).
//!
//! Included by `tests/real.rs` (and `tests/pings.rs`, `tests/http1.rs`) beside `mod support` (`#[path = "support/relay.rs"] mod relay`),
//! like `cluster.rs`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

use crate::support::apiserver::{listen, reserve_port};

/// What happens to the relay's connections from now on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The connections open now stay up and pass nothing either way (what is sent on them is
    /// neither delivered nor refused), while new connections work: what a load balancer or a
    /// conntrack table dropping its entries, or a frozen proxy, does to a client's pooled
    /// connections. Applying it again freezes the connections open then as well.
    HalfOpen,
    /// The connections open now pass on what the client sends, and nothing comes back (what the
    /// server sends is neither delivered nor refused), while new connections work: a request on
    /// one is carried out and its answer never arrives, as when a connection dies right after a
    /// request went out on it (a return path dropped, a proxy frozen after forwarding). Applying
    /// it again silences the connections open then as well.
    LoseAnswers,
    /// New connections are refused and open ones are reset. The port stays reserved.
    Partition,
    /// New connections work again; those a [`Fault::HalfOpen`] froze are reset, as a connection
    /// whose packets were dropped cannot resume.
    Heal,
}

/// Which connections pass: they are numbered from 0 as they are accepted.
#[derive(Debug, Clone, Copy, Default)]
struct State {
    /// Connections accepted so far.
    accepted: u64,
    /// Those numbered below this pass nothing.
    frozen_below: u64,
    /// Those numbered below this pass nothing back to the client.
    deaf_below: u64,
    /// Those numbered below this are reset.
    reset_below: u64,
    /// New connections are refused.
    refusing: bool,
}

/// One accepted connection, as the relay saw it.
#[derive(Debug, Clone, Copy)]
pub struct Passage {
    /// When the relay accepted it.
    pub accepted_at: Instant,
    /// When it last passed bytes either way (its accept time until it has).
    pub last_passed: Instant,
}

/// The connections accepted so far, by number.
type Passages = Arc<Mutex<Vec<Passage>>>;

/// A running relay.
pub struct Relay {
    addr: SocketAddr,
    state: watch::Sender<State>,
    passages: Passages,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Relays a new port on 127.0.0.1 to `target`.
    pub fn start(target: SocketAddr) -> Relay {
        let (reserve, addr, listener) = reserve_port();
        let (state, _) = watch::channel(State::default());
        let passages = Passages::default();
        let accept = tokio::spawn(accept_loop(
            reserve,
            listener,
            target,
            state.clone(),
            passages.clone(),
        ));
        Relay {
            addr,
            state,
            passages,
            accept,
        }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Applies `fault` (see [`Fault`]).
    pub fn apply(&self, fault: Fault) {
        self.state.send_modify(|s| match fault {
            Fault::HalfOpen => {
                s.frozen_below = s.accepted;
                s.refusing = false;
            }
            Fault::LoseAnswers => {
                s.deaf_below = s.accepted;
                s.refusing = false;
            }
            Fault::Partition => {
                s.reset_below = s.accepted;
                s.refusing = true;
            }
            Fault::Heal => {
                s.reset_below = s.reset_below.max(s.frozen_below).max(s.deaf_below);
                s.refusing = false;
            }
        });
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.state.borrow().accepted
    }

    /// The connections accepted so far, by number: when each was accepted and last passed bytes.
    pub fn passages(&self) -> Vec<Passage> {
        self.passages.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The accept loop holds the other sender: once both are gone, every connection task
        // resets its connection and ends.
        self.accept.abort();
    }
}

/// Accepts connections while not refusing, and starts a [`pump`] for each.
async fn accept_loop(
    reserve: TcpSocket,
    listener: TcpListener,
    target: SocketAddr,
    state: watch::Sender<State>,
    passages: Passages,
) {
    let _reserve = reserve;
    let addr = listener.local_addr().expect("the relay's address");
    let mut listener = Some(listener);
    let mut changes = state.subscribe();
    loop {
        if changes.borrow_and_update().refusing {
            // Closed, so connecting is refused; the reservation keeps the port ours.
            listener = None;
            if changes.changed().await.is_err() {
                return;
            }
            continue;
        }
        let current = listener.get_or_insert_with(|| {
            listen(addr).unwrap_or_else(|e| panic!("cannot listen on {addr} again: {e}"))
        });
        tokio::select! {
            accepted = current.accept() => {
                let Ok((inbound, _)) = accepted else { continue };
                if state.borrow().refusing {
                    // It came in as the partition began: reset, as if refused.
                    let _ = inbound.set_zero_linger();
                } else {
                    let mut number = 0;
                    let now = Instant::now();
                    // Recorded before the count rises, so a connection counted is listed.
                    passages.lock().unwrap().push(Passage {
                        accepted_at: now,
                        last_passed: now,
                    });
                    state.send_modify(|s| {
                        number = s.accepted;
                        s.accepted += 1;
                    });
                    tokio::spawn(pump(inbound, target, number, state.subscribe(), passages.clone()));
                }
            }
            _ = changes.changed() => {}
        }
    }
}

/// Relays connection `number` to `target` until either side closes it or a fault stops it; a
/// stopped connection is held open, passing nothing, until it is reset. A connection that loses
/// its answers goes on passing the client's bytes to the server.
async fn pump(
    mut inbound: TcpStream,
    target: SocketAddr,
    number: u64,
    mut state: watch::Receiver<State>,
    passages: Passages,
) {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    /// `tokio::io::copy`, stamping the connection's last passage after each chunk is written.
    async fn copy(
        from: &mut (impl AsyncRead + Unpin),
        to: &mut (impl AsyncWrite + Unpin),
        passages: &Passages,
        number: u64,
    ) -> std::io::Result<()> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            to.write_all(&buf[..n]).await?;
            passages.lock().unwrap()[number as usize].last_passed = Instant::now();
        }
    }
    let Ok(mut outbound) = TcpStream::connect(target).await else {
        let _ = inbound.set_zero_linger();
        return;
    };
    for stream in [&inbound, &outbound] {
        let _ = stream.set_nodelay(true);
    }
    {
        let (mut in_read, mut in_write) = inbound.split();
        let (mut out_read, mut out_write) = outbound.split();
        // Each way ends at its end of file, passing it on, as `copy_bidirectional` does; the
        // first error ends both.
        let up = async {
            copy(&mut in_read, &mut out_write, &passages, number).await?;
            out_write.shutdown().await
        };
        let mut deaf = state.clone();
        let deafened = async move {
            let _ = deaf.wait_for(|s| number < s.deaf_below).await;
        };
        let down = async {
            tokio::select! {
                copied = copy(&mut out_read, &mut in_write, &passages, number) => {
                    copied?;
                    in_write.shutdown().await
                }
                // The answers stop here; the requests go on.
                () = deafened => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = async { tokio::try_join!(up, down) } => return,
            _ = state.wait_for(|s| number < s.frozen_below || number < s.reset_below) => {}
        }
    }
    // Bytes read but not yet written are lost with the copy, as dropped packets are. An error
    // means the relay is gone: reset then too.
    let _ = state.wait_for(|s| number < s.reset_below).await;
    for stream in [&inbound, &outbound] {
        let _ = stream.set_zero_linger();
    }
}
