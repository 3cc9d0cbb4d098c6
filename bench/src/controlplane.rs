//! The control plane's figures (issue 5), each against the data-plane
//! figure measured in the same run:
//! - a warm Python step through control plane -> data plane -> agent vs the
//!   same step sent to the data plane directly;
//! - the same step as the `run_step` MCP tool (rmcp client, Streamable HTTP
//!   on the MCP port) vs the REST step of the same run (target: p50 <= 1.5x);
//! - a one-shot job, submit to result (POST, then a long poll), warm pool,
//!   vs the data plane's synchronous job;
//! - sustained one-shot jobs, on SQLite and on PostgreSQL, as ms per job
//!   (100 ms/job = 10 jobs/s) over a burst submitted at once;
//! - the rate limiter's cost: the same warm step through a control plane
//!   whose buckets are in Redis and through one without limits, interleaved
//!   (target: p50 of the per-pair difference <= 0.3 ms).
//!
//! The control planes of the other rows run with the rate limits off, so a
//! burst of the throughput row is never refused and those figures stay
//! comparable with earlier runs.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Parser;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::harness::{Agent, token, wait_pool};
use crate::report::{Row, Series};
use crate::{Args, Sizes};

const DP_SECRET: &str = "bench-dp-secret-bench-dp-secret-bench!";
/// Warm sandboxes kept by the agent in this phase.
const POOL: usize = 4;
const USER_SECRET: &str = "bench-user-secret-bench-user-secret!!";
/// The machine's Redis (the limiter row).
const REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Control-plane flags that turn the rate limits off.
const LIMITS_OFF: &[&str] = &[
    "--rate-limit-requests-per-minute",
    "0",
    "--rate-limit-creates-per-minute",
    "0",
];

struct Server {
    url: String,
    /// The MCP port (`/mcp`, `/tools/*`); empty for the data plane.
    mcp: String,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.handle.await.context("server task")??;
        Ok(())
    }
}

async fn wait_up(http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{url}/healthz")).send().await.is_err() {
        ensure!(Instant::now() < deadline, "{url} did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn start_dp(agent: &Agent, root: &std::path::Path) -> anyhow::Result<Server> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let artifacts = root.join("artifacts").display().to_string();
    let config = <data_plane::Config as Parser>::try_parse_from([
        "data-plane",
        "--env",
        "dev",
        "--jwt-secret",
        DP_SECRET,
        "--agent-endpoint",
        agent.url.as_str(),
        "--agent-admin-token",
        agent.admin_token.as_str(),
        "--artifact-root",
        artifacts.as_str(),
    ])?;
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(data_plane::serve(listener, config, shutdown.clone()));
    Ok(Server {
        url,
        mcp: String::new(),
        shutdown,
        handle,
    })
}

/// A control plane on `driver`/`url` (Postgres: in `schema`).
async fn start_cp(
    dp_url: &str,
    driver: &str,
    url: &str,
    schema: Option<&str>,
    extra: &[&str],
) -> anyhow::Result<Server> {
    let base = [
        "control-plane",
        "--env",
        "dev",
        "--jwt-secret",
        USER_SECRET,
        "--data-plane-secret",
        DP_SECRET,
        "--data-plane-url",
        dp_url,
        "--database-driver",
        driver,
        "--database-url",
        url,
        "--job-workers",
        "8",
    ];
    let config = <control_plane::Config as Parser>::try_parse_from(
        base.iter().chain(extra.iter()).copied(),
    )?;
    let db = control_plane::storage::Db::connect_in_schema(
        config.database_driver,
        url,
        config.database_max_connections,
        schema,
    )
    .await
    .with_context(|| format!("{driver} database"))?;
    let app = control_plane::App::build_with_db(config, db)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = format!("http://{}", listener.local_addr()?);
    let mcp_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mcp = format!("http://{}", mcp_listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(control_plane::serve_all(
        listener,
        Some(mcp_listener),
        app,
        shutdown.clone(),
    ));
    Ok(Server {
        url: addr,
        mcp,
        shutdown,
        handle,
    })
}

fn user_token() -> anyhow::Result<String> {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = control_plane::identity::Claims {
        iss: "sandbox-dev-idp".into(),
        aud: "control-plane".into(),
        sub: "bench".into(),
        exp: now + 3600,
        nbf: None,
        iat: Some(now),
        tenant: "bench".into(),
        app: None,
        agent: None,
        roles: vec!["agent".into()],
    };
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(USER_SECRET.as_bytes()),
    )?)
}

fn dp_credential() -> anyhow::Result<String> {
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
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(DP_SECRET.as_bytes()),
    )?)
}

/// An MCP client of `mcp` (the MCP port's base URL), initialized.
async fn mcp_client(
    mcp: &str,
    token: &str,
) -> anyhow::Result<rmcp::service::RunningService<rmcp::RoleClient, ()>> {
    use rmcp::ServiceExt;
    use rmcp::transport::StreamableHttpClientTransport;
    use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let transport = StreamableHttpClientTransport::with_client(
        http,
        StreamableHttpClientTransportConfig::with_uri(format!("{mcp}/mcp")).auth_header(token),
    );
    ().serve(transport).await.context("MCP initialize")
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    auth: &str,
    body: &Value,
) -> anyhow::Result<Value> {
    let resp = http.post(url).bearer_auth(auth).json(body).send().await?;
    let status = resp.status();
    let v: Value = resp.json().await?;
    ensure!(status.is_success(), "{url}: {status} {v}");
    Ok(v)
}

/// The control-plane rows.
pub(super) struct CpRows {
    pub step: Row,
    pub mcp_step: Row,
    pub job: Row,
    pub throughput_sqlite: Row,
    pub throughput_postgres: Row,
    pub limiter: Row,
    /// Artifact upload through `POST /v1/artifacts` vs the data plane directly.
    pub artifact_upload: Row,
    /// Artifact download through `GET /v1/artifacts/{id}` vs the data plane directly.
    pub artifact_download: Row,
}

pub(super) async fn phase_control_plane(
    args: &Args,
    sizes: Sizes,
    rows: &mut CpRows,
) -> anyhow::Result<()> {
    let agent = Agent::start(args, &format!("python={POOL}")).await?;
    let root = tempfile::Builder::new()
        .prefix("cp-bench-")
        .tempdir_in("/tmp")?;
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let dp = start_dp(&agent, root.path()).await?;
    wait_up(&http, &dp.url).await?;
    let sqlite_url = format!("file:{}/cp.db?mode=rwc", root.path().display());
    let cp = start_cp(&dp.url, "sqlite", &sqlite_url, None, LIMITS_OFF).await?;
    wait_up(&http, &cp.url).await?;
    let result = measure(args, sizes, &agent, &http, &dp.url, &cp, rows).await;
    let artifacts = artifact_throughput(
        args,
        &http,
        &dp.url,
        &cp.url,
        &mut rows.artifact_upload,
        &mut rows.artifact_download,
    )
    .await;
    let stopped = cp.stop().await;
    let limiter = limiter_cost(sizes, &http, &dp.url, root.path(), &mut rows.limiter).await;

    // The same burst on PostgreSQL, in a schema of its own.
    let pg = async {
        let pg_url = std::env::var("DATABASE_TEST_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let schema = format!("cp_bench_{}", hex::encode(rand::random::<[u8; 4]>()));
        let cp = start_cp(&dp.url, "postgres", &pg_url, Some(&schema), LIMITS_OFF).await?;
        wait_up(&http, &cp.url).await?;
        let r = throughput(args, &agent, &http, &cp.url, &mut rows.throughput_postgres).await;
        let stopped = cp.stop().await;
        let admin = sqlx::PgPool::connect(&pg_url).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE"
        )))
        .execute(&admin)
        .await?;
        admin.close().await;
        r.and(stopped)
    }
    .await;
    let dp_stopped = dp.stop().await;
    let agent_stopped = agent.stop().await;
    result
        .and(artifacts)
        .and(stopped)
        .and(limiter)
        .and(pg)
        .and(dp_stopped)
        .and(agent_stopped)
}

async fn measure(
    args: &Args,
    sizes: Sizes,
    agent: &Agent,
    http: &reqwest::Client,
    dp: &str,
    cp_server: &Server,
    rows: &mut CpRows,
) -> anyhow::Result<()> {
    let cp = cp_server.url.as_str();
    let user = user_token()?;
    let mcp = mcp_client(&cp_server.mcp, &user).await?;
    let cred = dp_credential()?;
    // 1. Steps: through the control plane, and to the data plane directly.
    let session = post(http, &format!("{cp}/v1/sessions"), &user, &json!({})).await?;
    let sid = session["sessionId"]
        .as_str()
        .context("session id")?
        .to_owned();
    let direct = post(
        http,
        &format!("{dp}/internal/v1/sessions"),
        &cred,
        &json!({}),
    )
    .await?;
    let did = direct["sessionId"]
        .as_str()
        .context("session id")?
        .to_owned();
    let (mut via_cp, mut via_dp, mut via_mcp) = (Vec::new(), Vec::new(), Vec::new());
    let body = json!({"code": "1+1"});
    let step_args = json!({"sessionId": sid, "code": "1+1"});
    let serde_json::Value::Object(step_args) = step_args else {
        anyhow::bail!("arguments are an object")
    };
    for i in 0..sizes.warmup_steps + sizes.steps {
        // Interleaved, so both see the same machine noise.
        let t = Instant::now();
        let r = post(http, &format!("{cp}/v1/sessions/{sid}/steps"), &user, &body).await?;
        let a = t.elapsed();
        ensure!(r["result"] == json!(2), "step answered {r}");
        let t = Instant::now();
        let r = post(
            http,
            &format!("{dp}/internal/v1/sessions/{did}/steps"),
            &cred,
            &body,
        )
        .await?;
        let b = t.elapsed();
        ensure!(r["result"] == json!(2), "step answered {r}");
        let t = Instant::now();
        let r = mcp
            .call_tool(
                rmcp::model::CallToolRequestParams::new("run_step")
                    .with_arguments(step_args.clone()),
            )
            .await
            .context("run_step over MCP")?;
        let c = t.elapsed();
        ensure!(
            r.is_error != Some(true)
                && r.structured_content.as_ref().map(|v| &v["result"]) == Some(&json!(2)),
            "run_step answered {r:?}"
        );
        if i >= sizes.warmup_steps {
            via_cp.push(a);
            via_dp.push(b);
            via_mcp.push(c);
        }
    }
    mcp.cancel().await.context("closing the MCP client")?;
    rows.step.series = Some(Series::ms(
        "step through the control plane",
        "POST /v1/sessions/{id}/steps `1+1`: JWT, policy (regorus), write-ahead and completion audit events + step \
         history on SQLite, data plane, agent; sequential",
        &via_cp,
    ));
    rows.step.baseline = Some(Series::ms(
        "step through the data plane",
        "POST /internal/v1/sessions/{id}/steps `1+1`, interleaved with the row's samples",
        &via_dp,
    ));
    rows.mcp_step.series = Some(Series::ms(
        "run_step tool through MCP",
        "tools/call run_step `1+1` with the rmcp client (Streamable HTTP, stateless, JSON response) on the MCP \
         port: the same JWT, policy, audit and step history as REST, plus the tool's rendering; same session",
        &via_mcp,
    ));
    rows.mcp_step.baseline = Some(Series::ms(
        "step through REST (row above)",
        "POST /v1/sessions/{id}/steps `1+1`, interleaved with the row's samples",
        &via_cp,
    ));
    for (url, auth) in [
        (format!("{cp}/v1/sessions/{sid}"), &user),
        (format!("{dp}/internal/v1/sessions/{did}"), &cred),
    ] {
        let r = http.delete(&url).bearer_auth(auth).send().await?;
        ensure!(r.status().is_success(), "delete {url}: {}", r.status());
    }

    // 2. One job at a time, the pool full before each (untimed).
    let (mut via_cp, mut via_dp) = (Vec::new(), Vec::new());
    for i in 0..sizes.warmup_creates + sizes.warm_n {
        wait_pool(agent, POOL).await?;
        let t = Instant::now();
        let job = post(
            http,
            &format!("{cp}/v1/jobs"),
            &user,
            &json!({"code": "1+1"}),
        )
        .await?;
        let id = job["jobId"].as_str().context("job id")?;
        let done: Value = http
            .get(format!("{cp}/v1/jobs/{id}?waitMs=30000"))
            .bearer_auth(&user)
            .send()
            .await?
            .json()
            .await?;
        let a = t.elapsed();
        ensure!(done["status"] == "succeeded", "job ended {done}");
        wait_pool(agent, POOL).await?;
        let t = Instant::now();
        let r = post(
            http,
            &format!("{dp}/internal/v1/jobs"),
            &cred,
            &json!({"jobId": format!("cp-bench-{i}"), "code": "1+1"}),
        )
        .await?;
        let b = t.elapsed();
        ensure!(r["result"] == json!(2), "job answered {r}");
        if i >= sizes.warmup_creates {
            via_cp.push(a);
            via_dp.push(b);
        }
    }
    rows.job.series = Some(Series::ms(
        "one-shot job through the control plane",
        "POST /v1/jobs `1+1` then GET /v1/jobs/{id}?waitMs: queued in SQLite, dispatched by a worker, run by the data \
         plane in a warm sandbox; the pool refilled (untimed) before each",
        &via_cp,
    ));
    rows.job.baseline = Some(Series::ms(
        "one-shot job on the data plane",
        "POST /internal/v1/jobs `1+1` (synchronous), same pool state",
        &via_dp,
    ));

    // 3. Sustained jobs on SQLite.
    throughput(args, agent, http, cp, &mut rows.throughput_sqlite).await
}

/// The rate limiter's cost on a warm step: two control planes in front of
/// the same data plane, one with its buckets in Redis (limits high enough
/// never to refuse: every step still takes a token with one EVALSHA), one
/// with the limits off; steps alternate between them. The row's series is
/// the per-pair difference; both raw series are informational. The Redis
/// keys are under a prefix of the run's own and expire by themselves (a
/// full bucket's key lives no longer than it takes to refill).
async fn limiter_cost(
    sizes: Sizes,
    http: &reqwest::Client,
    dp: &str,
    root: &std::path::Path,
    row: &mut Row,
) -> anyhow::Result<()> {
    let prefix = format!("cp-bench-{}:", hex::encode(rand::random::<[u8; 4]>()));
    let on_url = format!("file:{}/cp-limiter-on.db?mode=rwc", root.display());
    let off_url = format!("file:{}/cp-limiter-off.db?mode=rwc", root.display());
    let on = start_cp(
        dp,
        "sqlite",
        &on_url,
        None,
        &[
            "--redis-url",
            REDIS_URL,
            "--redis-key-prefix",
            &prefix,
            "--rate-limit-requests-per-minute",
            "100000000",
            "--rate-limit-burst",
            "100000000",
        ],
    )
    .await?;
    let off = start_cp(dp, "sqlite", &off_url, None, LIMITS_OFF).await?;
    let measured = async {
        wait_up(http, &on.url).await?;
        wait_up(http, &off.url).await?;
        let user = user_token()?;
        let mut sids = Vec::new();
        for cp in [&on.url, &off.url] {
            let s = post(http, &format!("{cp}/v1/sessions"), &user, &json!({})).await?;
            sids.push(s["sessionId"].as_str().context("session id")?.to_owned());
        }
        let body = json!({"code": "1+1"});
        let (mut with, mut without, mut added) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..sizes.warmup_steps + sizes.steps {
            let mut took = [Duration::ZERO; 2];
            for (k, (cp, sid)) in [&on.url, &off.url].iter().zip(&sids).enumerate() {
                let t = Instant::now();
                let resp = http
                    .post(format!("{cp}/v1/sessions/{sid}/steps"))
                    .bearer_auth(&user)
                    .json(&body)
                    .send()
                    .await?;
                let limited = resp.headers().contains_key("ratelimit-limit");
                let r: Value = resp.json().await?;
                took[k] = t.elapsed();
                ensure!(r["result"] == json!(2), "step answered {r}");
                ensure!(
                    limited == (k == 0),
                    "RateLimit headers only from the limited control plane"
                );
            }
            if i >= sizes.warmup_steps {
                with.push(took[0]);
                without.push(took[1]);
                added.push(took[0].as_secs_f64() * 1000.0 - took[1].as_secs_f64() * 1000.0);
            }
        }
        for (cp, sid) in [&on.url, &off.url].iter().zip(&sids) {
            let r = http
                .delete(format!("{cp}/v1/sessions/{sid}"))
                .bearer_auth(&user)
                .send()
                .await?;
            ensure!(r.status().is_success(), "delete session: {}", r.status());
        }
        row.series = Some(Series::new(
            "added by the Redis rate limiter",
            "per pair of interleaved steps: (step through a control plane whose request bucket is in Redis: one \
             EVALSHA per request) minus (the same step through a control plane with the limits off)",
            "ms",
            added,
        ));
        row.informational.push(Series::ms(
            "step, Redis limiter on",
            "POST /v1/sessions/{id}/steps `1+1`, buckets in Redis on 127.0.0.1",
            &with,
        ));
        row.informational.push(Series::ms(
            "step, limits off",
            "POST /v1/sessions/{id}/steps `1+1`, RATE_LIMIT_*_PER_MINUTE=0",
            &without,
        ));
        Ok(())
    }
    .await;
    let a = on.stop().await;
    let b = off.stop().await;
    measured.and(a).and(b)
}

/// Submits a burst of jobs at once and waits for all: ms per job over the
/// whole burst, three bursts.
async fn throughput(
    args: &Args,
    agent: &Agent,
    http: &reqwest::Client,
    cp: &str,
    row: &mut Row,
) -> anyhow::Result<()> {
    let user = user_token()?;
    let n: usize = if args.quick { 20 } else { 60 };
    let mut per_job = Vec::new();
    let mut failures = 0usize;
    for _ in 0..3 {
        wait_pool(agent, POOL).await?;
        let t = Instant::now();
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let job = post(
                http,
                &format!("{cp}/v1/jobs"),
                &user,
                &json!({"code": format!("{i}*2")}),
            )
            .await?;
            ids.push(job["jobId"].as_str().context("job id")?.to_owned());
        }
        for id in &ids {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let done: Value = http
                    .get(format!("{cp}/v1/jobs/{id}?waitMs=10000"))
                    .bearer_auth(&user)
                    .send()
                    .await?
                    .json()
                    .await?;
                match done["status"].as_str() {
                    Some("succeeded") => break,
                    Some("failed" | "cancelled") => {
                        failures += 1;
                        break;
                    }
                    _ => ensure!(Instant::now() < deadline, "job {id} did not finish: {done}"),
                }
            }
        }
        per_job.push(t.elapsed().as_secs_f64() * 1000.0 / n as f64);
    }
    ensure!(failures == 0, "{failures} jobs failed under load");
    // Baseline: the same number of single-use sandboxes cycled straight on
    // the agent (create, one step, delete; 8 at a time): what the machine
    // can churn, whatever sits in front of it.
    let mut churn = Vec::new();
    for _ in 0..3 {
        wait_pool(agent, POOL).await?;
        churn.push(agent_churn(agent, n, 8).await?);
    }
    row.baseline = Some(Series::new(
        "sandbox churn on the agent",
        &format!(
            "{n} create + `1+1` + delete cycles straight to the agent, 8 concurrent, ms per cycle"
        ),
        "ms/job",
        churn,
    ));
    row.series = Some(Series::new(
        "sustained jobs",
        &format!(
            "{n} jobs submitted at once, then all awaited; 8 workers, agent warm pool python=4; ms per job \
             over the burst (100 ms/job = 10 jobs/s), three bursts, no failure allowed"
        ),
        "ms/job",
        per_job,
    ));
    Ok(())
}

/// `n` single-use sessions on the agent, `concurrency` at a time; ms each.
async fn agent_churn(agent: &Agent, n: usize, concurrency: usize) -> anyhow::Result<f64> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let client = agent.client.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return Ok::<(), anyhow::Error>(());
                }
                let (id, tok) = (
                    format!("churn-{i}-{}", hex::encode(rand::random::<[u8; 4]>())),
                    token(),
                );
                let req = shared::agent::CreateSessionRequest {
                    session_id: id.clone(),
                    runtime: "python".into(),
                    token: Some(tok.clone()),
                    limits: None,
                    env: None,
                    ttl_seconds: None,
                    idle_timeout_seconds: None,
                    packages_dir: None,
                    secrets: None,
                };
                client.create_session(&req).await?;
                let step = shared::agent::StepRequest {
                    session_id: id.clone(),
                    step_id: "1".into(),
                    code: "1+1".into(),
                    timeout_ms: None,
                    mode: None,
                    event: None,
                };
                client.step(&step, Some(&tok)).await?;
                client.delete_session(&id, Some(&tok)).await?;
            }
        }));
    }
    for task in tasks {
        task.await.context("churn task")??;
    }
    Ok(t.elapsed().as_secs_f64() * 1000.0 / n as f64)
}

/// Streams `mib` MiB to `url` and downloads the stored artifact from
/// `download` (+ id) again: (ms per MiB up, ms per MiB down).
async fn artifact_round(
    http: &reqwest::Client,
    upload: &str,
    download: &str,
    auth: &str,
    mib: usize,
    chunk: &bytes::Bytes,
) -> anyhow::Result<(f64, f64)> {
    use futures::StreamExt;
    let body = futures::stream::iter((0..mib).map({
        let chunk = chunk.clone();
        move |_| Ok::<bytes::Bytes, std::io::Error>(chunk.clone())
    }));
    let t = Instant::now();
    let resp = http
        .post(upload)
        .bearer_auth(auth)
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await?;
    let status = resp.status();
    let info: Value = resp.json().await?;
    let up = t.elapsed().as_secs_f64() * 1000.0 / mib as f64;
    ensure!(status.is_success(), "{upload}: {status} {info}");
    ensure!(
        info["size"] == json!(mib * 1024 * 1024),
        "upload stored {info}"
    );
    let url = format!("{download}/{}", info["artifactId"].as_str().context("id")?);
    let t = Instant::now();
    let resp = http.get(&url).bearer_auth(auth).send().await?;
    ensure!(resp.status().is_success(), "{url}: {}", resp.status());
    let mut stream = resp.bytes_stream();
    let mut got = 0usize;
    while let Some(b) = stream.next().await {
        got += b?.len();
    }
    let down = t.elapsed().as_secs_f64() * 1000.0 / mib as f64;
    ensure!(got == mib * 1024 * 1024, "{url} returned {got} bytes");
    let del = http.delete(&url).bearer_auth(auth).send().await?;
    ensure!(del.status().is_success(), "delete {url}: {}", del.status());
    Ok((up, down))
}

/// Artifact upload and download through the control plane (`/v1/artifacts`,
/// streamed through to the data plane) and to the data plane directly,
/// interleaved, same bytes, same store: ms per MiB (target through the
/// control plane: >= 150 MiB/s, i.e. <= 6.7 ms/MiB).
async fn artifact_throughput(
    args: &Args,
    http: &reqwest::Client,
    dp: &str,
    cp: &str,
    upload_row: &mut Row,
    download_row: &mut Row,
) -> anyhow::Result<()> {
    let mib = args
        .artifact_mib
        .unwrap_or(if args.quick { 32 } else { 256 });
    let reps = if args.quick { 2 } else { 3 };
    let chunk = bytes::Bytes::from(
        (0..1024 * 1024)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let user = user_token()?;
    let cred = dp_credential()?;
    let (mut cp_up, mut cp_down, mut dp_up, mut dp_down) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps {
        let (u, d) = artifact_round(
            http,
            &format!("{dp}/internal/v1/artifacts?name=direct-{rep}"),
            &format!("{dp}/internal/v1/artifacts"),
            &cred,
            mib,
            &chunk,
        )
        .await?;
        dp_up.push(u);
        dp_down.push(d);
        let (u, d) = artifact_round(
            http,
            &format!("{cp}/v1/artifacts?name=via-cp-{rep}"),
            &format!("{cp}/v1/artifacts"),
            &user,
            mib,
            &chunk,
        )
        .await?;
        cp_up.push(u);
        cp_down.push(d);
    }
    let what = |dir: &str, route: &str| {
        format!(
            "{mib} MiB {dir} through {route} (streamed; AES-256-GCM, 64 KiB chunks, fsync in the data plane), \
             ms per MiB; 6.7 ms/MiB = 150 MiB/s"
        )
    };
    upload_row.series = Some(Series::new(
        "upload via control plane",
        &what("up", "POST /v1/artifacts"),
        "ms/MiB",
        cp_up,
    ));
    upload_row.baseline = Some(Series::new(
        "upload to data plane",
        &what("up", "POST /internal/v1/artifacts, same run"),
        "ms/MiB",
        dp_up,
    ));
    download_row.series = Some(Series::new(
        "download via control plane",
        &what("down", "GET /v1/artifacts/{id}"),
        "ms/MiB",
        cp_down,
    ));
    download_row.baseline = Some(Series::new(
        "download from data plane",
        &what("down", "GET /internal/v1/artifacts/{id}, same run"),
        "ms/MiB",
        dp_down,
    ));
    Ok(())
}
