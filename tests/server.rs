//! Self-tests of the in-memory API server: plain HTTP requests pin each behaviour it models after
//! kube-apiserver (see the module documentation of `support/apiserver.rs` for the sources).

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::apiserver::{self, ApiServer, Mode};
use support::wait_for;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const NS: &str = "default";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/default/leases";
const LIMIT: Duration = Duration::from_secs(5);

fn path(name: &str) -> String {
    format!("{LEASES}/{name}")
}

fn lease(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name}, "spec": spec})
}

/// An HTTP answer.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} answered no JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn rv(&self) -> String {
        self.json()["metadata"]["resourceVersion"]
            .as_str()
            .expect("a resourceVersion")
            .to_string()
    }

    /// Asserts a `Status` answer with this code and reason; returns it.
    fn status(&self, code: u16, reason: &str) -> Value {
        let status = self.json();
        assert_eq!(self.status, code, "{status}");
        assert_eq!(status["kind"], "Status", "{status}");
        assert_eq!(status["code"], code, "{status}");
        assert_eq!(status["reason"].as_str().unwrap_or(""), reason, "{status}");
        status
    }
}

/// Writes the request; returns the connection positioned at the body and the status and headers.
async fn open(
    server: &ApiServer,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (BufReader<TcpStream>, u16, Vec<(String, String)>) {
    let mut stream = TcpStream::connect(server.addr()).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: application/json\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await.unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).await.unwrap();
        let text = line.trim_end();
        if text.is_empty() {
            break;
        }
        if let Some((k, v)) = text.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    (reader, status, headers)
}

async fn request(
    server: &ApiServer,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> Reply {
    let exchange = async {
        let (mut reader, status, headers) = open(server, method, path, content_type, body).await;
        let chunked = headers.iter().any(|(k, v)| {
            k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
        });
        let mut body = Vec::new();
        if chunked {
            while let Some(chunk) = read_chunk(&mut reader).await {
                body.extend(chunk);
            }
        } else {
            reader.read_to_end(&mut body).await.unwrap();
        }
        Reply {
            status,
            headers,
            body,
        }
    };
    tokio::time::timeout(LIMIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("no answer to {method} {path} in {LIMIT:?}"))
}

/// One chunk of a chunked body; `None` at its end (or when the connection closes).
async fn read_chunk(reader: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut line = String::new();
    if reader.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let size = usize::from_str_radix(line.trim(), 16).ok()?;
    if size == 0 {
        return None;
    }
    let mut chunk = vec![0; size + 2];
    reader.read_exact(&mut chunk).await.ok()?;
    chunk.truncate(size);
    Some(chunk)
}

async fn get(server: &ApiServer, path: &str) -> Reply {
    request(server, "GET", path, "application/json", b"").await
}

async fn post(server: &ApiServer, object: &Value) -> Reply {
    request(
        server,
        "POST",
        LEASES,
        "application/json",
        object.to_string().as_bytes(),
    )
    .await
}

async fn put(server: &ApiServer, name: &str, object: &Value) -> Reply {
    request(
        server,
        "PUT",
        &path(name),
        "application/json",
        object.to_string().as_bytes(),
    )
    .await
}

async fn patch(server: &ApiServer, name: &str, patch: &Value) -> Reply {
    request(
        server,
        "PATCH",
        &path(name),
        "application/merge-patch+json",
        patch.to_string().as_bytes(),
    )
    .await
}

async fn delete(server: &ApiServer, name: &str, options: Option<&Value>) -> Reply {
    let body = options.map(Value::to_string).unwrap_or_default();
    request(
        server,
        "DELETE",
        &path(name),
        "application/json",
        body.as_bytes(),
    )
    .await
}

/// An open watch stream.
struct Watch {
    reader: BufReader<TcpStream>,
    pending: Vec<u8>,
    ended: bool,
}

impl Watch {
    async fn start(server: &ApiServer, query: &str) -> Watch {
        let (reader, status, _) = open(
            server,
            "GET",
            &format!("{LEASES}?watch=true&{query}"),
            "application/json",
            b"",
        )
        .await;
        assert_eq!(status, 200, "watch {query}");
        Watch {
            reader,
            pending: Vec::new(),
            ended: false,
        }
    }

    /// The next event; `Ok(None)` when the stream ended, `Err(())` when nothing came within `limit`.
    async fn next_within(&mut self, limit: Duration) -> Result<Option<Value>, ()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return Ok(Some(serde_json::from_slice(&line).expect("a JSON event")));
            }
            if self.ended {
                return Ok(None);
            }
            match tokio::time::timeout_at(deadline, read_chunk(&mut self.reader)).await {
                Ok(Some(chunk)) => self.pending.extend(chunk),
                Ok(None) => self.ended = true,
                Err(_) => return Err(()),
            }
        }
    }

    /// The next event, which must come within [`LIMIT`].
    async fn next(&mut self) -> Value {
        match self.next_within(LIMIT).await {
            Ok(Some(event)) => event,
            Ok(None) => panic!("the watch ended"),
            Err(()) => panic!("no event within {LIMIT:?}"),
        }
    }

    /// Asserts nothing comes within `window`.
    async fn quiet_for(&mut self, window: Duration) {
        if let Ok(event) = self.next_within(window).await {
            panic!("expected silence, got {event:?}");
        }
    }

    /// Waits for the stream to end; returns the events seen before.
    async fn end(&mut self) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            match self.next_within(LIMIT).await {
                Ok(Some(event)) => seen.push(event),
                Ok(None) => return seen,
                Err(()) => panic!("the watch did not end within {LIMIT:?}; saw {seen:?}"),
            }
        }
    }
}

fn rv_of(event: &Value) -> u64 {
    event["object"]["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|rv| rv.parse().ok())
        .unwrap_or_else(|| panic!("no resourceVersion in {event}"))
}

// ---- Create and update ----

#[tokio::test]
async fn a_put_without_uid_creates_a_missing_lease() {
    let server = ApiServer::start().await;
    let reply = put(
        &server,
        "job",
        &lease(
            "job",
            json!({"holderIdentity": "a", "leaseDurationSeconds": 10}),
        ),
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.json());
    let created = reply.json();
    assert!(!created["metadata"]["uid"].as_str().unwrap().is_empty());
    assert_eq!(
        created["metadata"]["resourceVersion"],
        server.resource_version().to_string()
    );
    assert_eq!(get(&server, &path("job")).await.json(), created);
}

#[tokio::test]
async fn a_put_with_a_resource_version_also_creates_a_missing_lease() {
    let server = ApiServer::start().await;
    let mut object = lease("job", json!({"holderIdentity": "a"}));
    object["metadata"]["resourceVersion"] = json!("12345");
    let reply = put(&server, "job", &object).await;
    assert_eq!(reply.status, 201, "{}", reply.json());
    assert_eq!(reply.rv(), server.resource_version().to_string());
}

#[tokio::test]
async fn a_put_with_the_uid_of_a_deleted_lease_is_a_conflict() {
    let server = ApiServer::start().await;
    let created = post(&server, &lease("job", json!({"holderIdentity": "a"}))).await;
    assert_eq!(created.status, 201);
    let old = created.json();
    let uid = old["metadata"]["uid"].as_str().unwrap().to_string();
    assert!(server.delete_lease(NS, "job"));

    let reply = put(&server, "job", &old).await;
    let status = reply.status(409, "Conflict");
    let message = status["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "Precondition failed: UID in precondition: {uid}, UID in object meta: "
        )),
        "{message}"
    );
    assert!(server.lease(NS, "job").is_none(), "not re-created");

    // Re-created by someone else: the old uid still does not match.
    let again = post(&server, &lease("job", json!({"holderIdentity": "b"}))).await;
    let new_uid = again.json()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new_uid, uid);
    let mut stale = old.clone();
    stale["metadata"]["resourceVersion"] = json!(again.rv());
    let status = put(&server, "job", &stale).await.status(409, "Conflict");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .ends_with(&format!("UID in object meta: {new_uid}")),
        "{status}"
    );
}

#[tokio::test]
async fn updates_need_the_current_resource_version() {
    let server = ApiServer::start().await;
    let created = post(&server, &lease("job", json!({"holderIdentity": "a"}))).await;
    let mut object = created.json();

    object["spec"]["holderIdentity"] = json!("b");
    let updated = put(&server, "job", &object).await;
    assert_eq!(updated.status, 200, "{}", updated.json());
    assert_ne!(updated.rv(), created.rv());

    // The first resourceVersion is stale now.
    object["spec"]["holderIdentity"] = json!("c");
    let status = put(&server, "job", &object).await.status(409, "Conflict");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("the object has been modified"),
        "{status}"
    );

    // None at all: leases allow no unconditional update.
    object["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    let status = put(&server, "job", &object).await.status(422, "Invalid");
    assert_eq!(
        status["message"],
        "leases.coordination.k8s.io \"job\" is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"
    );
    assert_eq!(
        status["details"]["causes"][0]["field"],
        "metadata.resourceVersion"
    );
    assert_eq!(server.holder(NS, "job").as_deref(), Some("b"));
}

#[tokio::test]
async fn a_put_must_name_the_lease_of_its_url() {
    let server = ApiServer::start().await;
    let reply = put(&server, "job", &lease("other", json!({}))).await;
    reply.status(400, "BadRequest");
    let mut nameless = lease("job", json!({}));
    nameless["metadata"] = json!({});
    put(&server, "job", &nameless)
        .await
        .status(400, "BadRequest");
    let mut elsewhere = lease("job", json!({}));
    elsewhere["metadata"]["namespace"] = json!("kube-system");
    put(&server, "job", &elsewhere)
        .await
        .status(400, "BadRequest");
    assert!(server.lease(NS, "job").is_none());
}

#[tokio::test]
async fn creating_via_put_needs_the_create_verb() {
    let server = ApiServer::start().await;
    server.deny("create", 403);
    let status = put(&server, "job", &lease("job", json!({})))
        .await
        .status(403, "Forbidden");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("cannot create resource \"leases\""),
        "{status}"
    );
}

#[tokio::test]
async fn creates_refuse_a_resource_version_and_an_existing_name() {
    let server = ApiServer::start().await;
    let mut object = lease("job", json!({}));
    object["metadata"]["resourceVersion"] = json!("7");
    let status = post(&server, &object).await.status(500, "");
    assert_eq!(
        status["message"],
        "resourceVersion should not be set on objects to be created"
    );
    assert_eq!(post(&server, &lease("job", json!({}))).await.status, 201);
    post(&server, &lease("job", json!({})))
        .await
        .status(409, "AlreadyExists");
    let mut elsewhere = lease("other", json!({}));
    elsewhere["metadata"]["namespace"] = json!("kube-system");
    post(&server, &elsewhere).await.status(400, "BadRequest");
}

#[tokio::test]
async fn stored_leases_are_what_the_typed_object_serializes() {
    let server = ApiServer::start().await;
    let mut object = lease(
        "job",
        json!({"holderIdentity": "a", "renewTime": "2026-01-02T03:04:05Z", "surprise": 1}),
    );
    object["metadata"]["labels"] = json!({});
    object["metadata"]["uid"] = json!("client-chosen");
    let stored = post(&server, &object).await.json();
    assert_eq!(stored["spec"]["renewTime"], "2026-01-02T03:04:05.000000Z");
    assert!(stored["spec"].get("surprise").is_none(), "{stored}");
    assert!(stored["metadata"].get("labels").is_none(), "{stored}");
    assert_ne!(stored["metadata"]["uid"], "client-chosen");
    assert!(stored["metadata"]["creationTimestamp"].is_string());

    let bare = post(&server, &json!({"metadata": {"name": "bare"}}))
        .await
        .json();
    assert_eq!(bare["spec"], json!({}), "spec is always there");
    assert_eq!(bare["kind"], "Lease");
}

// ---- No-op writes ----

#[tokio::test]
async fn a_write_that_changes_nothing_keeps_the_resource_version_and_sends_no_event() {
    let server = ApiServer::start().await;
    let created = post(&server, &lease("job", json!({"holderIdentity": "a"}))).await;
    let object = created.json();
    let mut watch = Watch::start(&server, &format!("resourceVersion={}", created.rv())).await;
    let writes = server.writes().len();

    let same = put(&server, "job", &object).await;
    assert_eq!(same.status, 200);
    assert_eq!(same.json(), object, "the stored object, unchanged");
    let same = patch(&server, "job", &json!({"spec": {"holderIdentity": "a"}})).await;
    assert_eq!(same.status, 200);
    assert_eq!(same.rv(), created.rv());
    assert_eq!(server.writes().len(), writes, "no write");

    let changed = patch(&server, "job", &json!({"spec": {"holderIdentity": "b"}})).await;
    assert_eq!(changed.status, 200);
    let event = watch.next().await;
    assert_eq!(event["type"], "MODIFIED", "the first event is the change");
    assert_eq!(event["object"]["spec"]["holderIdentity"], "b");
    assert_eq!(rv_of(&event).to_string(), changed.rv());
}

// ---- Deletion ----

#[tokio::test]
async fn deleted_events_carry_the_deletions_resource_version_and_the_last_state() {
    let server = ApiServer::start().await;
    let created = post(&server, &lease("job", json!({"holderIdentity": "a"}))).await;
    let uid = created.json()["metadata"]["uid"].clone();
    let mut watch = Watch::start(&server, &format!("resourceVersion={}", created.rv())).await;

    let stale = json!({"preconditions": {"uid": "someone-else"}});
    delete(&server, "job", Some(&stale))
        .await
        .status(409, "Conflict");
    let answer = delete(&server, "job", None).await;
    assert_eq!(answer.status, 200);
    let answer = answer.json();
    assert_eq!(answer["status"], "Success");
    assert_eq!(answer["details"]["uid"], uid);

    let event = watch.next().await;
    assert_eq!(event["type"], "DELETED");
    assert_eq!(event["object"]["spec"]["holderIdentity"], "a");
    let created_rv: u64 = created.rv().parse().unwrap();
    assert!(rv_of(&event) > created_rv, "{event}");
    assert_eq!(rv_of(&event), server.resource_version());
    delete(&server, "job", None).await.status(404, "NotFound");

    // The same for deletions by the test.
    let again = post(&server, &lease("job", json!({}))).await;
    let mut watch = Watch::start(&server, &format!("resourceVersion={}", again.rv())).await;
    server.delete_lease(NS, "job");
    let event = watch.next().await;
    assert_eq!(event["type"], "DELETED");
    assert_eq!(rv_of(&event), server.resource_version());
}

// ---- Validation ----

#[tokio::test]
async fn invalid_leases_are_refused_naming_the_field() {
    let server = ApiServer::start().await;
    let cases = [
        (
            json!({"leaseDurationSeconds": 0}),
            "spec.leaseDurationSeconds",
            "FieldValueInvalid",
        ),
        (
            json!({"leaseTransitions": -1}),
            "spec.leaseTransitions",
            "FieldValueInvalid",
        ),
        (
            json!({"preferredHolder": "b"}),
            "spec.preferredHolder",
            "FieldValueForbidden",
        ),
        (
            json!({"strategy": "Fastest"}),
            "spec.strategy.strategy",
            "FieldValueNotSupported",
        ),
        (
            json!({"strategy": "a/b/c"}),
            "spec.strategy.strategy",
            "FieldValueInvalid",
        ),
    ];
    post(&server, &lease("valid", json!({"holderIdentity": "a"}))).await;
    for (spec, field, reason) in cases {
        let check = |reply: Reply, how: &str| {
            let status = reply.status(422, "Invalid");
            let cause = &status["details"]["causes"][0];
            assert_eq!(cause["field"], field, "{how} {spec}: {status}");
            assert_eq!(cause["reason"], reason, "{how} {spec}: {status}");
            assert_eq!(status["details"]["kind"], "Lease", "{status}");
            assert!(
                status["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("Lease.coordination.k8s.io \""),
                "{status}"
            );
        };
        check(post(&server, &lease("bad", spec.clone())).await, "create");
        check(
            put(&server, "bad", &lease("bad", spec.clone())).await,
            "put-create",
        );
        check(
            patch(&server, "valid", &json!({"spec": spec})).await,
            "patch",
        );
        let mut current = get(&server, &path("valid")).await.json();
        current["spec"] = spec.clone();
        check(put(&server, "valid", &current).await, "update");
    }
    assert!(server.lease(NS, "bad").is_none());
    assert_eq!(server.holder(NS, "valid").as_deref(), Some("a"));

    // Two errors at once are listed in brackets.
    let status = post(
        &server,
        &lease(
            "bad",
            json!({"leaseDurationSeconds": -5, "leaseTransitions": -1}),
        ),
    )
    .await
    .status(422, "Invalid");
    assert!(
        status["message"].as_str().unwrap().contains(": [spec."),
        "{status}"
    );
    assert_eq!(status["details"]["causes"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn names_must_be_dns_subdomains() {
    let server = ApiServer::start().await;
    for name in ["Job", "job_1", "a..b", "-job", &"a".repeat(254)] {
        let status = post(&server, &lease(name, json!({})))
            .await
            .status(422, "Invalid");
        assert_eq!(
            status["details"]["causes"][0]["field"], "metadata.name",
            "{name}: {status}"
        );
    }
    let status = post(&server, &json!({"metadata": {}}))
        .await
        .status(422, "Invalid");
    assert_eq!(
        status["details"]["causes"][0]["reason"],
        "FieldValueRequired"
    );
    for name in ["job", "a.b-c", "0"] {
        assert_eq!(
            post(&server, &lease(name, json!({}))).await.status,
            201,
            "{name}"
        );
    }
    let generated = post(&server, &json!({"metadata": {"generateName": "job-"}})).await;
    assert_eq!(generated.status, 201);
    let name = generated.json()["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(name.starts_with("job-") && name.len() == 9, "{name}");
}

#[tokio::test]
async fn what_the_real_validation_allows_is_allowed() {
    let server = ApiServer::start().await;
    let cases = [
        // No rule limits holderIdentity but the request size.
        json!({"holderIdentity": "h".repeat(100_000)}),
        json!({"strategy": "OldestEmulationVersion", "preferredHolder": "b"}),
        json!({"strategy": "example.com/mine", "preferredHolder": "b"}),
        json!({"preferredHolder": ""}),
        json!({"leaseDurationSeconds": 1, "leaseTransitions": 0}),
    ];
    for (i, spec) in cases.into_iter().enumerate() {
        let name = format!("ok-{i}");
        let reply = post(&server, &lease(&name, spec.clone())).await;
        assert_eq!(reply.status, 201, "{spec}: {}", reply.json());
    }
}

#[tokio::test]
async fn undecodable_bodies_are_bad_requests() {
    let server = ApiServer::start().await;
    let bodies: [&[u8]; 5] = [
        b"{not json",
        b"",
        br#"{"metadata": {"name": "job"}, "spec": {"leaseDurationSeconds": "ten"}}"#,
        br#"{"metadata": {"name": "job"}, "spec": {"leaseDurationSeconds": 2147483648}}"#,
        br#"{"kind": "Pod", "metadata": {"name": "job"}}"#,
    ];
    for body in bodies {
        let shown = String::from_utf8_lossy(body).into_owned();
        let reply = request(&server, "POST", LEASES, "application/json", body).await;
        reply.status(400, "BadRequest");
        let reply = request(&server, "PUT", &path("job"), "application/json", body).await;
        assert_eq!(reply.status, 400, "{shown}");
    }
    post(&server, &lease("job", json!({}))).await;
    let reply = request(
        &server,
        "PATCH",
        &path("job"),
        "application/merge-patch+json",
        b"{oops",
    )
    .await;
    reply.status(400, "BadRequest");
    // A patch whose result does not decode is invalid.
    let status = patch(&server, "job", &json!({"spec": {"leaseTransitions": "x"}}))
        .await
        .status(422, "Invalid");
    assert_eq!(status["details"]["causes"][0]["field"], "patch");
    let reply = request(
        &server,
        "PATCH",
        &path("job"),
        "application/json-patch+json",
        b"[]",
    )
    .await;
    reply.status(415, "UnsupportedMediaType");
}

#[tokio::test]
async fn bodies_over_3_mib_are_too_large() {
    let server = ApiServer::start().await;
    let huge = lease(
        "job",
        json!({"holderIdentity": "h".repeat(3 * 1024 * 1024)}),
    );
    post(&server, &huge)
        .await
        .status(413, "RequestEntityTooLarge");
}

#[tokio::test]
async fn put_lease_plants_what_validation_would_refuse() {
    let server = ApiServer::start().await;
    server.put_lease(
        NS,
        "job",
        json!({"spec": {"leaseDurationSeconds": 0, "renewTime": "yesterday"}}),
    );
    let stored = get(&server, &path("job")).await.json();
    assert_eq!(stored["spec"]["leaseDurationSeconds"], 0);
    assert_eq!(stored["spec"]["renewTime"], "yesterday");
}

// ---- Watches ----

#[tokio::test]
async fn a_watch_from_zero_starts_with_the_current_state() {
    let server = ApiServer::start().await;
    server.steal(NS, "a", "x", 10);
    server.steal(NS, "b", "y", 10);
    server.steal("elsewhere", "c", "z", 10);
    for query in ["resourceVersion=0", "resourceVersion="] {
        let mut watch = Watch::start(&server, query).await;
        let first = watch.next().await;
        let second = watch.next().await;
        assert_eq!(first["type"], "ADDED");
        assert_eq!(first["object"]["metadata"]["name"], "a");
        assert_eq!(second["type"], "ADDED");
        assert_eq!(second["object"]["metadata"]["name"], "b");
        let rv = server.steal(NS, "a", "x2", 10);
        let next = watch.next().await;
        assert_eq!(next["type"], "MODIFIED", "{query}");
        assert_eq!(rv_of(&next), rv);
    }
    let mut one = Watch::start(&server, "fieldSelector=metadata.name%3Db").await;
    let first = one.next().await;
    assert_eq!(first["object"]["metadata"]["name"], "b");
    server.steal(NS, "a", "x3", 10);
    let rv = server.steal(NS, "b", "y2", 10);
    let next = one.next().await;
    assert_eq!(rv_of(&next), rv, "only b's events: {next}");
    let reply = get(
        &server,
        &format!("{LEASES}?watch=true&fieldSelector=spec.holderIdentity%3Dx"),
    )
    .await;
    reply.status(400, "BadRequest");
}

#[tokio::test]
async fn a_watch_from_a_resource_version_gets_what_followed_it() {
    let server = ApiServer::start().await;
    let first = server.steal(NS, "job", "a", 10);
    let second = server.steal(NS, "job", "b", 10);
    let mut watch = Watch::start(&server, &format!("resourceVersion={first}")).await;
    let event = watch.next().await;
    assert_eq!(event["type"], "MODIFIED");
    assert_eq!(rv_of(&event), second);
    let third = server.steal(NS, "job", "c", 10);
    assert_eq!(rv_of(&watch.next().await), third);
}

#[tokio::test]
async fn a_watch_from_before_the_kept_history_is_gone() {
    let server = ApiServer::start().await;
    server.set_history_limit(2);
    server.set_history_window(Duration::ZERO);
    let rvs: Vec<u64> = (0..5)
        .map(|i| server.steal(NS, "job", &format!("h{i}"), 10))
        .collect();
    // Events 4 and 5 are kept: a watch from 3 sees them; from 2 it would miss 3.
    let mut kept = Watch::start(&server, &format!("resourceVersion={}", rvs[2])).await;
    assert_eq!(rv_of(&kept.next().await), rvs[3]);
    assert_eq!(rv_of(&kept.next().await), rvs[4]);

    let mut gone = Watch::start(&server, &format!("resourceVersion={}", rvs[1])).await;
    let error = gone.next().await;
    assert_eq!(error["type"], "ERROR", "{error}");
    assert_eq!(error["object"]["code"], 410);
    assert_eq!(error["object"]["reason"], "Expired");
    assert!(
        error["object"]["message"]
            .as_str()
            .unwrap()
            .starts_with("too old resource version"),
        "{error}"
    );
    assert!(
        gone.end().await.is_empty(),
        "the stream ends after the error"
    );

    // compact() at the current revision: anything older is gone, the current one still watchable.
    server.compact();
    let mut compacted = Watch::start(&server, &format!("resourceVersion={}", rvs[3])).await;
    assert_eq!(compacted.next().await["object"]["code"], 410);
    let mut current = Watch::start(&server, &format!("resourceVersion={}", rvs[4])).await;
    let next = server.steal(NS, "job", "h5", 10);
    assert_eq!(rv_of(&current.next().await), next);
}

#[tokio::test]
async fn a_watch_from_a_resource_version_not_reached_yet_starts_at_once() {
    let server = ApiServer::start().await;
    let now = server.steal(NS, "job", "a", 10);
    let mut watch = Watch::start(&server, &format!("resourceVersion={}", now + 2)).await;
    wait_for(LIMIT, "the watch to open", || server.open_watches() == 1).await;
    // It gets what follows its resourceVersion, not what leads up to it.
    server.steal(NS, "job", "b", 10);
    server.steal(NS, "job", "c", 10);
    let next = server.steal(NS, "job", "d", 10);
    let event = watch.next().await;
    assert_eq!(rv_of(&event), next);

    // A watch-list request waits up to 3 s for it, then fails.
    let mut never = Watch::start(
        &server,
        &format!(
            "sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion={}",
            now + 1000
        ),
    )
    .await;
    let error = never.next().await;
    assert_eq!(error["type"], "ERROR");
    assert_eq!(error["object"]["code"], 504);
    assert_eq!(error["object"]["reason"], "Timeout");
    assert!(
        error["object"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Timeout: Too large resource version"),
        "{error}"
    );
    assert_eq!(
        error["object"]["details"]["causes"][0]["reason"],
        "ResourceVersionTooLarge"
    );
}

#[tokio::test]
async fn events_during_a_hang_are_delivered_when_it_ends() {
    let server = ApiServer::start().await;
    let start = server.steal(NS, "job", "a", 10);
    server.set_bookmark_interval(Duration::ZERO);
    let mut watch = Watch::start(&server, &format!("resourceVersion={start}")).await;
    server.set_mode(Mode::Hang);
    let first = server.steal(NS, "job", "b", 10);
    let deleted = {
        server.delete_lease(NS, "job");
        server.resource_version()
    };
    watch.quiet_for(Duration::from_millis(300)).await;
    server.set_mode(Mode::Normal);
    let event = watch.next().await;
    assert_eq!(
        (event["type"].as_str(), rv_of(&event)),
        (Some("MODIFIED"), first)
    );
    let event = watch.next().await;
    assert_eq!(
        (event["type"].as_str(), rv_of(&event)),
        (Some("DELETED"), deleted)
    );
    // And it goes on.
    let later = server.steal(NS, "job", "c", 10);
    assert_eq!(rv_of(&watch.next().await), later);
}

#[tokio::test]
async fn a_watch_too_far_behind_is_closed() {
    let server = ApiServer::start().await;
    let start = server.steal(NS, "job", "a", 10);
    server.set_bookmark_interval(Duration::ZERO);
    let mut watch = Watch::start(&server, &format!("resourceVersion={start}")).await;
    server.set_mode(Mode::Hang);
    for i in 0..1100 {
        server.steal(NS, "job", &format!("h{i}"), 10);
    }
    server.set_mode(Mode::Normal);
    let seen = watch.end().await;
    assert!(seen.len() < 1100, "closed instead of catching up");
}

#[tokio::test]
async fn closing_and_failing_end_open_watches() {
    let server = ApiServer::start().await;
    let mut watch = Watch::start(&server, "resourceVersion=0").await;
    wait_for(LIMIT, "the watch to open", || server.open_watches() == 1).await;
    server.close_watches();
    watch.end().await;
    wait_for(LIMIT, "the watch to be gone", || server.open_watches() == 0).await;

    let mut watch = Watch::start(&server, "resourceVersion=0").await;
    server.set_mode(Mode::Status(500, None));
    watch.end().await;
}

#[tokio::test]
async fn watches_end_after_their_timeout() {
    let server = ApiServer::start().await;
    server.set_bookmark_interval(Duration::ZERO);
    let started = std::time::Instant::now();
    let mut watch = Watch::start(&server, "resourceVersion=0&timeoutSeconds=1").await;
    watch.end().await;
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn bookmarks_come_periodically_when_allowed() {
    let server = ApiServer::start().await;
    server.steal(NS, "job", "a", 10);
    server.set_bookmark_interval(Duration::from_millis(200));
    let rv = server.resource_version();
    let query = format!("resourceVersion={rv}&allowWatchBookmarks=true");
    let mut watch = Watch::start(&server, &query).await;
    // None at the watch's own resourceVersion.
    watch.quiet_for(Duration::from_millis(600)).await;
    // A write this watch does not see still moves the bookmarks on.
    let elsewhere = server.steal("elsewhere", "other", "x", 10);
    for _ in 0..2 {
        let event = watch.next().await;
        assert_eq!(event["type"], "BOOKMARK", "{event}");
        assert_eq!(event["object"]["kind"], "Lease");
        assert_eq!(event["object"]["apiVersion"], "coordination.k8s.io/v1");
        assert_eq!(rv_of(&event), elsewhere);
    }
    // Not asked for: none.
    let mut plain = Watch::start(&server, &format!("resourceVersion={rv}")).await;
    plain.quiet_for(Duration::from_millis(600)).await;
}

#[tokio::test]
async fn bookmark_now_sends_one_after_the_events_before_it() {
    let server = ApiServer::start().await;
    let start = server.steal(NS, "job", "a", 10);
    server.set_bookmark_interval(Duration::from_secs(3600));
    let mut watch = Watch::start(
        &server,
        &format!("resourceVersion={start}&allowWatchBookmarks=true"),
    )
    .await;
    wait_for(LIMIT, "the watch to open", || server.open_watches() == 1).await;
    let changed = server.steal(NS, "job", "b", 10);
    server.bookmark_now();
    let event = watch.next().await;
    assert_eq!(
        (event["type"].as_str(), rv_of(&event)),
        (Some("MODIFIED"), changed)
    );
    let event = watch.next().await;
    assert_eq!(event["type"], "BOOKMARK");
    assert!(rv_of(&event) >= changed);
}

#[tokio::test]
async fn bookmarks_handed_to_watches_are_recorded_and_requests_keep_their_query() {
    let server = ApiServer::start().await;
    let start = server.steal(NS, "job", "a", 10);
    server.set_bookmark_interval(Duration::ZERO);
    let query = format!(
        "resourceVersion={start}&allowWatchBookmarks=true&fieldSelector=metadata.name%3Djob"
    );
    let mut watch = Watch::start(&server, &query).await;
    wait_for(LIMIT, "the watch to open", || server.open_watches() == 1).await;
    let seen = server.seen().pop().expect("the watch request");
    assert_eq!(seen.verb, "watch");
    assert_eq!(seen.query, format!("watch=true&{query}"));
    assert_eq!(seen.param("resourceVersion"), Some(start.to_string()));
    assert_eq!(
        seen.param("fieldSelector").as_deref(),
        Some("metadata.name=job")
    );
    assert_eq!(server.bookmarks_sent(), Vec::<u64>::new());
    let elsewhere = server.steal(NS, "other", "x", 10);
    server.bookmark_now();
    let event = watch.next().await;
    assert_eq!(
        (event["type"].as_str(), rv_of(&event)),
        (Some("BOOKMARK"), elsewhere)
    );
    assert_eq!(server.bookmarks_sent(), [elsewhere]);
}

#[tokio::test]
async fn send_initial_events_ends_them_with_a_bookmark() {
    let server = ApiServer::start().await;
    let old = server.steal(NS, "job", "a", 10);
    let now = server.steal(NS, "job", "b", 10);
    server.set_bookmark_interval(Duration::ZERO);
    server.set_history_limit(1);
    // Whatever the resourceVersion (too old for a plain watch here), the current state.
    let mut watch = Watch::start(
        &server,
        &format!("sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan&resourceVersion={old}"),
    )
    .await;
    let added = watch.next().await;
    assert_eq!(
        (added["type"].as_str(), rv_of(&added)),
        (Some("ADDED"), now)
    );
    let end = watch.next().await;
    assert_eq!(end["type"], "BOOKMARK");
    assert_eq!(
        end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    // Without bookmarks allowed, no bookmark.
    let mut quiet = Watch::start(
        &server,
        "sendInitialEvents=true&resourceVersionMatch=NotOlderThan",
    )
    .await;
    assert_eq!(quiet.next().await["type"], "ADDED");
    quiet.quiet_for(Duration::from_millis(300)).await;
    // sendInitialEvents=false from "0": no state, only what follows.
    let mut none = Watch::start(
        &server,
        "sendInitialEvents=false&resourceVersionMatch=NotOlderThan&resourceVersion=0",
    )
    .await;
    wait_for(LIMIT, "the watches to open", || server.open_watches() == 3).await;
    let next = server.steal(NS, "job", "c", 10);
    assert_eq!(rv_of(&none.next().await), next);

    let reply = get(
        &server,
        &format!("{LEASES}?watch=true&sendInitialEvents=true"),
    )
    .await;
    let status = reply.status(422, "Invalid");
    assert_eq!(
        status["details"]["causes"][0]["field"],
        "resourceVersionMatch"
    );
    let reply = get(
        &server,
        &format!("{LEASES}?watch=true&resourceVersionMatch=Exact"),
    )
    .await;
    let status = reply.status(422, "Invalid");
    assert_eq!(
        status["details"]["causes"].as_array().unwrap().len(),
        2,
        "{status}"
    );
}

// ---- Faults ----

#[tokio::test]
async fn each_status_fault_answers_as_the_real_server_does() {
    let server = ApiServer::start().await;
    let cases = [
        (401, "Unauthorized"),
        (403, "Forbidden"),
        (404, "NotFound"),
        (409, "Conflict"),
        (410, "Expired"),
        (500, "InternalError"),
        (503, "ServiceUnavailable"),
        (504, "Timeout"),
    ];
    for (code, reason) in cases {
        server.set_mode(Mode::Status(code, None));
        let status = get(&server, &path("job")).await.status(code, reason);
        if code == 403 {
            assert_eq!(
                status["message"],
                "leases.coordination.k8s.io \"job\" is forbidden: User \"system:serviceaccount:default:test\" cannot get resource \"leases\" in API group \"coordination.k8s.io\" in the namespace \"default\""
            );
        }
    }
    server.set_mode(Mode::Status(503, Some(2)));
    let reply = get(&server, &path("job")).await;
    assert_eq!(reply.header("retry-after"), Some("2"));
    assert_eq!(
        reply.status(503, "ServiceUnavailable")["details"]["retryAfterSeconds"],
        2
    );

    // 429 comes from priority and fairness: plain text, always with a Retry-After.
    server.set_mode(Mode::Status(429, Some(7)));
    let reply = get(&server, &path("job")).await;
    assert_eq!(reply.status, 429);
    assert_eq!(reply.header("retry-after"), Some("7"));
    assert!(
        reply
            .header("content-type")
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(
        String::from_utf8_lossy(&reply.body).trim(),
        "Too many requests, please try again later."
    );
    server.set_mode(Mode::Status(429, None));
    assert_eq!(
        get(&server, &path("job")).await.header("retry-after"),
        Some("1")
    );

    // Denying a verb answers the same way.
    server.set_mode(Mode::Normal);
    server.deny("update", 503);
    put(&server, "job", &lease("job", json!({})))
        .await
        .status(503, "ServiceUnavailable");
    server.deny("get", 401);
    get(&server, &path("job")).await.status(401, "Unauthorized");
}

#[tokio::test]
async fn refusing_keeps_the_port_reserved() {
    let server = ApiServer::start().await;
    let mut watch = Watch::start(&server, "resourceVersion=0").await;
    server.set_mode(Mode::Refuse);
    watch.end().await;
    let addr = server.addr();
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "still connecting: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    let taken = std::net::TcpListener::bind(addr);
    assert_eq!(
        taken.map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::AddrInUse,
        "nobody else can take the port meanwhile"
    );
    server.set_mode(Mode::Normal);
    let deadline = tokio::time::Instant::now() + LIMIT;
    while TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never listening again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(get(&server, &path("job")).await.status, 404);
}

#[test]
fn free_ports_are_distinct_free_and_outside_the_ephemeral_range() {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let ports: Vec<u16> = (0..20).map(|_| apiserver::free_port()).collect();
    let mut distinct = ports.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), ports.len(), "{ports:?}");
    for port in ports {
        assert!(port < low, "{port} is in the ephemeral range");
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("free");
    }
}

// ---- Events ----

const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

/// An Event as kube's `Recorder` creates it about the Lease `job`.
fn recorded_event(name: &str) -> Value {
    json!({
        "apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"name": name, "namespace": NS},
        "eventTime": "2026-01-02T03:04:05.123456Z",
        "action": "Acquire", "reason": "LeaderElection", "note": "me became leader",
        "type": "Normal", "reportingController": "lease-exec", "reportingInstance": "me",
        "regarding": {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "name": "job", "namespace": NS, "uid": "u"}
    })
}

async fn patch_event(server: &ApiServer, path: &str, content_type: &str, patch: &Value) -> Reply {
    request(
        server,
        "PATCH",
        path,
        content_type,
        patch.to_string().as_bytes(),
    )
    .await
}

#[tokio::test]
async fn a_repeated_event_is_patched_into_a_series_and_the_patch_is_validated() {
    let server = ApiServer::start().await;
    let created = request(
        &server,
        "POST",
        EVENTS,
        "application/json",
        recorded_event("job.1").to_string().as_bytes(),
    )
    .await;
    assert_eq!(created.status, 201);
    let path = format!("{EVENTS}/job.1");
    let merge = "application/merge-patch+json";
    // What the Recorder sends when the same event happens again: the whole event, with a series.
    let mut again = recorded_event("job.1");
    again["series"] = json!({"count": 2, "lastObservedTime": "2026-01-02T03:05:00.000001Z"});
    let patched = patch_event(&server, &path, merge, &again).await;
    assert_eq!(patched.status, 200, "{}", patched.json());
    assert_eq!(patched.json()["series"]["count"], 2);
    assert!(patched.rv().parse::<u64>().unwrap() > created.rv().parse::<u64>().unwrap());
    assert_eq!(server.events().len(), 1);
    assert_eq!(server.events()[0]["series"]["count"], 2);
    // A series must count at least 2 and say when it was last seen.
    let status = patch_event(
        &server,
        &path,
        merge,
        &json!({"series": {"count": 1, "lastObservedTime": "2026-01-02T03:06:00.000001Z"}}),
    )
    .await
    .status(422, "Invalid");
    assert!(
        status["message"].as_str().unwrap().contains("series.count"),
        "{status}"
    );
    let status = patch_event(
        &server,
        &path,
        merge,
        &json!({"series": {"count": 3, "lastObservedTime": null}}),
    )
    .await
    .status(422, "Invalid");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("series.lastObservedTime"),
        "{status}"
    );
    // What identifies the event cannot change.
    for (field, value, named) in [
        ("note", json!("other"), "message"),
        ("reason", json!("Other"), "reason"),
        (
            "regarding",
            json!({"kind": "Lease", "name": "x"}),
            "involvedObject",
        ),
        ("reportingInstance", json!("you"), "reportingInstance"),
        (
            "eventTime",
            json!("2026-01-02T03:04:06.123456Z"),
            "eventTime",
        ),
    ] {
        let status = patch_event(&server, &path, merge, &json!({ field: value }))
            .await
            .status(422, "Invalid");
        assert!(
            status["message"].as_str().unwrap().contains(named),
            "{field}: {status}"
        );
    }
    // Below a microsecond, eventTime may differ.
    let same = patch_event(
        &server,
        &path,
        merge,
        &json!({"eventTime": "2026-01-02T03:04:05.123456789Z"}),
    )
    .await;
    assert_eq!(same.status, 200, "{}", same.json());
    assert_eq!(
        server.events()[0]["series"]["count"],
        2,
        "refused patches changed nothing"
    );
    // Only merge patches, only in the event's namespace, only an existing event.
    patch_event(&server, &path, "application/json-patch+json", &json!([]))
        .await
        .status(415, "UnsupportedMediaType");
    let elsewhere = "/apis/events.k8s.io/v1/namespaces/kube-system/events/job.1";
    patch_event(&server, elsewhere, merge, &again)
        .await
        .status(404, "NotFound");
    patch_event(&server, &format!("{EVENTS}/job.2"), merge, &again)
        .await
        .status(404, "NotFound");
    // A resourceVersion in the patch is a precondition.
    patch_event(
        &server,
        &path,
        merge,
        &json!({"metadata": {"resourceVersion": "1"}}),
    )
    .await
    .status(409, "Conflict");
}

#[tokio::test]
async fn without_coordinated_leader_election_strategy_and_preferred_holder_are_dropped() {
    let server = ApiServer::start().await;
    server.set_coordinated_leader_election(false);
    let asked =
        json!({"holderIdentity": "a", "strategy": "example.com/mine", "preferredHolder": "b"});
    // On create, and on an update of a Lease that had neither: silently dropped, as
    // PrepareForCreate/PrepareForUpdate do (not refused).
    let created = post(&server, &lease("job", asked.clone())).await;
    assert_eq!(created.status, 201);
    let spec = &created.json()["spec"];
    assert!(
        spec["strategy"].is_null() && spec["preferredHolder"].is_null(),
        "{spec}"
    );
    let mut update = created.json();
    update["spec"] = asked.clone();
    let updated = put(&server, "job", &update).await;
    let spec = &updated.json()["spec"];
    assert!(
        spec["strategy"].is_null() && spec["preferredHolder"].is_null(),
        "{spec}"
    );
    // Kept where the stored Lease already had them (written while the feature was on).
    server.set_coordinated_leader_election(true);
    let mut update = updated.json();
    update["spec"] = asked;
    let kept = put(&server, "job", &update).await;
    server.set_coordinated_leader_election(false);
    let mut update = kept.json();
    update["spec"]["preferredHolder"] = json!("c");
    let spec = put(&server, "job", &update).await.json()["spec"].clone();
    assert_eq!(spec["preferredHolder"], "c");
    assert_eq!(spec["strategy"], "example.com/mine");
}
