//! The highly available control plane of `testenv/` (`testenv/cluster up DIR --ha`: three etcd
//! members, two kube-apiservers, Toxiproxy) and its fault commands, as the nemesis uses them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

pub struct Ha {
    script: PathBuf,
    pub dir: PathBuf,
    /// An admin client per API server, for reading the Lease.
    clients: Vec<kube::Client>,
    /// Whether this run started the control plane (and so stops it).
    pub owned: bool,
}

/// Runs `testenv/cluster COMMAND DIR ARGS...`; its stdout, or one line saying what failed.
pub async fn cluster(
    script: &Path,
    command: &str,
    dir: &Path,
    args: &[&str],
) -> Result<String, String> {
    let out = tokio::process::Command::new(script)
        .arg(command)
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "testenv/cluster {command} {} {}: {}",
            dir.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Ha {
    /// `testenv/cluster up DIR --ha`, or a control plane already running in `DIR`.
    pub async fn start(root: &Path, dir: &Path, reuse: bool) -> Ha {
        let script = root.join("testenv/cluster");
        if !reuse && let Err(e) = cluster(&script, "up", dir, &["--ha"]).await {
            panic!("{e}");
        }
        let mut clients = Vec::new();
        for n in 0..2 {
            let path = dir.join(format!("apiserver-{n}/kubeconfig"));
            let kubeconfig = Kubeconfig::read_from(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (is {} an --ha cluster?)",
                    path.display(),
                    dir.display()
                )
            });
            let config =
                kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await
                    .expect("kubeconfig");
            clients.push(kube::Client::try_from(config).expect("API client"));
        }
        Ha {
            script,
            dir: dir.to_owned(),
            clients,
            owned: !reuse,
        }
    }

    /// An admin client per API server.
    pub fn clients(&self) -> &[kube::Client] {
        &self.clients
    }

    pub async fn run(&self, command: &str, args: &[&str]) -> Result<String, String> {
        cluster(&self.script, command, &self.dir, args).await
    }

    /// A proxy named `name` in front of API server `n`; the kubeconfig through it.
    pub async fn proxy(&self, name: &str, n: usize) -> PathBuf {
        let path = self.dir.join("proxy").join(name).join("kubeconfig");
        if !path.exists()
            && let Err(e) = self.run("proxy", &[name, &n.to_string()]).await
        {
            panic!("{e}");
        }
        path
    }

    /// `toxic DIR NAME KIND [MS]`.
    pub async fn toxic(&self, name: &str, kind: &[&str]) -> Result<(), String> {
        let mut args = vec![name];
        args.extend_from_slice(kind);
        self.run("toxic", &args).await.map(drop)
    }

    /// The index of the etcd member that leads now.
    pub async fn etcd_leader(&self) -> Result<usize, String> {
        let out = self.run("etcd-leader", &[]).await?;
        out.trim()
            .parse()
            .map_err(|_| format!("etcd-leader printed {out:?}"))
    }

    /// The Lease as either API server has it (the first to answer within a second).
    pub async fn lease(&self, ns: &str, name: &str) -> Option<Lease> {
        for client in &self.clients {
            let api: Api<Lease> = Api::namespaced(client.clone(), ns);
            if let Ok(Ok(lease)) = tokio::time::timeout(Duration::from_secs(1), api.get(name)).await
            {
                return Some(lease);
            }
        }
        None
    }

    /// The holder named in the Lease now, if any API server answers.
    pub async fn holder(&self, ns: &str, name: &str) -> Option<String> {
        self.lease(ns, name)
            .await?
            .spec?
            .holder_identity
            .filter(|h| !h.is_empty())
    }

    /// Creates the Lease released, so that the first candidate takes it at once.
    pub async fn create_released(&self, ns: &str, name: &str) {
        let api: Api<Lease> = Api::namespaced(self.clients[0].clone(), ns);
        let lease = Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            spec: Some(Default::default()),
        };
        match api.create(&PostParams::default(), &lease).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("create the Lease {ns}/{name}: {e}"),
        }
    }

    pub async fn down(&self) {
        if self.owned {
            let _ = self.run("down", &[]).await;
        }
    }
}
