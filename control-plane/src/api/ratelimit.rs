//! The REST edge of `crate::limits`: a middleware behind authentication
//! (on `/v1` and on the MCP port) that takes a token from the caller's
//! request bucket and tells the bucket's state in the IETF `RateLimit-Limit`,
//! `RateLimit-Remaining` and `RateLimit-Reset` headers on every answer, plus
//! `Retry-After` on a 429. A creation refused by the domain (429
//! `rate_limited` with the creation bucket in its details) gets the same
//! headers from those details.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use shared::{ErrorBody, ErrorCode};

use crate::App;
use crate::identity::Identity;
use crate::limits::{RateInfo, RequestCheck};

/// `RateLimit-Limit`: the bucket's size.
pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
/// `RateLimit-Remaining`: tokens left.
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
/// `RateLimit-Reset`: seconds until the bucket is full again.
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Largest error body read back to find a creation refusal's bucket state.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Middleware: the request bucket, then the headers (see the module doc).
/// Runs after `authenticate`; a request without an identity passes untouched.
pub async fn enforce(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let Some(identity) = req.extensions().get::<Identity>().cloned() else {
        return next.run(req).await;
    };
    let info = match app.limits.check_request(&identity).await {
        RequestCheck::Limited(info, e) => {
            let mut resp = e.into_response();
            set_headers(resp.headers_mut(), &info);
            return resp;
        }
        RequestCheck::Allowed(info) => Some(info),
        RequestCheck::Off | RequestCheck::Unavailable => None,
    };
    let mut resp = next.run(req).await;
    if resp.status() == StatusCode::TOO_MANY_REQUESTS {
        resp = with_refusal_headers(resp).await;
        if resp.headers().contains_key(header::RETRY_AFTER) {
            return resp;
        }
    }
    if let Some(info) = info {
        set_headers(resp.headers_mut(), &info);
    }
    resp
}

/// Writes the `RateLimit-*` headers (and `Retry-After` for a refusal).
pub fn set_headers(headers: &mut HeaderMap, info: &RateInfo) {
    let mut put = |name: HeaderName, v: u64| {
        headers.insert(name, HeaderValue::from(v));
    };
    put(RATELIMIT_LIMIT, u64::from(info.limit));
    put(RATELIMIT_REMAINING, u64::from(info.remaining));
    put(RATELIMIT_RESET, info.reset_seconds);
    if let Some(retry) = info.retry_after_seconds {
        put(header::RETRY_AFTER, retry);
    }
}

/// A 429 from inside: if it is `rate_limited` with a bucket state in its
/// details (the creation bucket), the headers say that state. The body is
/// a small JSON error, read back whole and passed on unchanged.
async fn with_refusal_headers(resp: Response) -> Response {
    let (mut parts, body) = resp.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_ERROR_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return shared::CodedError::new(ErrorCode::RateLimited, "too many requests")
                .into_response();
        }
    };
    if let Ok(err) = serde_json::from_slice::<ErrorBody>(&bytes)
        && err.code == ErrorCode::RateLimited
        && let Some(info) = err
            .details
            .as_ref()
            .and_then(|d| d.get("rateLimit"))
            .and_then(|v| serde_json::from_value::<RateInfo>(v.clone()).ok())
    {
        set_headers(&mut parts.headers, &info);
    }
    Response::from_parts(parts, Body::from(bytes))
}
