//! Steps in real sandboxes: state, results, exceptions, handler mode,
//! timeouts, output caps and streaming, in every runtime.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use common::{TestAgent, token};
use futures::StreamExt;
use serde_json::json;
use shared::agent::{Limits, StepMode, StepRequest, StepStatus};
use shared::client::StepEvent;

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn python_state_result_and_exception() {
    let agent = TestAgent::start(&[]).await;
    let t = token();
    agent.session("py", "python", &t).await;

    let r = agent.step("py", &t, "x = 41\nprint('hello')\nx + 1").await;
    assert_eq!(r.status, StepStatus::Ok, "{r:?}");
    assert_eq!(r.stdout, "hello\n");
    assert_eq!(r.result, Some(json!(42)));
    assert!(!r.state_lost);

    let r = agent
        .step(
            "py",
            &t,
            "import sys\nprint('warn', file=sys.stderr)\n{'x': x, 'l': [1, 2]}",
        )
        .await;
    assert_eq!(r.stderr, "warn\n");
    assert_eq!(r.stdout, "");
    assert_eq!(r.result, Some(json!({"x": 41, "l": [1, 2]})));

    // A value that is not JSON comes back as its repr; a statement has no result.
    let r = agent.step("py", &t, "class P: pass\nP").await;
    assert!(
        r.result
            .unwrap()
            .as_str()
            .unwrap()
            .contains("class '__main__.P'")
    );
    let r = agent.step("py", &t, "y = 1").await;
    assert_eq!(r.result, None);

    // The driver starts on built-in modules only: under gVisor every module
    // file costs Sentry work at each sandbox start (session-agent.md, 16).
    let r = agent
        .step(
            "py",
            &t,
            "import sys\n[m for m in ('re', 'enum', 'functools', 'collections', 'json', 'ast', \
             'signal', 'types', 'contextlib') if m in sys.modules]",
        )
        .await;
    assert_eq!(r.result, Some(json!([])), "{r:?}");

    let r = agent
        .step("py", &t, "def f():\n    return 1 / 0\nf()")
        .await;
    assert_eq!(r.status, StepStatus::Error);
    let err = r.error.expect("error");
    assert_eq!(err.kind, "ZeroDivisionError");
    assert_eq!(err.message, "division by zero");
    assert!(err.traceback.contains("line 2, in f"), "{}", err.traceback);
    assert!(
        !err.traceback.contains("<string>"),
        "driver frames leak: {}",
        err.traceback
    );

    // The session survives the exception, with its state.
    let r = agent.step("py", &t, "x").await;
    assert_eq!(r.result, Some(json!(41)));

    // Subprocess output is captured on the right stream.
    let r = agent
        .step(
            "py",
            &t,
            "import subprocess\nsubprocess.run(['sh', '-c', 'echo out; echo err >&2'])\nNone",
        )
        .await;
    assert_eq!(r.stdout, "out\n", "{r:?}");
    assert_eq!(r.stderr, "err\n");

    // Top-level await works like in a notebook.
    let r = agent
        .step("py", &t, "import asyncio\nawait asyncio.sleep(0)\n7")
        .await;
    assert_eq!(r.result, Some(json!(7)), "{r:?}");
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn python_and_node_handler_mode() {
    let agent = TestAgent::start(&[]).await;
    let t = token();
    agent.session("py", "python", &t).await;
    agent.session("js", "node", &t.clone()).await;
    for (sid, code) in [
        (
            "py",
            "def handler(event):\n    return {'greeting': 'hi ' + event['name'], 'n': len(event['items'])}",
        ),
        (
            "js",
            "function handler(event) { return { greeting: 'hi ' + event.name, n: event.items.length }; }",
        ),
    ] {
        let req = StepRequest {
            step_id: "h1".into(),
            mode: Some(StepMode::Handler),
            event: Some(json!({"name": "ada", "items": [1, 2, 3]})),
            ..common::step_request(sid, code)
        };
        let r = agent.client.step(&req, Some(&t)).await.unwrap();
        assert_eq!(r.status, StepStatus::Ok, "{sid}: {r:?}");
        assert_eq!(
            r.result,
            Some(json!({"greeting": "hi ada", "n": 3})),
            "{sid}"
        );
    }
    // Without a handler: a clear error, the session stays.
    let req = StepRequest {
        step_id: "h2".into(),
        mode: Some(StepMode::Handler),
        ..common::step_request("py", "del handler")
    };
    let r = agent.client.step(&req, Some(&t)).await.unwrap();
    assert_eq!(r.status, StepStatus::Error);
    assert_eq!(r.error.unwrap().kind, "NameError");
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn node_state_result_and_exception() {
    let agent = TestAgent::start(&[]).await;
    let t = token();
    agent.session("js", "node", &t).await;
    let r = agent
        .step("js", &t, "let x = 41; console.log('hello'); x + 1")
        .await;
    assert_eq!(r.status, StepStatus::Ok, "{r:?}");
    assert_eq!(r.stdout, "hello\n");
    assert_eq!(r.result, Some(json!(42)));
    let r = agent
        .step("js", &t, "console.error('warn'); ({x, l: [1, 2]})")
        .await;
    assert_eq!(r.stderr, "warn\n");
    assert_eq!(r.result, Some(json!({"x": 41, "l": [1, 2]})));
    let r = agent.step("js", &t, "null.boom").await;
    assert_eq!(r.status, StepStatus::Error);
    let err = r.error.unwrap();
    assert_eq!(err.kind, "TypeError");
    assert!(err.traceback.contains("step-3.js"), "{}", err.traceback);
    let r = agent.step("js", &t, "x").await;
    assert_eq!(r.result, Some(json!(41)));
    // Promises are awaited.
    let r = agent
        .step("js", &t, "new Promise(r => setTimeout(() => r(x * 2), 10))")
        .await;
    assert_eq!(r.result, Some(json!(82)), "{r:?}");
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn bash_state_and_exit_status() {
    let agent = TestAgent::start(&[]).await;
    let t = token();
    agent.session("sh", "bash", &t).await;
    let r = agent
        .step("sh", &t, "X=41\ncd /tmp\necho \"tab\there \\\\ back\"")
        .await;
    assert_eq!(r.status, StepStatus::Ok, "{r:?}");
    assert_eq!(r.stdout, "tab\there \\ back\n");
    let r = agent
        .step("sh", &t, "echo $((X + 1)) $PWD; echo oops >&2")
        .await;
    assert_eq!(r.stdout, "42 /tmp\n");
    assert_eq!(r.stderr, "oops\n");
    let r = agent.step("sh", &t, "false").await;
    assert_eq!(r.status, StepStatus::Error);
    assert_eq!(r.error.unwrap().kind, "ExitStatus");
    let r = agent.step("sh", &t, "echo still $X").await;
    assert_eq!(r.stdout, "still 41\n");
    // Handler mode is refused for bash with a coded 400.
    let req = StepRequest {
        step_id: "h".into(),
        mode: Some(StepMode::Handler),
        ..common::step_request("sh", "true")
    };
    let e = agent.client.step(&req, Some(&t)).await.unwrap_err();
    assert_eq!(e.code(), Some(shared::ErrorCode::UnsupportedMode));
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn timeouts_interrupt_then_restart() {
    let agent = TestAgent::start(&[]).await;
    let t = token();
    agent.session("py", "python", &t).await;
    agent.step("py", &t, "kept = 'yes'").await;

    // An interruptible loop: interrupted, state kept.
    let r = agent
        .step_req("py", &t, "while True:\n    pass", Some(300))
        .await;
    assert_eq!(r.status, StepStatus::Timeout, "{r:?}");
    assert!(!r.state_lost);
    assert_eq!(r.error.as_ref().unwrap().kind, "Timeout");
    assert_eq!(
        agent.step("py", &t, "kept").await.result,
        Some(json!("yes"))
    );

    // Code that swallows the interrupt: killed, restarted, state lost.
    let code = "import time\nwhile True:\n    try:\n        time.sleep(5)\n    except KeyboardInterrupt:\n        pass";
    let r = agent.step_req("py", &t, code, Some(300)).await;
    assert_eq!(r.status, StepStatus::Timeout, "{r:?}");
    assert!(r.state_lost, "{r:?}");
    assert!(r.error.unwrap().message.contains("state was lost"));
    let r = agent.step("py", &t, "kept").await;
    assert_eq!(r.error.unwrap().kind, "NameError");
    let info = agent.client.get_session("py", Some(&t)).await.unwrap();
    assert_eq!(info.restarts, 1);

    // Node and bash time out too.
    agent.session("js", "node", &t).await;
    let r = agent.step_req("js", &t, "while (true) {}", Some(300)).await;
    assert_eq!(r.status, StepStatus::Timeout, "{r:?}");
    assert_eq!(agent.step("js", &t, "1 + 1").await.result, Some(json!(2)));
    agent.session("sh", "bash", &t).await;
    let r = agent.step_req("sh", &t, "sleep 30", Some(300)).await;
    assert_eq!(r.status, StepStatus::Timeout, "{r:?}");
    assert_eq!(agent.step("sh", &t, "echo ok").await.stdout, "ok\n");
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn output_cap_truncates_each_stream() {
    let agent = TestAgent::start(&[]).await;
    let t = token();
    let limits = Limits {
        max_output_bytes: Some(64 * 1024),
        ..Default::default()
    };
    agent.session_with("py", "python", &t, Some(limits)).await;
    let r = agent
        .step(
            "py",
            &t,
            "import sys\nsys.stdout.write('a' * 3_000_000)\nsys.stderr.write('b' * 10)\n'done'",
        )
        .await;
    assert_eq!(r.status, StepStatus::Ok, "{:?}", r.error);
    assert!(r.truncated);
    assert_eq!(r.stdout.len(), 64 * 1024);
    assert_eq!(r.stderr, "b".repeat(10));
    assert_eq!(r.result, Some(json!("done")));
    let r = agent.step("py", &t, "print('small')").await;
    assert!(!r.truncated);
    assert_eq!(r.stdout, "small\n");

    // The default cap is 1 MiB per stream.
    agent.session("py2", "python", &t).await;
    let r = agent
        .step("py2", &t, "print('x' * (2 * 1024 * 1024))")
        .await;
    assert!(r.truncated);
    assert_eq!(r.stdout.len(), 1024 * 1024);
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn streaming_delivers_output_before_the_result() {
    let agent = TestAgent::start(&[]).await;
    let t = token();
    agent.session("py", "python", &t).await;
    let code = "import sys, time\nfor i in range(3):\n    print(f'line {i}')\n    time.sleep(0.2)\nprint('e', file=sys.stderr)\n'end'";
    let req = StepRequest {
        step_id: "s1".into(),
        ..common::step_request("py", code)
    };
    let started = std::time::Instant::now();
    let mut stream = Box::pin(agent.client.step_stream(&req, Some(&t)).await.unwrap());
    let mut stdout = String::new();
    let mut stderr = String::new();
    let mut first_chunk_at = None;
    let mut result = None;
    let mut result_at = None;
    while let Some(ev) = stream.next().await {
        match ev.unwrap() {
            StepEvent::Stdout(s) => {
                first_chunk_at.get_or_insert_with(|| started.elapsed());
                stdout.push_str(&s);
            }
            StepEvent::Stderr(s) => stderr.push_str(&s),
            StepEvent::Result(r) => {
                result_at = Some(started.elapsed());
                result = Some(r);
            }
            StepEvent::Error(e) => panic!("error event {e:?}"),
        }
    }
    let result = result.expect("a final result event");
    assert_eq!(stdout, "line 0\nline 1\nline 2\n");
    assert_eq!(stderr, "e\n");
    assert_eq!(result.result, Some(json!("end")));
    assert_eq!(result.stdout, stdout);
    // The first line arrived while the step was still sleeping.
    // The first line arrived while the step was still sleeping (two more
    // 200 ms sleeps followed it), not all at once with the result.
    let first = first_chunk_at.expect("stdout chunks");
    let last = result_at.unwrap();
    assert!(
        first + std::time::Duration::from_millis(150) < last,
        "first chunk at {first:?}, result at {last:?}"
    );
    assert!(result.duration_ms >= 400);
    agent.stop().await;
}

/// A step's result lists the files it created or changed directly under
/// `output/` (and only those), so callers need no extra listing.
#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn a_step_lists_the_output_files_it_wrote() {
    let agent = TestAgent::start(&[]).await;
    let t = token();
    agent.session("out", "python", &t).await;

    let r = agent.step("out", &t, "1 + 1").await;
    assert_eq!(r.output_files, None, "no output/ yet: {r:?}");
    let r = agent
        .step(
            "out",
            &t,
            "import os\nos.makedirs('output/sub', exist_ok=True)\n\
             open('output/a.txt', 'w').write('hi')\nopen('output/sub/b.txt', 'w').write('x')",
        )
        .await;
    assert_eq!(r.status, StepStatus::Ok, "{r:?}");
    let files = r.output_files.unwrap();
    let names: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(names, ["output/a.txt"], "{files:?}");
    assert_eq!(files[0].size, 2);
    // A later step that writes nothing lists nothing; one that writes a new
    // file lists that file only.
    let r = agent.step("out", &t, "2 + 2").await;
    assert_eq!(r.output_files, None, "{r:?}");
    let r = agent
        .step("out", &t, "open('output/c.txt', 'w').write('abc')")
        .await;
    let files = r.output_files.unwrap();
    let names: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(names, ["output/c.txt"], "{files:?}");
    agent.stop().await;
}
