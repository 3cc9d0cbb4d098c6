//! The API server's syntax rules the fixture enforces: object names, label
//! and annotation keys and values, resource quantities. Each check returns
//! the field error text the API server would put in a 422.

use std::collections::BTreeMap;

/// Largest total size of a pod's annotations (keys plus values), as the API server allows.
const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;

fn alnum_lower(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// RFC 1123 label: 1-63 of `[a-z0-9-]`, alphanumeric at both ends.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| alnum_lower(b) || b == b'-')
        && s.bytes().next().is_some_and(alnum_lower)
        && s.bytes().last().is_some_and(alnum_lower)
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// The error for an object name that is not a DNS-1123 subdomain.
pub fn check_object_name(name: &str) -> Result<(), String> {
    if is_dns_subdomain(name) {
        Ok(())
    } else {
        Err(format!(
            "metadata.name: Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
        ))
    }
}

/// A qualified name's name part, or a non-empty label value: 1-63 of
/// `[A-Za-z0-9._-]`, alphanumeric at both ends.
fn is_qualified_part(s: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_alphanumeric();
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| alnum(b) || matches!(b, b'-' | b'_' | b'.'))
        && s.bytes().next().is_some_and(alnum)
        && s.bytes().last().is_some_and(alnum)
}

/// A label or annotation key: `[prefix/]name`, the prefix a DNS subdomain.
pub fn is_qualified_name(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_qualified_part(name),
        None => is_qualified_part(key),
    }
}

/// A label value: empty or a qualified name part.
pub fn is_label_value(value: &str) -> bool {
    value.is_empty() || is_qualified_part(value)
}

/// Field errors of a label map (`field` is e.g. `metadata.labels`).
pub fn check_labels(field: &str, labels: Option<&BTreeMap<String, String>>) -> Vec<String> {
    let mut errors = Vec::new();
    for (key, value) in labels.into_iter().flatten() {
        if !is_qualified_name(key) {
            errors.push(format!(
                "{field}: Invalid value: {key:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (an optional DNS subdomain prefix and '/' may precede it)"
            ));
        }
        if !is_label_value(value) {
            errors.push(format!(
                "{field}: Invalid value: {value:?}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (at most 63 characters)"
            ));
        }
    }
    errors
}

/// Field errors of an annotation map.
pub fn check_annotations(
    field: &str,
    annotations: Option<&BTreeMap<String, String>>,
) -> Vec<String> {
    let mut errors = Vec::new();
    let mut total = 0;
    for (key, value) in annotations.into_iter().flatten() {
        total += key.len() + value.len();
        if !is_qualified_name(&key.to_ascii_lowercase()) {
            errors.push(format!(
                "{field}: Invalid value: {key:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (an optional DNS subdomain prefix and '/' may precede it)"
            ));
        }
    }
    if total > MAX_ANNOTATIONS_BYTES {
        errors.push(format!(
            "{field}: Too long: may not be more than {MAX_ANNOTATIONS_BYTES} bytes"
        ));
    }
    errors
}

/// A resource quantity (`500m`, `1`, `0.5`, `512Mi`, `1G`, `1e3`) in base
/// units (cores, bytes); `None` when it does not parse.
pub fn parse_quantity(s: &str) -> Option<f64> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(end);
    if number.is_empty() || number == "+" || number == "-" {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "Pi" => 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "Ei" => 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0,
        exp if exp.starts_with(['e', 'E']) => {
            let power: i32 = exp[1..].parse().ok()?;
            10f64.powi(power)
        }
        _ => return None,
    };
    let v = value * factor;
    v.is_finite().then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let longest = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "a".repeat(61));
        assert_eq!(longest.len(), 253);
        for ok in ["sbx-abc", "a", "a.b-c", &longest] {
            assert!(check_object_name(ok).is_ok(), "{ok}");
        }
        let too_long = format!("a{longest}");
        for bad in [
            "",
            "Sbx",
            "-a",
            "a-",
            "a_b",
            "a..b",
            &"a".repeat(64),
            &too_long,
        ] {
            assert!(check_object_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn labels() {
        let ok = BTreeMap::from([
            ("agentsandbox.dev/state".to_owned(), "warm".to_owned()),
            ("app".to_owned(), String::new()),
            ("a_b.c".to_owned(), "X-1_2.3".to_owned()),
        ]);
        assert!(check_labels("metadata.labels", Some(&ok)).is_empty());
        for (k, v) in [
            ("-a", "x"),
            ("a/b/c", "x"),
            ("Bad.Prefix/x", "x"),
            ("a", "-x"),
            ("a", "has space"),
        ] {
            let m = BTreeMap::from([(k.to_owned(), v.to_owned())]);
            assert_eq!(
                check_labels("metadata.labels", Some(&m)).len(),
                1,
                "{k}={v}"
            );
        }
        let long = BTreeMap::from([("a".to_owned(), "x".repeat(64))]);
        assert_eq!(check_labels("metadata.labels", Some(&long)).len(), 1);
    }

    #[test]
    fn quantities() {
        for (q, v) in [
            ("500m", 0.5),
            ("1", 1.0),
            ("0.25", 0.25),
            ("512Mi", 512.0 * 1024.0 * 1024.0),
            ("1Gi", 1024.0 * 1024.0 * 1024.0),
            ("1G", 1e9),
            ("1e3", 1000.0),
            ("2k", 2000.0),
        ] {
            assert_eq!(parse_quantity(q), Some(v), "{q}");
        }
        for bad in ["", "m", "1x", "Mi", "1..2", "abc"] {
            assert_eq!(parse_quantity(bad), None, "{bad}");
        }
    }
}
