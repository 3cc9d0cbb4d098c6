//! `/v1/artifacts` through the control plane, in front of a real data plane
//! (its encrypted store on a temporary directory; no agent, no sandbox):
//! raw and multipart uploads, labels and the listing's filters and pages,
//! downloads with `Content-Length`, `ETag`, `If-None-Match` and `Range`,
//! delete, another tenant's artifact as 404 everywhere, coded refusals, and
//! a 1 GiB upload that leaves this process's peak memory flat.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Instant;

use common::*;
use control_plane::config::DatabaseDriver;
use futures::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// One test at a time: the memory test reads the process's peak resident
/// memory, which a concurrent test would move.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MIB: usize = 1024 * 1024;

/// A data plane in front of no agent and a control plane on SQLite.
struct Stack {
    dp: Proc,
    cp: Proc,
    db: TestDb,
    _state: tempfile::TempDir,
}

impl Stack {
    async fn start() -> Stack {
        Stack::start_with(&[]).await
    }

    /// With extra control-plane flags.
    async fn start_with(cp_args: &[&str]) -> Stack {
        let state = tempfile::Builder::new()
            .prefix("cp-artifacts-")
            .tempdir_in("/tmp")
            .unwrap();
        // A port nothing listens on: no agent, hence no sandbox.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let agent = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let dp = dp_proc(&agent, &state.path().join("dp"), None).await;
        let db = TestDb::new(DatabaseDriver::Sqlite).await;
        let (cp, _app) = cp_proc(&db, &dp.url, cp_args).await;
        Stack {
            dp,
            cp,
            db,
            _state: state,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.cp.url)
    }

    async fn stop(self) {
        self.cp.stop().await;
        self.dp.stop().await;
        self.db.cleanup().await;
    }
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: bytes::Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&self.body)}))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or("").to_owned()
    }
}

async fn send(rb: reqwest::RequestBuilder) -> Answer {
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    Answer {
        status,
        headers,
        body: resp.bytes().await.unwrap(),
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

async fn upload(s: &Stack, who: &str, query: &str, body: Vec<u8>) -> Answer {
    send(
        http()
            .post(s.url(&format!("/v1/artifacts?{query}")))
            .bearer_auth(who)
            .header("content-type", "application/octet-stream")
            .body(body),
    )
    .await
}

async fn get(s: &Stack, who: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut rb = http().get(s.url(path)).bearer_auth(who);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    send(rb).await
}

async fn delete(s: &Stack, who: &str, path: &str) -> Answer {
    send(http().delete(s.url(path)).bearer_auth(who)).await
}

/// A multipart body: `(field name, file name, bytes)` per part.
fn multipart(boundary: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, file, bytes) in parts {
        out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match file {
            Some(f) => out.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => out.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        out.extend_from_slice(bytes);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

fn ids(list: &Value) -> Vec<String> {
    list["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["artifactId"].as_str().unwrap().to_owned())
        .collect()
}

/// Bytes that differ at every offset modulo a prime: a misplaced range shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upload_list_download_ranges_and_delete() {
    let _serial = SERIAL.lock().await;
    let s = Stack::start().await;
    let acme = token("acme", &["agent"]);

    // Raw body, attached to a job, a workflow and two labels. Several
    // 64 KiB encryption chunks, the last one partial.
    let data = pattern(3 * 65536 + 1234);
    let a = upload(
        &s,
        &acme,
        "name=report.bin&jobId=job-1&workflowId=wf-1&label=kind%3Dreport&label=team%3Dred",
        data.clone(),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.json());
    let a = a.json();
    let a_id = a["artifactId"].as_str().unwrap().to_owned();
    assert_eq!(a["size"], data.len() as u64);
    assert_eq!(a["sha256"], hex::encode(Sha256::digest(&data)));
    assert_eq!(a["jobId"], "job-1");
    assert_eq!(a["workflowId"], "wf-1");
    assert_eq!(a["labels"], json!({"kind": "report", "team": "red"}));

    // Multipart: a text part first (skipped), then the file; its file name
    // names the artifact.
    let boundary = "xYzBoUnDaRy42";
    let body = multipart(
        boundary,
        &[
            ("note", None, b"ignored"),
            ("file", Some("notes.txt"), b"hello\r\n--not-a-boundary\r\n"),
        ],
    );
    let b = send(
        http()
            .post(s.url("/v1/artifacts?label=kind%3Dnotes"))
            .bearer_auth(&acme)
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body),
    )
    .await;
    assert_eq!(b.status, 201, "{}", b.json());
    let b = b.json();
    let b_id = b["artifactId"].as_str().unwrap().to_owned();
    assert_eq!(b["name"], "notes.txt");
    assert_eq!(b["size"], 25);
    let c = upload(&s, &acme, "name=c&label=kind%3Dreport", b"c".to_vec()).await;
    assert_eq!(c.status, 201);
    let c_id = c.json()["artifactId"].as_str().unwrap().to_owned();

    // Listing: filters, then pages.
    let list = get(&s, &acme, "/v1/artifacts", &[]).await;
    assert_eq!(list.status, 200, "{}", list.json());
    let mut all = vec![a_id.clone(), b_id.clone(), c_id.clone()];
    all.sort();
    assert_eq!(ids(&list.json()), all);
    let by = |q: &'static str| {
        let s = &s;
        let acme = &acme;
        async move {
            let l = get(s, acme, &format!("/v1/artifacts?{q}"), &[]).await;
            assert_eq!(l.status, 200, "{q}: {}", l.json());
            let mut got = ids(&l.json());
            got.sort();
            got
        }
    };
    assert_eq!(by("jobId=job-1").await, vec![a_id.clone()]);
    assert_eq!(by("workflowId=wf-1").await, vec![a_id.clone()]);
    let mut reports = vec![a_id.clone(), c_id.clone()];
    reports.sort();
    assert_eq!(by("label=kind%3Dreport").await, reports);
    assert_eq!(
        by("label=kind%3Dreport&label=team%3Dred").await,
        vec![a_id.clone()]
    );
    assert!(by("jobId=job-2").await.is_empty());
    assert!(by("sessionId=ses-none").await.is_empty());
    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("/v1/artifacts?limit=2&cursor={c}"),
            None => "/v1/artifacts?limit=2".into(),
        };
        let page = get(&s, &acme, &q, &[]).await.json();
        assert!(page["artifacts"].as_array().unwrap().len() <= 2);
        paged.extend(ids(&page));
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(paged, all);

    // Whole download: length, ETag (the SHA-256, quoted), bytes.
    let path = format!("/v1/artifacts/{a_id}");
    let full = get(&s, &acme, &path, &[]).await;
    assert_eq!(full.status, 200);
    let etag = format!("\"{}\"", hex::encode(Sha256::digest(&data)));
    assert_eq!(full.header("etag"), Some(etag.as_str()));
    assert_eq!(
        full.header("content-length"),
        Some(data.len().to_string().as_str())
    );
    assert_eq!(full.header("accept-ranges"), Some("bytes"));
    assert_eq!(full.body.as_ref(), data.as_slice());

    // If-None-Match: 304 with the ETag, no body; another tag: 200.
    let cached = get(&s, &acme, &path, &[("if-none-match", &etag)]).await;
    assert_eq!(cached.status, 304);
    assert_eq!(cached.header("etag"), Some(etag.as_str()));
    assert!(cached.body.is_empty());
    let stale = get(&s, &acme, &path, &[("if-none-match", "\"0000\"")]).await;
    assert_eq!(stale.status, 200);

    // Ranges: inside one chunk, across chunk boundaries, open-ended, suffix.
    let size = data.len() as u64;
    for (header, start, end) in [
        ("bytes=0-0".to_owned(), 0, 0),
        ("bytes=10-99".to_owned(), 10, 99),
        ("bytes=65530-65545".to_owned(), 65530, 65545),
        ("bytes=1000-140000".to_owned(), 1000, 140000),
        (format!("bytes={}-", size - 5), size - 5, size - 1),
        ("bytes=-1234".to_owned(), size - 1234, size - 1),
        ("bytes=196600-999999".to_owned(), 196600, size - 1),
    ] {
        let part = get(&s, &acme, &path, &[("range", &header)]).await;
        assert_eq!(part.status, 206, "{header}: {}", part.json());
        assert_eq!(
            part.header("content-range"),
            Some(format!("bytes {start}-{end}/{size}").as_str()),
            "{header}"
        );
        assert_eq!(
            part.header("content-length"),
            Some((end - start + 1).to_string().as_str()),
            "{header}"
        );
        assert_eq!(part.header("etag"), Some(etag.as_str()));
        assert_eq!(
            part.body.as_ref(),
            &data[start as usize..=end as usize],
            "{header}"
        );
    }
    // Outside the artifact: 416 with the size.
    for header in [format!("bytes={size}-"), "bytes=-0".to_owned()] {
        let none = get(&s, &acme, &path, &[("range", &header)]).await;
        assert_eq!(none.status, 416, "{header}");
        assert_eq!(none.code(), "range_not_satisfiable");
        assert_eq!(
            none.header("content-range"),
            Some(format!("bytes */{size}").as_str())
        );
    }
    // Several ranges (documented): the whole body.
    let multi = get(&s, &acme, &path, &[("range", "bytes=0-1,5-6")]).await;
    assert_eq!(multi.status, 200);
    assert_eq!(multi.body.len(), data.len());
    // The `/info` route.
    let info = get(&s, &acme, &format!("/v1/artifacts/{b_id}/info"), &[]).await;
    assert_eq!(info.status, 200);
    assert_eq!(info.json()["name"], "notes.txt");

    // Delete: 204, then gone everywhere.
    assert_eq!(delete(&s, &acme, &path).await.status, 204);
    for p in [path.clone(), format!("{path}/info")] {
        let gone = get(&s, &acme, &p, &[]).await;
        assert_eq!(gone.status, 404, "{p}");
        assert_eq!(gone.code(), "artifact_not_found");
    }
    assert_eq!(delete(&s, &acme, &path).await.status, 404);
    assert!(!by("").await.contains(&a_id));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_tenants_artifact_is_404_everywhere() {
    let _serial = SERIAL.lock().await;
    let s = Stack::start().await;
    let acme = token("acme", &["agent"]);
    let other = token("other", &["agent"]);
    let a = upload(&s, &acme, "name=secret&label=k%3Dv", b"acme only".to_vec()).await;
    assert_eq!(a.status, 201);
    let id = a.json()["artifactId"].as_str().unwrap().to_owned();
    let path = format!("/v1/artifacts/{id}");
    for (what, answer) in [
        ("download", get(&s, &other, &path, &[]).await),
        (
            "range",
            get(&s, &other, &path, &[("range", "bytes=0-1")]).await,
        ),
        (
            "if-none-match",
            get(&s, &other, &path, &[("if-none-match", "*")]).await,
        ),
        ("info", get(&s, &other, &format!("{path}/info"), &[]).await),
        ("delete", delete(&s, &other, &path).await),
    ] {
        assert_eq!(answer.status, 404, "{what}: {}", answer.json());
        assert_eq!(answer.code(), "artifact_not_found", "{what}");
    }
    // The other tenant's listing does not show it, whatever the filter.
    for q in ["", "?label=k%3Dv"] {
        let list = get(&s, &other, &format!("/v1/artifacts{q}"), &[]).await;
        assert_eq!(list.status, 200);
        assert!(ids(&list.json()).is_empty(), "{q}");
    }
    // Still there for its owner.
    let mine = get(&s, &acme, &path, &[]).await;
    assert_eq!(mine.status, 200);
    assert_eq!(mine.body.as_ref(), b"acme only");
    // No token: 401 on every route.
    for answer in [
        send(http().get(s.url("/v1/artifacts"))).await,
        send(http().get(s.url(&path))).await,
        send(http().post(s.url("/v1/artifacts")).body("x")).await,
        send(http().delete(s.url(&path))).await,
    ] {
        assert_eq!(answer.status, 401);
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_uploads_and_queries_are_coded_and_keep_nothing() {
    let _serial = SERIAL.lock().await;
    let s = Stack::start().await;
    let acme = token("acme", &["agent"]);
    for (query, why) in [
        ("nmae=x", "unknown parameter"),
        ("name=a%2Fb", "a '/' in the name"),
        ("label=novalue", "a label without '='"),
        ("label=bad%20key%3Dv", "a label key with a space"),
        ("label=k%3D1&label=k%3D2", "a label given twice"),
        ("jobId=..", "a bad job id"),
        ("sessionId=a%2Fb", "a bad session id"),
        ("name=a&name=b", "a parameter given twice"),
        ("size=lots", "a size that is no number"),
    ] {
        let a = upload(&s, &acme, query, b"x".to_vec()).await;
        assert_eq!(a.status, 400, "{why}: {}", a.json());
        assert_eq!(a.code(), "invalid_argument", "{why}");
    }
    for query in ["limit=0", "limit=x", "cursor=..", "bogus=1"] {
        let l = get(&s, &acme, &format!("/v1/artifacts?{query}"), &[]).await;
        assert_eq!(l.status, 400, "{query}: {}", l.json());
        assert_eq!(l.code(), "invalid_argument");
    }
    // Another tenant's (or no) session cannot own an artifact.
    let a = upload(&s, &acme, "sessionId=ses-nope", b"x".to_vec()).await;
    assert_eq!(a.status, 404, "{}", a.json());
    assert_eq!(a.code(), "session_not_found");

    // A body larger than its declared size: 413, nothing kept.
    let a = upload(&s, &acme, "size=10", vec![7u8; 5000]).await;
    assert_eq!(a.status, 413, "{}", a.json());
    assert_eq!(a.code(), "payload_too_large");

    let boundary = "b0undary";
    let form = |parts: &[(&str, Option<&str>, &[u8])]| {
        http()
            .post(s.url("/v1/artifacts"))
            .bearer_auth(&acme)
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(multipart(boundary, parts))
    };
    // No file part; two file parts (the first is not kept); no boundary.
    let none = send(form(&[("note", None, b"x")])).await;
    assert_eq!(none.status, 400, "{}", none.json());
    assert_eq!(none.code(), "invalid_argument");
    let two = send(form(&[
        ("file", Some("a.txt"), b"a"),
        ("file2", Some("b.txt"), b"b"),
    ]))
    .await;
    assert_eq!(two.status, 400, "{}", two.json());
    assert!(
        two.json()["message"]
            .as_str()
            .unwrap()
            .contains("one file part")
    );
    let no_boundary = send(
        http()
            .post(s.url("/v1/artifacts"))
            .bearer_auth(&acme)
            .header("content-type", "multipart/form-data")
            .body("x"),
    )
    .await;
    assert_eq!(no_boundary.status, 400);
    // A part that never ends: the upload broke off.
    let mut cut = multipart(boundary, &[("file", Some("a.txt"), b"abc")]);
    cut.truncate(cut.len() - 20);
    let broken = send(
        http()
            .post(s.url("/v1/artifacts"))
            .bearer_auth(&acme)
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(cut),
    )
    .await;
    assert_eq!(broken.status, 400, "{}", broken.json());
    // Framing that never ends is refused past 4 MiB, not buffered: a part
    // header with no end, a preamble with no boundary, and a skipped part
    // too large, each 8 MiB.
    let endless_header = {
        let mut b = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; x=\"")
            .into_bytes();
        b.extend(std::iter::repeat_n(b'a', 8 * 1024 * 1024));
        b
    };
    let endless_preamble = vec![b'p'; 8 * 1024 * 1024];
    let big = vec![b's'; 8 * 1024 * 1024];
    let big_skipped = multipart(
        boundary,
        &[("note", None, &big[..]), ("file", Some("a.txt"), b"abc")],
    );
    for (what, body) in [
        ("an endless part header", endless_header),
        ("an endless preamble", endless_preamble),
        ("a large skipped part", big_skipped),
    ] {
        // The answer comes before the body is all sent (the server stops
        // reading): a raw client writes on while it reads the answer.
        let (status, answer) = raw_post(
            &s.url("/v1/artifacts"),
            &acme,
            &format!("multipart/form-data; boundary={boundary}"),
            body,
        )
        .await;
        assert_eq!(status, 400, "{what}: {answer}");
        assert!(answer.contains("framing"), "{what}: {answer}");
    }

    let list = get(&s, &acme, "/v1/artifacts", &[]).await;
    assert_eq!(list.status, 200);
    assert!(ids(&list.json()).is_empty(), "{}", list.json());
    s.stop().await;
}

/// POSTs `body` over a plain connection, writing it in one task while
/// reading the answer in another (a server may answer and stop reading
/// early): the status and the answer's text.
async fn raw_post(url: &str, bearer: &str, content_type: &str, body: Vec<u8>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {bearer}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let writer = tokio::spawn(async move {
        // Errors are expected once the server has answered and closed.
        let _ = wr.write_all(head.as_bytes()).await;
        let _ = wr.write_all(&body).await;
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        rd.read_to_end(&mut answer),
    )
    .await
    .expect("an answer within 30 s");
    writer.abort();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn vm_hwm_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// 1 GiB from a generator through `POST /v1/artifacts` (raw), then 128 MiB
/// as one multipart file part: the control plane (and the data plane, both
/// in this process) never hold either, so the peak resident memory grows by
/// far less than the upload. The tail of the 1 GiB artifact then comes
/// back as a range, and a range download of the whole is checked against
/// the digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: ~3 minutes for 1 GiB in a debug build (make test-integration)"]
async fn a_1_gib_upload_keeps_memory_flat_and_ranges_come_back() {
    let _serial = SERIAL.lock().await;
    const TOTAL: usize = 1024 * MIB;
    let s = Stack::start().await;
    let acme = token("acme", &["agent"]);
    let warm = upload(&s, &acme, "name=warm", b"w".to_vec()).await;
    assert_eq!(warm.status, 201);

    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = vm_hwm_kb();
    let chunk = bytes::Bytes::from(vec![0x5a_u8; MIB]);
    let gen_chunk = chunk.clone();
    let generator = futures::stream::iter(0..TOTAL / MIB)
        .map(move |_| Ok::<_, std::io::Error>(gen_chunk.clone()));
    let started = Instant::now();
    let big = send(
        http()
            .post(s.url("/v1/artifacts?name=big.bin"))
            .bearer_auth(&acme)
            .body(reqwest::Body::wrap_stream(generator)),
    )
    .await;
    let took = started.elapsed();
    let after = vm_hwm_kb();
    assert_eq!(big.status, 201, "{}", big.json());
    let info = big.json();
    assert_eq!(info["size"], TOTAL as u64);
    let growth_mib = after.saturating_sub(before) / 1024;
    eprintln!(
        "VmHWM before {before} kB, after {after} kB: +{growth_mib} MiB for a 1 GiB upload ({:.0} MiB/s)",
        1024.0 / took.as_secs_f64()
    );
    // Generous (allocator slack, both planes' buffers), yet far below the
    // upload: buffering it whole would add at least 1024 MiB.
    assert!(
        growth_mib < 64,
        "peak memory grew by {growth_mib} MiB for a 1 GiB upload"
    );

    // Multipart, 128 MiB in one file part.
    let boundary = "big-boundary-7";
    let head = bytes::Bytes::from(format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"m.bin\"\r\n\r\n"
    ));
    let tail = bytes::Bytes::from(format!("\r\n--{boundary}--\r\n"));
    let parts = futures::stream::iter(
        std::iter::once(head)
            .chain(std::iter::repeat_n(chunk.clone(), 128))
            .chain(std::iter::once(tail)),
    )
    .map(Ok::<_, std::io::Error>);
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = vm_hwm_kb();
    let form = send(
        http()
            .post(s.url("/v1/artifacts"))
            .bearer_auth(&acme)
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(reqwest::Body::wrap_stream(parts)),
    )
    .await;
    let growth_mib = vm_hwm_kb().saturating_sub(before) / 1024;
    assert_eq!(form.status, 201, "{}", form.json());
    assert_eq!(form.json()["size"], 128 * MIB as u64);
    assert_eq!(form.json()["name"], "m.bin");
    eprintln!("+{growth_mib} MiB for a 128 MiB multipart upload");
    assert!(
        growth_mib < 64,
        "multipart: peak memory grew by {growth_mib} MiB"
    );

    // The last 10 bytes of the 1 GiB artifact, then a range from the middle.
    let path = format!("/v1/artifacts/{}", info["artifactId"].as_str().unwrap());
    let started = Instant::now();
    let tail = get(&s, &acme, &path, &[("range", "bytes=-10")]).await;
    eprintln!("the last 10 bytes of 1 GiB in {:?}", started.elapsed());
    assert_eq!(tail.status, 206);
    assert_eq!(
        tail.header("content-range"),
        Some(format!("bytes {}-{}/{TOTAL}", TOTAL - 10, TOTAL - 1).as_str())
    );
    assert_eq!(tail.body.as_ref(), &[0x5a_u8; 10]);
    let mid = get(&s, &acme, &path, &[("range", "bytes=536870000-536871000")]).await;
    assert_eq!(mid.status, 206);
    assert_eq!(mid.body.len(), 1001);
    s.stop().await;
}

/// Files a job leaves in `output/` are recorded with its id: listed by
/// `jobId`, and ranged like any upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn a_jobs_outputs_are_listed_by_its_id() {
    let _serial = SERIAL.lock().await;
    let s = stack(DatabaseDriver::Sqlite, &[]).await;
    let t = token("acme", &["agent"]);
    let (status, job) = s
        .call(
            "POST",
            "/v1/jobs",
            Some(&t),
            Some(json!({
                "code": "import os\nos.makedirs('output', exist_ok=True)\nopen('output/a.txt','w').write('0123456789')\nopen('output/b.txt','w').write('b')",
            })),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["jobId"].as_str().unwrap().to_owned();
    let done = wait_job(&s.cp.url, &t, &id, 60).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let (status, list) = s
        .call("GET", &format!("/v1/artifacts?jobId={id}"), Some(&t), None)
        .await;
    assert_eq!(status, 200, "{list}");
    let mut names: Vec<&str> = list["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["a.txt", "b.txt"], "{list}");
    let a = list["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "a.txt")
        .unwrap();
    assert_eq!(a["jobId"], id.as_str());
    let part = reqwest::Client::new()
        .get(format!(
            "{}/v1/artifacts/{}",
            s.cp.url,
            a["artifactId"].as_str().unwrap()
        ))
        .bearer_auth(&t)
        .header("range", "bytes=2-4")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.text().await.unwrap(), "234");
    let other = token("globex", &["agent"]);
    let (status, list) = s
        .call(
            "GET",
            &format!("/v1/artifacts?jobId={id}"),
            Some(&other),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert!(list["artifacts"].as_array().unwrap().is_empty(), "{list}");
    s.stop().await;
}

/// The tenant's quota on stored artifact bytes comes from the platform
/// policy (`rate_limits.maxArtifactBytes`) and holds where the bytes live:
/// past it an upload is 429 `tenant_quota_exceeded` and nothing is kept;
/// deleting frees room; another tenant is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_artifact_bytes_quota_comes_from_policy() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let platform = dir.path().join("platform.rego");
    std::fs::write(
        &platform,
        "package sandbox.platform\nimport rego.v1\ndeny := set()\n\
         rate_limits := {\"maxArtifactBytes\": 1000} if input.identity.tenant == \"acme\"\n",
    )
    .unwrap();
    let s = Stack::start_with(&["--policy-default-path", platform.to_str().unwrap()]).await;
    let acme = token("acme", &["agent"]);
    let globex = token("globex", &["agent"]);
    let first = upload(&s, &acme, "name=a", vec![1; 600]).await;
    assert_eq!(first.status, 201, "{}", first.json());
    let over = upload(&s, &acme, "name=b", vec![2; 600]).await;
    assert_eq!(over.status, 429, "{}", over.json());
    assert_eq!(over.code(), "tenant_quota_exceeded");
    assert_eq!(over.json()["details"]["quota"], "artifactBytes");
    assert_eq!(over.json()["details"]["max"], 1000);
    let list = get(&s, &acme, "/v1/artifacts", &[]).await;
    assert_eq!(
        ids(&list.json()).len(),
        1,
        "the refused upload left nothing"
    );
    // Another tenant has the data plane's default (10 GiB).
    assert_eq!(
        upload(&s, &globex, "name=g", vec![3; 5000]).await.status,
        201
    );
    // Deleting frees the room.
    let id = first.json()["artifactId"].as_str().unwrap().to_owned();
    assert_eq!(
        delete(&s, &acme, &format!("/v1/artifacts/{id}"))
            .await
            .status,
        204
    );
    assert_eq!(upload(&s, &acme, "name=c", vec![4; 900]).await.status, 201);
    s.stop().await;
}
