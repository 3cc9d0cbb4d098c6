//! Start-up as a person meets it: a configuration error is one line naming
//! the variable, exit code 2, and no backtrace even with RUST_BACKTRACE set.
#![allow(clippy::disallowed_methods)] // the test runs the real binary

use std::process::Command;

#[test]
fn a_configuration_error_is_one_line_and_exit_code_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_data-plane"))
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
        lines[0].starts_with("data-plane: configuration error: "),
        "{stderr}"
    );
    assert!(
        lines[0].contains("AUTH_JWT_SECRET"),
        "names the variable: {stderr}"
    );
    assert!(!stderr.contains("backtrace"), "{stderr}");
}
