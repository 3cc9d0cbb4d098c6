//! The committed OpenAPI document against the server's real answers: jobs
//! and steps returning every kind of JSON value are validated against the
//! response schema the document publishes for their route, so the contract
//! and the server cannot drift apart (a generated client reads every answer).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use control_plane::config::DatabaseDriver;
use serde_json::{Value, json};

const OPENAPI: &str =
    include_str!("../../specs/001-sandboxed-code-execution/contracts/control-plane.openapi.json");

/// The values a kernel can hand back, as Python expressions and as JSON.
const VALUES: &[(&str, &str)] = &[
    ("42", "42"),
    ("'text'", "\"text\""),
    ("[1, 'a', None]", "[1, \"a\", null]"),
    ("True", "true"),
    ("{'k': 1.5}", "{\"k\": 1.5}"),
    ("None", "null"),
];

/// The schema the document publishes for `method path` answering `status`
/// with JSON, with the document's components beside it so `$ref`s resolve.
fn response_schema(doc: &Value, path: &str, method: &str, status: &str) -> jsonschema::Validator {
    let schema =
        &doc["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"];
    assert!(
        schema.is_object(),
        "the document publishes no JSON schema for {method} {path} {status}"
    );
    let mut root = schema.clone();
    root["components"] = doc["components"].clone();
    jsonschema::validator_for(&root).unwrap()
}

fn assert_valid(v: &jsonschema::Validator, what: &str, instance: &Value) {
    let errors: Vec<String> = v
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} violates the published schema: {errors:?}\n{instance}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn real_answers_match_the_committed_openapi_document() {
    let doc: Value = serde_json::from_str(OPENAPI).unwrap();
    let job_schema = response_schema(&doc, "/v1/jobs/{id}", "get", "200");
    let job_list_schema = response_schema(&doc, "/v1/jobs", "get", "200");
    let step_schema = response_schema(&doc, "/v1/sessions/{id}/steps", "post", "200");
    let history_schema = response_schema(&doc, "/v1/sessions/{id}/steps", "get", "200");
    // SSE `result` events carry a StepResult.
    let mut sse_root = json!({"$ref": "#/components/schemas/StepResult"});
    sse_root["components"] = doc["components"].clone();
    let sse_result_schema = jsonschema::validator_for(&sse_root).unwrap();

    let s = stack(DatabaseDriver::Sqlite, &[]).await;
    let t = token("acme", &["agent"]);

    for (expr, expected) in VALUES {
        let expected: Value = serde_json::from_str(expected).unwrap();
        let (status, job) = s
            .call("POST", "/v1/jobs", Some(&t), Some(json!({"code": expr})))
            .await;
        assert_eq!(status / 100, 2, "{job}");
        let done = wait_job(&s.cp.url, &t, job["jobId"].as_str().unwrap(), 120).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_eq!(done["output"]["result"], expected, "{expr}: {done}");
        assert_valid(
            &job_schema,
            &format!("GET /v1/jobs/{{id}} for {expr}"),
            &done,
        );
    }
    let (status, list) = s.call("GET", "/v1/jobs", Some(&t), None).await;
    assert_eq!(status, 200, "{list}");
    assert_valid(&job_list_schema, "GET /v1/jobs", &list);

    let (status, session) = s
        .call("POST", "/v1/sessions", Some(&t), Some(json!({})))
        .await;
    assert_eq!(status, 201, "{session}");
    let id = session["sessionId"].as_str().unwrap().to_owned();
    for (expr, expected) in VALUES {
        let expected: Value = serde_json::from_str(expected).unwrap();
        let (status, r) = s
            .call(
                "POST",
                &format!("/v1/sessions/{id}/steps"),
                Some(&t),
                Some(json!({"code": expr})),
            )
            .await;
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["result"], expected, "{expr}: {r}");
        assert_valid(&step_schema, &format!("a step returning {expr}"), &r);

        let text = reqwest::Client::new()
            .post(format!("{}/v1/sessions/{id}/steps", s.cp.url))
            .bearer_auth(&t)
            .header("accept", "text/event-stream")
            .json(&json!({"code": expr}))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let data = text
            .split("\n\n")
            .find(|ev| ev.lines().any(|l| l == "event: result"))
            .and_then(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ")))
            .unwrap_or_else(|| panic!("no result event: {text}"));
        let ev: Value = serde_json::from_str(data).unwrap();
        assert_eq!(ev["result"], expected, "{expr}: {ev}");
        assert_valid(&sse_result_schema, &format!("SSE result of {expr}"), &ev);
    }
    let (status, history) = s
        .call("GET", &format!("/v1/sessions/{id}/steps"), Some(&t), None)
        .await;
    assert_eq!(status, 200, "{history}");
    assert_valid(&history_schema, "the step history", &history);
    s.stop().await;
}
