//! The MCP server on its own port (`MCP_ADDR`): the Model Context Protocol
//! over Streamable HTTP at `/mcp` (rmcp, stateless: no tool depends on
//! in-memory MCP session state, so replicas behind one load balancer serve
//! the same client), the seed's `/tools/*` REST routes (`rest`), `/healthz`
//! and the protected-resource metadata (RFC 9728).
//!
//! Every request but `/healthz` passes the `Host`/`Origin` allowlist (DNS
//! rebinding: 403 `forbidden`), then the REST API's own authentication
//! ([`crate::api::authenticate`]: 401 with `WWW-Authenticate` before any MCP
//! message is read). Tools call the same domain services as the REST
//! handlers, with the same policy actions, idempotency and audit.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use rmcp::transport::streamable_http_server::{
    StreamableHttpServerConfig, StreamableHttpService, session::never::NeverSessionManager,
};
use serde_json::json;
use shared::CodedError;
use shared::ErrorCode;
use tokio_util::sync::CancellationToken;

use crate::App;

pub mod rest;
mod tools;

pub use tools::McpTools;

/// Where the protected-resource metadata lives (RFC 9728).
pub const METADATA_PATH: &str = "/.well-known/oauth-protected-resource";

/// The MCP port's routes (tests; [`router_with_shutdown`] in `serve_all`).
pub fn router(app: Arc<App>) -> Router {
    router_with_shutdown(app, CancellationToken::new())
}

/// The MCP port's routes; open MCP event streams end when `shutdown` is
/// cancelled, so the listener drains.
pub fn router_with_shutdown(app: Arc<App>, shutdown: CancellationToken) -> Router {
    let factory_app = app.clone();
    let config = StreamableHttpServerConfig::default()
        // Stateless: each POST carries its own request; progress
        // notifications still flow on that request's SSE response.
        .with_legacy_session_mode(false)
        .with_json_response(true)
        // Host and Origin are checked by `guard` (coded 403, our allowlist).
        .disable_allowed_hosts()
        .disable_allowed_origins()
        .with_cancellation_token(shutdown.child_token())
        // A base64 file of `max_body_bytes` plus the JSON around it.
        .with_max_request_body_bytes(app.config.max_body_bytes / 3 * 4 + 64 * 1024);
    let mcp = StreamableHttpService::new(
        move || Ok(McpTools::new(factory_app.clone())),
        Arc::new(NeverSessionManager::default()),
        config,
    );
    let authed = Router::new()
        .route_service("/mcp", mcp)
        .merge(rest::router(app.clone()))
        .layer(middleware::from_fn_with_state(
            app.clone(),
            crate::api::ratelimit::enforce,
        ))
        .layer(middleware::from_fn_with_state(
            app.clone(),
            crate::api::authenticate,
        ))
        .layer(middleware::from_fn_with_state(app.clone(), challenge));
    let metadata = Router::new()
        .route(METADATA_PATH, get(protected_resource))
        .route(&format!("{METADATA_PATH}/mcp"), get(protected_resource))
        .with_state(app.clone());
    let guarded = authed
        .merge(metadata)
        .layer(middleware::from_fn_with_state(app.clone(), guard));
    let probes = Router::new().route("/healthz", get(|| async { Json(json!({"status": "ok"})) }));
    let http = app.metrics.http.clone();
    shared::server::with_edge_layers(guarded.merge(probes).layer(middleware::from_fn_with_state(
        http,
        shared::metrics::track_http,
    )))
}

/// The scheme and authority clients reach this port at: from
/// `MCP_RESOURCE_URL`, else `http://` + the request's `Host`.
pub(crate) fn public_base(app: &App, headers: &HeaderMap) -> String {
    if let Some(url) = &app.config.mcp_resource_url {
        let after_scheme = url.find("://").map_or(0, |i| i + 3);
        let end = url[after_scheme..]
            .find('/')
            .map_or(url.len(), |i| after_scheme + i);
        return url[..end].to_owned();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost");
    format!("http://{host}")
}

/// `GET /.well-known/oauth-protected-resource`: which authorization server
/// issues the tokens this resource accepts (the MCP authorization spec).
async fn protected_resource(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let base = public_base(&app, &headers);
    let resource = app
        .config
        .mcp_resource_url
        .clone()
        .unwrap_or_else(|| format!("{base}/mcp"));
    Json(json!({
        "resource": resource,
        "authorization_servers": [app.config.issuer],
        "bearer_methods_supported": ["header"],
        "resource_name": "Sandboxed code execution (MCP)",
    }))
    .into_response()
}

/// Adds the RFC 9728 challenge to every 401 of the authenticated routes.
async fn challenge(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let base = public_base(&app, req.headers());
    let mut resp = next.run(req).await;
    if resp.status() == StatusCode::UNAUTHORIZED {
        let value = format!("Bearer resource_metadata=\"{base}{METADATA_PATH}\"");
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
    }
    resp
}

/// The `Host` and `Origin` allowlist (DNS rebinding): 403 `forbidden`.
async fn guard(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Err(e) = check_host_origin(&app.config, req.headers()) {
        return e.into_response();
    }
    next.run(req).await
}

const DEFAULT_HOSTS: &[&str] = &[
    "localhost",
    "127.0.0.1",
    "::1",
    "control-plane",
    "control-plane.*.svc",
    "control-plane.*.svc.cluster.local",
];

fn forbidden(m: String) -> CodedError {
    CodedError::new(ErrorCode::Forbidden, m)
}

/// Checks `Host` (required) and `Origin` (when present) against the
/// configured or default allowlists.
pub fn check_host_origin(config: &crate::Config, headers: &HeaderMap) -> Result<(), CodedError> {
    let hosts: Vec<String> = match &config.mcp_allowed_hosts {
        Some(list) => list
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect(),
        None => DEFAULT_HOSTS.iter().map(|h| (*h).to_owned()).collect(),
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| forbidden("a Host header is required on the MCP port".into()))?;
    let (name, _) = split_authority(host);
    if !hosts.iter().any(|p| host_matches(p, &name)) {
        return Err(forbidden(format!(
            "Host {host:?} is not allowed on the MCP port (MCP_ALLOWED_HOSTS)"
        )));
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    let refused = || {
        forbidden(format!(
            "Origin {origin:?} is not allowed on the MCP port (MCP_ALLOWED_ORIGINS)"
        ))
    };
    let (scheme, authority) = origin.split_once("://").ok_or_else(refused)?;
    if !(scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https"))
        || authority.contains('/')
    {
        return Err(refused());
    }
    let (oname, oport) = split_authority(authority);
    let ok = match &config.mcp_allowed_origins {
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .any(|allowed| {
                let Some((s, a)) = allowed.split_once("://") else {
                    return false;
                };
                let (aname, aport) = split_authority(a);
                s.eq_ignore_ascii_case(scheme)
                    && host_matches(&aname, &oname)
                    && (aport.as_deref() == Some("*") || aport == oport)
            }),
        None => hosts.iter().any(|p| host_matches(p, &oname)),
    };
    if ok { Ok(()) } else { Err(refused()) }
}

/// `host[:port]` or `[v6][:port]` -> (lowercase host without brackets, port).
fn split_authority(a: &str) -> (String, Option<String>) {
    let a = a.trim();
    if let Some(rest) = a.strip_prefix('[') {
        let (h, after) = rest.split_once(']').unwrap_or((rest, ""));
        let port = after.strip_prefix(':').map(str::to_owned);
        return (h.to_ascii_lowercase(), port);
    }
    match a.rsplit_once(':') {
        // A bare IPv6 address has more than one colon: no port.
        Some((h, p)) if !h.contains(':') => (h.to_ascii_lowercase(), Some(p.to_owned())),
        _ => (a.to_ascii_lowercase(), None),
    }
}

/// `pattern` is a host name where `*` stands for exactly one DNS label.
fn host_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.trim_start_matches('[').trim_end_matches(']');
    if !pattern.contains('*') {
        return pattern.eq_ignore_ascii_case(host);
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let h: Vec<&str> = host.split('.').collect();
    p.len() == h.len()
        && p.iter().zip(&h).all(|(p, h)| {
            if *p == "*" {
                !h.is_empty()
            } else {
                p.eq_ignore_ascii_case(h)
            }
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser;

    fn config(extra: &[&str]) -> crate::Config {
        let mut args = vec![
            "control-plane",
            "--jwt-secret",
            "0123456789abcdef0123456789abcdef",
            "--data-plane-secret",
            "0123456789abcdef0123456789abcdef",
        ];
        args.extend_from_slice(extra);
        crate::Config::parse_from(args)
    }

    fn check(c: &crate::Config, host: Option<&str>, origin: Option<&str>) -> bool {
        let mut h = HeaderMap::new();
        if let Some(v) = host {
            h.insert(header::HOST, HeaderValue::from_str(v).unwrap());
        }
        if let Some(v) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(v).unwrap());
        }
        check_host_origin(c, &h).is_ok()
    }

    #[test]
    fn default_hosts_cover_loopback_and_the_service_name_only() {
        let c = config(&[]);
        for ok in [
            "localhost:8090",
            "127.0.0.1:1234",
            "[::1]:8090",
            "LOCALHOST",
            "control-plane:8090",
            "control-plane.sandbox.svc:8090",
            "control-plane.sandbox.svc.cluster.local",
        ] {
            assert!(check(&c, Some(ok), None), "{ok}");
        }
        for bad in [
            "evil.com",
            "localhost.evil.com",
            "control-plane.evil.com",
            "control-plane.a.b.svc",
            "127.0.0.1.nip.io:8090",
            "10.0.0.1:8090",
        ] {
            assert!(!check(&c, Some(bad), None), "{bad}");
        }
        assert!(!check(&c, None, None), "no Host");
    }

    #[test]
    fn origins_must_be_on_an_allowed_host() {
        let c = config(&[]);
        assert!(check(
            &c,
            Some("localhost:8090"),
            Some("http://localhost:3000")
        ));
        assert!(check(&c, Some("localhost:8090"), Some("https://127.0.0.1")));
        for bad in [
            "http://evil.com",
            "null",
            "file://",
            "http://localhost.evil.com:80",
        ] {
            assert!(!check(&c, Some("localhost:8090"), Some(bad)), "{bad}");
        }
        let c = config(&[
            "--mcp-allowed-hosts",
            "mcp.example.com",
            "--mcp-allowed-origins",
            "https://app.example.com:*,http://localhost:3000",
        ]);
        assert!(check(
            &c,
            Some("mcp.example.com"),
            Some("https://app.example.com")
        ));
        assert!(check(
            &c,
            Some("mcp.example.com"),
            Some("http://localhost:3000")
        ));
        assert!(!check(
            &c,
            Some("mcp.example.com"),
            Some("http://localhost:3001")
        ));
        assert!(!check(&c, Some("localhost:8090"), None));
    }
}
