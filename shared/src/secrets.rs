//! Named secrets (issue 19 §4, decision 8): the names a request may carry,
//! the value type that never prints, and the masker that replaces a value in
//! the code's output.
//!
//! A name is checked at every plane's edge by [`check_names`]; it is also the
//! environment variable the interpreter sees. A value exists only in the data
//! plane (which resolves it from its secret source) and the session agent
//! (which puts it into the interpreter's environment and masks it in what the
//! code prints); it travels between them only inside the agent's
//! authenticated create-session call.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// Secrets one session or job may name, at most.
pub const MAX_SECRETS: usize = 16;
/// Longest secret name (the interpreter's environment variable).
pub const MAX_SECRET_NAME_LEN: usize = 64;
/// Longest secret value the data plane hands out, bytes.
pub const MAX_SECRET_VALUE_BYTES: usize = 4096;
/// What a secret value is replaced with in output, results and errors.
pub const MASK: &str = "***";

/// Checks one name: `^[A-Z][A-Z0-9_]{0,63}$`, the environment variable the
/// interpreter sees (upper case, so it never collides with a lower-case path
/// part or a tenant id in a secret source's key).
pub fn check_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_SECRET_NAME_LEN
        && b[0].is_ascii_uppercase()
        && b.iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_');
    if ok {
        Ok(())
    } else {
        // The name is bounded before it is echoed back.
        let shown: String = name.chars().take(MAX_SECRET_NAME_LEN + 1).collect();
        Err(format!(
            "secret name {shown:?} must match ^[A-Z][A-Z0-9_]{{0,63}}$ (the environment variable the code reads)"
        ))
    }
}

/// Checks the names of one request: at most [`MAX_SECRETS`], each valid
/// ([`check_name`]), none twice.
pub fn check_names(names: &[String]) -> Result<(), String> {
    if names.len() > MAX_SECRETS {
        return Err(format!(
            "at most {MAX_SECRETS} secrets per request, got {}",
            names.len()
        ));
    }
    for (i, n) in names.iter().enumerate() {
        check_name(n)?;
        if names[..i].contains(n) {
            return Err(format!("secret {n:?} is named twice"));
        }
    }
    Ok(())
}

/// Refuses a secret whose name is also a plain `env` variable of the same
/// request (which one the code would see is not something to guess).
pub fn check_no_env_clash(
    names: &[String],
    env: Option<&BTreeMap<String, String>>,
) -> Result<(), String> {
    match env.and_then(|e| names.iter().find(|n| e.contains_key(n.as_str()))) {
        Some(n) => Err(format!("{n:?} is both a secret and an env variable")),
        None => Ok(()),
    }
}

/// A secret's value: zeroed when dropped, `***` when printed with `{:?}`,
/// and only readable through [`SecretValue::expose`]. It serializes as the
/// plain string, for the one hop that needs it (data plane -> agent).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    pub fn new(value: String) -> SecretValue {
        SecretValue(Zeroizing::new(value))
    }

    /// The value itself: for the interpreter's environment and the masker only.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

impl Serialize for SecretValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.expose())
    }
}

impl<'de> Deserialize<'de> for SecretValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SecretValue, D::Error> {
        String::deserialize(d).map(SecretValue::new)
    }
}

/// Name -> value of one session's secrets, as the agent receives them.
pub type SecretEnv = BTreeMap<String, SecretValue>;

/// Replaces every secret value in text with [`MASK`]. Longer values first,
/// so a value that contains another is masked whole. Empty values are never
/// searched for.
#[derive(Clone, Default)]
pub struct Masker {
    values: Vec<SecretValue>,
    /// Longest value, bytes.
    longest: usize,
}

impl fmt::Debug for Masker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Masker({} values)", self.values.len())
    }
}

impl Masker {
    pub fn new<'a>(values: impl IntoIterator<Item = &'a SecretValue>) -> Masker {
        let mut values: Vec<SecretValue> = values
            .into_iter()
            .filter(|v| !v.expose().is_empty())
            .cloned()
            .collect();
        values.sort_by_key(|v| std::cmp::Reverse(v.expose().len()));
        values.dedup();
        let longest = values.first().map_or(0, |v| v.expose().len());
        Masker { values, longest }
    }

    /// True when there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// `text` with every value replaced by [`MASK`].
    pub fn mask(&self, text: &str) -> String {
        let mut out = text.to_owned();
        self.mask_in_place(&mut out);
        out
    }

    /// Masks `text` where it is.
    pub fn mask_in_place(&self, text: &mut String) {
        for v in &self.values {
            if text.contains(v.expose()) {
                *text = text.replace(v.expose(), MASK);
            }
        }
    }

    /// Masks every string (and object key) inside a JSON value.
    pub fn mask_json(&self, value: &mut serde_json::Value) {
        if self.is_empty() {
            return;
        }
        match value {
            serde_json::Value::String(s) => self.mask_in_place(s),
            serde_json::Value::Array(items) => items.iter_mut().for_each(|v| self.mask_json(v)),
            serde_json::Value::Object(map) => {
                let old = std::mem::take(map);
                for (k, mut v) in old {
                    self.mask_json(&mut v);
                    map.insert(self.mask(&k), v);
                }
            }
            _ => {}
        }
    }

    /// A masker for one stream of chunks (stdout or stderr of one step).
    pub fn stream(&self) -> StreamMasker<'_> {
        StreamMasker {
            masker: self,
            held: String::new(),
        }
    }

    /// Length of the longest suffix of `text` that is the start of a value
    /// (but not a whole one): what must wait for the next chunk.
    fn pending_suffix(&self, text: &str) -> usize {
        let max = self.longest.saturating_sub(1).min(text.len());
        for k in (1..=max).rev() {
            let start = text.len() - k;
            if !text.is_char_boundary(start) {
                continue;
            }
            let tail = &text[start..];
            if self
                .values
                .iter()
                .any(|v| v.expose().len() > k && v.expose().starts_with(tail))
            {
                return k;
            }
        }
        0
    }
}

/// Masks a stream whose chunks may split a value: the end of a chunk that
/// could be the start of a value is held back until the next chunk shows
/// whether it is (at most the longest value's length minus one byte), and
/// released by [`StreamMasker::finish`].
pub struct StreamMasker<'a> {
    masker: &'a Masker,
    held: String,
}

impl StreamMasker<'_> {
    /// The masked text that can be sent now (possibly empty).
    pub fn push(&mut self, chunk: &str) -> String {
        if self.masker.is_empty() {
            return chunk.to_owned();
        }
        self.held.push_str(chunk);
        self.masker.mask_in_place(&mut self.held);
        let keep = self.masker.pending_suffix(&self.held);
        let tail = self.held.split_off(self.held.len() - keep);
        std::mem::replace(&mut self.held, tail)
    }

    /// Whatever was held back, masked: the end of the stream.
    pub fn finish(self) -> String {
        self.masker.mask(&self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker(values: &[&str]) -> Masker {
        let v: Vec<SecretValue> = values
            .iter()
            .map(|s| SecretValue::new((*s).into()))
            .collect();
        Masker::new(&v)
    }

    #[test]
    fn names_are_environment_variables() {
        for ok in ["A", "DB_PASSWORD", "X1", &format!("A{}", "B".repeat(63))] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a",
            "db",
            "1A",
            "_A",
            "A-B",
            "A.B",
            "A B",
            "A/B",
            "../A",
            "A\0",
            "Ä",
            &format!("A{}", "B".repeat(64)),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_request_names_few_distinct_secrets() {
        let many: Vec<String> = (0..=MAX_SECRETS).map(|i| format!("S{i}")).collect();
        assert!(check_names(&many[..MAX_SECRETS]).is_ok());
        assert!(check_names(&many).unwrap_err().contains("at most"));
        let twice = vec!["A".to_owned(), "A".to_owned()];
        assert!(check_names(&twice).unwrap_err().contains("twice"));
        let env = BTreeMap::from([("A".to_owned(), "1".to_owned())]);
        assert!(check_no_env_clash(&["A".into()], Some(&env)).is_err());
        assert!(check_no_env_clash(&["B".into()], Some(&env)).is_ok());
    }

    #[test]
    fn a_value_never_prints() {
        let v = SecretValue::new("hunter2-canary".into());
        let env: SecretEnv = BTreeMap::from([("PW".to_owned(), v.clone())]);
        let shown = format!("{v:?} {env:?} {:?}", Masker::new(std::slice::from_ref(&v)));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains(MASK));
        // It does serialize (the one hop to the agent) and round-trips.
        let json = serde_json::to_string(&env).unwrap();
        assert_eq!(json, r#"{"PW":"hunter2-canary"}"#);
        let back: SecretEnv = serde_json::from_str(&json).unwrap();
        assert_eq!(back["PW"].expose(), "hunter2-canary");
    }

    #[test]
    fn masking_replaces_every_value_longest_first() {
        let m = masker(&["abc", "abcdef", ""]);
        assert_eq!(m.mask("x abcdef y abc z"), "x *** y *** z");
        assert_eq!(m.mask("nothing here"), "nothing here");
        let mut j = serde_json::json!({"k": ["abc", 1, {"abcdef": "v abc"}]});
        m.mask_json(&mut j);
        assert_eq!(j, serde_json::json!({"k": ["***", 1, {"***": "v ***"}]}));
        assert!(Masker::default().is_empty());
    }

    #[test]
    fn a_value_split_across_chunks_is_masked() {
        let m = masker(&["SECRET-VALUE"]);
        // Every split of the value into two chunks, with text around it.
        let text = "before SECRET-VALUE after";
        for cut in 0..=text.len() {
            let mut s = m.stream();
            let mut out = s.push(&text[..cut]);
            out.push_str(&s.push(&text[cut..]));
            out.push_str(&s.finish());
            assert_eq!(out, "before *** after", "cut at {cut}");
        }
        // One byte at a time, and a near miss that must come out whole.
        let text = "SECRET-VALUX SECRET-VALUE SECRET-";
        let mut s = m.stream();
        let mut out = String::new();
        for c in text.chars() {
            out.push_str(&s.push(&c.to_string()));
        }
        out.push_str(&s.finish());
        assert_eq!(out, "SECRET-VALUX *** SECRET-");
    }

    #[test]
    fn only_a_possible_start_of_a_value_is_held_back() {
        let m = masker(&["SECRET-VALUE"]);
        let mut s = m.stream();
        assert_eq!(s.push("plain line\n"), "plain line\n");
        assert_eq!(s.push("x SEC"), "x ");
        assert_eq!(s.push("OND"), "SECOND");
        assert_eq!(s.finish(), "");
        // Multi-byte text around a split value.
        let m = masker(&["ключ-42"]);
        let mut s = m.stream();
        let mut out = s.push("é ключ");
        out.push_str(&s.push("-42 ü"));
        out.push_str(&s.finish());
        assert_eq!(out, "é *** ü");
    }
}
