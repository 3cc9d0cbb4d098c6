//! The storage layer's boundary (issue 19, section 0), enforced the way
//! process spawning is: every line of SQL and every use of sqlx lives in
//! `src/storage/`, and storage knows nothing of HTTP or of the API's error
//! codes. This scans the crate's sources; a violation names the file, the
//! line and the rule.

use std::path::{Path, PathBuf};

/// What may appear only inside `src/storage/`: sqlx itself, the macros
/// that expand code per database, the pools behind `Db`, and SQL text.
const STORAGE_ONLY: &[(&str, &str)] = &[
    ("sqlx", "sqlx is used only in src/storage/"),
    ("on_db!", "on_db! is storage's own macro"),
    ("on_tx!", "on_tx! is storage's own macro"),
    ("Db::Postgres", "the pools behind Db are storage's"),
    ("Db::Sqlite", "the pools behind Db are storage's"),
];

/// SQL at the start of a string literal.
const SQL_STARTS: &[&str] = &[
    "SELECT ", "INSERT ", "UPDATE ", "DELETE ", "CREATE ", "DROP ", "ALTER ", "BEGIN", "WITH ",
    "SET ",
];

/// What storage must not know: the API's error type and codes, HTTP.
const NOT_IN_STORAGE: &[(&str, &str)] = &[
    (
        "CodedError",
        "storage returns StorageError, never CodedError",
    ),
    ("ErrorCode", "storage knows no API error code"),
    ("axum", "storage knows no HTTP"),
    ("StatusCode", "storage knows no HTTP status"),
    ("http::", "storage knows no HTTP"),
    ("IntoResponse", "storage knows no HTTP"),
    ("shared::server", "storage knows no HTTP"),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Whether `needle` occurs in `line` as a whole token (not inside a longer
/// identifier such as `my_sqlx` or `ErrorCodes`).
fn has_token(line: &str, needle: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    line.match_indices(needle).any(|(i, _)| {
        let before = line[..i].chars().next_back();
        let after = line[i + needle.len()..].chars().next();
        let joined_before = needle.starts_with(ident) && before.is_some_and(ident);
        let joined_after = needle.ends_with(ident) && after.is_some_and(ident);
        !(joined_before || joined_after)
    })
}

/// The code of a line: empty for a comment line, else the text before a
/// trailing `//` comment (a `//` inside a string such as a URL is kept).
fn code_of(line: &str) -> &str {
    let trimmed = line.trim_start();
    if trimmed.starts_with("//") {
        return "";
    }
    let mut in_string = false;
    let mut escaped = false;
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if in_string => escaped = true,
            b'"' => in_string = !in_string,
            b'/' if !in_string && bytes.get(i + 1) == Some(&b'/') => return &line[..i],
            _ => {}
        }
    }
    line
}

/// The violations in one file's text; `in_storage` picks the rule set.
fn violations(text: &str, in_storage: bool) -> Vec<(usize, &'static str)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = code_of(line);
        if in_storage {
            for (needle, rule) in NOT_IN_STORAGE {
                if has_token(code, needle) {
                    found.push((n + 1, *rule));
                }
            }
            continue;
        }
        for (needle, rule) in STORAGE_ONLY {
            if has_token(code, needle) {
                found.push((n + 1, *rule));
            }
        }
        // A string literal (or a continuation line of one) that starts
        // with a SQL statement.
        let sql = code
            .split('"')
            .skip(1)
            .step_by(2)
            .chain([code.trim_start()]);
        for literal in sql {
            let upper = literal.trim_start().to_ascii_uppercase();
            if SQL_STARTS.iter().any(|k| upper.starts_with(k))
                && literal
                    .trim_start()
                    .starts_with(|c: char| c.is_ascii_uppercase())
                && (literal.contains(" FROM ")
                    || literal.contains(" INTO ")
                    || literal.contains(" SET ")
                    || literal.contains(" TABLE ")
                    || literal.contains("IMMEDIATE")
                    || literal.contains("TRIGGER"))
            {
                found.push((n + 1, "SQL is written only in src/storage/"));
                break;
            }
        }
    }
    found
}

#[test]
fn sql_lives_in_storage_and_storage_knows_no_http() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let storage = src.join("storage");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(
        files.len() > 20,
        "only {} files under {}",
        files.len(),
        src.display()
    );
    let mut report = Vec::new();
    let mut storage_uses_sqlx = false;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{file:?}: {e}"));
        let in_storage = file.starts_with(&storage);
        storage_uses_sqlx |= in_storage && text.lines().any(|l| has_token(l, "sqlx"));
        for (line, rule) in violations(&text, in_storage) {
            let shown = file.strip_prefix(&src).unwrap_or(file);
            report.push(format!("src/{}:{line}: {rule}", shown.display()));
        }
    }
    assert!(
        storage_uses_sqlx,
        "no sqlx found under {}: the scan looks in the wrong place",
        storage.display()
    );
    assert!(
        report.is_empty(),
        "the storage boundary is broken (architecture/control-plane.md, section 4):\n{}",
        report.join("\n")
    );
}

/// The scanner itself: each rule fires on a violation and stays quiet on
/// comments, longer identifiers and prose.
#[test]
fn the_scan_catches_each_kind_of_violation() {
    let domain = |text: &str| violations(text, false).len();
    let storage = |text: &str| violations(text, true).len();
    assert_eq!(domain("use sqlx::Row;"), 1);
    assert_eq!(domain("let r = sqlx::query(q).execute(p).await;"), 1);
    assert_eq!(domain("on_db!(&self.db, p => p.close().await)"), 1);
    assert_eq!(domain("if let Db::Sqlite(p) = &db {"), 1);
    assert_eq!(
        domain(r#"let q = "SELECT * FROM jobs WHERE id = $1";"#),
        1,
        "a SQL literal"
    );
    assert_eq!(domain(r#"    "UPDATE jobs SET status = $1 \"#), 1);
    assert_eq!(domain("             DELETE FROM jobs WHERE id = $1\")"), 1);
    assert_eq!(domain("// sqlx is storage's; SELECT * FROM jobs"), 0);
    assert_eq!(domain("let my_sqlx_count = 1; // uses sqlx"), 0);
    assert_eq!(domain(r#"let m = "Select the runtime from the list";"#), 0);
    assert_eq!(domain(r#"let m = "the update failed";"#), 0);
    assert_eq!(storage("use shared::CodedError;"), 1);
    assert_eq!(storage("Err(CodedError::new(ErrorCode::Internal, m))"), 2);
    assert_eq!(storage("use axum::http::StatusCode;"), 3);
    assert_eq!(storage("use sqlx::Row; // not CodedError"), 0);
    assert_eq!(storage("let codes: ErrorCodes = x;"), 0);
}
