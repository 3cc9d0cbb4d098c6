//! The fake API server's HTTP side: every request is recorded, checked
//! against the armed faults, then routed by path; anything the fixture does
//! not serve answers a 404 `Status` (and stays in the log, so a test sees
//! an unexpected call).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::pods::{self, DeleteOptions, PatchKind};
use crate::selector::{FieldSelector, LabelSelector};
use crate::state::{Key, WatchFilter, Watcher, event_line, now};
use crate::status::ApiError;
use crate::{RecordedRequest, Shared};

/// The fixture's routes: one fallback that routes by path itself.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(dispatch).with_state(shared)
}

type Params = BTreeMap<String, String>;

fn json_response(code: StatusCode, value: &impl Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut response = (code, body).into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => ApiError::new(500, "InternalError", e.to_string()).into_response(),
    }
}

fn ok(value: &impl Serialize) -> Response {
    json_response(StatusCode::OK, value)
}

async fn dispatch(
    State(fx): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let query: Params = Query::try_from_uri(&uri)
        .map(|Query(q)| q)
        .unwrap_or_default();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let recorded_body = if body.is_empty() {
        None
    } else {
        Some(
            serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned())),
        )
    };
    let fault = {
        let mut state = fx.state();
        state.requests.push(RecordedRequest {
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
            content_type: content_type.clone(),
            body: recorded_body,
        });
        state.take_fault(method.as_str(), &path)
    };
    if let Some(f) = fault {
        return ApiError::new(
            f.code,
            &f.reason,
            format!("injected by the k8s fixture: {} ({})", f.reason, f.code),
        )
        .into_response();
    }
    let request = Request {
        fx: &fx,
        method: &method,
        query: &query,
        content_type: content_type.as_deref().unwrap_or(""),
        body: &body,
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    route(&request, &segments).unwrap_or_else(IntoResponse::into_response)
}

/// What the handlers get of a request.
struct Request<'a> {
    fx: &'a Arc<Shared>,
    method: &'a Method,
    query: &'a Params,
    content_type: &'a str,
    body: &'a Bytes,
}

impl Request<'_> {
    fn mutating(&self) -> Result<(), ApiError> {
        if self.query.contains_key("dryRun") {
            return Err(ApiError::bad_request(
                "dryRun is not supported by the k8s fixture",
            ));
        }
        Ok(())
    }

    /// The media type without parameters (`; charset=utf-8`).
    fn media_type(&self) -> &str {
        self.content_type.split(';').next().unwrap_or("").trim()
    }
}

fn route(r: &Request<'_>, segments: &[&str]) -> Result<Response, ApiError> {
    let m = r.method;
    match segments {
        ["api", "v1", "namespaces", ns] => match *m {
            Method::GET => get_namespace(r, ns),
            _ => Err(ApiError::method_not_allowed(m.as_str())),
        },
        ["api", "v1", "namespaces", ns, "pods"] => match *m {
            Method::GET
                if r.query
                    .get("watch")
                    .is_some_and(|w| w == "true" || w == "1") =>
            {
                watch_pods(r, ns)
            }
            Method::GET => list_pods(r, ns),
            Method::POST => {
                r.mutating()?;
                let pod = pods::create(r.fx, ns, r.body)?;
                Ok(json_response(StatusCode::CREATED, &pod))
            }
            _ => Err(ApiError::method_not_allowed(m.as_str())),
        },
        ["api", "v1", "namespaces", ns, "pods", name] => {
            let key: Key = ((*ns).to_owned(), (*name).to_owned());
            match *m {
                Method::GET => {
                    r.fx.state()
                        .pods
                        .get(&key)
                        .map(|e| ok(&e.pod))
                        .ok_or_else(|| ApiError::not_found("pods", name))
                }
                Method::PATCH => {
                    r.mutating()?;
                    let kind = match r.media_type() {
                        "application/merge-patch+json"
                        | "application/strategic-merge-patch+json" => PatchKind::Merge,
                        "application/json-patch+json" => PatchKind::Json,
                        other => return Err(ApiError::unsupported_media_type(other)),
                    };
                    Ok(ok(&pods::patch(r.fx, &key, kind, r.body)?))
                }
                Method::DELETE => {
                    r.mutating()?;
                    let options = delete_options(r)?;
                    Ok(ok(&pods::delete(r.fx, &key, Some(options), None)?))
                }
                _ => Err(ApiError::method_not_allowed(m.as_str())),
            }
        }
        ["api", "v1", "namespaces", ns, "secrets", name] => match *m {
            Method::GET => get_secret(r, ns, name),
            _ => Err(ApiError::method_not_allowed(m.as_str())),
        },
        ["apis", "node.k8s.io", "v1", "runtimeclasses", name] => match *m {
            Method::GET => get_runtime_class(r, name),
            _ => Err(ApiError::method_not_allowed(m.as_str())),
        },
        [
            "apis",
            "authorization.k8s.io",
            "v1",
            "selfsubjectaccessreviews",
        ] => match *m {
            Method::POST => access_review(r),
            _ => Err(ApiError::method_not_allowed(m.as_str())),
        },
        [
            "apis",
            "networking.k8s.io",
            "v1",
            "namespaces",
            ns,
            "networkpolicies",
        ] => match *m {
            Method::GET => Ok(list_policies(r, ns)),
            _ => Err(ApiError::method_not_allowed(m.as_str())),
        },
        [
            "apis",
            "networking.k8s.io",
            "v1",
            "namespaces",
            ns,
            "networkpolicies",
            name,
        ] => {
            let key: Key = ((*ns).to_owned(), (*name).to_owned());
            match *m {
                Method::GET => {
                    r.fx.state().policies.get(&key).map(ok).ok_or_else(|| {
                        ApiError::not_found("networkpolicies.networking.k8s.io", name)
                    })
                }
                Method::PATCH => {
                    r.mutating()?;
                    apply_policy(r, &key)
                }
                Method::DELETE => {
                    r.mutating()?;
                    r.fx.state()
                        .policies
                        .remove(&key)
                        .map(|_| ok(&json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": {"name": name, "group": "networking.k8s.io", "kind": "networkpolicies"}})))
                        .ok_or_else(|| ApiError::not_found("networkpolicies.networking.k8s.io", name))
                }
                _ => Err(ApiError::method_not_allowed(m.as_str())),
            }
        }
        _ => Err(ApiError::no_route()),
    }
}

fn get_namespace(r: &Request<'_>, ns: &str) -> Result<Response, ApiError> {
    if !r.fx.options.namespaces.contains(ns) {
        return Err(ApiError::not_found("namespaces", ns));
    }
    Ok(ok(&json!({
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": {
            "name": ns,
            "uid": format!("00000000-0000-4000-8000-{:012x}", name_hash(ns)),
            "resourceVersion": "1",
            "labels": { "kubernetes.io/metadata.name": ns },
        },
        "spec": { "finalizers": ["kubernetes"] },
        "status": { "phase": "Active" },
    })))
}

/// A stable number per name (for fixed uids of built-in objects).
fn name_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) & 0xffff_ffff_ffff
}

/// A Secret of [`crate::FixtureOptions::secrets`] (values base64 in `data`).
fn get_secret(r: &Request<'_>, ns: &str, name: &str) -> Result<Response, ApiError> {
    let data =
        r.fx.options
            .secrets
            .get(&(ns.to_owned(), name.to_owned()))
            .ok_or_else(|| ApiError::not_found("secrets", name))?;
    let secret = k8s_openapi::api::core::v1::Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(ns.to_owned()),
            uid: Some(format!("00000000-0000-4000-a000-{:012x}", name_hash(name))),
            resource_version: Some("1".into()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.clone(), k8s_openapi::ByteString(v.clone())))
                .collect(),
        ),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    Ok(ok(&secret))
}

fn get_runtime_class(r: &Request<'_>, name: &str) -> Result<Response, ApiError> {
    if !r.fx.options.runtime_classes.contains(name) {
        return Err(ApiError::not_found("runtimeclasses.node.k8s.io", name));
    }
    Ok(ok(&json!({
        "kind": "RuntimeClass",
        "apiVersion": "node.k8s.io/v1",
        "metadata": {
            "name": name,
            "uid": format!("00000000-0000-4000-9000-{:012x}", name_hash(name)),
            "resourceVersion": "1",
        },
        "handler": "runsc",
    })))
}

/// `SelfSubjectAccessReview`: allowed unless `(verb, resource)` is denied.
fn access_review(r: &Request<'_>) -> Result<Response, ApiError> {
    let mut review: Value = serde_json::from_slice(r.body).map_err(|e| {
        ApiError::bad_request(format!("error decoding the SelfSubjectAccessReview: {e}"))
    })?;
    let attrs = review
        .pointer("/spec/resourceAttributes")
        .cloned()
        .unwrap_or(Value::Null);
    if attrs.is_null() && review.pointer("/spec/nonResourceAttributes").is_none() {
        return Err(ApiError::invalid(
            "SelfSubjectAccessReview",
            "",
            &["spec.resourceAttributes: Invalid value: \"null\": exactly one of nonResourceAttributes or resourceAttributes must be specified".into()],
        ));
    }
    let field = |k: &str| {
        attrs
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let (verb, resource, sub) = (field("verb"), field("resource"), field("subresource"));
    let full = if sub.is_empty() {
        resource.clone()
    } else {
        format!("{resource}/{sub}")
    };
    let denied =
        r.fx.options
            .denied
            .iter()
            .any(|(v, res)| *v == verb && (*res == resource || *res == full));
    let status = if denied {
        json!({
            "allowed": false,
            "denied": true,
            "reason": format!("the k8s fixture denies {verb} on {full}"),
        })
    } else {
        json!({ "allowed": true, "reason": "the k8s fixture allows it" })
    };
    review["status"] = status;
    review["apiVersion"] = json!("authorization.k8s.io/v1");
    review["kind"] = json!("SelfSubjectAccessReview");
    review["metadata"] = json!({ "creationTimestamp": null });
    Ok(json_response(StatusCode::CREATED, &review))
}

fn selectors(r: &Request<'_>) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(r.query.get("labelSelector").map_or("", String::as_str))
        .map_err(ApiError::bad_request)?;
    let fields =
        FieldSelector::parse_for_pods(r.query.get("fieldSelector").map_or("", String::as_str))
            .map_err(ApiError::bad_request)?;
    Ok((labels, fields))
}

/// `GET pods`: every match at the current resourceVersion (no paging:
/// `limit` is ignored and no `continue` is returned).
fn list_pods(r: &Request<'_>, ns: &str) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(r)?;
    let filter = WatchFilter {
        namespace: ns.to_owned(),
        labels,
        fields,
    };
    let state = r.fx.state();
    let items: Vec<&k8s_openapi::api::core::v1::Pod> = state
        .pods
        .values()
        .map(|e| &e.pod)
        .filter(|p| filter.matches(p))
        .collect();
    Ok(ok(&json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": { "resourceVersion": state.rv.to_string() },
        "items": items,
    })))
}

/// `GET pods?watch=true`: the changes after `resourceVersion` (all current
/// pods as ADDED when it is absent or `0`), then live ones, until
/// `timeoutSeconds` or the fixture stops; BOOKMARKs when asked for.
fn watch_pods(r: &Request<'_>, ns: &str) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(r)?;
    let filter = WatchFilter {
        namespace: ns.to_owned(),
        labels,
        fields,
    };
    let since = match r.query.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version {v:?}")))?,
        ),
    };
    let timeout = r
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let bookmarks = r
        .query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true" || b == "1");
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    {
        let mut state = r.fx.state();
        if let Some(since) = since
            && since > state.rv
        {
            return Err(ApiError::new(
                504,
                "Timeout",
                format!("Too large resource version: {since}, current: {}", state.rv),
            ));
        }
        let backlog = match since {
            Some(since) => state.replay(since, &filter),
            None => state
                .pods
                .values()
                .filter(|e| filter.matches(&e.pod))
                .filter_map(|e| serde_json::to_value(&e.pod).ok())
                .map(|o| event_line("ADDED", &o))
                .collect(),
        };
        for line in backlog {
            let _ = tx.send(line);
        }
        state.watchers.push(Watcher {
            filter,
            tx: tx.clone(),
        });
    }
    // Ends the stream at the timeout or the fixture's stop; sends the
    // bookmarks through the same channel as the events, under the store's
    // lock, so a bookmark never overtakes an event it covers.
    let end = r.fx.shutdown.child_token();
    {
        let fx = r.fx.clone();
        let end = end.clone();
        let every = fx.options.bookmark_interval;
        r.fx.tasks.spawn(async move {
            let stop_at = tokio::time::sleep(timeout);
            tokio::pin!(stop_at);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tokio::select! {
                    () = &mut stop_at => break,
                    () = end.cancelled() => break,
                    () = tx.closed() => break,
                    _ = tick.tick(), if bookmarks => {
                        let state = fx.state();
                        let object = json!({
                            "kind": "Pod",
                            "apiVersion": "v1",
                            "metadata": { "resourceVersion": state.rv.to_string() },
                        });
                        let _ = tx.send(event_line("BOOKMARK", &object));
                    }
                }
            }
            end.cancel();
        });
    }
    let stream = UnboundedReceiverStream::new(rx)
        .take_until(end.cancelled_owned())
        .map(Ok::<Bytes, Infallible>);
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// `DeleteOptions` from the body (kube sends one) or the query.
fn delete_options(r: &Request<'_>) -> Result<DeleteOptions, ApiError> {
    let mut options = DeleteOptions::default();
    if !r.body.is_empty() {
        let body: Value = serde_json::from_slice(r.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?;
        let pre = |k: &str| {
            body.pointer(&format!("/preconditions/{k}"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        options.uid = pre("uid");
        options.resource_version = pre("resourceVersion");
    }
    Ok(options)
}

fn list_policies(r: &Request<'_>, ns: &str) -> Response {
    let state = r.fx.state();
    let items: Vec<&Value> = state
        .policies
        .iter()
        .filter(|((n, _), _)| n == ns)
        .map(|(_, v)| v)
        .collect();
    ok(&json!({
        "kind": "NetworkPolicyList",
        "apiVersion": "networking.k8s.io/v1",
        "metadata": { "resourceVersion": state.rv.to_string() },
        "items": items,
    }))
}

/// Server-side apply of a NetworkPolicy: the applied object replaces what
/// is stored (one field manager owns it all), keeping `uid` and
/// `creationTimestamp`; `generation` moves when the spec changes.
fn apply_policy(r: &Request<'_>, key: &Key) -> Result<Response, ApiError> {
    let (ns, name) = (key.0.as_str(), key.1.as_str());
    if r.media_type() != "application/apply-patch+yaml" {
        return Err(ApiError::unsupported_media_type(r.media_type()));
    }
    let Some(manager) = r.query.get("fieldManager").filter(|m| !m.is_empty()) else {
        return Err(ApiError::bad_request(
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        ));
    };
    let mut applied: Value = serde_json::from_slice(r.body).map_err(|e| {
        ApiError::bad_request(format!(
            "error decoding the apply patch (the k8s fixture reads apply patches written as JSON): {e}"
        ))
    })?;
    if applied.get("apiVersion").and_then(Value::as_str) != Some("networking.k8s.io/v1")
        || applied.get("kind").and_then(Value::as_str) != Some("NetworkPolicy")
    {
        return Err(ApiError::bad_request(
            "apiVersion networking.k8s.io/v1 and kind NetworkPolicy must be set in an apply patch",
        ));
    }
    if applied.pointer("/metadata/name").and_then(Value::as_str) != Some(name) {
        return Err(ApiError::bad_request(
            "the name of the object does not match the name on the URL",
        ));
    }
    if applied
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .is_some_and(|n| n != ns)
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    if !r.fx.options.namespaces.contains(ns) {
        return Err(ApiError::not_found("namespaces", ns));
    }
    let typed: k8s_openapi::api::networking::v1::NetworkPolicy =
        serde_json::from_value(applied.clone()).map_err(|e| {
            ApiError::bad_request(format!("the NetworkPolicy does not decode: {e}"))
        })?;
    let labels = typed.metadata.labels.as_ref();
    let errors = crate::validation::check_labels("metadata.labels", labels);
    if !errors.is_empty() {
        return Err(ApiError::invalid("NetworkPolicy", name, &errors));
    }
    let mut state = r.fx.state();
    let rv = state.bump();
    let previous = state.policies.get(key).cloned();
    let (uid, created, generation) = match &previous {
        Some(p) => {
            let generation = p
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            let changed = p.get("spec") != applied.get("spec");
            (
                p.pointer("/metadata/uid").cloned().unwrap_or(Value::Null),
                p.pointer("/metadata/creationTimestamp")
                    .cloned()
                    .unwrap_or(Value::Null),
                if changed { generation + 1 } else { generation },
            )
        }
        None => (
            json!(pods::new_uid()),
            serde_json::to_value(now()).unwrap_or(Value::Null),
            1,
        ),
    };
    let meta = &mut applied["metadata"];
    meta["namespace"] = json!(ns);
    meta["uid"] = uid;
    meta["creationTimestamp"] = created;
    meta["resourceVersion"] = json!(rv.to_string());
    meta["generation"] = json!(generation);
    meta["managedFields"] = json!([{
        "manager": manager,
        "operation": "Apply",
        "apiVersion": "networking.k8s.io/v1",
        "time": serde_json::to_value(now()).unwrap_or(Value::Null),
        "fieldsType": "FieldsV1",
        "fieldsV1": {},
    }]);
    state.policies.insert(key.clone(), applied.clone());
    let code = if previous.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(json_response(code, &applied))
}
