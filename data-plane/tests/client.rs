//! The typed data-plane client (`shared::client::DataPlaneClient`, what the
//! control plane calls) against a real data plane and a real session agent
//! (real gVisor sandboxes) on loopback: every route, coded errors, transport
//! failures, and job cancellation.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{SECRET, Stack, credential, credential_with, stack};
use futures::StreamExt;
use serde_json::{Value, json};
use shared::ErrorCode;
use shared::agent::StepStatus;
use shared::client::{ClientError, DataPlaneClient, PathContent, StepEvent, TenantClient};
use shared::dataplane::{CreateSession, JOB_CANCELLED, RunJob, RunStep};

mod common;

/// Generous: sandboxes start slowly on a loaded two-core machine.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
const CODE_TIMEOUT: Duration = Duration::from_secs(30);

fn client(s: &Stack, tenant: &str) -> TenantClient {
    DataPlaneClient::new(&s.dp)
        .unwrap()
        .with_timeout(CALL_TIMEOUT)
        .as_tenant(credential(tenant))
}

fn step(code: &str) -> RunStep {
    RunStep {
        step_id: None,
        code: code.into(),
        timeout_ms: None,
        mode: None,
        event: None,
    }
}

fn job(id: &str, code: &str) -> RunJob {
    RunJob {
        job_id: id.into(),
        runtime: Some("python".into()),
        code: code.into(),
        mode: None,
        event: None,
        timeout_ms: None,
        limits: None,
        env: None,
        packages: None,
    }
}

/// The coded error of a failed call, or a panic naming what came instead.
fn api_error<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, ErrorCode) {
    match r {
        Err(ClientError::Api { status, body }) => (status, body.code),
        other => panic!("expected a coded error, got {other:?}"),
    }
}

async fn agent_sessions(s: &Stack) -> Value {
    s.http
        .get(format!("{}/v1/health", s.agent_url))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["sessions"]
        .clone()
}

#[tokio::test]
async fn sessions_steps_and_files_through_the_typed_client() {
    let s = stack(true, &[]).await;
    let dp = DataPlaneClient::new(&s.dp).unwrap();
    assert_eq!(dp.health().await.unwrap().status, "ok");
    let ready = dp.ready().await.unwrap();
    assert_eq!((ready.status.as_str(), ready.runtimes), ("ready", Some(3)));

    let acme = client(&s, "acme").with_context(Some("req-client-1".into()), None);
    let names: Vec<String> = acme
        .runtimes()
        .await
        .unwrap()
        .runtimes
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["bash", "node", "python"]);

    let view = acme
        .create_session(&CreateSession {
            runtime: Some("python".into()),
            env: Some(BTreeMap::from([("GREETING".into(), "hej".into())])),
            ..CreateSession::default()
        })
        .await
        .unwrap();
    assert_eq!(
        (view.tenant.as_str(), view.state.as_str()),
        ("acme", "active")
    );
    let id = view.session_id.clone();
    assert_eq!(acme.get_session(&id).await.unwrap(), view);
    assert_eq!(acme.list_sessions().await.unwrap().sessions, vec![view]);

    let r = acme
        .step(
            &id,
            &step("x = 41\nimport os\nos.environ['GREETING']"),
            CODE_TIMEOUT,
        )
        .await
        .unwrap();
    assert_eq!((r.status, r.result), (StepStatus::Ok, Some(json!("hej"))));
    let r = acme.step(&id, &step("x + 1"), CODE_TIMEOUT).await.unwrap();
    assert_eq!(r.result, Some(json!(42)));

    // Streamed: output as printed, then the result.
    let events: Vec<StepEvent> = acme
        .step_stream(&id, &step("print('a')\nprint('b')\n7"), CODE_TIMEOUT)
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    let stdout: String = events
        .iter()
        .filter_map(|e| match e {
            StepEvent::Stdout(d) => Some(d.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(stdout, "a\nb\n", "{events:?}");
    match events.last() {
        Some(StepEvent::Result(r)) => assert_eq!(r.result, Some(json!(7))),
        other => panic!("the stream did not end with a result: {other:?}"),
    }

    // Files: the path travels as one encoded segment.
    acme.write_file(&id, "data/in.txt", "from the client")
        .await
        .unwrap();
    let r = acme
        .step(&id, &step("open('data/in.txt').read()"), CODE_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(r.result, Some(json!("from the client")));
    assert_eq!(
        acme.read_path(&id, "data/in.txt").await.unwrap(),
        PathContent::File(Bytes::from_static(b"from the client"))
    );
    assert_eq!(
        acme.read_file(&id, "data/in.txt").await.unwrap(),
        "from the client"
    );
    match acme.read_path(&id, "data").await.unwrap() {
        PathContent::Dir(list) => {
            assert_eq!(list.files[0].path, "data/in.txt", "{list:?}");
        }
        other => panic!("a directory read gave {other:?}"),
    }
    let root = acme.list_files(&id, "").await.unwrap();
    assert_eq!(root.files[0].path, "data", "{root:?}");
    assert_eq!(
        api_error(acme.read_path(&id, "../../etc/passwd").await),
        (400, ErrorCode::PathOutsideWorkspace)
    );
    acme.delete_file(&id, "data/in.txt").await.unwrap();
    assert_eq!(
        api_error(acme.read_path(&id, "data/in.txt").await),
        (404, ErrorCode::FileNotFound)
    );

    // Another tenant: the session does not exist for it.
    let globex = client(&s, "globex");
    assert_eq!(
        api_error(globex.get_session(&id).await),
        (404, ErrorCode::SessionNotFound)
    );
    assert_eq!(
        api_error(globex.delete_session(&id).await),
        (404, ErrorCode::SessionNotFound)
    );

    acme.delete_session(&id).await.unwrap();
    assert_eq!(
        api_error(acme.get_session(&id).await),
        (404, ErrorCode::SessionNotFound)
    );
    assert!(acme.list_sessions().await.unwrap().sessions.is_empty());
    assert_eq!(agent_sessions(&s).await, json!(0));
    s.stop().await;
}

#[tokio::test]
async fn jobs_and_artifacts_through_the_typed_client() {
    let s = stack(true, &["--max-body-bytes", "65536"]).await;
    let acme = client(&s, "acme");

    // A streamed upload, larger than the body limit (artifacts are exempt).
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let chunks: Vec<Result<Bytes, std::io::Error>> = data
        .chunks(50_000)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let info = acme
        .upload_artifact(
            "report.bin",
            None,
            reqwest::Body::wrap_stream(futures::stream::iter(chunks)),
        )
        .await
        .unwrap();
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(&data));
    assert_eq!(
        (info.size, info.sha256.as_str()),
        (300_000, digest.as_str())
    );
    assert_eq!(acme.artifact_info(&info.artifact_id).await.unwrap(), info);
    let download = acme.download_artifact(&info.artifact_id).await.unwrap();
    assert_eq!(
        (download.size, download.sha256.as_deref()),
        (Some(300_000), Some(digest.as_str()))
    );
    let mut got = Vec::new();
    let mut stream = Box::pin(download.into_stream());
    while let Some(chunk) = stream.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert!(got == data, "the downloaded bytes differ");
    assert_eq!(
        api_error(client(&s, "globex").artifact_info(&info.artifact_id).await),
        (404, ErrorCode::ArtifactNotFound)
    );
    acme.delete_artifact(&info.artifact_id).await.unwrap();
    assert_eq!(
        api_error(acme.download_artifact(&info.artifact_id).await),
        (404, ErrorCode::ArtifactNotFound)
    );

    // A job: output files become artifacts; the id runs once.
    let code = "import os\nos.makedirs('output', exist_ok=True)\nopen('output/report.txt', 'w').write('done')\nprint('working')\n6 * 7";
    let first = acme
        .run_job(&job("job-1", code), CODE_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        (first.status, first.result.clone(), first.stdout.as_str()),
        (StepStatus::Ok, Some(json!(42)), "working\n")
    );
    assert!(!first.replayed && !first.is_cancelled());
    assert_eq!(first.artifacts.len(), 1);
    let report = acme
        .download_artifact(&first.artifacts[0].artifact_id)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(report, "done");
    let got = acme.get_job("job-1").await.unwrap();
    assert!(got.replayed);
    assert_eq!(got.artifacts, first.artifacts);
    let again = acme
        .run_job(&job("job-1", code), CODE_TIMEOUT)
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(
        api_error(acme.get_job("job-never").await),
        (404, ErrorCode::JobNotFound)
    );
    assert_eq!(agent_sessions(&s).await, json!(0));
    s.stop().await;
}

#[tokio::test]
async fn coded_errors_and_transport_failures() {
    // No agent behind this data plane: nothing here needs a sandbox.
    let s = stack(false, &["--agent-timeout", "3s", "--ready-timeout", "3s"]).await;
    let acme = client(&s, "acme");
    assert_eq!(
        api_error(acme.step("ses-unknown", &step("1"), CODE_TIMEOUT).await),
        (404, ErrorCode::SessionNotFound)
    );
    // The data plane answers, the agent behind it does not: a coded 503,
    // not a transport failure.
    assert_eq!(
        api_error(acme.create_session(&CreateSession::default()).await),
        (503, ErrorCode::SandboxUnavailable)
    );
    let dp = DataPlaneClient::new(&s.dp).unwrap();
    assert_eq!(
        api_error(dp.ready().await),
        (503, ErrorCode::SandboxUnavailable)
    );
    for bad in [
        credential_with(
            "acme",
            "another-secret-another-secret-xx",
            "data-plane",
            300,
        ),
        credential_with("acme", SECRET, "data-plane", -3600),
        "x.y.z".to_owned(),
    ] {
        assert_eq!(
            api_error(dp.as_tenant(bad).list_sessions().await),
            (401, ErrorCode::Unauthorized)
        );
    }

    // A data plane that is down: a transport failure.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let err = DataPlaneClient::new(&down)
        .unwrap()
        .as_tenant(credential("acme"))
        .runtimes()
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Transport(_)), "{err:?}");

    // One that accepts and never answers: a transport failure within the bound.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = silent.accept().await {
            held.push(sock);
        }
    });
    let started = Instant::now();
    let err = DataPlaneClient::new(&silent_url)
        .unwrap()
        .with_timeout(Duration::from_millis(500))
        .as_tenant(credential("acme"))
        .get_job("j")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Transport(e) if e.is_timeout()),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    hold.abort();
    s.stop().await;
}

#[tokio::test]
async fn a_running_job_is_cancelled_and_its_sandbox_destroyed() {
    let s = stack(true, &[]).await;
    let acme = client(&s, "acme");
    let sleepy = job(
        "sleepy",
        "import time\nprint('started', flush=True)\ntime.sleep(30)\nprint('finished')",
    );
    let run = tokio::spawn({
        let (acme, sleepy) = (acme.clone(), sleepy.clone());
        async move { acme.run_job(&sleepy, CODE_TIMEOUT).await }
    });
    // Wait for its sandbox, then give the step a moment to start.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acme.list_sessions().await.unwrap().sessions.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the job's sandbox never appeared"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let asked = Instant::now();
    let cancelled = acme.cancel_job("sleepy").await.unwrap();
    assert!(cancelled.is_cancelled(), "{cancelled:?}");
    assert_eq!(cancelled.status, StepStatus::Killed);
    assert_eq!(cancelled.error.as_ref().unwrap().kind, JOB_CANCELLED);
    let outcome = run.await.unwrap().unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "the run took {:?} to end after the cancel",
        asked.elapsed()
    );
    assert!(outcome.is_cancelled() && !outcome.replayed, "{outcome:?}");
    assert!(!outcome.stdout.contains("finished"), "{outcome:?}");
    assert!(outcome.artifacts.is_empty() && outcome.result.is_none());
    // No sandbox left, here or on the agent.
    assert!(acme.list_sessions().await.unwrap().sessions.is_empty());
    assert_eq!(agent_sessions(&s).await, json!(0));

    // Remembered: a get or a repeated run replays the cancellation, and a
    // repeated cancel (a retry) gets the same answer.
    let got = acme.get_job("sleepy").await.unwrap();
    assert!(got.is_cancelled() && got.replayed);
    let again = acme.run_job(&sleepy, CODE_TIMEOUT).await.unwrap();
    assert!(again.is_cancelled() && again.replayed, "{again:?}");
    let twice = acme.cancel_job("sleepy").await.unwrap();
    assert!(twice.is_cancelled() && twice.replayed);
    assert!(acme.list_sessions().await.unwrap().sessions.is_empty());
    s.stop().await;
}

#[tokio::test]
async fn cancel_of_finished_unknown_and_not_yet_started_jobs() {
    let s = stack(true, &[]).await;
    let acme = client(&s, "acme");

    let quick = acme
        .run_job(&job("quick", "1 + 1"), CODE_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(quick.result, Some(json!(2)));
    assert_eq!(
        api_error(acme.cancel_job("quick").await),
        (409, ErrorCode::JobFinished)
    );
    // Still its real outcome.
    assert_eq!(acme.get_job("quick").await.unwrap().result, Some(json!(2)));
    // Job ids are per tenant: another tenant has no job "quick".
    assert_eq!(
        api_error(client(&s, "globex").cancel_job("quick").await),
        (404, ErrorCode::JobNotFound)
    );

    // Cancelled before it arrived: 404, and the run that comes later does
    // not execute (nothing printed, nothing written, no sandbox).
    assert_eq!(
        api_error(acme.cancel_job("later").await),
        (404, ErrorCode::JobNotFound)
    );
    let later = acme
        .run_job(
            &job(
                "later",
                "import os\nos.makedirs('output', exist_ok=True)\nopen('output/ran.txt', 'w').write('ran')\nprint('ran')",
            ),
            CODE_TIMEOUT,
        )
        .await
        .unwrap();
    assert!(later.is_cancelled(), "{later:?}");
    assert_eq!(
        (later.stdout.as_str(), later.artifacts.len()),
        ("", 0),
        "{later:?}"
    );
    assert!(acme.list_sessions().await.unwrap().sessions.is_empty());
    assert_eq!(agent_sessions(&s).await, json!(0));

    assert_eq!(
        api_error(acme.cancel_job("../x").await),
        (400, ErrorCode::InvalidArgument)
    );
    s.stop().await;
}
