//! Issue 19 §5 in the agent: its `POST /v1/sessions` request span carries
//! the session's id (as `POST /v1/steps` and `step.run` do), only once the
//! caller is the admin credential's holder and the id is valid. Hermetic:
//! the spans are captured in this process (no collector, no sandbox: a
//! refused creation starts none, and the created one runs with isolation
//! `none`, a plain bash process on this machine).
#![allow(clippy::unwrap_used)]

use clap::Parser;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "current_thread")]
async fn the_create_session_span_carries_the_valid_session_id() {
    let capture = shared::telemetry::testing::SpanCapture::start();
    let state = tempfile::Builder::new()
        .prefix("sa-otel-")
        .tempdir_in("/tmp")
        .unwrap();
    let admin = hex::encode(rand::random::<[u8; 32]>());
    let config = session_agent::Config::parse_from([
        "session-agent",
        "--admin-token",
        &admin,
        "--isolation",
        "none",
        "--state-dir",
        &state.path().display().to_string(),
    ]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(session_agent::serve(listener, config, shutdown.clone()));
    let http = reqwest::Client::new();
    let token = hex::encode(rand::random::<[u8; 32]>());
    let create = |admin: Option<&str>, id: &str, runtime: &str| {
        let mut req = http
            .post(format!("{base}/v1/sessions"))
            .json(&json!({"sessionId": id, "runtime": runtime, "token": token}));
        if let Some(a) = admin {
            req = req.header(shared::agent::ADMIN_TOKEN_HEADER, a);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    // Created, refused for its runtime (after the id was checked), refused
    // for its id, refused for its caller.
    assert_eq!(create(Some(&admin), "ses-otel-made", "bash").await, 201);
    assert_eq!(create(Some(&admin), "ses-otel-cobol", "cobol").await, 400);
    assert_eq!(create(Some(&admin), "../ses-otel-bad", "bash").await, 400);
    assert_eq!(create(None, "ses-otel-anonymous", "bash").await, 401);
    shutdown.cancel();
    server.await.unwrap().unwrap();

    let spans = capture.wait_named("POST /v1/sessions", 4).await;
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let seen: Vec<(Option<&str>, Option<&str>)> = spans
        .iter()
        .map(|s| {
            (
                s.attributes
                    .get("http.response.status_code")
                    .map(String::as_str),
                s.attributes.get("session_id").map(String::as_str),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (Some("201"), Some("ses-otel-made")),
            (Some("400"), Some("ses-otel-cobol")),
            (Some("400"), None),
            (Some("401"), None),
        ],
        "{spans:#?}"
    );
}
