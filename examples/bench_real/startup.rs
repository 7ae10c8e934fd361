//! `bench_real startup`: from the `exec` of lease-exec to its first bytes on the wire (the TLS
//! ClientHello of its first connection, as a relay in front of the API server receives it) and to
//! its worker's start, on a released Lease, with a kubeconfig holding a token and with one whose
//! token comes from an exec credential plugin (`/bin/cat` printing an `ExecCredential` from a file). The exec
//! is stamped by the kernel (proc connector, CLOCK_MONOTONIC), the relay and the worker on the same
//! clock.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use crate::kernel::Kernel;
use crate::{Bench, NS, cluster, mono_ns, percentile};

/// The figures of one kubeconfig.
pub struct Startup {
    pub variant: &'static str,
    /// exec → first byte on the wire, ms, sorted.
    pub wire: Vec<f64>,
    /// exec → the worker's start, ms, sorted.
    pub worker: Vec<f64>,
}

impl Startup {
    pub fn row(&self) -> String {
        let p = |v: &[f64], q: f64| percentile(v, q);
        format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            self.variant,
            self.wire.len(),
            p(&self.wire, 50.0),
            p(&self.wire, 90.0),
            self.wire.last().copied().unwrap_or(f64::NAN),
            p(&self.worker, 50.0),
            p(&self.worker, 90.0),
            self.worker.last().copied().unwrap_or(f64::NAN),
        )
    }
}

/// A relay to `to` that stamps (CLOCK_MONOTONIC ns) the first bytes of every connection.
async fn stamping_relay(to: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<Mutex<Vec<u64>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stamps = Arc::new(Mutex::new(Vec::new()));
    let seen = stamps.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let _ = client.set_nodelay(true);
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut first = vec![0u8; 4096];
                let Ok(n) = client.read(&mut first).await else {
                    return;
                };
                seen.lock().unwrap().push(mono_ns());
                let Ok(mut server) = TcpStream::connect(to).await else {
                    return;
                };
                let _ = server.set_nodelay(true);
                if tokio::io::AsyncWriteExt::write_all(&mut server, &first[..n])
                    .await
                    .is_err()
                {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    (addr, stamps)
}

/// The bench's kubeconfig pointed at `relay`; with `exec`, its token moved into an exec plugin.
fn kubeconfig(bench: &Bench, relay: std::net::SocketAddr, exec: bool, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(&bench.kubeconfig).unwrap();
    let server = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .expect("a server line")
        .to_string();
    let mut text = text.replace(&server, &format!("https://{relay}"));
    if exec {
        let token_line = text
            .lines()
            .find(|l| l.trim().starts_with("token: "))
            .expect("a token in the bench's kubeconfig")
            .to_string();
        let token = token_line.trim().trim_start_matches("token: ").to_string();
        let credential = format!(
            r#"{{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{{"token":"{token}"}}}}"#
        );
        let file = dir.join("startup-exec-credential.json");
        std::fs::write(&file, credential).unwrap();
        let indent = &token_line[..token_line.len() - token_line.trim_start().len()];
        let plugin = format!(
            "{indent}exec:\n{indent}  apiVersion: client.authentication.k8s.io/v1\n{indent}  command: /bin/cat\n{indent}  args: [{:?}]\n{indent}  interactiveMode: Never",
            file.display().to_string()
        );
        text = text.replace(&token_line, &plugin);
    }
    let path = dir.join(if exec {
        "startup-exec.kubeconfig"
    } else {
        "startup-token.kubeconfig"
    });
    std::fs::write(&path, text).unwrap();
    path
}

pub async fn startup(bench: &Bench, api_port: u16, samples: usize) -> Vec<Startup> {
    let kernel = match Kernel::start(&bench.lease_exec) {
        Ok(kernel) => kernel,
        Err(e) => {
            eprintln!("startup: the proc connector is unavailable ({e}); not measured");
            return Vec::new();
        }
    };
    let (relay, stamps) = stamping_relay(([127, 0, 0, 1], api_port).into()).await;
    let mut results = Vec::new();
    for (variant, exec) in [("token", false), ("exec plugin", true)] {
        eprintln!("startup: {variant}, {samples} samples");
        let config = kubeconfig(bench, relay, exec, &bench.logs);
        let (mut wire, mut worker) = (Vec::new(), Vec::new());
        for i in 0..samples {
            let lease = format!("startup-{}-{i}", if exec { "exec" } else { "token" });
            cluster::create_released(&bench.client, NS, &lease).await;
            let journal = bench.journal(&lease);
            let seen = stamps.lock().unwrap().len();
            let log = std::fs::File::create(bench.logs.join(format!("{lease}.log"))).unwrap();
            let mut child = tokio::process::Command::new(&bench.lease_exec)
                .args(["--identity", "starter", &lease, "--"])
                .arg(&bench.worker)
                .arg(&journal.0)
                .arg("0.000")
                .env("KUBECONFIG", &config)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .expect("spawn lease-exec");
            let pid = child.id().expect("a pid");
            let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
                .await
                .expect("lease-exec ran too long")
                .unwrap();
            assert!(status.success(), "lease-exec failed: {status}");
            let start = journal
                .starts()
                .first()
                .copied()
                .expect("the worker started");
            let exec_ns = kernel
                .spans()
                .into_iter()
                .find(|s| s.pid == pid)
                .map(|s| s.exec_ns)
                .expect("the kernel saw lease-exec's exec");
            let first = stamps.lock().unwrap()[seen..]
                .iter()
                .copied()
                .find(|&t| t >= exec_ns)
                .expect("the relay saw the connection");
            wire.push((first - exec_ns) as f64 / 1e6);
            worker.push((start.mono - exec_ns) as f64 / 1e6);
        }
        wire.sort_by(f64::total_cmp);
        worker.sort_by(f64::total_cmp);
        let result = Startup {
            variant,
            wire,
            worker,
        };
        eprintln!("{}", result.row());
        results.push(result);
    }
    results
}
