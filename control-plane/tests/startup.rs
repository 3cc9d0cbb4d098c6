//! Start-up as a person meets it: a configuration error is one line naming
//! the variable, exit code 2, and no backtrace even with RUST_BACKTRACE set.
#![allow(clippy::disallowed_methods)] // the test runs the real binary

use std::process::Command;

#[test]
fn a_configuration_error_is_one_line_and_exit_code_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_control-plane"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_BACKTRACE", "full")
        .env("RUST_LOG", "off")
        .env("ENV", "production")
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run the binary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {stderr}");
    assert!(
        lines[0].starts_with("control-plane: configuration error: "),
        "{stderr}"
    );
    assert!(
        lines[0].contains("AUTH_JWT_SECRET"),
        "names the variable: {stderr}"
    );
    assert!(!stderr.contains("backtrace"), "{stderr}");
}

/// Another plane's binary, next to this crate's (`cargo test --workspace`,
/// as `make test` runs it, builds every binary first).
fn sibling_binary(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_control-plane")).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build -p session-agent -p data-plane`, or run `make test`)",
        path.display()
    );
    path.display().to_string()
}

/// Three free loopback ports (bound, then released for the binaries).
fn free_ports() -> [u16; 3] {
    let l: Vec<std::net::TcpListener> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    [0, 1, 2].map(|i| l[i].local_addr().expect("addr").port())
}

/// Kills the child when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        // SIGTERM, so the agent destroys its sandboxes; then wait.
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

async fn wait_http(url: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match reqwest::get(url).await {
            Ok(r) if r.status().is_success() => return,
            _ => {}
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{url} did not come up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The seed's "Run locally" commands, as written (`ENV=dev`, no keys, the
/// agent with `SESSION_AGENT_AUTH_BYPASS=true`, the data plane's example
/// with `SESSION_AGENT_AUTH_MODE=bypass`), from one directory: each plane
/// falls back to the development keys in `.local/` (created 0600), and
/// `control-plane token` mints a token the stack accepts. Only the ports
/// (ephemeral, so a running `make run-local` is never disturbed) and the
/// state directories differ.
#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn the_seeds_run_locally_commands_give_a_working_stack() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("cp-seed-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let cwd = dir.path();
    let [agent_port, dp_port, cp_port] = free_ports();
    let isolation = std::env::var("SESSION_ISOLATION").unwrap_or_else(|_| "gvisor".into());
    let spawn = |bin: &str, envs: &[(&str, String)]| {
        let mut cmd = Command::new(bin);
        cmd.current_dir(cwd)
            .env_remove("AUTH_JWT_SECRET")
            .env_remove("DATA_PLANE_JWT_SECRET")
            .env_remove("SESSION_AGENT_ADMIN_TOKEN")
            .env("ENV", "dev")
            .env("RUST_LOG", "warn");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Child(cmd.spawn().expect("spawn"))
    };
    let state = |name: &str| cwd.join(name).display().to_string();
    // ENV=dev SESSION_AGENT_AUTH_BYPASS=true make run-session-agent
    let _agent = spawn(
        &sibling_binary("session-agent"),
        &[
            ("SESSION_AGENT_AUTH_BYPASS", "true".into()),
            ("SESSION_AGENT_ADDR", format!("127.0.0.1:{agent_port}")),
            ("SESSION_ISOLATION", isolation),
            ("SESSION_AGENT_STATE_DIR", state("agent")),
        ],
    );
    wait_http(&format!("http://127.0.0.1:{agent_port}/v1/health")).await;
    // SESSION_AGENT_ENDPOINT=... SESSION_AGENT_AUTH_MODE=bypass
    // SESSION_AGENT_PREFER=true ENV=dev SESSION_RUNTIME_BACKEND=local make run-data-plane
    let _dp = spawn(
        &sibling_binary("data-plane"),
        &[
            (
                "SESSION_AGENT_ENDPOINT",
                format!("http://127.0.0.1:{agent_port}"),
            ),
            ("SESSION_AGENT_AUTH_MODE", "bypass".into()),
            ("SESSION_AGENT_PREFER", "true".into()),
            ("SESSION_RUNTIME_BACKEND", "local".into()),
            ("DATA_PLANE_ADDR", format!("127.0.0.1:{dp_port}")),
            ("ARTIFACT_ROOT", state("artifacts")),
        ],
    );
    wait_http(&format!("http://127.0.0.1:{dp_port}/healthz")).await;
    // ENV=dev DATA_PLANE_URL=http://localhost:8081 make run-control-plane
    let _cp = spawn(
        env!("CARGO_BIN_EXE_control-plane"),
        &[
            ("DATA_PLANE_URL", format!("http://localhost:{dp_port}")),
            ("CONTROL_PLANE_ADDR", format!("127.0.0.1:{cp_port}")),
            ("MCP_ADDR", String::new()),
        ],
    );
    let cp = format!("http://127.0.0.1:{cp_port}");
    wait_http(&format!("{cp}/readyz")).await;

    for key in ["dev-jwt-secret", "dev-user-jwt-secret"] {
        let mode = std::fs::metadata(cwd.join(".local").join(key))
            .unwrap_or_else(|e| panic!(".local/{key}: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, ".local/{key}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_control-plane"))
        .current_dir(cwd)
        .env_remove("AUTH_JWT_SECRET")
        .env("ENV", "dev")
        .args(["token", "--tenant", "demo", "--roles", "agent"])
        .output()
        .expect("control-plane token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned();

    let http = reqwest::Client::new();
    let job: serde_json::Value = http
        .post(format!("{cp}/v1/jobs"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"code": "6 * 7"}))
        .send()
        .await
        .expect("submit")
        .json()
        .await
        .expect("a JSON job");
    let id = job["jobId"].as_str().unwrap_or_else(|| panic!("{job}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let done = loop {
        let j: serde_json::Value = http
            .get(format!("{cp}/v1/jobs/{id}?waitMs=5000"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("poll")
            .json()
            .await
            .expect("a JSON job");
        if matches!(
            j["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            break j;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job never finished: {j}"
        );
    };
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["output"]["result"], 42, "{done}");
}
