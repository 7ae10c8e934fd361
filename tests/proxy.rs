//! Proxies, as kubectl takes them: the kubeconfig's `proxy-url` (http and socks5, with
//! credentials), `HTTP_PROXY`/`HTTPS_PROXY` from the environment, and `NO_PROXY`. The in-memory
//! API server sits behind a forward proxy that forwards every tunnel to it, whatever host was
//! asked for, so a kubeconfig naming an unresolvable server (`lease-exec.invalid`) works only
//! through the proxy. The rule itself (which variable, `NO_PROXY` matching, loopback) is unit
//! tested in `src/lease/proxy.rs`; these run the binary through a real proxy.

#[path = "support/proxy.rs"]
mod proxy;
mod support;

use std::time::Duration;

use support::*;

const LIMIT: Duration = Duration::from_secs(30);

/// A kubeconfig for the in-memory server at `server` (a URL), through `proxy_url` if given.
fn kubeconfig(
    world: &World,
    name: &str,
    server: &str,
    proxy_url: Option<&str>,
) -> std::path::PathBuf {
    let mut text = world
        .server
        .kubeconfig(NS)
        .replace(&world.server.url(), server);
    if let Some(proxy) = proxy_url {
        text = text.replace(
            &format!("    server: {server}\n"),
            &format!("    server: {server}\n    proxy-url: {proxy}\n"),
        );
        assert!(text.contains("proxy-url"), "{text}");
    }
    let path = world.path(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Acquires `job`, runs the journaling worker for a moment, releases: exit 0, one worker run,
/// the Lease released.
async fn lead_once(world: &World, command: TestCommand) -> String {
    let (code, log) = command.run(LIMIT).await;
    assert_eq!(code, 0, "{log}");
    assert_eq!(world.starts().len(), 1, "the worker ran once\n{log}");
    let lease = world.server.lease(NS, "job").expect("the Lease");
    assert!(lease["spec"]["holderIdentity"].is_null(), "released\n{log}");
    log
}

fn contender(world: &World) -> TestCommand {
    world
        .contender("job", "me", 0.2, 0)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
}

#[tokio::test]
async fn the_kubeconfigs_http_proxy_with_credentials_carries_every_request() {
    let world = World::start().await;
    let proxy = proxy::Proxy::start(world.server.addr()).await;
    let server = "http://lease-exec.invalid:8080";
    let url = format!("http://us%40er:pass@{}", proxy.addr());
    let config = kubeconfig(&world, "proxied", server, Some(&url));
    lead_once(&world, contender(&world).kubeconfig(&config)).await;
    let tunnels = proxy.tunnels();
    assert!(!tunnels.is_empty(), "nothing went through the proxy");
    for tunnel in &tunnels {
        assert_eq!(tunnel.protocol, "connect");
        assert_eq!(tunnel.target, "lease-exec.invalid:8080");
        // base64("us@er:pass")
        assert_eq!(
            tunnel.credentials.as_deref(),
            Some("Basic dXNAZXI6cGFzcw==")
        );
    }
}

#[tokio::test]
async fn the_kubeconfigs_socks5_proxy_with_credentials_carries_every_request() {
    let world = World::start().await;
    let proxy = proxy::Proxy::start(world.server.addr()).await;
    let server = "http://lease-exec.invalid:8080";
    let url = format!("socks5://user:secret@{}", proxy.addr());
    let config = kubeconfig(&world, "socks", server, Some(&url));
    lead_once(&world, contender(&world).kubeconfig(&config)).await;
    let tunnels = proxy.tunnels();
    assert!(!tunnels.is_empty(), "nothing went through the proxy");
    for tunnel in &tunnels {
        assert_eq!(tunnel.protocol, "socks5");
        // The name goes to the proxy, which resolves it.
        assert_eq!(tunnel.target, "lease-exec.invalid:8080");
        assert_eq!(tunnel.credentials.as_deref(), Some("user:secret"));
    }
}

/// `HTTP_PROXY` for an `http://` server (`HTTPS_PROXY` is for `https://` ones and is not used).
#[tokio::test]
async fn http_proxy_from_the_environment() {
    let world = World::start().await;
    let proxy = proxy::Proxy::start(world.server.addr()).await;
    let config = kubeconfig(&world, "by-name", "http://lease-exec.invalid:8080", None);
    let command = contender(&world)
        .kubeconfig(&config)
        .env("HTTP_PROXY", format!("http://{}", proxy.addr()))
        .env("HTTPS_PROXY", "http://127.0.0.1:1");
    lead_once(&world, command).await;
    let tunnels = proxy.tunnels();
    assert!(!tunnels.is_empty(), "nothing went through the proxy");
    assert!(
        tunnels
            .iter()
            .all(|t| t.target == "lease-exec.invalid:8080"),
        "{tunnels:?}"
    );
}

/// A server that `NO_PROXY` covers is reached directly, not through the proxy the environment
/// names: here the server's name does not resolve, so the direct attempt fails (a DNS error), and the proxy, which would have reached the server, sees nothing. Without
/// `NO_PROXY` the same command goes through the proxy and works.
#[tokio::test]
async fn no_proxy_covering_the_server_goes_direct() {
    let world = World::start().await;
    let proxy = proxy::Proxy::start(world.server.addr()).await;
    let url = format!("http://{}", proxy.addr());
    let config = kubeconfig(
        &world,
        "covered",
        "http://api.lease-exec.invalid:8080",
        None,
    );
    let status = |no_proxy: Option<&str>| {
        let mut command = tokio::process::Command::new(BIN);
        command
            .args(["--status", "job"])
            .env("KUBECONFIG", &config)
            .env("HTTP_PROXY", &url)
            .env("HTTPS_PROXY", &url)
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE");
        if let Some(no) = no_proxy {
            command.env("NO_PROXY", no);
        }
        command
    };
    for no in [
        ".lease-exec.invalid",
        "*.lease-exec.invalid",
        "10.0.0.1,api.lease-exec.invalid",
    ] {
        let out = tokio::time::timeout(LIMIT, status(Some(no)).output())
            .await
            .expect("--status ran too long")
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(
            out.status.code(),
            Some(0),
            "NO_PROXY={no}: reached the server\n{stderr}"
        );
        assert!(
            stderr.contains("dns error"),
            "NO_PROXY={no}: the direct attempt fails to resolve the server: {stderr}"
        );
        assert_eq!(proxy.tunnels(), vec![], "NO_PROXY={no}: the proxy was used");
    }
    let out = tokio::time::timeout(LIMIT, status(None).output())
        .await
        .expect("--status ran too long")
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !proxy.tunnels().is_empty(),
        "without NO_PROXY the proxy is used"
    );
}

/// With proxies in the environment, a loopback server is reached directly (as by kubectl), where
/// lease-exec used to refuse to start (exit 125, "requires the disabled feature").
#[tokio::test]
async fn a_loopback_server_goes_direct_whatever_the_environment_says() {
    let world = World::start().await;
    let proxy = proxy::Proxy::start(world.server.addr()).await;
    let url = format!("http://{}", proxy.addr());
    let command = contender(&world)
        .env("HTTP_PROXY", &url)
        .env("HTTPS_PROXY", &url);
    lead_once(&world, command).await;
    assert_eq!(proxy.tunnels(), vec![], "the proxy was used");
}

/// A proxy URL lease-exec cannot use is named before anything is touched, with the fix.
#[tokio::test]
async fn an_unusable_proxy_is_named_with_exit_125() {
    let world = World::start().await;
    let config = kubeconfig(&world, "ftp", "http://lease-exec.invalid:8080", None);
    let (code, log) = contender(&world)
        .kubeconfig(&config)
        .env("HTTP_PROXY", "ftp://127.0.0.1:21")
        .run(LIMIT)
        .await;
    assert_eq!(code, 125, "{log}");
    assert!(
        log.contains("HTTP_PROXY") && log.contains("ftp") && log.contains("http, https and socks5"),
        "{log}"
    );
    assert!(
        world.server.lease(NS, "job").is_none(),
        "nothing was touched"
    );
}

/// A malformed `HTTPS_PROXY` is named as such (kube would blame the kubeconfig), without its
/// password.
#[tokio::test]
async fn a_malformed_https_proxy_is_named_without_its_password() {
    let world = World::start().await;
    let (code, log) = contender(&world)
        .env("HTTPS_PROXY", "http://user:s3cret@bad host:1")
        .run(LIMIT)
        .await;
    assert_eq!(code, 125, "{log}");
    assert!(
        log.contains("HTTPS_PROXY") && log.contains("not a proxy URL") && !log.contains("s3cret"),
        "{log}"
    );
    assert!(
        world.server.lease(NS, "job").is_none(),
        "nothing was touched"
    );
}
