//! Self-tests of the in-memory API server's doors (see `support/apiserver.rs`): each door is a port
//! of the same server whose fault hits the clients behind it only. Plain HTTP/1.1 on keep-alive
//! connections, so that "a connection open before the fault" is a real one.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::apiserver::{ApiServer, Door, Fault, Mode};
use support::wait_for;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/default/leases";
const JOB: &str = "/apis/coordination.k8s.io/v1/namespaces/default/leases/job";
const LIMIT: Duration = Duration::from_secs(5);
/// How long "no answer" is watched for.
const SILENCE: Duration = Duration::from_millis(500);

fn lease(holder: &str) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "job"},
           "spec": {"holderIdentity": holder, "leaseDurationSeconds": 10}})
}

/// A keep-alive HTTP/1.1 connection.
struct Conn(BufReader<TcpStream>);

impl Conn {
    async fn open(door: &Door) -> Conn {
        Conn(BufReader::new(
            TcpStream::connect(door.addr()).await.expect("connect"),
        ))
    }

    async fn send(&mut self, method: &str, path: &str, body: &[u8]) {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let stream = self.0.get_mut();
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body).await.unwrap();
    }

    /// The status line and headers of the next answer; `None` if the connection ends first.
    async fn head(&mut self) -> Option<(u16, Vec<(String, String)>)> {
        let mut line = String::new();
        if self.0.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let status = line.split_whitespace().nth(1)?.parse().ok()?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.0.read_line(&mut line).await.ok()?;
            let text = line.trim_end();
            if text.is_empty() {
                return Some((status, headers));
            }
            if let Some((k, v)) = text.split_once(':') {
                headers.push((k.trim().to_lowercase(), v.trim().to_string()));
            }
        }
    }

    /// The next whole answer (a `Content-Length` body); `None` if the connection ends first.
    async fn reply(&mut self) -> Option<(u16, Vec<(String, String)>, Value)> {
        let (status, headers) = self.head().await?;
        let length: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        self.0.read_exact(&mut body).await.ok()?;
        Some((
            status,
            headers,
            serde_json::from_slice(&body).unwrap_or(Value::Null),
        ))
    }

    /// Sends a request and returns its answer, which must come within [`LIMIT`].
    async fn request(&mut self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        self.send(method, path, body).await;
        let (status, _, body) = tokio::time::timeout(LIMIT, self.reply())
            .await
            .unwrap_or_else(|_| panic!("no answer to {method} {path} in {LIMIT:?}"))
            .unwrap_or_else(|| panic!("the connection ended before answering {method} {path}"));
        (status, body)
    }

    /// Asserts nothing comes within [`SILENCE`].
    async fn silent(&mut self) {
        let mut byte = [0u8; 1];
        if let Ok(read) = tokio::time::timeout(SILENCE, self.0.read(&mut byte)).await {
            panic!("expected silence, got {read:?}");
        }
    }

    /// Waits until the connection ends (closed or reset).
    async fn ended(&mut self) {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(LIMIT, self.0.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the connection still up after {LIMIT:?}");
    }

    /// Opens a watch of the Leases from now; the head is read.
    async fn watch(door: &Door) -> Conn {
        let mut conn = Conn::open(door).await;
        conn.send("GET", &format!("{LEASES}?watch=true"), b"").await;
        let (status, _) = tokio::time::timeout(LIMIT, conn.head())
            .await
            .expect("the watch's head")
            .expect("the watch's head");
        assert_eq!(status, 200);
        conn
    }

    /// The next chunk of a watch stream; `None` at its end.
    async fn chunk(&mut self) -> Option<String> {
        let mut line = String::new();
        if self.0.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let size = usize::from_str_radix(line.trim(), 16).ok()?;
        if size == 0 {
            return None;
        }
        let mut chunk = vec![0; size + 2];
        self.0.read_exact(&mut chunk).await.ok()?;
        chunk.truncate(size);
        Some(String::from_utf8(chunk).unwrap())
    }
}

/// Creates the Lease through `door`.
async fn create(door: &Door, holder: &str) {
    let (status, body) = Conn::open(door)
        .await
        .request("POST", LEASES, lease(holder).to_string().as_bytes())
        .await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn doors_share_the_store_and_name_who_wrote() {
    let server = ApiServer::start().await;
    let (a, b) = (server.door(), server.door());
    assert_eq!(server.own_door().index(), 0);
    assert_ne!(a.addr(), b.addr());
    create(&a, "a").await;
    let (status, body) = Conn::open(&b).await.request("GET", JOB, b"").await;
    assert_eq!(status, 200);
    assert_eq!(body["spec"]["holderIdentity"], "a");
    let writes = server.writes();
    assert_eq!(writes.len(), 1);
    assert_eq!(writes[0].door, a.index());
    assert_eq!(a.writes().len(), 1);
    assert!(b.writes().is_empty());
    assert_eq!((a.total("create"), a.total("get")), (1, 0));
    assert_eq!((b.total("create"), b.total("get")), (0, 1));
    assert!(server.own_door().seen().is_empty());
    assert!(a.kubeconfig("default").contains(&a.url()));
}

#[tokio::test]
async fn a_refused_door_resets_and_refuses_its_own_connections_only() {
    let server = ApiServer::start().await;
    let (a, b) = (server.door(), server.door());
    let mut open = Conn::open(&a).await;
    open.request("GET", JOB, b"").await;
    a.set_fault(Fault::Refuse);
    open.ended().await;
    wait_for(LIMIT, "the door to refuse", || {
        std::net::TcpStream::connect(a.addr()).is_err()
    })
    .await;
    let refused = TcpStream::connect(a.addr()).await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert_eq!(
        std::net::TcpListener::bind(a.addr()).unwrap_err().kind(),
        std::io::ErrorKind::AddrInUse,
        "the port stays reserved"
    );
    create(&b, "b").await;
    a.set_fault(Fault::Normal);
    wait_for(LIMIT, "the door to listen again", || {
        std::net::TcpStream::connect(a.addr()).is_ok()
    })
    .await;
    assert_eq!(Conn::open(&a).await.request("GET", JOB, b"").await.0, 200);
}

#[tokio::test]
async fn a_black_holed_door_accepts_and_passes_nothing_until_healed() {
    let server = ApiServer::start().await;
    let (a, b) = (server.door(), server.door());
    let mut old = Conn::open(&a).await;
    old.request("GET", JOB, b"").await;
    let mut watch = Conn::watch(&a).await;
    a.set_fault(Fault::Blackhole);
    let seen = a.seen().len();
    old.send("GET", JOB, b"").await;
    old.silent().await;
    let mut new = Conn::open(&a).await;
    new.send("GET", JOB, b"").await;
    new.silent().await;
    create(&b, "b").await;
    watch.silent().await;
    assert_eq!(a.seen().len(), seen, "requests are never read");
    a.set_fault(Fault::Normal);
    for conn in [&mut old, &mut new] {
        let (status, _, body) = tokio::time::timeout(LIMIT, conn.reply())
            .await
            .expect("answered once healed")
            .expect("still connected");
        assert_eq!(
            (status, &body["spec"]["holderIdentity"]),
            (200, &json!("b"))
        );
    }
    let event = tokio::time::timeout(LIMIT, watch.chunk()).await.unwrap();
    assert!(event.unwrap().contains("\"ADDED\""));
}

#[tokio::test]
async fn a_half_open_door_cuts_the_connections_open_now_and_serves_new_ones() {
    let server = ApiServer::start().await;
    let (a, b) = (server.door(), server.door());
    let mut old = Conn::open(&a).await;
    old.request("GET", JOB, b"").await;
    let mut watch = Conn::watch(&a).await;
    let mut other = Conn::open(&b).await;
    other.request("GET", JOB, b"").await;
    wait_for(LIMIT, "both connections counted", || {
        a.open_connections() == 2
    })
    .await;
    a.set_fault(Fault::HalfOpen);
    let seen = a.seen().len();
    old.send("GET", JOB, b"").await;
    old.silent().await;
    assert_eq!(a.seen().len(), seen, "nothing read from a cut connection");
    let mut new = Conn::open(&a).await;
    assert_eq!(new.request("GET", JOB, b"").await.0, 404);
    create(&b, "b").await;
    watch.silent().await;
    // Another door's open connections are not cut.
    assert_eq!(other.request("GET", JOB, b"").await.0, 200);
    // Healing resets the cut connections; the one opened since stays.
    a.set_fault(Fault::Normal);
    old.ended().await;
    watch.ended().await;
    assert_eq!(new.request("GET", JOB, b"").await.0, 200);
}

#[tokio::test]
async fn a_delayed_door_answers_late() {
    let server = ApiServer::start().await;
    let (a, b) = (server.door(), server.door());
    let delay = Duration::from_secs(1);
    a.set_fault(Fault::Delay(delay));
    let started = std::time::Instant::now();
    assert_eq!(Conn::open(&a).await.request("GET", JOB, b"").await.0, 404);
    assert!(started.elapsed() >= delay);
    let started = std::time::Instant::now();
    assert_eq!(Conn::open(&b).await.request("GET", JOB, b"").await.0, 404);
    assert!(started.elapsed() < delay, "another door is not delayed");
}

#[tokio::test]
async fn a_delayed_request_whose_client_hung_up_is_not_carried_out() {
    let server = ApiServer::start().await;
    let a = server.door();
    let delay = Duration::from_millis(300);
    a.set_fault(Fault::Delay(delay));
    let mut conn = Conn::open(&a).await;
    conn.send("POST", LEASES, lease("a").to_string().as_bytes())
        .await;
    wait_for(LIMIT, "the request to arrive", || a.total("create") == 1).await;
    drop(conn);
    // Nothing may happen in a window well past the delay.
    tokio::time::sleep(delay * 3).await;
    assert_eq!(server.holder("default", "job"), None);
    assert!(server.writes().is_empty());
}

#[tokio::test]
async fn a_status_door_answers_its_status_and_closes_its_watches() {
    let server = ApiServer::start().await;
    let (a, b) = (server.door(), server.door());
    let mut watch_a = Conn::watch(&a).await;
    let mut watch_b = Conn::watch(&b).await;
    a.set_fault(Fault::Status(503, Some(2)));
    assert_eq!(tokio::time::timeout(LIMIT, watch_a.chunk()).await, Ok(None));
    let mut conn = Conn::open(&a).await;
    conn.send("GET", JOB, b"").await;
    let (status, headers, body) = conn.reply().await.unwrap();
    assert_eq!(
        (status, &body["reason"]),
        (503, &json!("ServiceUnavailable"))
    );
    assert!(headers.contains(&("retry-after".into(), "2".into())));
    create(&b, "b").await;
    let event = tokio::time::timeout(LIMIT, watch_b.chunk()).await.unwrap();
    assert!(
        event.unwrap().contains("\"ADDED\""),
        "another door's watch stays"
    );
}

#[tokio::test]
async fn a_door_losing_answers_commits_its_writes() {
    let server = ApiServer::start().await;
    let a = server.door();
    a.set_fault(Fault::LoseAnswers);
    let mut conn = Conn::open(&a).await;
    conn.send("POST", LEASES, lease("a").to_string().as_bytes())
        .await;
    conn.silent().await;
    assert_eq!(server.holder("default", "job").as_deref(), Some("a"));
    assert_eq!(server.writes()[0].door, a.index());
    assert_eq!(Conn::open(&a).await.request("GET", JOB, b"").await.0, 200);
}

#[tokio::test]
async fn global_faults_reach_every_door() {
    let server = ApiServer::start().await;
    let a = server.door();
    server.set_mode(Mode::Status(500, None));
    assert_eq!(Conn::open(&a).await.request("GET", JOB, b"").await.0, 500);
    server.set_mode(Mode::Refuse);
    wait_for(LIMIT, "the door to refuse", || {
        std::net::TcpStream::connect(a.addr()).is_err()
    })
    .await;
    server.set_mode(Mode::Normal);
    wait_for(LIMIT, "the door to listen again", || {
        std::net::TcpStream::connect(a.addr()).is_ok()
    })
    .await;
    assert_eq!(Conn::open(&a).await.request("GET", JOB, b"").await.0, 404);
}
