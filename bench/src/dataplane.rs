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
        DataPlaneServer::start_with(
            &[
                "--agent-endpoint",
                agent.url.as_str(),
                "--agent-admin-token",
                agent.admin_token.as_str(),
            ],
            None,
        )
        .await
    }

    /// A data plane with the `k8s` backend on `cluster`.
    async fn start_k8s(cluster: kube::Client, warm_pool: &str) -> anyhow::Result<DataPlaneServer> {
        DataPlaneServer::start_with(
            &[
                "--backend",
                "k8s",
                "--runtime-owner",
                "bench",
                "--runtime-warm-pool",
                warm_pool,
            ],
            Some(cluster),
        )
        .await
    }

    async fn start_with(
        backend: &[&str],
        cluster: Option<kube::Client>,
    ) -> anyhow::Result<DataPlaneServer> {
        let root = tempfile::Builder::new()
            .prefix("dp-bench-")
            .tempdir_in("/tmp")?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let artifacts = root.path().join("artifacts").display().to_string();
        let mut args = vec![
            "data-plane",
            "--env",
            "dev",
            "--jwt-secret",
            SECRET,
            "--artifact-root",
            artifacts.as_str(),
            "--artifact-max-bytes",
            "8589934592",
        ];
        args.extend_from_slice(backend);
        let config = <data_plane::Config as Parser>::try_parse_from(args)?;
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(data_plane::serve_with_cluster(
            listener,
            config,
            shutdown.clone(),
            cluster,
        ));
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

    async fn delete(&self, path: &str) -> anyhow::Result<()> {
        let resp = self
            .http
            .delete(format!("{}{path}", self.url))
            .bearer_auth(&self.credential)
            .send()
            .await?;
        ensure!(
            resp.status().is_success(),
            "DELETE {path}: {}",
            resp.status()
        );
        Ok(())
    }

    /// Idle warm sandboxes of `runtime`, as `/metrics` reports them.
    async fn warm_idle(&self, runtime: &str) -> anyhow::Result<usize> {
        let text = self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .await?
            .text()
            .await?;
        let label = format!("runtime=\"{runtime}\"");
        Ok(text
            .lines()
            .filter(|l| l.contains("warm_pool_idle") && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .next()
            .unwrap_or(0))
    }

    async fn wait_warm(&self, runtime: &str, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.warm_idle(runtime).await? < n {
            ensure!(Instant::now() < deadline, "the warm pool did not fill");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
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

/// The `k8s` backend's rows: a warm-pool claim and a cold create through
/// the data plane, against the `k8s-fixture` stand-in cluster (its pods run
/// the real agent with gVisor), beside the same two through the `local`
/// backend in the same run.
pub(super) struct K8sRows {
    pub warm: Row,
    pub cold: Row,
}

/// Creates `n` sessions one at a time (each deleted before the next, the
/// pool refilled first when `warm`) and times each create.
async fn creates(dp: &DataPlaneServer, n: usize, warm: bool) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    // Non-default limits never take a warm sandbox, in either backend.
    let body = if warm {
        json!({"runtime": "python"})
    } else {
        json!({"runtime": "python", "limits": {"memoryMb": 256}})
    };
    for _ in 0..n {
        if warm {
            dp.wait_warm("python", 2).await?;
        }
        let t = Instant::now();
        let created = dp.post("/internal/v1/sessions", body.clone()).await?;
        out.push(t.elapsed());
        ensure!(
            created["warm"] == json!(warm),
            "expected warm={warm}: {created}"
        );
        let id = created["sessionId"].as_str().context("session id")?;
        dp.delete(&format!("/internal/v1/sessions/{id}")).await?;
    }
    Ok(out)
}

pub(super) async fn phase_k8s(args: &Args, sizes: Sizes, rows: &mut K8sRows) -> anyhow::Result<()> {
    let n_warm = sizes.warm_n.clamp(5, 20);
    let n_cold = sizes.cold_n.clamp(3, 8);
    // local: an agent with python=2 behind a data plane.
    let agent = Agent::start(args, "python=2").await?;
    let dp = DataPlaneServer::start(&agent).await?;
    let local_warm = creates(&dp, n_warm, true).await;
    let local_cold = creates(&dp, n_cold, false).await;
    dp.stop().await?;
    agent.stop().await?;
    // k8s: the fixture's pods, python=2 warm.
    let fixture = k8s_fixture::Fixture::start(
        k8s_fixture::FixtureOptions::default().isolation(&k8s_fixture::isolation_from_env()),
    )
    .await;
    let dp = DataPlaneServer::start_k8s(fixture.client(), "python=2").await?;
    let k8s_warm = creates(&dp, n_warm, true).await;
    let k8s_cold = creates(&dp, n_cold, false).await;
    dp.stop().await?;
    fixture.shutdown().await;
    rows.warm.series = Some(Series::ms(
        "k8s warm-pool claim",
        "POST /internal/v1/sessions with the runtime's default limits, SESSION_RUNTIME_BACKEND=k8s, \
         RUNTIME_WARM_POOL=python=2, against k8s-fixture (a stand-in API server whose pods run the real \
         agent in gVisor): an in-memory claim, one call to the pod's agent, labels in the background",
        &k8s_warm?,
    ));
    rows.warm.baseline = Some(Series::ms(
        "local warm create",
        "the same create through the local backend (agent warm pool python=2)",
        &local_warm?,
    ));
    rows.cold.series = Some(Series::ms(
        "k8s cold create",
        "POST /internal/v1/sessions with memoryMb=256 (no warm pod fits): pod create, fixture \
         scheduling and agent start, the data plane's ready wait, the agent's gVisor sandbox start",
        &k8s_cold?,
    ));
    rows.cold.baseline = Some(Series::ms(
        "local cold create",
        "the same create through the local backend (a new gVisor sandbox)",
        &local_cold?,
    ));
    Ok(())
}
