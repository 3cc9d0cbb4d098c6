//! The agent as a real process: SIGTERM reaps every sandbox it started, and
//! a restart after kill -9 destroys what the dead agent left behind.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // the test runs the agent binary and runsc

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::token;
use serde_json::json;
use shared::client::AgentClient;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The agent's creation credential (the data plane's, in production).
const ADMIN_TOKEN: &str = "lifecycle-test-admin-credential-0123456789abcdef";

fn spawn_agent(state: &Path, port: u16, pool: &str) -> Child {
    let iso = common::isolation();
    Command::new(env!("CARGO_BIN_EXE_session-agent"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SESSION_AGENT_ADDR", format!("127.0.0.1:{port}"))
        .env("SESSION_AGENT_STATE_DIR", state)
        .env("SESSION_ISOLATION", iso)
        .env("SESSION_AGENT_WARM_POOL", pool)
        .env("SESSION_AGENT_ADMIN_TOKEN", ADMIN_TOKEN)
        // A canary in the agent's own environment must never reach a sandbox.
        .env("AGENT_SECRET_CANARY", "canary-8d1f0b7e")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn session-agent")
}

/// Starts the agent binary on a free port and waits until it answers.
async fn start_agent(state: &Path, pool: &str) -> (Child, AgentClient) {
    let port = free_port();
    let child = spawn_agent(state, port, pool);
    let client = AgentClient::new(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .with_admin_token(Some(ADMIN_TOKEN.into()));
    wait_healthy(&client).await;
    (child, client)
}

async fn wait_healthy(client: &AgentClient) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.health().await.is_err() {
        assert!(Instant::now() < deadline, "agent did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sandboxes still known to runsc under this agent's state dir.
fn runsc_containers(state: &Path) -> Vec<String> {
    if common::isolation() != "gvisor" {
        return vec![];
    }
    let out = Command::new("runsc")
        .arg(format!("--root={}", state.join("runsc").display()))
        .args(["list", "-quiet"])
        .output()
        .expect("runsc list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// Host processes whose command line mentions this agent's state dir.
fn processes_under(state: &Path) -> Vec<String> {
    let needle = state.display().to_string();
    let mut out = vec![];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(&needle) {
                out.push(format!("{name}: {cmd}"));
            }
        }
    }
    out
}

fn mounts_under(state: &Path) -> Vec<String> {
    let needle = format!("{}/", state.display());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|mp| mp.starts_with(&needle))
        .map(str::to_owned)
        .collect()
}

/// Files runsc keeps in this agent's runsc root (state and lock files).
fn runsc_root_files(state: &Path) -> Vec<String> {
    std::fs::read_dir(state.join("runsc"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Sandbox cgroups of this agent, in any hierarchy.
fn cgroups_of(state: &Path) -> Vec<std::path::PathBuf> {
    session_agent::isolation::CgroupParent::discover("session-agent", state).children()
}

/// Everything a stopped agent must not leave on the host.
fn assert_nothing_left(state: &Path, when: &str) {
    assert_eq!(
        runsc_containers(state),
        Vec::<String>::new(),
        "containers left {when}"
    );
    assert_eq!(
        processes_under(state),
        Vec::<String>::new(),
        "processes left {when}"
    );
    assert_eq!(
        mounts_under(state),
        Vec::<String>::new(),
        "workspace mounts left {when}"
    );
    assert_eq!(
        runsc_root_files(state),
        Vec::<String>::new(),
        "runsc state left {when}"
    );
    assert_eq!(
        cgroups_of(state),
        Vec::<std::path::PathBuf>::new(),
        "sandbox cgroups left {when}"
    );
    let bundles = std::fs::read_dir(state.join("bundles"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(bundles, 0, "sandbox bundles left {when}");
}

/// Sends SIGTERM and waits (30 s at most) for a clean exit.
async fn terminate(child: &mut Child) {
    rustix::process::kill_process(
        rustix::process::Pid::from_child(child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not stop within 30 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "agent exited with {status}");
}

async fn create(client: &AgentClient, id: &str, runtime: &str, t: &str) {
    let req = common::create_request(id, runtime, t);
    client
        .create_session(&req)
        .await
        .unwrap_or_else(|e| panic!("create {id}: {e}"));
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn sigterm_reaps_every_sandbox() {
    let state = tempfile::Builder::new()
        .prefix("sa-life-")
        .tempdir_in("/tmp")
        .unwrap();
    let (mut child, client) = start_agent(state.path(), "python=1").await;
    let t = token();
    create(&client, "a", "python", &t).await;
    create(&client, "b", "bash", &t).await;
    // The agent's environment does not leak into the sandbox.
    let req = shared::agent::StepRequest {
        step_id: "env".into(),
        ..common::step_request(
            "a",
            "import os\n[k for k in os.environ] + [open('/proc/1/environ','rb').read().decode(errors='replace')]",
        )
    };
    let r = client.step(&req, Some(&t)).await.unwrap();
    assert!(
        !serde_json::to_string(&r.result).unwrap().contains("canary"),
        "{:?}",
        r.result
    );
    // Wait for the warm sandbox too, so three sandboxes are live.
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.health().await.unwrap().warm_pool.get("python") != Some(&1) {
        assert!(Instant::now() < deadline, "pool did not fill");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if common::isolation() == "gvisor" {
        assert_eq!(runsc_containers(state.path()).len(), 3);
    }
    assert!(!processes_under(state.path()).is_empty());
    assert_eq!(mounts_under(state.path()).len(), 3);

    assert!(!cgroups_of(state.path()).is_empty() || common::isolation() == "none");
    terminate(&mut child).await;
    assert_nothing_left(state.path(), "after SIGTERM");
}

/// SIGTERM while the warm pool is still starting its sandboxes: the starts
/// in flight finish and are destroyed, none is cut off midway (a killed
/// launcher would leave runsc's state, the bundle and the cgroups behind).
#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn sigterm_while_the_pool_fills_leaves_nothing() {
    for delay_ms in [0u64, 60, 150] {
        let state = tempfile::Builder::new()
            .prefix("sa-fill-")
            .tempdir_in("/tmp")
            .unwrap();
        let (mut child, _client) = start_agent(state.path(), "python=3,bash=1").await;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        terminate(&mut child).await;
        assert_nothing_left(
            state.path(),
            &format!("after SIGTERM {delay_ms} ms into the pool fill"),
        );
    }
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn restart_after_kill_9_destroys_leftovers() {
    let state = tempfile::Builder::new()
        .prefix("sa-kill-")
        .tempdir_in("/tmp")
        .unwrap();
    let (mut child, client) = start_agent(state.path(), "").await;
    let t = token();
    create(&client, "orphan", "python", &t).await;
    // A busy interpreter: an idle one exits by itself when its stdin closes
    // with the agent, a busy one would run on without the reaping.
    let busy = {
        let (client, t) = (client.clone(), t.clone());
        tokio::spawn(async move {
            let req = shared::agent::StepRequest {
                step_id: "busy".into(),
                timeout_ms: Some(600_000),
                ..common::step_request("orphan", "import time\ntime.sleep(600)")
            };
            let _ = client.step(&req, Some(&t)).await;
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    busy.abort();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The dead agent's sandbox outlives it...
    assert_eq!(mounts_under(state.path()).len(), 1);
    if common::isolation() == "gvisor" {
        assert_eq!(runsc_containers(state.path()).len(), 1);
    }
    assert!(!cgroups_of(state.path()).is_empty() || common::isolation() == "none");
    // ...until the next agent on the same state dir starts.
    let (mut child, client) = start_agent(state.path(), "").await;
    assert_eq!(runsc_containers(state.path()), Vec::<String>::new());
    assert_eq!(mounts_under(state.path()), Vec::<String>::new());
    assert_eq!(runsc_root_files(state.path()), Vec::<String>::new());
    assert_eq!(cgroups_of(state.path()), Vec::<std::path::PathBuf>::new());
    let leftovers: Vec<String> = processes_under(state.path())
        .into_iter()
        .filter(|p| !p.contains("session-agent"))
        .collect();
    assert_eq!(leftovers, Vec::<String>::new());
    // And it works.
    create(&client, "fresh", "python", &t).await;
    let req = shared::agent::StepRequest {
        step_id: "1".into(),
        ..common::step_request("fresh", "1 + 1")
    };
    assert_eq!(
        client.step(&req, Some(&t)).await.unwrap().result,
        Some(json!(2))
    );
    child.kill().unwrap();
    child.wait().unwrap();
    // Clean up after the second kill -9 with a third, orderly agent.
    let (mut child, _client) = start_agent(state.path(), "").await;
    terminate(&mut child).await;
    assert_nothing_left(state.path(), "after kill -9, restart and SIGTERM");
}
