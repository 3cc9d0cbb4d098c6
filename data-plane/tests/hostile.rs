//! A hostile tenant against the data plane's internal API (issue 15):
//! traversal forms in every id (path, query and body), another tenant's ids
//! used directly, malformed tenants in the credential, internal addresses in
//! error messages, whole-file buffering (the data plane's memory is measured
//! while large files stream through it), the per-tenant transfer cap, and
//! expired sessions whose artifacts must be shredded.
//!
//! Requests whose path matters are sent over a raw TCP connection, byte for
//! byte: an HTTP client library would resolve `..` and `%2e%2e` itself and
//! the attack would never arrive.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::{Stack, call_at, credential, stack};

mod common;

/// One HTTP/1.1 request with `path` sent exactly as given; (status, JSON
/// body or `{"raw": ...}`).
async fn raw(base: &str, method: &str, path: &str, auth: &str, body: Option<&str>) -> (u16, Value) {
    let addr = base.strip_prefix("http://").unwrap();
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.unwrap_or("");
    let ctype = if body.starts_with('{') {
        "application/json"
    } else {
        "application/octet-stream"
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {auth}\r\n\
         content-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    sock.read_to_end(&mut resp).await.unwrap();
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, mut payload) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let dechunked;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = payload;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        dechunked = out;
        payload = &dechunked;
    }
    let value = serde_json::from_str(payload).unwrap_or_else(|_| json!({ "raw": payload }));
    (status, value)
}

/// Every traversal form of `../other/<target>` a client could send in one
/// path segment: encoded slash, encoded dots (either case), double encoding,
/// NUL, backslash, absolute, and the bare dot segments.
fn hostile_segments(target: &str) -> Vec<String> {
    vec![
        format!("..%2Fother%2F{target}"),
        format!("..%2fother%2f{target}"),
        format!("%2e%2e%2Fother%2F{target}"),
        format!("%2E%2E%2Fother%2F{target}"),
        format!("..%2F..%2F..%2Fmeta%2Fother%2F{target}"),
        format!("%252e%252e%252fother%252f{target}"),
        format!("{target}%00"),
        format!("%00{target}"),
        format!("..%00"),
        format!("..%5Cother%5C{target}"),
        format!("%5C{target}"),
        "%2Fetc%2Fpasswd".to_owned(),
        format!("%2F{target}"),
        "%2e%2e".to_owned(),
        "%2e".to_owned(),
        "..".to_owned(),
        ".".to_owned(),
        format!(".{target}"),
        format!("{target}%20"),
        format!("{target}%0D%0A"),
    ]
}

/// The same forms, decoded (what a JSON body can carry).
const HOSTILE_BODY_IDS: &[&str] = &[
    "../other/x",
    "..",
    ".",
    "",
    "%2e%2e%2fother",
    "%252e%252e%252f",
    "a\u{0}b",
    "..\\other",
    "\\x",
    "/etc/passwd",
    "a/b",
    ".hidden",
    "x\r\ny",
];

/// A coded 4xx: never a success, never a 5xx.
fn assert_refused(what: &str, status: u16, body: &Value) {
    assert!(
        (400..500).contains(&status),
        "{what}: expected a 4xx, got {status}: {body}"
    );
    assert!(
        body["code"].as_str().is_some_and(|c| !c.is_empty()),
        "{what}: no error code in {body}"
    );
}

/// Refused at the edge, as malformed: 400 `invalid_argument` (not a lookup
/// that happened to find nothing).
fn assert_malformed(what: &str, status: u16, body: &Value) {
    assert_refused(what, status, body);
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_argument")),
        "{what}: {body}"
    );
}

/// Uploads `data` as tenant `tenant`; the artifact id.
async fn upload(s: &Stack, tenant: &str, name: &str, data: &[u8]) -> String {
    let resp = s
        .http
        .post(format!("{}/internal/v1/artifacts?name={name}", s.dp))
        .bearer_auth(credential(tenant))
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let info: Value = resp.json().await.unwrap();
    info["artifactId"].as_str().unwrap().to_owned()
}

async fn download(s: &Stack, tenant: &str, id: &str) -> (u16, Vec<u8>) {
    let resp = s
        .http
        .get(format!("{}/internal/v1/artifacts/{id}", s.dp))
        .bearer_auth(credential(tenant))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.bytes().await.unwrap().to_vec())
}

/// The reported attack, then every traversal form on every id-bearing route:
/// tenant `demo` can neither read nor shred tenant `other`'s artifact, and
/// `other`'s artifact downloads intact afterwards.
#[tokio::test]
async fn traversal_in_any_id_never_reaches_another_tenant() {
    let s = stack(false, &[]).await;
    let demo = credential("demo");
    let secret = b"other's quarterly numbers".repeat(100);
    let theirs = upload(&s, "other", "numbers.csv", &secret).await;
    upload(&s, "demo", "mine.txt", b"demo's own").await;

    // The reported attack: info, then delete, through `../other/<id>`.
    let attack = format!("/internal/v1/artifacts/..%2Fother%2F{theirs}");
    let (st, body) = raw(&s.dp, "GET", &format!("{attack}/info"), &demo, None).await;
    assert_refused("info via ../other", st, &body);
    assert_eq!(body["code"], "invalid_argument", "{body}");
    assert!(!body.to_string().contains("numbers.csv"), "{body}");
    let (st, body) = raw(&s.dp, "DELETE", &attack, &demo, None).await;
    assert_refused("delete via ../other", st, &body);
    let (st, body) = raw(&s.dp, "GET", &attack, &demo, None).await;
    assert_refused("download via ../other", st, &body);

    // Every form on every id-bearing route (the session and job routes
    // refuse the id before any agent is asked).
    let routes: &[(&str, &str, Option<&str>)] = &[
        ("GET", "/internal/v1/artifacts/{}", None),
        ("DELETE", "/internal/v1/artifacts/{}", None),
        ("GET", "/internal/v1/artifacts/{}/info", None),
        (
            "POST",
            "/internal/v1/artifacts?name=x&sessionId={}",
            Some("data"),
        ),
        ("GET", "/internal/v1/sessions/{}", None),
        ("DELETE", "/internal/v1/sessions/{}", None),
        (
            "POST",
            "/internal/v1/sessions/{}/steps",
            Some(r#"{"code":"1+1"}"#),
        ),
        ("GET", "/internal/v1/sessions/{}/files", None),
        ("GET", "/internal/v1/sessions/{}/files/a.txt", None),
        ("PUT", "/internal/v1/sessions/{}/files/a.txt", Some("x")),
        ("DELETE", "/internal/v1/sessions/{}/files/a.txt", None),
        ("GET", "/internal/v1/jobs/{}", None),
        ("POST", "/internal/v1/jobs/{}/cancel", None),
    ];
    for (method, template, body) in routes {
        for seg in hostile_segments(&theirs) {
            let path = template.replace("{}", &seg);
            let (st, resp) = raw(&s.dp, method, &path, &demo, *body).await;
            assert_malformed(&format!("{method} {path}"), st, &resp);
        }
    }

    // Ids in JSON bodies are checked like ids in paths.
    for bad in HOSTILE_BODY_IDS {
        let (st, body) = call_at(
            &s.dp,
            "POST",
            "/internal/v1/jobs",
            Some(&demo),
            Some(json!({"jobId": bad, "code": "1+1"})),
        )
        .await;
        assert_eq!(st, 400, "jobId {bad:?}: {body}");
        assert_eq!(body["code"], "invalid_argument", "jobId {bad:?}: {body}");
    }
    let (st, body) = call_at(
        &s.dp,
        "POST",
        "/internal/v1/sessions",
        Some(&demo),
        Some(json!({"tenant": "other"})),
    )
    .await;
    assert_eq!((st, body["code"].as_str()), (403, Some("forbidden")));

    // `other`'s real id with `demo`'s credential: 404 like an id that does
    // not exist, on download, info and delete.
    let unknown = "art-000000000000000000000000";
    for (method, suffix) in [("GET", ""), ("GET", "/info"), ("DELETE", "")] {
        for id in [theirs.as_str(), unknown] {
            let path = format!("/internal/v1/artifacts/{id}{suffix}");
            let (st, body) = raw(&s.dp, method, &path, &demo, None).await;
            assert_eq!(
                (st, body["code"].as_str()),
                (404, Some("artifact_not_found")),
                "{method} {path}: {body}"
            );
            assert_eq!(body["message"], "no such artifact", "{body}");
        }
    }

    // After all of it, `other`'s artifact is whole.
    let (st, bytes) = download(&s, "other", &theirs).await;
    assert_eq!(st, 200);
    assert_eq!(bytes, secret);
    let (st, info) = call_at(
        &s.dp,
        "GET",
        &format!("/internal/v1/artifacts/{theirs}/info"),
        Some(&credential("other")),
        None,
    )
    .await;
    assert_eq!((st, info["tenant"].as_str()), (200, Some("other")));
    s.stop().await;
}

/// A credential whose tenant is not a real identifier is refused outright.
#[tokio::test]
async fn malformed_tenants_in_the_credential_are_refused() {
    let s = stack(false, &[]).await;
    for tenant in ["-", "_", "-x", "Other", "..", ".", "a/b", "a.b", "", "a b"] {
        let (st, body) = call_at(
            &s.dp,
            "GET",
            "/internal/v1/sessions",
            Some(&credential(tenant)),
            None,
        )
        .await;
        assert_eq!(
            (st, body["code"].as_str()),
            (401, Some("unauthorized")),
            "tenant {tenant:?}: {body}"
        );
    }
    let (st, _) = call_at(
        &s.dp,
        "GET",
        "/internal/v1/sessions",
        Some(&credential("demo")),
        None,
    )
    .await;
    assert_eq!(st, 200);
    s.stop().await;
}

/// The agent is down: the coded 503 names no internal address.
#[tokio::test]
async fn errors_never_carry_internal_addresses() {
    let s = stack(false, &[]).await;
    let (st, body) = call_at(
        &s.dp,
        "POST",
        "/internal/v1/sessions",
        Some(&credential("demo")),
        Some(json!({"runtime": "python"})),
    )
    .await;
    assert_eq!(
        (st, body["code"].as_str()),
        (503, Some("sandbox_unavailable"))
    );
    let (st2, ready) = call_at(&s.dp, "GET", "/readyz", None, None).await;
    assert_eq!(st2, 503);
    for text in [body.to_string(), ready.to_string()] {
        assert!(!text.contains("127.0.0.1"), "{text}");
        assert!(!text.contains("http://"), "{text}");
        let port = s.agent_url.rsplit(':').next().unwrap();
        assert!(!text.contains(&format!(":{port}")), "{text}");
    }
    s.stop().await;
}

async fn create_session(s: &Stack, tenant: &str, extra: Value) -> String {
    let mut req = json!({"runtime": "python"});
    req.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let (st, view) = call_at(
        &s.dp,
        "POST",
        "/internal/v1/sessions",
        Some(&credential(tenant)),
        Some(req),
    )
    .await;
    assert_eq!(st, 201, "{view}");
    view["sessionId"].as_str().unwrap().to_owned()
}

/// Session routes with a real agent: traversal toward another tenant's
/// session, that session's id used directly, and step ids in bodies.
#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn session_ids_are_checked_and_scoped() {
    let s = stack(true, &[]).await;
    let demo = credential("demo");
    let mine = create_session(&s, "demo", json!({})).await;
    let theirs = create_session(&s, "other", json!({})).await;
    for seg in hostile_segments(&theirs) {
        for (method, path, body) in [
            ("GET", format!("/internal/v1/sessions/{seg}"), None),
            ("DELETE", format!("/internal/v1/sessions/{seg}"), None),
            (
                "POST",
                format!("/internal/v1/sessions/{seg}/steps"),
                Some(r#"{"code":"1+1"}"#),
            ),
            ("GET", format!("/internal/v1/sessions/{seg}/files"), None),
            ("GET", format!("/internal/v1/sessions/{seg}/files/a"), None),
        ] {
            let (st, resp) = raw(&s.dp, method, &path, &demo, body).await;
            assert_malformed(&format!("{method} {path}"), st, &resp);
        }
    }
    // Their real id: not found, like an unknown one.
    for (method, path, body) in [
        ("GET", format!("/internal/v1/sessions/{theirs}"), None),
        ("DELETE", format!("/internal/v1/sessions/{theirs}"), None),
        (
            "POST",
            format!("/internal/v1/sessions/{theirs}/steps"),
            Some(r#"{"code":"1+1"}"#),
        ),
        (
            "GET",
            format!("/internal/v1/sessions/{theirs}/files/a"),
            None,
        ),
    ] {
        let (st, resp) = raw(&s.dp, method, &path, &demo, body).await;
        assert_eq!(
            (st, resp["code"].as_str()),
            (404, Some("session_not_found")),
            "{method} {path}: {resp}"
        );
    }
    for bad in HOSTILE_BODY_IDS {
        let (st, body) = call_at(
            &s.dp,
            "POST",
            &format!("/internal/v1/sessions/{mine}/steps"),
            Some(&demo),
            Some(json!({"stepId": bad, "code": "1+1"})),
        )
        .await;
        assert_eq!(
            (st, body["code"].as_str()),
            (400, Some("invalid_argument")),
            "stepId {bad:?}: {body}"
        );
    }
    let (st, _) = call_at(
        &s.dp,
        "GET",
        &format!("/internal/v1/sessions/{theirs}"),
        Some(&credential("other")),
        None,
    )
    .await;
    assert_eq!(st, 200, "their session is untouched");
    s.stop().await;
}

async fn artifact_status(s: &Stack, tenant: &str, id: &str) -> u16 {
    call_at(
        &s.dp,
        "GET",
        &format!("/internal/v1/artifacts/{id}/info"),
        Some(&credential(tenant)),
        None,
    )
    .await
    .0
}

async fn upload_for_session(s: &Stack, tenant: &str, sid: &str) -> String {
    let resp = s
        .http
        .post(format!(
            "{}/internal/v1/artifacts?name=r.txt&sessionId={sid}",
            s.dp
        ))
        .bearer_auth(credential(tenant))
        .body("session data")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let info: Value = resp.json().await.unwrap();
    info["artifactId"].as_str().unwrap().to_owned()
}

/// Waits until the session's TTL has run out (its GET is 404).
async fn wait_expired(s: &Stack, tenant: &str, sid: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (st, _) = call_at(
            &s.dp,
            "GET",
            &format!("/internal/v1/sessions/{sid}"),
            Some(&credential(tenant)),
            None,
        )
        .await;
        if st == 404 {
            return;
        }
        assert!(Instant::now() < deadline, "session {sid} never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An expired session's artifacts are shredded: by a DELETE of the expired
/// session (204, not 404) and by the periodic sweep.
#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn an_expired_sessions_artifacts_are_shredded() {
    let s = stack(true, &[]).await;
    // Deleted after it expired.
    let sid = create_session(&s, "demo", json!({"ttlSeconds": 2})).await;
    let art = upload_for_session(&s, "demo", &sid).await;
    let object = s.artifacts.join("objects/demo").join(&art);
    assert!(object.exists());
    wait_expired(&s, "demo", &sid).await;
    let (st, body) = call_at(
        &s.dp,
        "DELETE",
        &format!("/internal/v1/sessions/{sid}"),
        Some(&credential("demo")),
        None,
    )
    .await;
    assert_eq!(st, 204, "{body}");
    assert_eq!(artifact_status(&s, "demo", &art).await, 404);
    assert!(!object.exists(), "the expired session's object is gone");
    assert!(
        !s.artifacts
            .join("keys/demo")
            .join(format!("{art}.dek"))
            .exists()
    );

    // Left alone: the sweep shreds it.
    let sid = create_session(&s, "demo", json!({"ttlSeconds": 2})).await;
    let art = upload_for_session(&s, "demo", &sid).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while artifact_status(&s, "demo", &art).await != 404 {
        assert!(
            Instant::now() < deadline,
            "the expired session's artifact was never shredded"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        !s.artifacts
            .join("keys/demo")
            .join(format!("{art}.dek"))
            .exists()
    );
    s.stop().await;
}

/// Expired while the data plane was down: recovery shreds its artifacts.
#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn recovery_shreds_artifacts_of_sessions_that_expired_meanwhile() {
    let state = tempfile::Builder::new()
        .prefix("dp-expire-")
        .tempdir_in("/tmp")
        .unwrap();
    let agent = common::agent_proc(&state.path().join("agent"), &[]).await;
    let registry = state.path().join("sessions").display().to_string();
    let args = ["--registry", "file", "--registry-path", &registry];
    let dp = common::dp_proc(&agent.url, state.path(), &args).await;
    let demo = credential("demo");
    let (st, view) = call_at(
        &dp.url,
        "POST",
        "/internal/v1/sessions",
        Some(&demo),
        Some(json!({"runtime": "python", "ttlSeconds": 4})),
    )
    .await;
    assert_eq!(st, 201, "{view}");
    let sid = view["sessionId"].as_str().unwrap();
    let expires = view["expiresAtMs"].as_u64().unwrap();
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/internal/v1/artifacts?name=r&sessionId={sid}",
            dp.url
        ))
        .bearer_auth(&demo)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let art = resp.json::<Value>().await.unwrap()["artifactId"]
        .as_str()
        .unwrap()
        .to_owned();
    dp.kill().await;
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    while now_ms() <= expires + 200 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let object = state.path().join("artifacts/objects/demo").join(&art);
    assert!(object.exists(), "nothing ran while the data plane was down");
    let dp = common::dp_proc(&agent.url, state.path(), &args).await;
    // Recovery ran before the listener answered.
    assert!(!object.exists());
    let (st, _) = call_at(
        &dp.url,
        "GET",
        &format!("/internal/v1/artifacts/{art}/info"),
        Some(&demo),
        None,
    )
    .await;
    assert_eq!(st, 404);
    dp.stop().await;
    agent.stop().await;
}

/// The peak resident memory of process `pid` so far (VmHWM), bytes.
fn vm_hwm(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap()
        .to_owned();
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// Large workspace files stream through the data plane (a separate process,
/// so its memory is its own): two concurrent reads of a 128 MiB file leave
/// its peak memory far below the file size; a third concurrent read of the
/// same tenant is 429 (`TENANT_MAX_TRANSFERS=2`) while another tenant's is
/// served; once the reads end the slots are free again.
#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn file_reads_stream_and_transfers_are_capped_per_tenant() {
    #![allow(clippy::disallowed_methods)] // this test runs the data-plane binary to measure its memory
    const MIB: u64 = 1024 * 1024;
    const SIZE: u64 = 128 * MIB;
    let state = tempfile::Builder::new()
        .prefix("dp-stream-")
        .tempdir_in("/tmp")
        .unwrap();
    let agent = common::agent_proc(&state.path().join("agent"), &[]).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_data-plane"))
        .env_clear()
        .env("DATA_PLANE_ADDR", format!("127.0.0.1:{port}"))
        .env("AUTH_JWT_SECRET", common::SECRET)
        .env("SESSION_AGENT_ENDPOINT", &agent.url)
        .env("SESSION_AGENT_ADMIN_TOKEN", common::AGENT_ADMIN)
        .env("ARTIFACT_ROOT", state.path().join("artifacts"))
        .env("TENANT_MAX_TRANSFERS", "2")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while reqwest::get(format!("{url}/healthz")).await.is_err() {
        assert!(Instant::now() < deadline, "data plane did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let http = reqwest::Client::new();
    let mut sessions = Vec::new();
    for tenant in ["demo", "other"] {
        let (st, view) = call_at(
            &url,
            "POST",
            "/internal/v1/sessions",
            Some(&credential(tenant)),
            Some(json!({"runtime": "python", "limits": {"diskMb": 512}})),
        )
        .await;
        assert_eq!(st, 201, "{view}");
        let sid = view["sessionId"].as_str().unwrap().to_owned();
        let code = format!(
            "with open('big.bin', 'wb') as f:\n    for _ in range({}):\n        f.write(b'\\xab' * {MIB})\n'ok'",
            SIZE / MIB
        );
        let (st, r) = call_at(
            &url,
            "POST",
            &format!("/internal/v1/sessions/{sid}/steps"),
            Some(&credential(tenant)),
            Some(json!({"code": code, "timeoutMs": 120000})),
        )
        .await;
        assert_eq!((st, r["status"].as_str()), (200, Some("ok")), "{r}");
        sessions.push(sid);
    }
    let file_url = |i: usize| format!("{url}/internal/v1/sessions/{}/files/big.bin", sessions[i]);
    let open = |i: usize, tenant: &'static str| {
        http.get(file_url(i)).bearer_auth(credential(tenant)).send()
    };
    let pid = child.id();
    let before = vm_hwm(pid);

    // Two reads open (heads only: their bodies wait in the pipe).
    let a = open(0, "demo").await.unwrap();
    let b = open(0, "demo").await.unwrap();
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    assert_eq!(a.content_length(), Some(SIZE));
    // A third of the same tenant is refused, coded; another tenant is served.
    let c = open(0, "demo").await.unwrap();
    assert_eq!(c.status(), 429);
    let body: Value = c.json().await.unwrap();
    assert_eq!(body["code"], "tenant_quota_exceeded", "{body}");
    let theirs = open(1, "other").await.unwrap();
    assert_eq!(theirs.status(), 200);
    drop(theirs);

    let drain = |mut r: reqwest::Response| async move {
        let mut n = 0u64;
        while let Some(chunk) = r.chunk().await.unwrap() {
            assert!(chunk.iter().all(|&b| b == 0xab));
            n += chunk.len() as u64;
        }
        n
    };
    let (na, nb) = tokio::join!(drain(a), drain(b));
    assert_eq!((na, nb), (SIZE, SIZE));
    let growth = vm_hwm(pid).saturating_sub(before);
    eprintln!(
        "data plane peak memory grew by {} MiB for 2 x {} MiB read",
        growth / MIB,
        SIZE / MIB
    );
    // Generous: buffering would add at least the file size per read.
    assert!(
        growth < SIZE / 2,
        "the data plane's peak memory grew by {} MiB while streaming 2 x {} MiB",
        growth / MIB,
        SIZE / MIB
    );
    // The slots are free again (the data plane notices the ends shortly).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = open(0, "demo").await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "transfer slots never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    agent.stop().await;
}

async fn run_job(s: &Stack, id: &str, code: &str) -> Value {
    let (st, r) = call_at(
        &s.dp,
        "POST",
        "/internal/v1/jobs",
        Some(&credential("demo")),
        Some(json!({"jobId": id, "runtime": "python", "code": code, "timeoutMs": 60000})),
    )
    .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["status"], "ok", "{r}");
    r
}

/// The text of a job's truncation marker artifact.
async fn marker_text(s: &Stack, result: &Value) -> String {
    let arts = result["artifacts"].as_array().unwrap();
    let marker = arts
        .iter()
        .find(|a| a["name"] == "_output_truncated.txt")
        .unwrap_or_else(|| panic!("no truncation marker among {} artifacts", arts.len()));
    let (st, text) = download(s, "demo", marker["artifactId"].as_str().unwrap()).await;
    assert_eq!(st, 200);
    String::from_utf8(text).unwrap()
}

/// A job whose `output/` holds more entries than the bound, or directories
/// deeper than it, or names with control characters: the walk stops, names
/// are made safe, and a marker artifact says what was left out.
#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn output_collection_is_bounded() {
    let s = stack(true, &[]).await;
    let many = run_job(
        &s,
        "many-outputs",
        "import os\nos.makedirs('output', exist_ok=True)\n\
         for i in range(1500):\n    open(f'output/f{i:04}.txt', 'w').write('x')\n'ok'",
    )
    .await;
    let arts = many["artifacts"].as_array().unwrap();
    assert!(arts.len() <= 101, "{} artifacts", arts.len());
    let text = marker_text(&s, &many).await;
    assert!(text.contains("more than 1000 entries"), "{text}");
    assert!(text.contains("more than 100 files"), "{text}");

    let deep = run_job(
        &s,
        "deep-outputs",
        "import os\n\
         d = 'output/deep'\n\
         for i in range(12):\n    d += f'/d{i}'\n\
         os.makedirs(d, exist_ok=True)\n\
         open(d + '/bottom.txt', 'w').write('y')\n\
         open('output/top.txt', 'w').write('t')\n\
         open('output/bad\\x1b[31mname\\r\\n.txt', 'w').write('z')\n'ok'",
    )
    .await;
    let text = marker_text(&s, &deep).await;
    assert!(text.contains("deeper than 8 levels"), "{text}");
    let names: Vec<&str> = deep["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"top.txt"), "{names:?}");
    assert_eq!(
        names.len(),
        3,
        "top, the renamed bad name, the marker: {names:?}"
    );
    for name in names {
        assert!(
            !name
                .chars()
                .any(|c| c.is_control() || c == '/' || c == '\\'),
            "{name:?}"
        );
    }
    s.stop().await;
}
