//! The Python driver's JSON codec, outside any sandbox: the one over the C
//! accelerator `_json` (what every sandbox uses) and the `import json`
//! fallback (for an interpreter whose `_json` differs) must read and write
//! the protocol byte for byte alike. Runs `/usr/bin/python3` directly, as the
//! bare baselines of `make bench` do; the sandboxed driver is covered by
//! `kernels.rs`.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
#![allow(clippy::disallowed_methods)] // runs the host interpreter with the driver, no sandbox

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use session_agent::kernels::{PYTHON_DRIVER, PYTHON_FLAGS};

const PYTHON: &str = "/usr/bin/python3";

/// Requests, one per line, as the agent writes them (plus lines the driver
/// must ignore).
fn requests() -> Vec<String> {
    let event = json!({
        "text": "caf\u{e9} \u{2028} \u{1f600} \u{1} \"quoted\" back\\slash\ttab\nline",
        "numbers": [0, -1, 9_007_199_254_740_993_u64, 1.5, -2.25e-8, 1e300],
        "nested": {"a": [[], {}, [null, true, false]], "": ""},
    });
    let mut lines = vec![
        json!({"nonce": "echo", "code": "def handler(event):\n    return event", "mode": "handler", "event": event}).to_string(),
        // Not JSON, trailing data, a missing nonce: ignored, no answer.
        "garbage".to_owned(),
        r#"{"nonce": "trailing", "code": "1"} extra"#.to_owned(),
        r#"{"code": "1"}"#.to_owned(),
        // Whitespace around a value is JSON.
        format!(
            "  {}  ",
            json!({"nonce": "spaced", "code": "'\u{e9}' * 2"})
        ),
        json!({"nonce": "nan-eval", "code": "float('nan')"}).to_string(),
        json!({"nonce": "nan-handler", "code": "def handler(e):\n    return float('inf')", "mode": "handler", "event": null}).to_string(),
        json!({"nonce": "object", "code": "def handler(e):\n    return {'o': object}", "mode": "handler", "event": {}}).to_string(),
        json!({"nonce": "circular", "code": "l = []\nl.append(l)\nl"}).to_string(),
        json!({"nonce": "keys", "code": "{1: 'int key', None: 'none key', 2.5: 'float key'}"}).to_string(),
        json!({"nonce": "big", "code": "2 ** 70"}).to_string(),
    ];
    lines.push(String::new());
    lines
}

/// Runs the driver over [`requests`]; returns each answer as (nonce, raw JSON).
fn run(prelude: &str) -> Vec<(String, String)> {
    let source = format!("{prelude}{PYTHON_DRIVER}");
    let mut child = Command::new(PYTHON)
        .args(PYTHON_FLAGS)
        .arg("-c")
        .arg(&source)
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{PYTHON} is needed (apt-get install -y python3): {e}"));
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(requests().join("\n").as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "driver failed: {out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("\u{1e}\u{1e}SA:"))
        .map(|l| {
            let (nonce, body) = l.split_once(':').unwrap();
            (nonce.to_owned(), body.to_owned())
        })
        .collect()
}

#[test]
fn the_c_codec_and_the_json_fallback_agree_byte_for_byte() {
    let fast = run("");
    let fallback = run("import sys\nsys.modules['_json'] = None\n");
    // Byte for byte, except that the pure-Python encoder (which `json` uses
    // when `_json` is missing) names the float it refuses.
    let normalize = |answers: &[(String, String)]| -> Vec<(String, String)> {
        answers
            .iter()
            .map(|(n, raw)| {
                (
                    n.clone(),
                    raw.replace("not JSON compliant: inf", "not JSON compliant"),
                )
            })
            .collect()
    };
    assert_eq!(normalize(&fast), normalize(&fallback));

    let nonces: Vec<&str> = fast.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        nonces,
        [
            "echo",
            "spaced",
            "nan-eval",
            "nan-handler",
            "object",
            "circular",
            "keys",
            "big"
        ],
        "malformed lines must get no answer"
    );
    let answer = |nonce: &str| -> Value {
        let raw = &fast.iter().find(|(n, _)| n == nonce).unwrap().1;
        assert!(raw.is_ascii(), "protocol output is ASCII: {raw}");
        serde_json::from_str(raw).unwrap()
    };
    let echo = answer("echo");
    assert_eq!(echo["status"], "ok", "{echo}");
    let sent: Value = serde_json::from_str(&requests()[0]).unwrap();
    assert_eq!(echo["result"], sent["event"]);

    assert_eq!(answer("spaced")["result"], "\u{e9}\u{e9}");
    // Not JSON: an eval result comes back as its repr...
    assert_eq!(answer("nan-eval")["result"], "nan");
    assert_eq!(answer("circular")["result"], "[[...]]");
    // ...a handler's result must be JSON.
    for (nonce, message) in [
        (
            "nan-handler",
            "handler(event) must return a JSON value: Out of range float values are not JSON compliant",
        ),
        (
            "object",
            "handler(event) must return a JSON value: Object of type type is not JSON serializable",
        ),
    ] {
        let a = answer(nonce);
        assert_eq!(a["status"], "error", "{a}");
        assert_eq!(a["error"]["type"], "TypeError");
        assert_eq!(a["error"]["message"], message);
    }
    assert_eq!(
        answer("keys")["result"],
        json!({"1": "int key", "null": "none key", "2.5": "float key"})
    );
    let big = &fast.iter().find(|(n, _)| n == "big").unwrap().1;
    assert!(big.contains("1180591620717411303424"), "{big}");
}
