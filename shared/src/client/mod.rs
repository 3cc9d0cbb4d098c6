//! Typed HTTP clients of the session agent ([`AgentClient`]) and of the
//! data plane's internal API ([`DataPlaneClient`]), so no caller builds URLs
//! by hand. Both share one error type, one way of decoding coded errors and
//! one SSE parser.

use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use reqwest::{Method, RequestBuilder};
use serde::de::DeserializeOwned;

use crate::agent::{FileList, StepResult};
use crate::error::{ErrorBody, ErrorCode};

mod agent;
mod dataplane;
mod sse;

pub use agent::AgentClient;
pub use dataplane::{ArtifactDownload, DataPlaneClient, TenantClient};

/// What a call to the agent or the data plane can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with a coded error.
    #[error("{status}: {} ({})", body.message, body.code.as_str())]
    Api { status: u16, body: ErrorBody },
    /// The server answered something that is not the contract.
    #[error("unexpected response ({status}): {detail}")]
    Protocol { status: u16, detail: String },
    /// The server could not be reached, the connection broke, or the call
    /// ran past its timeout. The URL is stripped: internal addresses never
    /// travel on in an error message.
    #[error("transport: {} ({})", .0, transport_reason(.0))]
    Transport(reqwest::Error),
}

/// What went wrong on the wire, in words that name no address.
fn transport_reason(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "the connection broke"
    } else {
        "request failed"
    }
}

impl From<reqwest::Error> for ClientError {
    fn from(e: reqwest::Error) -> Self {
        ClientError::Transport(e.without_url())
    }
}

impl ClientError {
    /// The coded error, when the server returned one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { body, .. } => Some(body.code),
            _ => None,
        }
    }
}

/// One event of a streamed step.
#[derive(Debug, Clone, PartialEq)]
pub enum StepEvent {
    Stdout(String),
    Stderr(String),
    Result(Box<StepResult>),
    Error(ErrorBody),
}

/// What a workspace path holds (a file's bytes read whole: small files only;
/// see [`PathStream`]).
#[derive(Debug, Clone, PartialEq)]
pub enum PathContent {
    File(Bytes),
    Dir(FileList),
}

/// What a workspace path holds, a file's bytes still to be streamed: nothing
/// holds a whole file in memory on the way.
#[derive(Debug)]
pub enum PathStream {
    File(FileStream),
    Dir(FileList),
}

/// A workspace file being read: its size, then the bytes as they arrive.
#[derive(Debug)]
pub struct FileStream {
    /// The size announced by the server (`content-length`).
    pub size: Option<u64>,
    response: reqwest::Response,
}

impl FileStream {
    /// The bytes, chunk by chunk.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, ClientError>> + Send + 'static {
        self.response.bytes_stream().map_err(ClientError::from)
    }

    /// All the bytes, refused past `max` bytes (read no further than that).
    pub async fn bytes_limited(self, max: usize) -> Result<Bytes, ClientError> {
        let mut resp = self.response;
        if resp.content_length().is_some_and(|n| n > max as u64) {
            return Err(too_large(max));
        }
        let mut out = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            if out.len() + chunk.len() > max {
                return Err(too_large(max));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(out))
    }
}

fn too_large(max: usize) -> ClientError {
    ClientError::Api {
        status: 413,
        body: ErrorBody {
            code: ErrorCode::PayloadTooLarge,
            message: format!("the file is larger than {max} bytes; stream it instead"),
            request_id: None,
            details: None,
        },
    }
}

/// Largest error body read (a coded error is a few hundred bytes).
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Largest directory listing read.
const MAX_LISTING: usize = 16 * 1024 * 1024;

/// At most `max` bytes of a body (the rest is left unread).
async fn read_capped(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, ClientError> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = max - out.len();
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= max {
            break;
        }
    }
    Ok(out)
}

/// A reqwest client with TCP_NODELAY (small request/response pairs must not
/// wait for Nagle) and a bounded connect.
fn default_http() -> Result<reqwest::Client, ClientError> {
    Ok(reqwest::Client::builder()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(60))
        .build()?)
}

/// A base URL, a connection pool and the context headers every request of
/// one caller carries.
#[derive(Debug, Clone)]
struct Endpoint {
    base: String,
    http: reqwest::Client,
    /// Headers sent with every request (request id, trace context).
    context: Vec<(&'static str, String)>,
}

impl Endpoint {
    fn new(base_url: impl Into<String>, http: reqwest::Client) -> Self {
        let mut base = base_url.into();
        while base.ends_with('/') {
            base.pop();
        }
        Endpoint {
            base,
            http,
            context: Vec::new(),
        }
    }

    /// The same endpoint, sending `x-request-id` and `traceparent` so the
    /// server's logs join the caller's.
    fn with_context(&self, request_id: Option<String>, traceparent: Option<String>) -> Self {
        let mut e = self.clone();
        e.context = [("x-request-id", request_id), ("traceparent", traceparent)]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
        e
    }

    /// A request to `path` (already encoded) with the context headers. With
    /// an OpenTelemetry layer, the trace context is the calling span's (the
    /// next hop's spans are its children), not the one passed on.
    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let mut rb = self.http.request(method, format!("{}{}", self.base, path));
        let trace = crate::telemetry::current_trace_context();
        for (k, v) in &self.context {
            if trace.is_some() && *k == "traceparent" {
                continue;
            }
            rb = rb.header(*k, v);
        }
        for (k, v) in trace.into_iter().flatten() {
            rb = rb.header(k, v);
        }
        rb
    }
}

/// The workspace path travels as one encoded segment (`/` as `%2F`), so no
/// URL normalisation can resolve a `..` in it before the server judges it. A
/// path of dots alone would still be a dot segment: it is sent as `./<dots>`.
fn files_path(sessions: &str, id: &str, file: &str) -> String {
    let mut p = format!("{sessions}/{}/files", segment(id));
    if !file.is_empty() {
        p.push('/');
        if file.bytes().all(|b| b == b'.') {
            p.push_str(&segment(&format!("./{file}")));
        } else {
            p.push_str(&segment(file));
        }
    }
    p
}

/// Percent-encodes one path segment (or query value): everything but the
/// unreserved characters.
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A successful JSON body, or the error the response carries.
async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, ClientError> {
    let status = resp.status();
    if !status.is_success() {
        return Err(error_from(resp).await);
    }
    let bytes = resp.bytes().await?;
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
        status: status.as_u16(),
        detail: format!("invalid body: {e}"),
    })
}

/// Success without a body (204), or the error the response carries.
async fn expect_empty(resp: reqwest::Response) -> Result<(), ClientError> {
    if resp.status().is_success() {
        return Ok(());
    }
    Err(error_from(resp).await)
}

/// The response itself when it succeeded (its body still to be read).
async fn success(resp: reqwest::Response) -> Result<reqwest::Response, ClientError> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    Err(error_from(resp).await)
}

/// A coded error body becomes [`ClientError::Api`]; anything else (a proxy's
/// HTML page, a truncated body) is [`ClientError::Protocol`].
async fn error_from(resp: reqwest::Response) -> ClientError {
    let status = resp.status();
    match read_capped(resp, MAX_ERROR_BODY).await {
        Ok(bytes) => match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => ClientError::Api {
                status: status.as_u16(),
                body,
            },
            Err(_) => ClientError::Protocol {
                status: status.as_u16(),
                detail: String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned(),
            },
        },
        Err(e) => e,
    }
}

/// A file read answers with the bytes, a directory read with a JSON listing:
/// the content type tells them apart. The file's bytes are not read here.
async fn path_stream(resp: reqwest::Response) -> Result<PathStream, ClientError> {
    let resp = success(resp).await?;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        let bytes = read_capped(resp, MAX_LISTING).await?;
        let list = serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
            status: status.as_u16(),
            detail: format!("invalid listing: {e}"),
        })?;
        return Ok(PathStream::Dir(list));
    }
    Ok(PathStream::File(FileStream {
        size: resp.content_length(),
        response: resp,
    }))
}

/// [`path_stream`] with a file read whole, up to `max` bytes.
async fn path_content(resp: reqwest::Response, max: usize) -> Result<PathContent, ClientError> {
    Ok(match path_stream(resp).await? {
        PathStream::Dir(list) => PathContent::Dir(list),
        PathStream::File(f) => PathContent::File(f.bytes_limited(max).await?),
    })
}

/// The most a buffered read ([`PathContent`]) holds; larger files stream.
pub const MAX_BUFFERED_FILE: usize = 64 * 1024 * 1024;

#[cfg(test)]
pub(crate) mod testing {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server on loopback that answers one request with `status` and
    /// `body` (JSON), and hands back that request, lowercased.
    pub async fn answer_once(
        status: u16,
        body: &'static str,
    ) -> (String, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 8192];
            let n = sock.read(&mut buf).await.unwrap();
            let resp = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            sock.write_all(resp.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&buf[..n]).to_lowercase()
        });
        (base, server)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_encoded() {
        assert_eq!(
            files_path("/v1/sessions", "s 1", "a/b c/../d"),
            "/v1/sessions/s%201/files/a%2Fb%20c%2F..%2Fd"
        );
        assert_eq!(
            files_path("/v1/sessions", "s", ".."),
            "/v1/sessions/s/files/.%2F.."
        );
        // Nothing is left for URL normalisation to resolve.
        let url = reqwest::Url::parse(&format!(
            "http://h{}",
            files_path("/internal/v1/sessions", "s", "../../etc")
        ))
        .unwrap();
        assert_eq!(url.path(), "/internal/v1/sessions/s/files/..%2F..%2Fetc");
        assert_eq!(files_path("/v1/sessions", "s", ""), "/v1/sessions/s/files");
    }
}

#[cfg(test)]
mod address_tests {
    /// A transport failure's message never carries the server's URL (it is
    /// an internal address of the next plane).
    #[tokio::test]
    async fn transport_errors_carry_no_url() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let client = super::DataPlaneClient::new(&base).unwrap().as_tenant("jwt");
        let err = client.get_job("j").await.unwrap_err();
        // What callers and error bodies see: the Display.
        let text = err.to_string();
        assert!(text.contains("could not connect"), "{text}");
        assert!(!text.contains("127.0.0.1"), "{text}");
        assert!(!text.contains("http://"), "{text}");
        let agent = super::AgentClient::new(&base).unwrap();
        let err = agent.health().await.unwrap_err();
        assert!(!err.to_string().contains("127.0.0.1"), "{err}");
    }
}
