//! The data plane's figures (issue 4), each against the direct-to-agent or
//! bare-filesystem figure measured in the same run:
//! - a warm Python step through the data plane vs straight to the agent;
//! - a one-shot job from a warm pool (submit to result);
//! - encrypted artifact upload and download on `fs`, as ms per MiB
//!   (5 ms/MiB = 200 MiB/s) vs writing and reading the same bytes plainly.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::harness::{Agent, token, wait_pool_full};
use crate::report::{Row, Series};
use crate::{Args, Sizes};

const SECRET: &str = "bench-secret-bench-secret-bench-secret";

struct DataPlaneServer {
    url: String,
    http: reqwest::Client,
    credential: String,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    root: tempfile::TempDir,
}

impl DataPlaneServer {
    async fn start(agent: &Agent) -> anyhow::Result<DataPlaneServer> {
        let root = tempfile::Builder::new()
            .prefix("dp-bench-")
            .tempdir_in("/tmp")?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let artifacts = root.path().join("artifacts").display().to_string();
        let config = <data_plane::Config as Parser>::try_parse_from([
            "data-plane",
            "--env",
            "dev",
            "--jwt-secret",
            SECRET,
            "--agent-endpoint",
            agent.url.as_str(),
            "--agent-admin-token",
            agent.admin_token.as_str(),
            "--artifact-root",
            artifacts.as_str(),
            "--artifact-max-bytes",
            "8589934592",
        ])?;
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(data_plane::serve(listener, config, shutdown.clone()));
        let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.get(format!("{url}/healthz")).send().await.is_err() {
            ensure!(Instant::now() < deadline, "the data plane did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let now = jsonwebtoken::get_current_timestamp();
        let claims = shared::dataplane::ServiceClaims {
            iss: "control-plane".into(),
            aud: "data-plane".into(),
            sub: "bench".into(),
            tenant: "bench".into(),
            exp: now + 3600,
            nbf: None,
            iat: Some(now),
        };
        let credential = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )?;
        Ok(DataPlaneServer {
            url,
            http,
            credential,
            shutdown,
            handle,
            root,
        })
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let resp = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.credential)
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        let v: Value = resp.json().await?;
        ensure!(status.is_success(), "{path}: {status} {v}");
        Ok(v)
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.handle.await.context("data plane task")??;
        Ok(())
    }
}

/// The four data-plane rows.
pub(super) struct DpRows {
    pub step: Row,
    pub job: Row,
    pub upload: Row,
    pub download: Row,
}

pub(super) async fn phase_data_plane(
    args: &Args,
    sizes: Sizes,
    rows: &mut DpRows,
) -> anyhow::Result<()> {
    let agent = Agent::start(args, "python=2").await?;
    let dp = DataPlaneServer::start(&agent).await?;
    let result = measure(args, sizes, &agent, &dp, rows).await;
    let stopped = dp.stop().await;
    let agent_stopped = agent.stop().await;
    result.and(stopped).and(agent_stopped)
}

async fn measure(
    args: &Args,
    sizes: Sizes,
    agent: &Agent,
    dp: &DataPlaneServer,
    rows: &mut DpRows,
) -> anyhow::Result<()> {
    // 1. Steps: through the data plane, and straight to the agent.
    let session = dp
        .post("/internal/v1/sessions", json!({"runtime": "python"}))
        .await?;
    let sid = session["sessionId"]
        .as_str()
        .context("session id")?
        .to_owned();
    let steps_path = format!("/internal/v1/sessions/{sid}/steps");
    let mut through = Vec::with_capacity(sizes.steps);
    for i in 0..sizes.warmup_steps + sizes.steps {
        let t = Instant::now();
        let r = dp.post(&steps_path, json!({"code": "1+1"})).await?;
        let elapsed = t.elapsed();
        ensure!(r["result"] == json!(2), "step answered {r}");
        if i >= sizes.warmup_steps {
            through.push(elapsed);
        }
    }
    let (direct_id, direct_token) = ("bench-direct".to_owned(), token());
    agent.create(&direct_id, &direct_token).await?;
    let mut direct = Vec::with_capacity(sizes.steps);
    for i in 0..sizes.warmup_steps + sizes.steps {
        let req = shared::agent::StepRequest {
            session_id: direct_id.clone(),
            step_id: format!("d{i}"),
            code: "1+1".into(),
            timeout_ms: None,
            mode: None,
            event: None,
        };
        let t = Instant::now();
        agent.client.step(&req, Some(&direct_token)).await?;
        if i >= sizes.warmup_steps {
            direct.push(t.elapsed());
        }
    }
    rows.step.series = Some(Series::ms(
        "step through the data plane",
        "POST /internal/v1/sessions/{id}/steps `1+1` (service credential, tenant routing, agent hop), sequential",
        &through,
    ));
    rows.step.baseline = Some(Series::ms(
        "step straight to the agent",
        "POST /v1/steps `1+1` on a session of the same agent, same run",
        &direct,
    ));
    agent.delete(&direct_id, &direct_token).await?;
    let resp = dp
        .http
        .delete(format!("{}/internal/v1/sessions/{sid}", dp.url))
        .bearer_auth(&dp.credential)
        .send()
        .await?;
    ensure!(
        resp.status().is_success(),
        "deleting the bench session: {}",
        resp.status()
    );

    // 2. One-shot jobs with the pool full before each (untimed wait).
    let mut jobs = Vec::with_capacity(sizes.warm_n);
    for i in 0..sizes.warmup_creates + sizes.warm_n {
        wait_pool_full(agent).await?;
        let t = Instant::now();
        let r = dp
            .post(
                "/internal/v1/jobs",
                json!({"jobId": format!("bench-{i}"), "code": "1+1"}),
            )
            .await?;
        let elapsed = t.elapsed();
        ensure!(r["result"] == json!(2), "job answered {r}");
        if i >= sizes.warmup_creates {
            jobs.push(elapsed);
        }
    }
    wait_pool_full(agent).await?;
    rows.job.series = Some(Series::ms(
        "one-shot job, warm pool",
        "POST /internal/v1/jobs `1+1`: claim a warm sandbox, run, collect output/, destroy; the pool refilled \
         (untimed) before each",
        &jobs,
    ));

    // 3. Artifacts: encrypted through the data plane vs plain file I/O.
    let mib = args
        .artifact_mib
        .unwrap_or(if args.quick { 32 } else { 256 });
    let reps = if args.quick { 2 } else { 3 };
    let chunk = Bytes::from(
        (0..1024 * 1024)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let (mut up, mut down, mut plain_w, mut plain_r) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps {
        let body = futures::stream::iter((0..mib).map({
            let chunk = chunk.clone();
            move |_| Ok::<Bytes, std::io::Error>(chunk.clone())
        }));
        let t = Instant::now();
        let resp = dp
            .http
            .post(format!("{}/internal/v1/artifacts?name=bench-{rep}", dp.url))
            .bearer_auth(&dp.credential)
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await?;
        let status = resp.status();
        let info: Value = resp.json().await?;
        up.push(t.elapsed().as_secs_f64() * 1000.0 / mib as f64);
        ensure!(status.is_success(), "upload: {status} {info}");
        ensure!(
            info["size"] == json!(mib * 1024 * 1024),
            "upload stored {info}"
        );
        let id = info["artifactId"]
            .as_str()
            .context("artifact id")?
            .to_owned();
        let t = Instant::now();
        let resp = dp
            .http
            .get(format!("{}/internal/v1/artifacts/{id}", dp.url))
            .bearer_auth(&dp.credential)
            .send()
            .await?;
        ensure!(resp.status().is_success(), "download: {}", resp.status());
        let mut stream = resp.bytes_stream();
        let mut got = 0usize;
        while let Some(b) = stream.next().await {
            got += b?.len();
        }
        down.push(t.elapsed().as_secs_f64() * 1000.0 / mib as f64);
        ensure!(got == mib * 1024 * 1024, "download returned {got} bytes");
        let del = dp
            .http
            .delete(format!("{}/internal/v1/artifacts/{id}", dp.url))
            .bearer_auth(&dp.credential)
            .send()
            .await?;
        ensure!(
            del.status().is_success(),
            "artifact delete: {}",
            del.status()
        );

        // Baseline: the same bytes written and read plainly, same filesystem.
        let path = dp.root.path().join(format!("plain-{rep}"));
        let t = Instant::now();
        {
            use tokio::io::AsyncWriteExt;
            let mut f = tokio::io::BufWriter::new(tokio::fs::File::create(&path).await?);
            for _ in 0..mib {
                f.write_all(&chunk).await?;
            }
            f.flush().await?;
            f.get_mut().sync_all().await?;
        }
        plain_w.push(t.elapsed().as_secs_f64() * 1000.0 / mib as f64);
        let t = Instant::now();
        {
            use tokio::io::AsyncReadExt;
            let mut f = tokio::fs::File::open(&path).await?;
            let mut buf = vec![0u8; 256 * 1024];
            while f.read(&mut buf).await? > 0 {}
        }
        plain_r.push(t.elapsed().as_secs_f64() * 1000.0 / mib as f64);
        tokio::fs::remove_file(&path).await?;
    }
    let what = |dir: &str| {
        format!(
            "{mib} MiB {dir} through /internal/v1/artifacts (AES-256-GCM, 64 KiB chunks, fsync), ms per MiB; 5 ms/MiB = 200 MiB/s"
        )
    };
    rows.upload.series = Some(Series::new("encrypted upload", &what("up"), "ms/MiB", up));
    rows.upload.baseline = Some(Series::new(
        "plain write + fsync",
        "the same bytes written to a file on the same filesystem",
        "ms/MiB",
        plain_w,
    ));
    rows.download.series = Some(Series::new(
        "encrypted download",
        &what("down"),
        "ms/MiB",
        down,
    ));
    rows.download.baseline = Some(Series::new(
        "plain read",
        "the same bytes read back from the file (page cache)",
        "ms/MiB",
        plain_r,
    ));
    Ok(())
}
