//! `SESSION_ISOLATION=pod`: the agent of a Kubernetes runtime pod, where the
//! container (a gVisor RuntimeClass pod) is the sandbox and the interpreter
//! runs directly (issue 18 §2). Covers the configuration (the admin
//! credential given as its SHA-256 only; what production demands of pod
//! mode), one session end to end in-process, and, with root, the real binary
//! as uid 65534: code in the session cannot read the agent's memory or
//! environment, nor ptrace it, and finds no credential anywhere.
#![allow(clippy::disallowed_methods)] // runs the real binary (and setpriv to drop it to 65534)

mod common;

use std::time::Duration;

use clap::Parser;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use shared::ErrorCode;
use shared::agent::{StepRequest, StepStatus};
use shared::client::AgentClient;
use tokio_util::sync::CancellationToken;

use common::{create_request, step_request, token};

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// A config from flags only (`--isolation` always given, so a
/// `SESSION_ISOLATION` in the test's environment does not leak in).
fn config(args: &[&str]) -> session_agent::Config {
    let mut v = vec!["session-agent"];
    v.extend_from_slice(args);
    session_agent::Config::parse_from(v)
}

// ---------------------------------------------------------------------------
// Configuration

#[test]
fn the_admin_credential_may_be_given_as_its_digest_in_either_case() {
    let admin = token();
    let want: [u8; 32] = Sha256::digest(admin.as_bytes()).into();
    for digest in [sha256_hex(&admin), sha256_hex(&admin).to_uppercase()] {
        let c = config(&["--isolation", "gvisor", "--admin-token-sha256", &digest]);
        c.validate().expect("a digest is a valid admin credential");
        assert_eq!(c.admin_digest().expect("valid"), Some(want));
        assert_eq!(c.settings().admin_token, Some(want));
        // Hidden in Debug, like the token itself.
        let debug = format!("{c:?}");
        assert!(!debug.contains(&digest), "Debug shows the digest: {debug}");
    }
    // The token form gives the same digest, and hides the token.
    let c = config(&["--isolation", "gvisor", "--admin-token", &admin]);
    assert_eq!(c.admin_digest().expect("valid"), Some(want));
    assert!(!format!("{c:?}").contains(&admin));
}

#[test]
fn a_malformed_digest_or_both_forms_are_refused_naming_the_variable() {
    let admin = token();
    let good = sha256_hex(&admin);
    let bad = [
        format!("{}g", &good[..63]),  // a non-hex digit
        good[..63].to_owned(),        // too short
        format!("{good}0"),           // too long
        format!(" {}", &good[..63]),  // whitespace
        format!("0x{}", &good[..62]), // a prefix
        String::new(),
    ];
    for digest in &bad {
        let e = config(&["--isolation", "gvisor", "--admin-token-sha256", digest])
            .validate()
            .expect_err("a malformed digest is refused");
        assert!(e.contains("SESSION_AGENT_ADMIN_TOKEN_SHA256"), "{e}");
        assert!(e.contains("64 hex digits"), "{e}");
        if !digest.is_empty() {
            assert!(!e.contains(digest.as_str()), "the value is echoed: {e}");
        }
    }
    let e = config(&[
        "--isolation",
        "gvisor",
        "--admin-token",
        &admin,
        "--admin-token-sha256",
        &good,
    ])
    .validate()
    .expect_err("both forms are refused");
    assert!(
        e.contains("SESSION_AGENT_ADMIN_TOKEN and SESSION_AGENT_ADMIN_TOKEN_SHA256"),
        "{e}"
    );
    assert!(!e.contains(&admin) && !e.contains(&good), "{e}");
}

#[test]
fn pod_isolation_in_production_needs_one_session_and_the_admin_credential() {
    let digest = sha256_hex(&token());
    let prod = ["--env", "production", "--isolation", "pod"];
    let with = |extra: &[&str]| {
        let mut args = prod.to_vec();
        args.extend_from_slice(extra);
        config(&args).validate()
    };
    // Too many sessions (the default 64, or 2).
    for extra in [
        vec!["--admin-token-sha256", digest.as_str()],
        vec![
            "--admin-token-sha256",
            digest.as_str(),
            "--max-sessions",
            "2",
        ],
    ] {
        let e = with(&extra).expect_err("pod with several sessions in production");
        assert!(e.contains("SESSION_AGENT_MAX_SESSIONS=1"), "{e}");
        assert!(e.contains("SESSION_ISOLATION=pod"), "{e}");
    }
    // No admin credential.
    let e = with(&["--max-sessions", "1"]).expect_err("pod without admin in production");
    assert!(e.contains("SESSION_AGENT_ADMIN_TOKEN_SHA256"), "{e}");
    assert!(e.contains("SESSION_ISOLATION=pod"), "{e}");
    // Auth bypass stays refused in production.
    let e =
        with(&["--max-sessions", "1", "--auth-bypass", "true"]).expect_err("bypass in production");
    assert!(e.contains("SESSION_AGENT_AUTH_BYPASS"), "{e}");
    // Both conditions met: allowed, with either form of the credential.
    with(&["--max-sessions", "1", "--admin-token-sha256", &digest]).expect("pod in production");
    with(&["--max-sessions", "1", "--admin-token", &token()]).expect("pod in production");
    // Unlike `none`, which production refuses whatever else is set.
    let e = config(&[
        "--env",
        "production",
        "--isolation",
        "none",
        "--max-sessions",
        "1",
        "--admin-token-sha256",
        &digest,
    ])
    .validate()
    .expect_err("none in production");
    assert!(e.contains("SESSION_ISOLATION=none"), "{e}");
    // Outside production pod mode is as free as `none`, and its
    // interpreters need not be under /usr (the image's own, e.g. /opt).
    config(&[
        "--isolation",
        "pod",
        "--admin-token-sha256",
        &digest,
        "--python",
        "/opt/python/bin/python3",
    ])
    .validate()
    .expect("pod in development");
}

/// The real binary: a bad digest is a one-line configuration error naming
/// the variable, exit code 2, and the value is not printed.
#[test]
fn the_binary_refuses_a_bad_digest_with_exit_code_2() {
    let value = "not-a-digest-at-all";
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_session-agent"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "off")
        .env("SESSION_ISOLATION", "pod")
        .env("SESSION_AGENT_ADMIN_TOKEN_SHA256", value)
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run the binary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.starts_with("session-agent: configuration error: SESSION_AGENT_ADMIN_TOKEN_SHA256"),
        "{stderr}"
    );
    assert!(!stderr.contains(value), "{stderr}");
}

// ---------------------------------------------------------------------------
// In-process, end to end

struct PodAgent {
    client: AgentClient,
    base: String,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    _state: tempfile::TempDir,
}

/// The agent as the k8s backend configures a runtime pod: production,
/// `pod` isolation, one session, the admin credential as a digest.
async fn start_pod_agent(admin: &str) -> PodAgent {
    start_pod_agent_with(admin, &[]).await
}

async fn start_pod_agent_with(admin: &str, extra: &[&str]) -> PodAgent {
    let state = tempfile::Builder::new()
        .prefix("sa-pod-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let state_dir = state.path().join("agent").display().to_string();
    let workspaces = state.path().join("workspace").display().to_string();
    let digest = sha256_hex(admin);
    let mut args = vec![
        "--env",
        "production",
        "--isolation",
        "pod",
        "--admin-token-sha256",
        &digest,
        "--max-sessions",
        "1",
        "--state-dir",
        &state_dir,
        "--workspace-root",
        &workspaces,
    ];
    args.extend_from_slice(extra);
    let config = config(&args);
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(session_agent::serve(listener, config, shutdown.clone()));
    let client = AgentClient::new(&base)
        .expect("client")
        .with_admin_token(Some(admin.to_owned()));
    for _ in 0..200 {
        if client.health().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    PodAgent {
        client,
        base,
        shutdown,
        handle,
        _state: state,
    }
}

impl PodAgent {
    async fn stop(self) {
        self.shutdown.cancel();
        self.handle
            .await
            .expect("agent task")
            .expect("agent stopped with an error");
    }
}

/// A warm pod (`SESSION_AGENT_WARM_POOL=python=1`, as the k8s backend sets
/// it) pre-starts its one interpreter: its session is a warm start, and no
/// second interpreter is started after it.
#[tokio::test]
async fn a_warm_pod_prestarts_one_interpreter_and_never_refills() {
    let admin = token();
    let agent = start_pod_agent_with(&admin, &["--warm-pool", "python=1"]).await;
    let mut primed = false;
    for _ in 0..400 {
        let h = agent.client.health().await.expect("health");
        if h.warm_pool.get("python") == Some(&1) {
            primed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(primed, "the interpreter was never pre-started");
    let tok = token();
    let info = agent
        .client
        .create_session(&create_request("pod-warm", "python", &tok))
        .await
        .expect("create");
    assert!(info.warm, "{info:?}");
    let r = agent
        .client
        .step(&step_request("pod-warm", "print(6*7)"), Some(&tok))
        .await
        .expect("step");
    assert_eq!(r.stdout, "42\n");
    // The filler has had time to refill, and did not.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let h = agent.client.health().await.expect("health");
    assert_eq!(h.warm_pool.get("python"), Some(&0), "{h:?}");
    agent.stop().await;
}

#[tokio::test]
async fn a_pod_agent_runs_one_session_for_the_data_plane_only() {
    let admin = token();
    let agent = start_pod_agent(&admin).await;
    let health = agent.client.health().await.expect("health");
    assert_eq!(health.isolation, "pod");

    // Creation needs the credential whose digest the agent was given.
    let tok = token();
    let req = create_request("pod-1", "python", &tok);
    let http = reqwest::Client::new();
    for (what, header) in [
        ("no credential", None),
        ("a wrong credential", Some(token())),
        ("the digest itself", Some(sha256_hex(&admin))),
        ("the session token", Some(tok.clone())),
    ] {
        let mut rb = http.post(format!("{}/v1/sessions", agent.base)).json(&req);
        if let Some(h) = header {
            rb = rb.header(shared::agent::ADMIN_TOKEN_HEADER, h);
        }
        let resp = rb.send().await.expect("request");
        assert_eq!(resp.status().as_u16(), 401, "{what}");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["code"], "unauthorized", "{what}: {body}");
    }
    assert_eq!(agent.client.health().await.expect("health").sessions, 0);

    // The right one works.
    let info = agent.client.create_session(&req).await.expect("create");
    assert_eq!(info.isolation, "pod");

    // A second session is refused: one per pod.
    let tok2 = token();
    let e = agent
        .client
        .create_session(&create_request("pod-2", "python", &tok2))
        .await
        .expect_err("a second session");
    assert_eq!(e.code(), Some(ErrorCode::CapacityExhausted), "{e}");

    // Steps run, in an environment cleared of the agent's and with the
    // rlimits of `none`.
    let r = agent
        .client
        .step(&step_request("pod-1", "print(6*7)"), Some(&tok))
        .await
        .expect("step");
    assert_eq!(r.status, StepStatus::Ok, "{r:?}");
    assert_eq!(r.stdout, "42\n");
    let probe = r#"
import os, resource
status = open("/proc/self/status").read()
{
  "env": sorted(os.environ),
  "uid": os.getuid(),
  "nnp": [l.split()[1] for l in status.splitlines() if l.startswith("NoNewPrivs:")],
  "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0],
  "as": resource.getrlimit(resource.RLIMIT_AS)[0],
  "core": resource.getrlimit(resource.RLIMIT_CORE)[0],
  "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
}
"#;
    let r = agent
        .client
        .step(&step_request("pod-1", probe), Some(&tok))
        .await
        .expect("step");
    assert_eq!(r.status, StepStatus::Ok, "{r:?}");
    let result = r.result.expect("a result");
    let env: Vec<String> =
        serde_json::from_value(result["env"].clone()).expect("environment names");
    assert!(
        env.iter()
            .all(|k| ["PATH", "HOME", "TMPDIR", "LANG", "PYTHONIOENCODING"].contains(&k.as_str())),
        "the interpreter inherited the agent's environment: {env:?}"
    );
    assert!(
        env.iter().all(|k| !k.starts_with("SESSION_AGENT")),
        "{env:?}"
    );
    assert_eq!(result["nnp"], json!(["1"]), "no new privileges: {result}");
    if rustix::process::geteuid().is_root() {
        // A root agent still drops the interpreter to 65534.
        assert_eq!(result["uid"], json!(65534), "{result}");
    }
    assert_eq!(
        result["nproc"],
        json!(info.limits.max_processes),
        "{result}"
    );
    assert_eq!(
        result["as"],
        json!(info.limits.memory_mb * 1024 * 1024),
        "{result}"
    );
    assert_eq!(result["core"], json!(0), "{result}");
    assert_eq!(result["nofile"], json!(1024), "{result}");

    // The step timeout and the output cap apply.
    let slow = StepRequest {
        timeout_ms: Some(300),
        ..step_request("pod-1", "import time\ntime.sleep(30)")
    };
    let r = agent.client.step(&slow, Some(&tok)).await.expect("step");
    assert_eq!(r.status, StepStatus::Timeout, "{r:?}");
    let big = format!(
        "import sys\nsys.stdout.write('x' * {})",
        info.limits.max_output_bytes * 2
    );
    let r = agent
        .client
        .step(&step_request("pod-1", &big), Some(&tok))
        .await
        .expect("step");
    assert!(r.truncated, "{:?}", r.status);
    assert!(r.stdout.len() as u64 <= info.limits.max_output_bytes);

    // The pod is single-use: after its session ends, no other is created.
    agent
        .client
        .delete_session("pod-1", Some(&tok))
        .await
        .expect("delete");
    let e = agent
        .client
        .create_session(&create_request("pod-3", "python", &token()))
        .await
        .expect_err("a session after the first ended");
    assert_eq!(e.code(), Some(ErrorCode::CapacityExhausted), "{e}");
    assert!(e.to_string().contains("never reused"), "{e}");
    agent.stop().await;
}

/// A creation that fails (bad input here) leaves the pod usable: only a
/// created session uses it up.
#[tokio::test]
async fn a_failed_creation_does_not_use_the_pod_up() {
    let admin = token();
    let agent = start_pod_agent(&admin).await;
    let tok = token();
    let e = agent
        .client
        .create_session(&create_request("pod-1", "cobol", &tok))
        .await
        .expect_err("unknown runtime");
    assert_eq!(e.code(), Some(ErrorCode::UnknownRuntime), "{e}");
    agent
        .client
        .create_session(&create_request("pod-1", "python", &tok))
        .await
        .expect("the pod is still unused");
    agent.stop().await;
}

// ---------------------------------------------------------------------------
// The real binary as uid 65534: the agent's memory is out of reach

/// What the session's code tries against its agent; prints one JSON line.
/// `hex()` of every readable `/proc/*/environ` and `cmdline` goes back to the
/// test, which searches them (so the code itself holds no credential).
const PROBE: &str = r#"
import ctypes, json, os, subprocess, sys

libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
PTRACE_ATTACH, PTRACE_DETACH, WALL = 16, 17, 0x40000000

def attempt(fn):
    try:
        return "ok: " + fn()
    except Exception as e:
        return type(e).__name__ + ": " + str(e)

def inspect(pid):
    found = {"address": 0x400000}
    def maps():
        first = open(f"/proc/{pid}/maps").readline()
        found["address"] = int(first.split("-")[0], 16)
        return first.strip()
    def mem():
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
            f.seek(found["address"])
            return f"read {len(f.read(64))} bytes at {found['address']:#x}"
    def ptrace():
        if libc.ptrace(ctypes.c_long(PTRACE_ATTACH), ctypes.c_long(pid), None, None) != 0:
            raise PermissionError(os.strerror(ctypes.get_errno()))
        os.waitpid(pid, WALL)  # the attach stop
        libc.ptrace(ctypes.c_long(PTRACE_DETACH), ctypes.c_long(pid), None, None)
        return "attached"
    return {
        "maps": attempt(maps),
        "mem": attempt(mem),
        "environ": attempt(lambda: f"read {len(open(f'/proc/{pid}/environ', 'rb').read())} bytes"),
        "cmdline": attempt(lambda: open(f"/proc/{pid}/cmdline", "rb").read().hex()),
        "ptrace": attempt(ptrace),
    }

agent = os.getppid()
named = []
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            if open(f"/proc/{p}/comm").read().strip() == "session-agent":
                named.append(int(p))
        except OSError:
            pass
out = {"agent": agent, "named": named, "uid": os.getuid(), "target": inspect(agent)}
# The control: a dumpable process of the same uid, which the same probes
# must be able to read (so a refusal above is the agent's own doing).
control = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env={"PROBE_CONTROL": "1"})
out["control"] = inspect(control.pid)
control.kill()
control.wait()

readable = {"self-environ-dict": json.dumps(dict(os.environ)).encode().hex()}
for p in os.listdir("/proc"):
    if p.isdigit():
        for f in ("environ", "cmdline"):
            try:
                readable[f"/proc/{p}/{f}"] = open(f"/proc/{p}/{f}", "rb").read().hex()
            except OSError:
                pass
out["readable"] = readable
print(json.dumps(out))
"#;

#[tokio::test]
#[ignore = "needs: root (make test-integration)"]
async fn code_in_a_pod_cannot_read_the_agents_memory_or_find_a_credential() {
    assert!(
        rustix::process::geteuid().is_root(),
        "needs root, to start the agent as uid 65534 (make test-integration)"
    );
    let setpriv = std::path::Path::new("/usr/bin/setpriv");
    assert!(
        setpriv.is_file(),
        "/usr/bin/setpriv is missing: apt-get install -y util-linux"
    );
    // A state directory the unprivileged agent owns.
    let dir = tempfile::Builder::new()
        .prefix("sa-pod-mem-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let nobody = Some(65534);
    std::os::unix::fs::chown(dir.path(), nobody, nobody).expect("chown the state dir");
    let port = free_port();
    let admin = token();
    let admin_digest = sha256_hex(&admin);
    let log_path = dir.path().join("agent.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    // As the k8s backend starts a runtime pod's agent (its env), minus the
    // container: uid and gid 65534, no groups, no capabilities at all.
    let mut child = std::process::Command::new(setpriv)
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
            env!("CARGO_BIN_EXE_session-agent"),
        ])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("RUST_LOG", "info")
        .env("ENV", "production")
        .env("SESSION_AGENT_ADDR", format!("127.0.0.1:{port}"))
        .env("SESSION_ISOLATION", "pod")
        .env("SESSION_AGENT_ADMIN_TOKEN_SHA256", &admin_digest)
        .env("SESSION_AGENT_MAX_SESSIONS", "1")
        .env("WORKSPACE_ROOT", dir.path().join("workspace"))
        .env("SESSION_AGENT_STATE_DIR", dir.path().join("agent"))
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start the agent");
    let agent_pid = child.id();
    let stop = |child: &mut std::process::Child| {
        if let Some(pid) = rustix::process::Pid::from_raw(agent_pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        for _ in 0..100 {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    };
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let client = AgentClient::new(format!("http://127.0.0.1:{port}"))
        .expect("client")
        .with_admin_token(Some(admin.clone()));
    let mut up = false;
    for _ in 0..400 {
        if client.health().await.is_ok() {
            up = true;
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the agent exited ({status}):\n{}", log_text());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    if !up {
        stop(&mut child);
        panic!("the agent did not come up:\n{}", log_text());
    }
    let status = std::fs::read_to_string(format!("/proc/{agent_pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_owned())
            .unwrap_or_default()
    };
    let (uid, cap_eff) = (field("Uid:"), field("CapEff:"));

    let tok = token();
    let session = client
        .create_session(&create_request("mem", "python", &tok))
        .await;
    let run = match session {
        Ok(_) => client.step(&step_request("mem", PROBE), Some(&tok)).await,
        Err(e) => Err(e),
    };
    stop(&mut child);
    let r = run.unwrap_or_else(|e| panic!("session or step failed: {e}\n{}", log_text()));
    assert_eq!(r.status, StepStatus::Ok, "{r:?}\n{}", log_text());
    assert_eq!(uid, "65534", "the agent runs as 65534");
    assert_eq!(cap_eff, "0000000000000000", "the agent has no capabilities");
    let out: Value = serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("probe output: {e}: {}", r.stdout));
    let verdicts = json!({
        "agent": out["agent"], "named": out["named"], "uid": out["uid"],
        "target": out["target"], "control": out["control"],
    });
    eprintln!("probe: {verdicts:#}");

    // The code found its agent, as the same uid.
    assert_eq!(out["agent"], json!(agent_pid), "{verdicts}");
    assert!(
        out["named"]
            .as_array()
            .is_some_and(|a| a.contains(&json!(agent_pid))),
        "{verdicts}"
    );
    assert_eq!(out["uid"], json!(65534), "{verdicts}");
    let verdict = |who: &str, what: &str| out[who][what].as_str().unwrap_or_default().to_owned();
    // The probes work: against a dumpable process of the same uid each of
    // them succeeds.
    for what in ["maps", "mem", "environ", "cmdline", "ptrace"] {
        assert!(
            verdict("control", what).starts_with("ok: "),
            "the probe cannot {what} even a dumpable process: {verdicts}"
        );
    }
    // The agent's command line is public.
    assert!(
        verdict("target", "cmdline").starts_with("ok: "),
        "{verdicts}"
    );
    // Its memory, environment and ptrace are not.
    for what in ["maps", "mem", "environ", "ptrace"] {
        assert!(
            verdict("target", what).starts_with("PermissionError"),
            "{what} of the agent must be refused: {verdicts}"
        );
    }
    // No credential, nor its digest, in any environment or command line the
    // code can read (its own included).
    let readable = out["readable"].as_object().expect("readable files");
    assert!(
        readable.contains_key("self-environ-dict")
            && readable.keys().any(|k| k.ends_with("/environ")),
        "the probe read nothing: {:?}",
        readable.keys().collect::<Vec<_>>()
    );
    let needles = [
        ("the session token", tok.clone()),
        ("the session token's digest", sha256_hex(&tok)),
        ("the admin credential", admin.clone()),
        ("the admin credential's digest", admin_digest.clone()),
    ];
    for (path, hexed) in readable {
        let bytes = hex::decode(hexed.as_str().unwrap_or_default()).expect("hex");
        let text = String::from_utf8_lossy(&bytes).to_lowercase();
        for (what, needle) in &needles {
            assert!(
                !text.contains(&needle.to_lowercase()),
                "{what} is readable in {path}"
            );
        }
    }
}

/// An ephemeral loopback port, free a moment ago (the agent binds it itself).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Pod mode (cleared environment, the pod's pre-started interpreter): a
/// secret given at creation is in the interpreter's live environment only,
/// not in the environment it was started with, and printed it is masked.
#[tokio::test]
async fn a_secret_in_a_warm_pod_is_only_in_the_live_environment_and_masked() {
    let admin = token();
    let agent = start_pod_agent_with(&admin, &["--warm-pool", "python=1"]).await;
    for _ in 0..400 {
        let h = agent.client.health().await.expect("health");
        if h.warm_pool.get("python") == Some(&1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let value = format!("pod-canary-{}", token());
    let tok = token();
    let req = shared::agent::CreateSessionRequest {
        secrets: Some(
            [(
                "API_TOKEN".to_owned(),
                shared::secrets::SecretValue::new(value.clone()),
            )]
            .into(),
        ),
        ..create_request("pod-secret", "python", &tok)
    };
    let info = agent.client.create_session(&req).await.expect("create");
    assert!(info.warm, "{info:?}");
    let r = agent
        .client
        .step(
            &step_request(
                "pod-secret",
                "import os\nprint(os.environ['API_TOKEN'])\nk = os.environ['API_TOKEN'].encode()\n[len(k), open('/proc/self/environ', 'rb').read().count(k)]",
            ),
            Some(&tok),
        )
        .await
        .expect("step");
    assert_eq!(r.stdout, "***\n", "{r:?}");
    assert_eq!(r.result, Some(serde_json::json!([value.len(), 0])), "{r:?}");
    agent.stop().await;
}
