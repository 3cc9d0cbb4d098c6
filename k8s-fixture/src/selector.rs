//! `labelSelector` and `fieldSelector` query parameters: parsed once per
//! request, then matched against pods (lists, watches).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

use crate::validation;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed label selector: every requirement must hold (empty = everything).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LabelSelector(Vec<Requirement>);

/// Splits on commas outside parentheses (`a in (x,y),b` is two terms).
fn split_terms(s: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    terms
}

fn key(k: &str) -> Result<String, String> {
    let k = k.trim();
    if validation::is_qualified_name(k) {
        Ok(k.to_owned())
    } else {
        Err(format!(
            "unable to parse requirement: invalid label key {k:?}"
        ))
    }
}

fn value(v: &str) -> Result<String, String> {
    let v = v.trim();
    if validation::is_label_value(v) {
        Ok(v.to_owned())
    } else {
        Err(format!(
            "unable to parse requirement: invalid label value {v:?}"
        ))
    }
}

fn set(rest: &str) -> Result<Vec<String>, String> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("unable to parse requirement: expected a (set) in {rest:?}"))?;
    inner.split(',').map(value).collect()
}

impl LabelSelector {
    /// Parses `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`, comma-separated.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(LabelSelector(reqs));
        }
        for term in split_terms(s) {
            let term = term.trim();
            let req = if let Some((k, v)) = term.split_once("!=") {
                Requirement::NotEquals(key(k)?, value(v)?)
            } else if let Some((k, v)) = term.split_once("==") {
                Requirement::Equals(key(k)?, value(v)?)
            } else if let Some((k, v)) = term.split_once('=') {
                Requirement::Equals(key(k)?, value(v)?)
            } else if let Some((k, rest)) = term.split_once(" notin ") {
                Requirement::NotIn(key(k)?, set(rest)?)
            } else if let Some((k, rest)) = term.split_once(" in ") {
                Requirement::In(key(k)?, set(rest)?)
            } else if let Some(k) = term.strip_prefix('!') {
                Requirement::NotExists(key(k)?)
            } else {
                Requirement::Exists(key(term)?)
            };
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k));
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => get(k) == Some(v),
            Requirement::NotEquals(k, v) => get(k) != Some(v),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
            Requirement::In(k, vs) => get(k).is_some_and(|x| vs.contains(x)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|x| !vs.contains(x)),
        })
    }
}

/// The pod fields a field selector may name (those the API server indexes for pods).
const POD_FIELDS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "status.phase",
    "status.podIP",
];

fn pod_field(pod: &Pod, field: &str) -> String {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let v = match field {
        "metadata.name" => pod.metadata.name.clone(),
        "metadata.namespace" => pod.metadata.namespace.clone(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "spec.restartPolicy" => spec.and_then(|s| s.restart_policy.clone()),
        "spec.schedulerName" => spec.and_then(|s| s.scheduler_name.clone()),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()),
        "status.phase" => status.and_then(|s| s.phase.clone()),
        "status.podIP" => status.and_then(|s| s.pod_ip.clone()),
        _ => None,
    };
    v.unwrap_or_default()
}

/// A parsed field selector over pods: `field=value`, `field==value`, `field!=value`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses a pod field selector; an unknown field is refused as the API server does.
    pub fn parse_for_pods(s: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        if s.trim().is_empty() {
            return Ok(FieldSelector(terms));
        }
        for term in s.split(',') {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!("invalid selector: {term:?}; can't understand it"));
            };
            let field = field.trim();
            if !POD_FIELDS.contains(&field) {
                return Err(format!(
                    "field label not supported: {field} (the fixture knows {})",
                    POD_FIELDS.join(", ")
                ));
            }
            terms.push((field.to_owned(), equal, value.trim().to_owned()));
        }
        Ok(FieldSelector(terms))
    }

    pub fn matches(&self, pod: &Pod) -> bool {
        self.0
            .iter()
            .all(|(field, equal, value)| (pod_field(pod, field) == *value) == *equal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn label_selectors() {
        let l = labels(&[("role", "runtime"), ("state", "warm"), ("owner", "dp")]);
        for (sel, want) in [
            ("", true),
            ("role=runtime", true),
            ("role==runtime,state=warm", true),
            ("role=runtime,state=bound", false),
            ("state!=bound", true),
            ("state!=warm", false),
            ("owner", true),
            ("session", false),
            ("!session", true),
            ("!owner", false),
            ("state in (warm,bound)", true),
            ("state notin (warm)", false),
            ("session notin (a),role=runtime", true),
        ] {
            let s = LabelSelector::parse(sel).expect(sel);
            assert_eq!(s.matches(Some(&l)), want, "{sel}");
        }
        assert!(LabelSelector::parse("state!=x").expect("ok").matches(None));
        for bad in ["a=b c", "-x", "a in x", "a=-b"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn field_selectors() {
        let mut pod = Pod::default();
        pod.metadata.name = Some("sbx-1".into());
        let s = FieldSelector::parse_for_pods("metadata.name=sbx-1").expect("parses");
        assert!(s.matches(&pod));
        let s = FieldSelector::parse_for_pods("metadata.name!=sbx-1").expect("parses");
        assert!(!s.matches(&pod));
        assert!(FieldSelector::parse_for_pods("spec.image=x").is_err());
    }
}
