//! Hostile code: each attempt is confined and the agent stays healthy.
//! Network probes run in a network namespace this test makes itself, where
//! the outside addresses live on its loopback and are answered by fakes: a
//! broken sandbox reaches a fake, never the internet.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // the tests spawn `unshare` and `ip` to build the namespace

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{TestAgent, token};
use serde_json::json;
use shared::agent::{Limits, StepStatus};

const NETNS_CHILD: &str = "SESSION_AGENT_TEST_IN_NETNS";

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn network_escape_attempts_reach_nothing() {
    if std::env::var_os(NETNS_CHILD).is_none() {
        // Re-run this very test inside a fresh network namespace.
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new("unshare")
            .args(["--net", "--fork", "--"])
            .arg(exe)
            .args([
                "--exact",
                "network_escape_attempts_reach_nothing",
                // The test is ignored (integration tier): run it anyway.
                "--include-ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(NETNS_CHILD, "1")
            .output()
            .expect("unshare (util-linux) must be installed");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("--- in the network namespace ---\n{stdout}\n{stderr}");
        assert!(
            out.status.success(),
            "the network escape test failed inside its namespace"
        );
        assert!(
            stdout.contains("1 passed"),
            "the test did not run inside the namespace"
        );
        return;
    }
    for args in [
        vec!["link", "set", "lo", "up"],
        vec!["addr", "add", "1.1.1.1/32", "dev", "lo"],
        vec!["addr", "add", "169.254.169.254/32", "dev", "lo"],
    ] {
        let st = std::process::Command::new("ip")
            .args(&args)
            .status()
            .expect("ip (iproute2)");
        assert!(st.success(), "ip {args:?}");
    }
    // Fakes for the outside world, counting every contact.
    let contacts = Arc::new(AtomicUsize::new(0));
    for addr in ["1.1.1.1:53", "169.254.169.254:80"] {
        let l = tokio::net::TcpListener::bind(addr).await.unwrap();
        let c = contacts.clone();
        tokio::spawn(async move {
            while l.accept().await.is_ok() {
                c.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    let udp = tokio::net::UdpSocket::bind("1.1.1.1:53").await.unwrap();
    {
        let c = contacts.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while udp.recv_from(&mut buf).await.is_ok() {
                c.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    // The fakes are reachable from outside the sandbox: the probe can fail.
    tokio::net::TcpStream::connect("1.1.1.1:53")
        .await
        .expect("the fake must be reachable from the host side");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(contacts.swap(0, Ordering::SeqCst), 1);

    let agent = TestAgent::start(&[]).await;
    let t = token();
    agent.session("net", "python", &t).await;
    let code = format!(
        r#"
import socket
results = {{}}
for host, port in [("1.1.1.1", 53), ("169.254.169.254", 80), ("127.0.0.1", {port}), ("10.0.0.1", 80)]:
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((host, port))
        results[f"{{host}}:{{port}}"] = "CONNECTED"
    except OSError as e:
        results[f"{{host}}:{{port}}"] = type(e).__name__
    finally:
        s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"x", ("1.1.1.1", 53))
    results["udp"] = "SENT"
except OSError as e:
    results["udp"] = type(e).__name__
import os
results["interfaces"] = sorted(os.listdir("/sys/class/net")) if os.path.exists("/sys/class/net") else []
results
"#,
        port = agent.port
    );
    let r = agent.step("net", &t, &code).await;
    eprintln!(
        "sandbox network probes: {}",
        r.result.as_ref().unwrap_or(&json!(null))
    );
    assert_eq!(r.status, StepStatus::Ok, "{r:?}");
    let res = r.result.unwrap();
    for key in ["1.1.1.1:53", "169.254.169.254:80", "10.0.0.1:80"] {
        assert_ne!(
            res[key],
            json!("CONNECTED"),
            "{key} reachable from the sandbox"
        );
    }
    assert_ne!(
        res[format!("127.0.0.1:{}", agent.port)],
        json!("CONNECTED"),
        "the agent's port is reachable"
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        contacts.load(Ordering::SeqCst),
        0,
        "a fake outside address was contacted from the sandbox"
    );
    // Still healthy.
    assert_eq!(agent.step("net", &t, "1 + 1").await.result, Some(json!(2)));
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn host_files_are_invisible_and_read_only() {
    let agent = TestAgent::start(&[]).await;
    let t = token();
    agent.session("fs", "python", &t).await;
    let here = std::env::current_dir().unwrap().display().to_string();
    let code = format!(
        r#"
import os
r = {{}}
def attempt(name, f):
    try:
        f()
        r[name] = "ALLOWED"
    except OSError as e:
        r[name] = type(e).__name__
attempt("read_shadow", lambda: open("/etc/shadow").read())
attempt("read_project", lambda: open("{here}/Cargo.toml").read())
attempt("list_home", lambda: os.listdir("/home"))
attempt("list_root_home", lambda: os.listdir("/root"))
attempt("list_var", lambda: os.listdir("/var"))
attempt("write_usr", lambda: open("/usr/lib/pwned", "w").write("x"))
attempt("write_etc", lambda: open("/etc/passwd", "a").write("x"))
attempt("write_root", lambda: open("/pwned", "w").write("x"))
attempt("write_bin", lambda: open("/bin/pwned", "w").write("x"))
attempt("mkdir_proc", lambda: os.mkdir("/proc/pwned"))
open("/tmp/sandbox-private-marker", "w").write("x")
r["root"] = sorted(os.listdir("/"))
r["etc"] = sorted(os.listdir("/etc"))
r["uid"] = [os.getuid(), os.geteuid(), os.getgid()]
status = open("/proc/self/status").read()
r["capeff"] = [l for l in status.splitlines() if l.startswith(("CapEff", "CapPrm", "CapBnd", "NoNewPrivs"))]
r["kernel"] = os.uname().release
r
"#
    );
    let r = agent.step("fs", &t, &code).await;
    assert_eq!(r.status, StepStatus::Ok, "{r:?}");
    let res = r.result.unwrap();
    eprintln!("sandbox file probes: {res}");
    for key in [
        "read_shadow",
        "read_project",
        "list_home",
        "list_root_home",
        "list_var",
        "write_usr",
        "write_etc",
        "write_root",
        "write_bin",
        "mkdir_proc",
    ] {
        assert_ne!(
            res[key],
            json!("ALLOWED"),
            "{key} succeeded inside the sandbox"
        );
    }
    let root: Vec<String> = serde_json::from_value(res["root"].clone()).unwrap();
    for forbidden in ["home", "root", "var", "work", "opt", "srv", "mnt"] {
        assert!(
            !root.contains(&forbidden.to_owned()),
            "/{forbidden} visible in the sandbox: {root:?}"
        );
    }
    let etc: Vec<String> = serde_json::from_value(res["etc"].clone()).unwrap();
    assert!(
        !etc.iter().any(|e| e.contains("shadow") || e == "ssh"),
        "{etc:?}"
    );
    assert_eq!(res["uid"], json!([65534, 65534, 65534]));
    for line in res["capeff"].as_array().unwrap() {
        let line = line.as_str().unwrap();
        if line.starts_with("NoNewPrivs") {
            assert!(line.ends_with('1'), "{line}");
        } else {
            assert!(
                line.ends_with("0000000000000000"),
                "capabilities left: {line}"
            );
        }
    }
    if agent.isolation == "gvisor" {
        // Proof the gVisor kernel answered, not the host's.
        let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert_ne!(res["kernel"].as_str().unwrap(), host.trim());
        let r = agent.step("fs", &t, "import subprocess\nsubprocess.run(['dmesg'], capture_output=True, text=True).stdout").await;
        assert!(
            r.result.unwrap().as_str().unwrap().contains("gVisor"),
            "dmesg is not gVisor's"
        );
    }
    assert!(
        !std::path::Path::new("/tmp/sandbox-private-marker").exists(),
        "the sandbox's /tmp is the host's"
    );
    assert!(!std::path::Path::new("/usr/lib/pwned").exists());
    agent.stop().await;
}

/// Each sandbox has a process budget of its own. Under bwrap the rlimit was
/// once set before bwrap made its user namespace, so every sandbox's
/// processes counted against one per-uid budget on the host: eight
/// concurrent sessions with `maxProcesses = 8` made bwrap itself fail with
/// EAGAIN ("Creating new namespace failed").
#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn sandboxes_do_not_share_a_process_budget() {
    let agent = Arc::new(TestAgent::start(&[]).await);
    let t = token();
    let small = Limits {
        max_processes: Some(8),
        ..Default::default()
    };
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (agent, t, small) = (agent.clone(), t.clone(), small.clone());
        tasks.push(tokio::spawn(async move {
            let id = format!("budget-{i}");
            agent.session_with(&id, "python", &t, Some(small)).await;
            // Three children that stay alive while the others start theirs.
            let code = "import os, time\nkids = []\nfor _ in range(3):\n    pid = os.fork()\n    if pid == 0:\n        time.sleep(5)\n        os._exit(0)\n    kids.append(pid)\nlen(kids)";
            agent.step_req(&id, &t, code, Some(20_000)).await
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let r = task.await.unwrap();
        assert_eq!(
            r.result,
            Some(json!(3)),
            "session {i}: status={:?} error={:?}",
            r.status,
            r.error
        );
    }
    for i in 0..8 {
        agent
            .client
            .delete_session(&format!("budget-{i}"), Some(&t))
            .await
            .unwrap();
    }
    if let Ok(agent) = Arc::try_unwrap(agent) {
        agent.stop().await;
    }
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn fork_bomb_memory_hog_and_busy_loop_are_contained() {
    let agent = TestAgent::start(&[]).await;
    let t = token();
    // Counted forks: RLIMIT_NPROC stops them inside the sandbox with EAGAIN.
    // (Memory is generous here so the process limit, not memory, is what stops them.)
    let counted = Limits {
        max_processes: Some(32),
        memory_mb: Some(2048),
        ..Default::default()
    };
    agent
        .session_with("forks", "python", &t, Some(counted))
        .await;
    let code = "import os, time\nn = 0\nerr = None\nwhile n < 1000:\n    try:\n        pid = os.fork()\n    except OSError as e:\n        err = type(e).__name__\n        break\n    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n    n += 1\n[n, err]";
    let r = agent.step_req("forks", &t, code, Some(20_000)).await;
    eprintln!(
        "counted forks: status={:?} result={:?} error={:?}",
        r.status, r.result, r.error
    );
    let res = r.result.expect("fork counter result");
    assert_eq!(res[1], json!("BlockingIOError"), "{res}");
    assert!(res[0].as_u64().unwrap() < 32, "{res}");
    agent
        .client
        .delete_session("forks", Some(&t))
        .await
        .unwrap();

    // The classic bash bomb: whatever the step reports (fork failures, the
    // memory limit, the timeout), the sandbox holds it and the agent goes on.
    let limits = Limits {
        max_processes: Some(64),
        ..Default::default()
    };
    agent.session_with("bomb", "bash", &t, Some(limits)).await;
    let r = agent
        .step_req(
            "bomb",
            &t,
            "bomb() { bomb | bomb & }; bomb 2>/dev/null; sleep 3; ls /proc | grep -c '^[0-9]'",
            Some(10_000),
        )
        .await;
    eprintln!(
        "fork bomb: status={:?} stdout={:?} error={:?}",
        r.status, r.stdout, r.error
    );
    if r.status == StepStatus::Ok {
        let procs: u64 = r.stdout.trim().parse().unwrap();
        assert!(procs <= 64 + 2, "{procs} processes under a limit of 64");
    }
    agent.client.delete_session("bomb", Some(&t)).await.unwrap();

    agent.session("mem", "python", &t).await;
    let r = agent.step("mem", &t, "x = bytearray(2 * 1024**3)").await;
    eprintln!("2 GiB: status={:?} error={:?}", r.status, r.error);
    assert!(
        matches!(r.status, StepStatus::Error | StepStatus::Killed),
        "{r:?}"
    );
    assert_eq!(r.error.unwrap().kind, "MemoryError");
    // Python's MemoryError leaves the session usable.
    assert_eq!(
        agent
            .step("mem", &t, "len(bytearray(10 * 1024**2))")
            .await
            .result,
        Some(json!(10 * 1024 * 1024))
    );

    agent.session("jsmem", "node", &t).await;
    let r = agent
        .step_req(
            "jsmem",
            &t,
            "const a = []; while (true) { a.push(Buffer.alloc(64 * 1024 * 1024, 1)); }",
            Some(20_000),
        )
        .await;
    eprintln!("node hog: status={:?} error={:?}", r.status, r.error);
    assert_ne!(r.status, StepStatus::Ok);
    assert_ne!(
        r.status,
        StepStatus::Timeout,
        "the memory limit, not the timeout, must stop it: {r:?}"
    );

    agent.session("loop", "python", &t).await;
    let r = agent
        .step_req("loop", &t, "while True: pass", Some(500))
        .await;
    assert_eq!(r.status, StepStatus::Timeout);

    // The agent is healthy and new sessions work.
    agent.session("after", "python", &t).await;
    assert_eq!(
        agent.step("after", &t, "1 + 1").await.result,
        Some(json!(2))
    );
    let h = agent.client.health().await.unwrap();
    assert_eq!(h.status, "ok");
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn concurrent_sessions_cannot_see_each_other() {
    let agent = TestAgent::start(&[]).await;
    let (ta, tb) = (token(), token());
    agent.session("alice", "python", &ta).await;
    agent.session("bob", "python", &tb).await;
    let (ra, rb) = tokio::join!(
        agent.step(
            "alice",
            &ta,
            "secret_a = 'alpha'\nopen('alice-only.txt', 'w').write('alpha')"
        ),
        agent.step(
            "bob",
            &tb,
            "secret_b = 'bravo'\nopen('bob-only.txt', 'w').write('bravo')"
        ),
    );
    assert_eq!((ra.status, rb.status), (StepStatus::Ok, StepStatus::Ok));
    let probe = r#"
import os
found = set()
for dirpath, dirs, files in os.walk("/"):
    if dirpath.startswith(("/proc", "/sys", "/usr")):
        dirs[:] = []
        continue
    found |= {f for f in files if f.endswith("-only.txt")}
{"names": sorted(k for k in globals() if k.startswith("secret")), "files": sorted(found),
 "procs": len([p for p in os.listdir("/proc") if p.isdigit()])}
"#;
    let ra = agent.step("alice", &ta, probe).await.result.unwrap();
    let rb = agent.step("bob", &tb, probe).await.result.unwrap();
    assert_eq!(ra["names"], json!(["secret_a"]));
    assert_eq!(rb["names"], json!(["secret_b"]));
    assert_eq!(ra["files"], json!(["alice-only.txt"]));
    assert_eq!(rb["files"], json!(["bob-only.txt"]));
    // Only the sandbox's own processes are visible.
    assert!(ra["procs"].as_u64().unwrap() <= 3, "{ra}");
    // And the files API keeps them apart too.
    let e = agent
        .client
        .read_file("alice", "bob-only.txt", Some(&ta))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(shared::ErrorCode::FileNotFound));
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn the_token_never_reaches_the_sandbox() {
    let agent = TestAgent::start(&[]).await;
    let t = token();
    let limits = Limits {
        memory_mb: Some(256),
        ..Default::default()
    };
    agent.session_with("tok", "python", &t, Some(limits)).await;
    // Neither the session's token nor the agent's own credential.
    for (what, secret) in [
        ("session token", &t),
        ("admin credential", &agent.admin_token),
    ] {
        let code = format!(
            r#"
import os
needle = "{needle}"
hits = []
if needle in repr(dict(os.environ)): hits.append("environ")
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    for f in ["environ", "cmdline"]:
        try:
            if needle.encode() in open(f"/proc/{{pid}}/{{f}}", "rb").read(): hits.append(f"/proc/{{pid}}/{{f}}")
        except OSError:
            pass
for top in ["/workspace", "/tmp", "/etc"]:
    for dirpath, _, files in os.walk(top):
        for f in files:
            try:
                if needle.encode() in open(os.path.join(dirpath, f), "rb").read(): hits.append(os.path.join(dirpath, f))
            except OSError:
                pass
hits
"#,
            // Search for the second half, so the code itself does not contain
            // the token in one piece.
            needle = &secret[32..]
        );
        let r = agent.step("tok", &t, &code).await;
        assert_eq!(r.status, StepStatus::Ok, "{r:?}");
        assert_eq!(
            r.result,
            Some(json!([])),
            "the {what} is visible inside the sandbox"
        );
    }
    agent.stop().await;
}

/// Issue 15: an unauthenticated client on the agent's port created sessions
/// with maximum limits and mounted directories of the package root. Only the
/// data plane's credential creates; everything else is a 401 before any
/// workspace or sandbox exists.
#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn only_the_data_planes_credential_creates_sessions() {
    let packages = tempfile::Builder::new()
        .prefix("sa-pkg-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::create_dir(packages.path().join("tenant-a")).unwrap();
    std::fs::write(packages.path().join("tenant-a/marker.txt"), "tenant-a").unwrap();
    let root = packages.path().display().to_string();
    let agent = TestAgent::start(&["--package-root", &root]).await;
    let workspaces = agent.state.path().join("workspaces");
    let pkg_dir = packages.path().join("tenant-a").display().to_string();
    let admin = agent.admin_token.clone();
    let other_session_token = token();
    let bodies = [
        json!({"sessionId": "plain", "runtime": "python", "token": token()}),
        json!({"sessionId": "pkgs", "runtime": "python", "token": token(), "packagesDir": pkg_dir}),
        json!({"sessionId": "big", "runtime": "python", "token": token(),
               "limits": {"memoryMb": 4096, "cpuMillicores": 4000, "diskMb": 4096}}),
        json!({"sessionId": "notoken", "runtime": "bash"}),
    ];
    let near_miss = format!("{}x", &admin[..admin.len() - 1]);
    let credentials: [(&str, Option<&str>); 5] = [
        ("no credential", None),
        ("empty credential", Some("")),
        ("wrong credential", Some(&other_session_token)),
        (
            "the credential with one character changed",
            Some(&near_miss),
        ),
        ("the credential's prefix", Some(&admin[..43])),
    ];
    for body in &bodies {
        for (why, presented) in credentials {
            let mut headers = vec![("content-type", "application/json")];
            if let Some(p) = presented {
                headers.push(("x-agent-admin-token", p));
            }
            // A session token in the header proves nothing either.
            let t = body["token"].as_str().unwrap_or(&other_session_token);
            headers.push(("x-session-token", t));
            let (s, e) = agent
                .raw(
                    "POST",
                    "/v1/sessions",
                    &headers,
                    Some(serde_json::to_vec(body).unwrap()),
                )
                .await;
            assert_eq!(
                (s, e["code"].as_str()),
                (401, Some("unauthorized")),
                "{why}, {body}: {e}"
            );
            assert!(!e["message"].as_str().unwrap().contains(&admin));
        }
    }
    // Nothing was started: no session, no workspace, no sandbox.
    assert_eq!(agent.client.health().await.unwrap().sessions, 0);
    assert!(
        agent
            .client
            .list_all_sessions(&admin)
            .await
            .unwrap()
            .sessions
            .is_empty()
    );
    assert_eq!(std::fs::read_dir(&workspaces).unwrap().count(), 0);

    // The data plane's credential creates, packagesDir included.
    let t = token();
    let req = shared::agent::CreateSessionRequest {
        packages_dir: Some(pkg_dir),
        secrets: None,
        ..common::create_request("pkgs", "python", &t)
    };
    agent.client.create_session(&req).await.unwrap();
    let r = agent
        .step("pkgs", &t, "open('/packages/marker.txt').read()")
        .await;
    assert_eq!(r.result, Some(json!("tenant-a")), "{r:?}");
    agent.stop().await;
}

/// Issue 15: 61 unauthenticated creates exhausted the agent's capacity and
/// every tenant's sessions failed. Now they are refused before they take a
/// slot, and the data plane still gets every slot there is.
#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn unauthenticated_creates_cannot_exhaust_capacity() {
    let agent = Arc::new(TestAgent::start(&["--max-sessions", "2", "--warm-pool", "bash=1"]).await);
    let pool_full = || async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while agent.client.health().await.unwrap().warm_pool.get("bash") != Some(&1) {
            assert!(
                std::time::Instant::now() < deadline,
                "the pool did not fill"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    pool_full().await;
    let refused = Arc::new(AtomicUsize::new(0));
    let mut floods = tokio::task::JoinSet::new();
    for i in 0..24 {
        let (agent, refused) = (agent.clone(), refused.clone());
        floods.spawn(async move {
            let body = json!({"sessionId": format!("flood-{i}"), "runtime": "bash", "token": token(),
                              "limits": {"memoryMb": 4096, "diskMb": 4096}});
            let (s, e) = agent
                .raw(
                    "POST",
                    "/v1/sessions",
                    &[("content-type", "application/json")],
                    Some(serde_json::to_vec(&body).unwrap()),
                )
                .await;
            if (s, e["code"].as_str()) == (401, Some("unauthorized")) {
                refused.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    while floods.join_next().await.is_some() {}
    assert_eq!(
        refused.load(Ordering::SeqCst),
        24,
        "an unauthenticated create was not refused"
    );
    // No slot and no warm sandbox was taken.
    let health = agent.client.health().await.unwrap();
    assert_eq!(health.sessions, 0);
    assert_eq!(health.warm_pool.get("bash"), Some(&1));
    // Every slot is still the data plane's, the warm sandbox too.
    let t = token();
    assert_eq!(agent.session("dp-1", "bash", &t).await["warm"], json!(true));
    agent.session("dp-2", "bash", &t).await;
    let e = agent
        .client
        .create_session(&common::create_request("dp-3", "bash", &t))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(shared::ErrorCode::CapacityExhausted));
    let agent = Arc::into_inner(agent).unwrap();
    agent.stop().await;
}
