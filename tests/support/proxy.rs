//! A forward proxy on 127.0.0.1 speaking HTTP `CONNECT` and SOCKS5 (no authentication, or
//! username and password), that records every connection (protocol, the target asked for, the
//! credentials given) and forwards each to one fixed address, whatever target was asked for: so a
//! client can name a server that does not resolve (`lease-exec.invalid`), and only a client that
//! really went through the proxy reaches it. It stops when dropped.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// One connection the proxy accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnel {
    /// `connect` or `socks5`.
    pub protocol: &'static str,
    /// `host:port` as the client asked for it.
    pub target: String,
    /// `Proxy-Authorization`'s value, or SOCKS5 `user:password`.
    pub credentials: Option<String>,
}

pub struct Proxy {
    addr: SocketAddr,
    tunnels: Arc<Mutex<Vec<Tunnel>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// Starts a proxy forwarding every tunnel to `to`.
    pub async fn start(to: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tunnels = Arc::new(Mutex::new(Vec::new()));
        let recorded = tunnels.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let _ = serve(client, to, recorded).await;
                });
            }
        });
        Proxy {
            addr,
            tunnels,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every tunnel opened so far.
    pub fn tunnels(&self) -> Vec<Tunnel> {
        self.tunnels.lock().unwrap().clone()
    }
}

async fn serve(
    client: TcpStream,
    to: SocketAddr,
    recorded: Arc<Mutex<Vec<Tunnel>>>,
) -> std::io::Result<()> {
    let mut client = BufReader::new(client);
    let first = client.fill_buf().await?.first().copied();
    let tunnel = if first == Some(5) {
        socks5(&mut client).await?
    } else {
        connect(&mut client).await?
    };
    recorded.lock().unwrap().push(tunnel.clone());
    let mut server = TcpStream::connect(to).await?;
    server.set_nodelay(true)?;
    let reply: &[u8] = if tunnel.protocol == "socks5" {
        &[5, 0, 0, 1, 127, 0, 0, 1, 0, 0]
    } else {
        b"HTTP/1.1 200 Connection established\r\n\r\n"
    };
    client.get_mut().write_all(reply).await?;
    // What the client sent past the handshake, still buffered.
    let early = client.buffer().to_vec();
    server.write_all(&early).await?;
    let mut client = client.into_inner();
    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    Ok(())
}

/// `CONNECT host:port HTTP/1.1` and its headers.
async fn connect(client: &mut BufReader<TcpStream>) -> std::io::Result<Tunnel> {
    let mut line = String::new();
    client.read_line(&mut line).await?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "CONNECT" {
        client
            .get_mut()
            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Err(std::io::Error::other(format!("not a CONNECT: {line:?}")));
    }
    let target = target.to_string();
    let mut credentials = None;
    loop {
        let mut header = String::new();
        client.read_line(&mut header).await?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("proxy-authorization")
        {
            credentials = Some(value.trim().to_string());
        }
    }
    Ok(Tunnel {
        protocol: "connect",
        target,
        credentials,
    })
}

/// A SOCKS5 greeting (no authentication, or username/password when offered) and `CONNECT`.
async fn socks5(client: &mut BufReader<TcpStream>) -> std::io::Result<Tunnel> {
    let mut head = [0u8; 2];
    client.read_exact(&mut head).await?;
    let mut methods = vec![0u8; head[1] as usize];
    client.read_exact(&mut methods).await?;
    let mut credentials = None;
    if methods.contains(&2) {
        client.get_mut().write_all(&[5, 2]).await?;
        let mut version_len = [0u8; 2];
        client.read_exact(&mut version_len).await?;
        let mut user = vec![0u8; version_len[1] as usize];
        client.read_exact(&mut user).await?;
        let mut len = [0u8; 1];
        client.read_exact(&mut len).await?;
        let mut password = vec![0u8; len[0] as usize];
        client.read_exact(&mut password).await?;
        credentials = Some(format!(
            "{}:{}",
            String::from_utf8_lossy(&user),
            String::from_utf8_lossy(&password)
        ));
        client.get_mut().write_all(&[1, 0]).await?;
    } else {
        client.get_mut().write_all(&[5, 0]).await?;
    }
    let mut request = [0u8; 4];
    client.read_exact(&mut request).await?;
    let host = match request[3] {
        1 => {
            let mut ip = [0u8; 4];
            client.read_exact(&mut ip).await?;
            std::net::Ipv4Addr::from(ip).to_string()
        }
        3 => {
            let mut len = [0u8; 1];
            client.read_exact(&mut len).await?;
            let mut name = vec![0u8; len[0] as usize];
            client.read_exact(&mut name).await?;
            String::from_utf8_lossy(&name).into_owned()
        }
        4 => {
            let mut ip = [0u8; 16];
            client.read_exact(&mut ip).await?;
            format!("[{}]", std::net::Ipv6Addr::from(ip))
        }
        other => return Err(std::io::Error::other(format!("address type {other}"))),
    };
    let mut port = [0u8; 2];
    client.read_exact(&mut port).await?;
    Ok(Tunnel {
        protocol: "socks5",
        target: format!("{host}:{}", u16::from_be_bytes(port)),
        credentials,
    })
}
