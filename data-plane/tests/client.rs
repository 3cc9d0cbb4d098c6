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
        artifact_quota_bytes: None,
        secrets: None,
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
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
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
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
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
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
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
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
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

/// Issue 15 §7: one tenant's 10,001 cancels of unknown ids (each leaves a
/// cancel marker) evicted another tenant's kept outcomes, so a cancelled
/// job then ran and a finished one ran again. Outcomes are now bounded per
/// tenant: the flood only evicts the flooder's own.
#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn one_tenants_cancel_flood_does_not_evict_another_tenants_outcomes() {
    let s = stack(true, &[]).await;
    let victim = client(&s, "victim");
    let done = victim
        .run_job(
            &job("v-done", "import random\nrandom.random()"),
            CODE_TIMEOUT,
        )
        .await
        .unwrap();
    assert!(!done.replayed && done.result.is_some(), "{done:?}");
    assert_eq!(
        api_error(victim.cancel_job("v-cancelled").await),
        (404, ErrorCode::JobNotFound)
    );

    let flooder = client(&s, "flooder");
    let refused = futures::stream::iter(0..10_001)
        .map(|i| {
            let f = flooder.clone();
            async move { f.cancel_job(&format!("f-{i}")).await }
        })
        .buffer_unordered(32)
        .filter(|r| {
            futures::future::ready(!matches!(
                r,
                Err(ClientError::Api { body, .. }) if body.code == ErrorCode::JobNotFound
            ))
        })
        .count()
        .await;
    assert_eq!(refused, 0, "every flood cancel is a 404 job_not_found");

    // The finished job replays its first outcome; it does not run again.
    let again = victim
        .run_job(
            &job("v-done", "import random\nrandom.random()"),
            CODE_TIMEOUT,
        )
        .await
        .unwrap();
    assert!(again.replayed, "{again:?}");
    assert_eq!(again.result, done.result);
    // The cancelled job stays cancelled: it never runs.
    let later = victim
        .run_job(&job("v-cancelled", "print('ran')"), CODE_TIMEOUT)
        .await
        .unwrap();
    assert!(later.is_cancelled() && later.stdout.is_empty(), "{later:?}");
    s.stop().await;
}

/// Issue 15 §7: kept job output is bounded by bytes per tenant; going over
/// it gives up the same tenant's oldest output (the outcome stays, slimmed,
/// so the id does not run again), never another tenant's.
#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn kept_job_output_is_bounded_per_tenant_by_bytes() {
    let s = stack(
        true,
        &[
            "--job-keep-tenant-bytes",
            "300000",
            "--job-keep-total-bytes",
            "10000000",
        ],
    )
    .await;
    let (a, b) = (client(&s, "acme"), client(&s, "globex"));
    let big = "print('x' * 200000)";
    let b1 = b.run_job(&job("b1", big), CODE_TIMEOUT).await.unwrap();
    assert!(b1.stdout.len() >= 200_000, "{}", b1.stdout.len());
    for id in ["a1", "a2"] {
        a.run_job(&job(id, big), CODE_TIMEOUT).await.unwrap();
    }
    // a1's output went to make room for a2's: replayed as a summary.
    let a1 = a.get_job("a1").await.unwrap();
    assert!(a1.stdout.is_empty() && a1.truncated, "{a1:?}");
    let rerun = a.run_job(&job("a1", big), CODE_TIMEOUT).await.unwrap();
    assert!(rerun.replayed && rerun.stdout.is_empty(), "not run again");
    assert!(a.get_job("a2").await.unwrap().stdout.len() >= 200_000);
    // The other tenant's output is untouched.
    assert_eq!(b.get_job("b1").await.unwrap().stdout, b1.stdout);
    s.stop().await;
}

/// Issue 15 §7: two data-plane replicas on one Redis registry could run the
/// same (tenant, job id) at once. A run now claims the id in Redis
/// (`SET NX PX`): one replica runs it, the other waits for its saved
/// outcome and replays it.
#[tokio::test]
#[ignore = "needs: runsc, root and Redis on 127.0.0.1:6379 (make test-integration)"]
async fn two_replicas_on_one_redis_never_run_a_job_id_twice() {
    let prefix = format!("dp-test-{}:", hex::encode(rand::random::<[u8; 6]>()));
    let redis_client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut conn = redis_client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis must run on 127.0.0.1:6379 (redis-server --daemonize yes --port 6379)");
    // Replicas share the KEK (saved results are sealed with it).
    let kek = hex::encode(rand::random::<[u8; 32]>());
    let args = [
        "--registry",
        "redis",
        "--redis-key-prefix",
        &prefix,
        "--artifact-kek",
        &kek,
    ];
    let (one, two) = (stack(true, &args).await, stack(true, &args).await);
    let code = "import random, time\ntime.sleep(2)\nrandom.random()";
    let (c1, c2, j) = (
        client(&one, "acme"),
        client(&two, "acme"),
        job("twice", code),
    );
    let (r1, r2) = tokio::join!(c1.run_job(&j, CODE_TIMEOUT), c2.run_job(&j, CODE_TIMEOUT));
    let (r1, r2) = (r1.unwrap(), r2.unwrap());
    assert_eq!(r1.result, r2.result, "both replicas ran the job");
    assert!(
        r1.replayed != r2.replayed,
        "one ran, one replayed: {r1:?} {r2:?}"
    );
    one.stop().await;
    two.stop().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    // The claim was let go once the outcome was saved.
    assert!(
        !keys.iter().any(|k| k.contains(":claim:")),
        "a claim outlived its run: {keys:?}"
    );
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

/// Issue 15 §7: saved job results were plain JSON. They are now sealed with
/// the KEK under `job:{tenant}/{id}`: not readable at rest, private (0600),
/// and a record moved to another tenant's folder does not open there (500
/// `integrity_error`, never a replay of someone else's output nor a run).
#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn saved_job_results_are_sealed_for_their_tenant() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("dp-jobs-")
        .tempdir_in("/tmp")
        .unwrap();
    let path = dir.path().join("registry").display().to_string();
    let s = stack(true, &["--registry", "file", "--registry-path", &path]).await;
    let (acme, globex) = (client(&s, "acme"), client(&s, "globex"));
    let r = acme
        .run_job(&job("secret", "print('top-secret-output')"), CODE_TIMEOUT)
        .await
        .unwrap();
    assert!(r.stdout.contains("top-secret-output"), "{r:?}");
    let saved = dir.path().join("registry/jobs/acme/secret.sealed");
    let bytes = std::fs::read(&saved).unwrap();
    assert!(
        !String::from_utf8_lossy(&bytes).contains("top-secret-output"),
        "the saved result is readable at rest"
    );
    assert_eq!(
        std::fs::metadata(&saved).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Moved to another tenant: it does not open there.
    let other = dir.path().join("registry/jobs/globex");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(&saved, other.join("secret.sealed")).unwrap();
    assert_eq!(
        api_error(globex.get_job("secret").await),
        (500, ErrorCode::IntegrityError)
    );
    assert_eq!(
        api_error(
            globex
                .run_job(&job("secret", "print('ran')"), CODE_TIMEOUT)
                .await
        ),
        (500, ErrorCode::IntegrityError)
    );
    // Its owner still replays it (from memory, and from disk after a restart).
    assert!(
        acme.get_job("secret")
            .await
            .unwrap()
            .stdout
            .contains("top-secret-output")
    );
    s.stop().await;
}
