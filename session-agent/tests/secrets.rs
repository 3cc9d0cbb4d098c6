//! Secrets in the agent (issue 19 §4) against real sandboxes: a value given
//! at creation is in the interpreter's environment of every runtime (and of
//! a restarted interpreter), never in the sandbox's initial environment or
//! a file, and masked in what a step returns; bad secrets are a 400.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use common::{TestAgent, create_request, token};
use shared::ErrorCode;
use shared::agent::{CreateSessionRequest, StepStatus};
use shared::client::ClientError;
use shared::secrets::{SecretEnv, SecretValue};

fn secrets(pairs: &[(&str, &str)]) -> SecretEnv {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), SecretValue::new((*v).to_owned())))
        .collect()
}

fn find(dir: &std::path::Path, needle: &[u8]) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() && !p.is_symlink() {
            if let Some(hit) = find(&p, needle) {
                return Some(hit);
            }
        } else if let Ok(bytes) = std::fs::read(&p)
            && bytes.windows(needle.len()).any(|w| w == needle)
        {
            return Some(p);
        }
    }
    None
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn a_secret_reaches_only_the_interpreter_and_comes_back_masked() {
    let agent = TestAgent::start(&[]).await;
    let t = token();
    let value = format!("sa-canary-{}", hex::encode(rand::random::<[u8; 8]>()));
    for (id, runtime, print, want) in [
        (
            "py",
            "python",
            "import os\nprint('v=' + os.environ['API_TOKEN'])",
            "v=***\n",
        ),
        (
            "js",
            "node",
            "console.log('v=' + process.env.API_TOKEN)",
            "v=***\n",
        ),
        ("sh", "bash", "echo \"v=$API_TOKEN\"", "v=***\n"),
    ] {
        let req = CreateSessionRequest {
            secrets: Some(secrets(&[("API_TOKEN", &value)])),
            env: Some([("PLAIN".to_owned(), "p".to_owned())].into()),
            ..create_request(id, runtime, &t)
        };
        agent.client.create_session(&req).await.unwrap();
        let r = agent.step(id, &t, print).await;
        assert_eq!(r.stdout, want, "{runtime}: {r:?}");
    }
    // Python: the value is the one given (by its length and hash), stderr,
    // results and exceptions are masked, and the sandbox's initial
    // environment and command line do not hold it.
    let r = agent
        .step(
            "py",
            &t,
            "import hashlib, os\n[len(os.environ['API_TOKEN']), hashlib.sha256(os.environ['API_TOKEN'].encode()).hexdigest()]",
        )
        .await;
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(value.as_bytes()));
    assert_eq!(
        r.result,
        Some(serde_json::json!([value.len(), digest])),
        "{r:?}"
    );
    let r = agent
        .step(
            "py",
            &t,
            "import os, sys\nprint(os.environ['API_TOKEN'], file=sys.stderr)\n{os.environ['API_TOKEN']: [os.environ['API_TOKEN']]}",
        )
        .await;
    assert_eq!(r.stderr, "***\n", "{r:?}");
    assert_eq!(r.result, Some(serde_json::json!({"***": ["***"]})), "{r:?}");
    let r = agent
        .step(
            "py",
            &t,
            "import os\nraise KeyError(os.environ['API_TOKEN'])",
        )
        .await;
    let e = r.error.unwrap();
    assert!(
        e.message.contains("***") && !e.message.contains(&value),
        "{e:?}"
    );
    assert!(!e.traceback.contains(&value), "{e:?}");
    let r = agent
        .step(
            "py",
            &t,
            "import os\nk = os.environ['API_TOKEN'].encode()\n[open(p, 'rb').read().count(k) for p in ('/proc/1/environ', '/proc/1/cmdline', '/proc/self/environ')]",
        )
        .await;
    assert_eq!(r.result, Some(serde_json::json!([0, 0, 0])), "{r:?}");
    // A restarted interpreter (state lost) gets the secret again.
    let r = agent.step("py", &t, "import os\nos._exit(3)").await;
    assert_ne!(r.status, StepStatus::Ok, "{r:?}");
    let r = agent
        .step("py", &t, "import os\nprint(os.environ['API_TOKEN'])")
        .await;
    assert!(r.state_lost || r.stdout == "***\n", "{r:?}");
    let r = agent
        .step("py", &t, "import os\nprint(os.environ['API_TOKEN'])")
        .await;
    assert_eq!(r.stdout, "***\n", "{r:?}");
    // No file the agent or a sandbox wrote holds it (workspaces, state).
    assert_eq!(find(agent.state.path(), value.as_bytes()), None);
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn bad_secrets_are_refused_and_create_nothing() {
    let agent = TestAgent::start(&[]).await;
    let t = token();
    let long = "x".repeat(shared::secrets::MAX_SECRET_VALUE_BYTES + 1);
    let many: Vec<(String, String)> = (0..=shared::secrets::MAX_SECRETS)
        .map(|i| (format!("S{i}"), "v".to_owned()))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    for (i, (pairs, env)) in [
        (vec![("api_token", "v")], None),
        (vec![("A/B", "v")], None),
        (vec![("API_TOKEN", "a\0b")], None),
        (vec![("API_TOKEN", "")], None),
        (vec![("API_TOKEN", long.as_str())], None),
        (many, None),
        (vec![("API_TOKEN", "v")], Some("API_TOKEN")),
    ]
    .into_iter()
    .enumerate()
    {
        let req = CreateSessionRequest {
            secrets: Some(secrets(&pairs)),
            env: env.map(|k: &str| [(k.to_owned(), "x".to_owned())].into()),
            ..create_request(&format!("bad{i}"), "python", &t)
        };
        match agent.client.create_session(&req).await {
            Err(ClientError::Api { status, body }) => {
                assert_eq!(
                    (status, body.code),
                    (400, ErrorCode::InvalidArgument),
                    "{body:?}"
                );
                assert!(body.message.starts_with("secrets: "), "{body:?}");
                assert!(!body.message.contains("xxxx"), "{body:?}");
            }
            other => panic!("case {i}: {other:?}"),
        }
    }
    assert!(
        agent
            .client
            .list_sessions(None)
            .await
            .unwrap()
            .sessions
            .is_empty()
    );
    agent.stop().await;
}
