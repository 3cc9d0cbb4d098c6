//! The API's edges without sandboxes: authentication, bad input, policy
//! administration, audit, bypass, and the committed OpenAPI file.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use control_plane::config::DatabaseDriver;
use serde_json::json;

/// A control plane whose data plane is not running (no sandbox needed).
async fn lone_cp(extra: &[&str]) -> (Proc, TestDb) {
    let db = TestDb::new(DatabaseDriver::Sqlite).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let (cp, _) = cp_proc(&db, &closed, extra).await;
    (cp, db)
}

#[tokio::test]
async fn bad_tokens_get_401_and_are_audited() {
    let (cp, _db) = lone_cp(&["--auth-failure-window", "300ms"]).await;
    let good = token("acme", &["admin"]);
    let mut tampered = good.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let parts: Vec<&str> = good.split('.').collect();
    use base64::Engine;
    let none_header =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let alg_none = format!("{none_header}.{}.", parts[1]);
    for (name, tok) in [
        (
            "expired",
            Some(token_with("acme", &[], USER_SECRET, "control-plane", -300)),
        ),
        ("tampered", Some(tampered)),
        (
            "wrong audience",
            Some(token_with("acme", &[], USER_SECRET, "someone-else", 300)),
        ),
        (
            "wrong secret",
            Some(token_with(
                "acme",
                &[],
                "another-secret-another-secret-xx",
                "control-plane",
                300,
            )),
        ),
        ("alg none", Some(alg_none)),
        ("missing", None),
    ] {
        let (status, body) = call_at(&cp.url, "GET", "/v1/jobs", tok.as_deref(), None).await;
        assert_eq!(status, 401, "{name}: {body}");
        assert_eq!(body["code"], "unauthorized", "{name}");
        assert!(body["request_id"].is_string());
    }
    // A tenant's admin gets its own view: no global position, no anchors
    // (issue 15, section 6); the platform role gets the global chain.
    let (status, own) = call_at(&cp.url, "GET", "/v1/audit/verify", Some(&good), None).await;
    assert_eq!(
        (status, &own["ok"], &own["headSeq"]),
        (200, &json!(true), &json!(0)),
        "{own}"
    );
    let (status, e) = call_at(
        &cp.url,
        "GET",
        &format!("/v1/audit/verify?anchorSeq=1&anchorHash={}", "0".repeat(64)),
        Some(&good),
        None,
    )
    .await;
    assert_eq!(
        (status, e["code"].as_str()),
        (403, Some("forbidden")),
        "{e}"
    );
    let platform = token("operator", &["platform-admin"]);
    // The first failure was audited at once; the other five arrive as one
    // aggregated event when the window (300 ms here) closes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let body = loop {
        let (status, body) =
            call_at(&cp.url, "GET", "/v1/audit/verify", Some(&platform), None).await;
        assert_eq!(status, 200);
        if body["checked"].as_u64().unwrap() >= 2 {
            break body;
        }
        assert!(std::time::Instant::now() < deadline, "no aggregate: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(body["ok"], true);
    // The head, saved elsewhere, anchors a later verify.
    let (seq, head) = (
        body["headSeq"].as_i64().unwrap(),
        body["head"].as_str().unwrap(),
    );
    assert!(seq >= 2, "{body}");
    let (status, anchored) = call_at(
        &cp.url,
        "GET",
        &format!("/v1/audit/verify?anchorSeq={seq}&anchorHash={head}"),
        Some(&platform),
        None,
    )
    .await;
    assert_eq!((status, &anchored["ok"]), (200, &json!(true)), "{anchored}");
    let (status, wrong) = call_at(
        &cp.url,
        "GET",
        &format!(
            "/v1/audit/verify?anchorSeq={seq}&anchorHash={}",
            "0".repeat(64)
        ),
        Some(&platform),
        None,
    )
    .await;
    assert_eq!((status, &wrong["ok"]), (200, &json!(false)), "{wrong}");
    assert_eq!(wrong["firstBroken"]["seq"], json!(seq), "{wrong}");
    let (status, ahead) = call_at(
        &cp.url,
        "GET",
        &format!(
            "/v1/audit/verify?anchorSeq={}&anchorHash={head}",
            seq + 1000
        ),
        Some(&platform),
        None,
    )
    .await;
    assert_eq!((status, &ahead["ok"]), (200, &json!(false)), "{ahead}");
    for bad in [
        format!("anchorSeq={seq}"),
        format!("anchorHash={head}"),
        format!("anchorSeq={seq}&anchorHash=abc"),
        format!("anchorSeq=0&anchorHash={head}"),
        format!("anchorSeq=x&anchorHash={head}"),
        "anchor=1".to_owned(),
    ] {
        let (status, e) = call_at(
            &cp.url,
            "GET",
            &format!("/v1/audit/verify?{bad}"),
            Some(&platform),
            None,
        )
        .await;
        assert_eq!(status, 400, "{bad}: {e}");
        assert_eq!(e["code"], "invalid_argument", "{bad}: {e}");
    }
    cp.stop().await;
}

/// An unauthenticated flood cannot grow the audit log without bound: per
/// source and window the first failure is one `auth.failure` row, the rest
/// one `auth.failure.aggregate` row with their count; past the allowance a
/// bad token from the source gets 429 with `Retry-After`, and a valid one
/// from the same source still gets through (no lockout of a shared proxy).
#[tokio::test]
async fn failed_authentications_are_aggregated_and_throttled_per_source() {
    let db = TestDb::new(DatabaseDriver::Sqlite).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let (cp, app) = cp_proc(
        &db,
        &closed,
        &[
            "--auth-failure-window",
            "700ms",
            "--auth-failure-max-per-window",
            "20",
        ],
    )
    .await;
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..50 {
        let r = http
            .get(format!("{}/v1/jobs", cp.url))
            .bearer_auth("not-a-jwt")
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            let retry: u64 = r.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=1).contains(&retry), "{retry}");
        }
        statuses.push(r.status().as_u16());
    }
    assert!(statuses[..20].iter().all(|s| *s == 401), "{statuses:?}");
    assert!(statuses[20..].iter().all(|s| *s == 429), "{statuses:?}");
    let (status, body) = call_at(
        &cp.url,
        "GET",
        "/v1/jobs",
        Some(&token("acme", &["agent"])),
        None,
    )
    .await;
    assert_eq!(status, 200, "a valid token is not locked out: {body}");
    let q = |action: &str| control_plane::audit::AuditQuery {
        action: Some(action.into()),
        ..Default::default()
    };
    let single = app.audit.list("-", &q("auth.failure")).await.unwrap();
    assert_eq!(single.len(), 1, "one row for the window's first failure");
    assert_eq!(single[0].details["source"], "127.0.0.1");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let aggregate = loop {
        let rows = app
            .audit
            .list("-", &q("auth.failure.aggregate"))
            .await
            .unwrap();
        if !rows.is_empty() {
            break rows;
        }
        assert!(std::time::Instant::now() < deadline, "no aggregate event");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(aggregate.len(), 1, "{aggregate:?}");
    assert_eq!(aggregate[0].details["failures"], 50);
    assert_eq!(aggregate[0].details["notAuditedSeparately"], 49);
    // The next window starts afresh: the source may try again.
    let (status, _) = call_at(&cp.url, "GET", "/v1/jobs", Some("still-bad"), None).await;
    assert_eq!(status, 401);
    cp.stop().await;
    db.cleanup().await;
}

#[tokio::test]
async fn bad_input_gets_coded_4xx_and_leaves_nothing() {
    let (cp, _db) = lone_cp(&["--max-body-bytes", "4096"]).await;
    let t = token("acme", &["agent"]);
    let http = reqwest::Client::new();
    let post = |body: String, ct: &'static str| {
        http.post(format!("{}/v1/jobs", cp.url))
            .bearer_auth(&t)
            .header("content-type", ct)
            .body(body)
            .send()
    };
    for (body, ct, status, code) in [
        (
            "{not json".to_owned(),
            "application/json",
            400,
            "invalid_json",
        ),
        (
            r#"{"code": "1", "colour": "red"}"#.to_owned(),
            "application/json",
            400,
            "invalid_json",
        ),
        (
            r#"{"runtime": "python"}"#.to_owned(),
            "application/json",
            400,
            "invalid_json",
        ),
        (
            r#"{"code": "   "}"#.to_owned(),
            "application/json",
            400,
            "invalid_argument",
        ),
        (
            r#"{"code": "1"}"#.to_owned(),
            "text/plain",
            415,
            "unsupported_media_type",
        ),
        (
            format!(r#"{{"code": "{}"}}"#, "x".repeat(10_000)),
            "application/json",
            413,
            "payload_too_large",
        ),
        (
            r#"{"code": "1", "labels": {"bad name": "x"}}"#.to_owned(),
            "application/json",
            400,
            "invalid_argument",
        ),
        (
            r#"{"code": "1", "secrets": ["DB"]}"#.to_owned(),
            "application/json",
            403,
            "policy_denied",
        ),
        (
            r#"{"code": "1", "secrets": ["db"]}"#.to_owned(),
            "application/json",
            400,
            "invalid_argument",
        ),
    ] {
        let resp = post(body.clone(), ct).await.unwrap();
        let got = resp.status().as_u16();
        let json: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(
            (got, json["code"].as_str()),
            (status, Some(code)),
            "{}: {json}",
            &body[..body.len().min(60)]
        );
    }
    let (_, list) = call_at(&cp.url, "GET", "/v1/jobs", Some(&t), None).await;
    assert_eq!(
        list["jobs"].as_array().unwrap().len(),
        0,
        "no job from bad input"
    );
    // A denial carries its reasons, is counted and audited.
    let (status, body) = call_at(
        &cp.url,
        "POST",
        "/v1/jobs",
        Some(&t),
        Some(json!({"code": "1", "egress": ["example.com"]})),
    )
    .await;
    assert_eq!(status, 403);
    assert!(
        !body["details"]["reasons"].as_array().unwrap().is_empty(),
        "{body}"
    );
    let metrics = reqwest::get(format!("{}/metrics", cp.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("control_plane_policy_denials_total{action=\"job.submit\"} 2"),
        "{metrics}"
    );
    // Request latency is labelled by the route template, never the raw path.
    assert!(
        metrics.contains(
            "control_plane_http_request_duration_seconds_count{route=\"/v1/jobs\",method=\"POST\",status=\"403\"}"
        ),
        "{metrics}"
    );
    let admin = token("acme", &["admin"]);
    let (_, audit) = call_at(
        &cp.url,
        "GET",
        "/v1/audit?outcome=denied",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(audit["events"].as_array().unwrap().len(), 2, "{audit}");
    cp.stop().await;
}

#[tokio::test]
async fn policy_is_per_tenant_admin_only_and_narrows() {
    let (cp, _db) = lone_cp(&[]).await;
    let admin = token("acme", &["admin"]);
    let agent = token("acme", &["agent"]);
    let rego = "package sandbox.tenant\n\ndeny contains \"node is not allowed here\" if input.request.runtime == \"node\"\n";
    let put = |tok: String, tenant: &'static str, body: serde_json::Value| {
        let url = cp.url.clone();
        async move {
            call_at(
                &url,
                "PUT",
                &format!("/v1/tenants/{tenant}/policy"),
                Some(&tok),
                Some(body),
            )
            .await
        }
    };
    let (status, body) = put(agent.clone(), "acme", json!({"rego": rego})).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));
    let (status, body) = put(admin.clone(), "globex", json!({"rego": rego})).await;
    assert_eq!(
        status, 404,
        "another tenant's policy does not exist for acme: {body}"
    );
    let (status, body) = put(
        admin.clone(),
        "acme",
        json!({"rego": "package sandbox.tenant\ndeny contains"}),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("policy_invalid")),
        "{body}"
    );
    let (status, body) = put(admin.clone(), "acme", json!({"rego": rego})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 1);
    let (status, body) = call_at(
        &cp.url,
        "GET",
        "/v1/tenants/acme/policy",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["rego"], rego);
    // Dry run, as the agent.
    let (status, d) = call_at(
        &cp.url,
        "POST",
        "/v1/policy/evaluate",
        Some(&agent),
        Some(json!({"action": "job.submit", "request": {"runtime": "node"}})),
    )
    .await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["allow"], false);
    assert!(
        d["reasons"].to_string().contains("node is not allowed"),
        "{d}"
    );
    let (_, d) = call_at(
        &cp.url,
        "POST",
        "/v1/policy/evaluate",
        Some(&agent),
        Some(json!({"action": "job.submit", "request": {"runtime": "python"}})),
    )
    .await;
    assert_eq!(d["allow"], true, "{d}");
    // Another tenant is unaffected.
    let g = token("globex", &["agent"]);
    let (_, d) = call_at(
        &cp.url,
        "POST",
        "/v1/policy/evaluate",
        Some(&g),
        Some(json!({"action": "job.submit", "request": {"runtime": "node"}})),
    )
    .await;
    assert_eq!(d["allow"], true, "{d}");
    let (status, _) = call_at(
        &cp.url,
        "GET",
        "/v1/tenants/globex/policy",
        Some(&token("globex", &["admin"])),
        None,
    )
    .await;
    assert_eq!(status, 404);
    // Audit is for admins and auditors, of their own tenant only.
    let (status, _) = call_at(&cp.url, "GET", "/v1/audit", Some(&agent), None).await;
    assert_eq!(status, 403);
    let (status, audit) = call_at(
        &cp.url,
        "GET",
        "/v1/audit",
        Some(&token("globex", &["auditor"])),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        audit["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["tenant"] == "globex"),
        "{audit}"
    );
    cp.stop().await;
}

#[tokio::test]
async fn bypass_audits_every_request() {
    let (cp, _db) = lone_cp(&["--authz-bypass", "true"]).await;
    let (status, _, body) = call_full(
        &cp.url,
        "GET",
        "/v1/jobs",
        None,
        None,
        &[("x-tenant-id", "acme")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _, audit) = call_full(
        &cp.url,
        "GET",
        "/v1/audit",
        None,
        None,
        &[("x-tenant-id", "acme")],
    )
    .await;
    assert_eq!(status, 200);
    let events = audit["events"].as_array().unwrap();
    assert!(events.len() >= 2, "{audit}");
    assert!(
        events
            .iter()
            .all(|e| e["bypass"] == true && e["action"] == "request.bypass"),
        "{audit}"
    );
    cp.stop().await;
}

#[test]
fn bypass_is_refused_in_production() {
    use clap::Parser;
    let c = control_plane::Config::parse_from([
        "control-plane",
        "--authz-bypass",
        "true",
        "--env",
        "production",
        "--data-plane-secret",
        DP_SECRET,
    ]);
    assert!(c.validate().unwrap_err().contains("AUTHZ_BYPASS"));
}

#[tokio::test]
async fn probes_docs_and_openapi() {
    let (cp, _db) = lone_cp(&[]).await;
    let (status, _) = call_at(&cp.url, "GET", "/healthz", None, None).await;
    assert_eq!(status, 200);
    let (status, body) = call_at(&cp.url, "GET", "/readyz", None, None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("data_plane_unavailable"))
    );
    let docs = reqwest::get(format!("{}/docs/", cp.url)).await.unwrap();
    assert_eq!(docs.status(), 200);
    assert!(
        docs.text().await.unwrap().contains("swagger"),
        "Swagger UI at /docs"
    );
    let (status, spec) = call_at(&cp.url, "GET", "/openapi.json", None, None).await;
    assert_eq!(status, 200);
    assert!(spec["paths"]["/v1/jobs"]["post"].is_object());
    cp.stop().await;
}

/// `control-plane audit verify` from the shell: exit 0 on an intact chain,
/// 1 with the first broken link after an edit.
#[tokio::test]
async fn audit_verify_command() {
    let (cp, db) = lone_cp(&[]).await;
    for _ in 0..3 {
        call_at(&cp.url, "GET", "/v1/jobs", None, None).await; // audited 401s
    }
    // The first is one event, the other two one aggregate, written at the
    // latest when the control plane stops.
    cp.stop().await;
    let run_with = |extra: &[&str]| {
        #[allow(clippy::disallowed_methods, reason = "the test runs the real binary")]
        std::process::Command::new(env!("CARGO_BIN_EXE_control-plane"))
            .args([
                "audit",
                "verify",
                "--database-driver",
                "sqlite",
                "--database-url",
                &db.url,
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let run = || run_with(&[]);
    let ok = run();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("\"ok\": true"));
    // The report's head is the anchor of a later run.
    let report: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    let anchor = format!("{}:{}", report["headSeq"], report["head"].as_str().unwrap());
    let anchored = run_with(&["--anchor", &anchor]);
    assert!(
        anchored.status.success(),
        "{}",
        String::from_utf8_lossy(&anchored.stdout)
    );
    let beyond = run_with(&["--anchor", &format!("999:{}", "0".repeat(64))]);
    assert_eq!(beyond.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&beyond.stdout).contains("cut short"));
    let malformed = run_with(&["--anchor", "nonsense"]);
    assert!(!malformed.status.success());
    assert!(
        String::from_utf8_lossy(&malformed.stderr).contains("SEQ:HASH"),
        "{}",
        String::from_utf8_lossy(&malformed.stderr)
    );
    let pool = db.connect().await;
    if let control_plane::storage::Db::Sqlite(p) = &pool {
        sqlx::query("DROP TRIGGER audit_events_no_update")
            .execute(p)
            .await
            .unwrap();
        sqlx::query("UPDATE audit_events SET outcome = 'ok' WHERE seq = 2")
            .execute(p)
            .await
            .unwrap();
    }
    pool.close().await;
    let broken = run();
    assert_eq!(broken.status.code(), Some(1));
    let out = String::from_utf8_lossy(&broken.stdout);
    assert!(
        out.contains("\"seq\": 2") && out.contains("edited"),
        "{out}"
    );
}

/// The committed OpenAPI file is what the code describes; regenerate it
/// with `make openapi` when this fails.
#[test]
fn committed_openapi_is_fresh() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../specs/001-sandboxed-code-execution/contracts/control-plane.openapi.json"
    );
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    let current = control_plane::api::openapi_json();
    assert!(
        committed.trim() == current.trim(),
        "{path} is stale: run `make openapi` and commit it"
    );
}

/// Every parameter sits where the server reads it: a path parameter is a
/// `{name}` of its route, the rest are optional query parameters or
/// headers (a query struct once came out as required path parameters).
#[test]
fn openapi_parameters_are_where_the_server_reads_them() {
    let spec: serde_json::Value =
        serde_json::from_str(&control_plane::api::openapi_json()).unwrap();
    let mut queries = 0;
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            for p in op["parameters"].as_array().into_iter().flatten() {
                let (name, place) = (p["name"].as_str().unwrap(), p["in"].as_str().unwrap());
                let in_route = path.contains(&format!("{{{name}}}"));
                match place {
                    "path" => assert!(in_route, "{method} {path}: {name} is not in the route"),
                    "query" | "header" => {
                        assert!(!in_route, "{method} {path}: {name} belongs to the path");
                        assert_ne!(p["required"], json!(true), "{method} {path}: {name}");
                        queries += usize::from(place == "query");
                    }
                    other => panic!("{method} {path}: {name} in {other}"),
                }
            }
        }
    }
    assert!(queries >= 10, "query parameters missing: {queries}");
}

/// One raw HTTP/1.1 request, so the path reaches the server exactly as
/// written (a client library would normalise `%2e%2e` away): (status, body).
async fn raw(
    base: &str,
    method: &str,
    path: &str,
    auth: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {auth}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text[9..12].parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    // Chunked or not, the JSON object is the part between the outer braces.
    let json = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) => serde_json::from_str(&body[a..=b]).unwrap_or(json!({"raw": body})),
        _ => json!({"raw": body}),
    };
    (status, json)
}

/// Issue 15, section 1: every id-bearing route refuses every traversal form
/// with 400 `invalid_argument` before the id reaches SQL or the data plane
/// (whose 404 or 503 would otherwise answer), and a malformed tenant never
/// authenticates.
#[tokio::test]
async fn traversal_ids_are_refused_at_the_edge_of_every_route() {
    let (cp, _db) = lone_cp(&[]).await;
    let admin = token("acme", &["admin"]);
    let forms = [
        "..%2Fother%2Fart-1",
        "%2e%2e",
        "%2e%2e%2fother",
        "%252e%252e%252f",
        "a%00b",
        "..%5Cother",
        "%5C..%5Cother",
        "%2Fetc%2Fpasswd",
        "..",
        ".hidden",
    ];
    let routes: &[(&str, &str, &str)] = &[
        ("GET", "/v1/sessions/{}", ""),
        ("DELETE", "/v1/sessions/{}", ""),
        ("GET", "/v1/sessions/{}/steps", ""),
        ("POST", "/v1/sessions/{}/steps", r#"{"code":"1+1"}"#),
        ("GET", "/v1/sessions/{}/files", ""),
        ("GET", "/v1/sessions/{}/files/a.txt", ""),
        ("PUT", "/v1/sessions/{}/files/a.txt", "x"),
        ("DELETE", "/v1/sessions/{}/files/a.txt", ""),
        ("GET", "/v1/jobs/{}", ""),
        ("POST", "/v1/jobs/{}/cancel", ""),
        ("GET", "/v1/artifacts/{}", ""),
        ("GET", "/v1/artifacts/{}/info", ""),
        ("DELETE", "/v1/artifacts/{}", ""),
        ("GET", "/v1/tenants/{}/policy", ""),
        (
            "PUT",
            "/v1/tenants/{}/policy",
            r#"{"rego":"package sandbox.tenant\n"}"#,
        ),
    ];
    for (method, route, body) in routes {
        for form in forms {
            let path = route.replace("{}", form);
            let (status, e) = raw(&cp.url, method, &path, &admin, body).await;
            assert_eq!(
                (status, e["code"].as_str()),
                (400, Some("invalid_argument")),
                "{method} {path}: {e}"
            );
        }
    }
    // A tenant that is not an identifier never authenticates, and the
    // token command refuses to mint one.
    for tenant in ["-", "..", "a/b", "Acme", "-acme"] {
        let (status, e) = call_at(
            &cp.url,
            "GET",
            "/v1/jobs",
            Some(&token(tenant, &["admin"])),
            None,
        )
        .await;
        assert_eq!(
            (status, e["code"].as_str()),
            (401, Some("unauthorized")),
            "{tenant}: {e}"
        );
        let args = <control_plane::identity::TokenArgs as clap::Parser>::parse_from([
            "token",
            &format!("--tenant={tenant}"),
            "--secret",
            USER_SECRET,
        ]);
        assert!(
            control_plane::identity::mint_dev_token(&args).is_err(),
            "{tenant}"
        );
    }
    cp.stop().await;
}

fn vm_rss_mb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        / 1024
}

/// Issue 15, section 3: a tenant's Rego cannot stall or bloat the control
/// plane. The two policies of the report are refused at PUT (even dodging
/// the trial evaluation); variants that pass the static check but go over
/// the time or size limits fail closed with `policy_limit_exceeded` while
/// another tenant's requests keep being answered, and the process does not
/// grow by hundreds of MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_tenant_policy_neither_stalls_nor_bloats_the_control_plane() {
    // The control plane on a runtime of its own (2 workers), as in a
    // deployment: its clients never share its threads.
    let (url_tx, url_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let (cp, _db) = lone_cp(&[]).await;
                url_tx.send(cp.url.clone()).unwrap();
                let _ = stop_rx.await;
                cp.stop().await;
            })
    });
    struct Url {
        url: String,
    }
    let cp = Url {
        url: url_rx.await.unwrap(),
    };
    let attacker = token("mallory", &["admin"]);
    let victim = token("acme", &["agent"]);
    let policy = |expr: &str| {
        format!(
            "package sandbox.tenant\n\ndeny contains \"x\" if {{\n\tinput.identity.tenant != \"trial\"\n\t{expr}\n}}\n"
        )
    };
    for expr in [
        "count([x | some x in numbers.range(1, 3000000); x % 7 == 0]) < 0",
        "count(numbers.range(1, 20000000)) < 0",
    ] {
        let (status, e) = call_at(
            &cp.url,
            "PUT",
            "/v1/tenants/mallory/policy",
            Some(&attacker),
            Some(json!({"rego": policy(expr)})),
        )
        .await;
        assert_eq!(
            (status, e["code"].as_str()),
            (400, Some("policy_invalid")),
            "{expr}: {e}"
        );
    }
    let mut doubling = String::from("s0 := \"aaaaaaaaaaaaaaaa\"\n");
    for i in 0..40 {
        doubling.push_str(&format!("\ts{} := concat(\"\", [s{i}, s{i}])\n", i + 1));
    }
    doubling.push_str("\tcount(s40) < 0");
    let rss_before = vm_rss_mb();
    for expr in [
        // 10^8 interpreter steps: the timer's case.
        "count([x | some i in numbers.range(1, 9999); some j in numbers.range(1, 9999); x := i * j; x % 7 == 0]) < 0".to_owned(),
        // 2^40 bytes by doubling: the builtins' bound.
        doubling,
    ] {
        let (status, e) = call_at(
            &cp.url,
            "PUT",
            "/v1/tenants/mallory/policy",
            Some(&attacker),
            Some(json!({"rego": policy(&expr)})),
        )
        .await;
        assert_eq!(status, 200, "{e}");
        let url = cp.url.clone();
        let flood: Vec<_> = (0..60)
            .map(|_| {
                let (url, attacker) = (url.clone(), attacker.clone());
                tokio::spawn(async move { call_at(&url, "GET", "/v1/jobs", Some(&attacker), None).await })
            })
            .collect();
        // The victim's requests are answered while the flood is evaluated.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let mut took = Vec::new();
        for _ in 0..10 {
            let start = std::time::Instant::now();
            let (status, body) = call_at(&cp.url, "GET", "/v1/jobs", Some(&victim), None).await;
            assert_eq!(status, 200, "{body}");
            took.push(start.elapsed());
        }
        let still_flooding = flood.iter().any(|t| !t.is_finished());
        for task in flood {
            let (status, e) = task.await.unwrap();
            assert!(
                matches!(
                    (status, e["code"].as_str()),
                    (403, Some("policy_limit_exceeded")) | (429, Some("tenant_quota_exceeded"))
                ),
                "{status} {e}"
            );
        }
        took.sort();
        assert!(
            took[took.len() / 2] < std::time::Duration::from_millis(500),
            "victim p50 {:?} (flood still running: {still_flooding})",
            took[took.len() / 2]
        );
    }
    let grown = vm_rss_mb().saturating_sub(rss_before);
    assert!(grown < 200, "the process grew by {grown} MB");
    // The tenant's admin sees why, in the policy and in the audit log.
    let (status, p) = call_at(
        &cp.url,
        "GET",
        "/v1/tenants/mallory/policy",
        Some(&attacker),
        None,
    )
    .await;
    assert_eq!(status, 200, "{p}");
    assert!(
        p["lastFault"]["reason"].as_str().unwrap().contains("limit"),
        "{p}"
    );
    let (status, page) = call_at(
        &cp.url,
        "GET",
        "/v1/audit?action=policy.limit_exceeded",
        Some(&attacker),
        None,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert!(!page["events"].as_array().unwrap().is_empty(), "{page}");
    stop_tx.send(()).unwrap();
    tokio::task::spawn_blocking(move || server.join().unwrap())
        .await
        .unwrap();
}
