//! Typed HTTP client of the session agent, so no caller builds URLs by hand.

use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;

use crate::agent::{
    ADMIN_TOKEN_HEADER, CreateSessionRequest, FileList, Health, OutputChunk, SESSION_TOKEN_HEADER,
    SessionInfo, SessionList, StepRequest, StepResult, sse_event,
};
use crate::error::{ErrorBody, ErrorCode};

/// What a call to the agent can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent answered with a coded error.
    #[error("{status}: {} ({})", body.message, body.code.as_str())]
    Api { status: u16, body: ErrorBody },
    /// The agent answered something that is not the contract.
    #[error("unexpected response ({status}): {detail}")]
    Protocol { status: u16, detail: String },
    /// The agent could not be reached or the connection broke.
    #[error("transport: {0}")]
    Transport(#[from] reqwest::Error),
}

impl ClientError {
    /// The coded error, when the agent returned one.
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

/// What a workspace path holds.
#[derive(Debug, Clone, PartialEq)]
pub enum PathContent {
    File(Bytes),
    Dir(FileList),
}

/// A client bound to one agent base URL (`http://127.0.0.1:9000`).
#[derive(Debug, Clone)]
pub struct AgentClient {
    base: String,
    http: reqwest::Client,
    /// Headers sent with every request (request id, trace context).
    context: Vec<(&'static str, String)>,
}

impl AgentClient {
    /// A client with TCP_NODELAY and a connect timeout.
    pub fn new(base_url: impl Into<String>) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()?;
        Ok(Self::with_http(base_url, http))
    }

    /// A client sharing an existing connection pool.
    pub fn with_http(base_url: impl Into<String>, http: reqwest::Client) -> Self {
        let mut base = base_url.into();
        while base.ends_with('/') {
            base.pop();
        }
        Self {
            base,
            http,
            context: Vec::new(),
        }
    }

    /// The same client, sending `x-request-id` and `traceparent` so the
    /// agent's logs join the caller's.
    pub fn with_context(&self, request_id: Option<String>, traceparent: Option<String>) -> Self {
        let mut c = self.clone();
        c.context = [("x-request-id", request_id), ("traceparent", traceparent)]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
        c
    }

    fn req(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let mut rb = self.http.request(method, format!("{}{}", self.base, path));
        for (k, v) in &self.context {
            rb = rb.header(*k, v);
        }
        if let Some(t) = token {
            rb = rb.header(SESSION_TOKEN_HEADER, t);
        }
        rb
    }

    /// `GET /v1/health`.
    pub async fn health(&self) -> Result<Health, ClientError> {
        decode(self.req(Method::GET, "/v1/health", None).send().await?).await
    }

    /// `POST /v1/sessions`; the token in `req` is also sent as the header.
    pub async fn create_session(
        &self,
        req: &CreateSessionRequest,
    ) -> Result<SessionInfo, ClientError> {
        let rb = self
            .req(Method::POST, "/v1/sessions", req.token.as_deref())
            .json(req);
        decode(rb.send().await?).await
    }

    /// `GET /v1/sessions/{id}`.
    pub async fn get_session(
        &self,
        id: &str,
        token: Option<&str>,
    ) -> Result<SessionInfo, ClientError> {
        let path = format!("/v1/sessions/{}", segment(id));
        decode(self.req(Method::GET, &path, token).send().await?).await
    }

    /// `GET /v1/sessions`.
    pub async fn list_sessions(&self, token: Option<&str>) -> Result<SessionList, ClientError> {
        decode(self.req(Method::GET, "/v1/sessions", token).send().await?).await
    }

    /// `DELETE /v1/sessions/{id}`.
    pub async fn delete_session(&self, id: &str, token: Option<&str>) -> Result<(), ClientError> {
        let path = format!("/v1/sessions/{}", segment(id));
        expect_empty(self.req(Method::DELETE, &path, token).send().await?).await
    }

    /// `GET /v1/sessions` with the admin credential: every session.
    pub async fn list_all_sessions(&self, admin_token: &str) -> Result<SessionList, ClientError> {
        let rb = self
            .req(Method::GET, "/v1/sessions", None)
            .header(ADMIN_TOKEN_HEADER, admin_token);
        decode(rb.send().await?).await
    }

    /// `DELETE /v1/sessions/{id}` with the admin credential.
    pub async fn admin_delete_session(
        &self,
        id: &str,
        admin_token: &str,
    ) -> Result<(), ClientError> {
        let path = format!("/v1/sessions/{}", segment(id));
        let rb = self
            .req(Method::DELETE, &path, None)
            .header(ADMIN_TOKEN_HEADER, admin_token);
        expect_empty(rb.send().await?).await
    }

    /// `POST /v1/steps`, waiting for the whole result.
    pub async fn step(
        &self,
        req: &StepRequest,
        token: Option<&str>,
    ) -> Result<StepResult, ClientError> {
        decode(
            self.req(Method::POST, "/v1/steps", token)
                .json(req)
                .send()
                .await?,
        )
        .await
    }

    /// `POST /v1/steps` with `Accept: text/event-stream`.
    pub async fn step_stream(
        &self,
        req: &StepRequest,
        token: Option<&str>,
    ) -> Result<impl Stream<Item = Result<StepEvent, ClientError>> + use<>, ClientError> {
        let resp = self
            .req(Method::POST, "/v1/steps", token)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .json(req)
            .send()
            .await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(error_from(resp).await);
        }
        Ok(sse_events(resp.bytes_stream()))
    }

    /// Lists a workspace directory (`""` is the root).
    pub async fn list_files(
        &self,
        id: &str,
        dir: &str,
        token: Option<&str>,
    ) -> Result<FileList, ClientError> {
        let path = files_path(id, dir);
        decode(self.req(Method::GET, &path, token).send().await?).await
    }

    /// Reads a workspace file.
    pub async fn read_file(
        &self,
        id: &str,
        file: &str,
        token: Option<&str>,
    ) -> Result<Bytes, ClientError> {
        let resp = self
            .req(Method::GET, &files_path(id, file), token)
            .send()
            .await?;
        if !resp.status().is_success() {
            return Err(error_from(resp).await);
        }
        Ok(resp.bytes().await?)
    }

    /// Reads a workspace path: a file's bytes or a directory's listing.
    pub async fn read_path(
        &self,
        id: &str,
        path: &str,
        token: Option<&str>,
    ) -> Result<PathContent, ClientError> {
        let resp = self
            .req(Method::GET, &files_path(id, path), token)
            .send()
            .await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(error_from(resp).await);
        }
        let is_json = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let bytes = resp.bytes().await?;
        if is_json {
            let list = serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
                status: status.as_u16(),
                detail: format!("invalid listing: {e}"),
            })?;
            return Ok(PathContent::Dir(list));
        }
        Ok(PathContent::File(bytes))
    }

    /// Writes (creates or replaces) a workspace file.
    pub async fn write_file(
        &self,
        id: &str,
        file: &str,
        body: impl Into<reqwest::Body>,
        token: Option<&str>,
    ) -> Result<(), ClientError> {
        let rb = self
            .req(Method::PUT, &files_path(id, file), token)
            .body(body);
        expect_empty(rb.send().await?).await
    }

    /// Deletes a workspace file, symlink or directory tree.
    pub async fn delete_file(
        &self,
        id: &str,
        file: &str,
        token: Option<&str>,
    ) -> Result<(), ClientError> {
        expect_empty(
            self.req(Method::DELETE, &files_path(id, file), token)
                .send()
                .await?,
        )
        .await
    }
}

/// The workspace path travels as one encoded segment (`/` as `%2F`), so no
/// URL normalisation can resolve a `..` in it before the agent judges it. A
/// path of dots alone would still be a dot segment: it is sent as `./<dots>`.
fn files_path(id: &str, file: &str) -> String {
    let mut p = format!("/v1/sessions/{}/files", segment(id));
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

/// Percent-encodes one path segment.
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

async fn expect_empty(resp: reqwest::Response) -> Result<(), ClientError> {
    if resp.status().is_success() {
        return Ok(());
    }
    Err(error_from(resp).await)
}

async fn error_from(resp: reqwest::Response) -> ClientError {
    let status = resp.status();
    match resp.bytes().await {
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
        Err(e) => ClientError::Transport(e),
    }
}

/// Parses a `text/event-stream` body into step events.
fn sse_events(
    body: impl Stream<Item = reqwest::Result<Bytes>> + Send + 'static,
) -> impl Stream<Item = Result<StepEvent, ClientError>> {
    let body = Box::pin(body);
    futures::stream::unfold(
        (body, Vec::<u8>::new(), false),
        |(mut body, mut buf, done)| async move {
            if done {
                return None;
            }
            loop {
                if let Some(end) = find_event_end(&buf) {
                    let raw: Vec<u8> = buf.drain(..end.0 + end.1).collect();
                    match parse_event(&raw[..end.0]) {
                        Some(ev) => return Some((ev, (body, buf, false))),
                        None => continue,
                    }
                }
                match body.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        return Some((Err(ClientError::Transport(e)), (body, buf, true)));
                    }
                    None => return None,
                }
            }
        },
    )
}

/// Position and length of the blank line that ends the first event.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn parse_event(raw: &[u8]) -> Option<Result<StepEvent, ClientError>> {
    let text = String::from_utf8_lossy(raw);
    let mut name = "message".to_owned();
    let mut data = String::new();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            name = v.trim().to_owned();
        } else if let Some(v) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    if data.is_empty() {
        return None;
    }
    let bad = |e: serde_json::Error| ClientError::Protocol {
        status: StatusCode::OK.as_u16(),
        detail: format!("bad {name} event: {e}"),
    };
    Some(match name.as_str() {
        sse_event::STDOUT => serde_json::from_str::<OutputChunk>(&data)
            .map(|c| StepEvent::Stdout(c.data))
            .map_err(bad),
        sse_event::STDERR => serde_json::from_str::<OutputChunk>(&data)
            .map(|c| StepEvent::Stderr(c.data))
            .map_err(bad),
        sse_event::RESULT => serde_json::from_str::<StepResult>(&data)
            .map(|r| StepEvent::Result(Box::new(r)))
            .map_err(bad),
        sse_event::ERROR => serde_json::from_str::<ErrorBody>(&data)
            .map(StepEvent::Error)
            .map_err(bad),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_encoded() {
        assert_eq!(
            files_path("s 1", "a/b c/../d"),
            "/v1/sessions/s%201/files/a%2Fb%20c%2F..%2Fd"
        );
        assert_eq!(files_path("s", ".."), "/v1/sessions/s/files/.%2F..");
        // Nothing is left for URL normalisation to resolve.
        let url =
            reqwest::Url::parse(&format!("http://h{}", files_path("s", "../../etc"))).unwrap();
        assert_eq!(url.path(), "/v1/sessions/s/files/..%2F..%2Fetc");
        assert_eq!(files_path("s", ""), "/v1/sessions/s/files");
    }

    #[tokio::test]
    async fn context_headers_reach_the_agent() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = sock.read(&mut buf).await.unwrap();
            let body =
                r#"{"status":"ok","isolation":"none","sessions":0,"warmPool":{},"version":"t"}"#;
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            sock.write_all(resp.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&buf[..n]).to_lowercase()
        });
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned();
        let client = AgentClient::new(base)
            .unwrap()
            .with_context(Some("req-42".into()), Some(tp.clone()));
        client.health().await.unwrap();
        let request = server.await.unwrap();
        assert!(request.contains("x-request-id: req-42"), "{request}");
        assert!(request.contains(&format!("traceparent: {tp}")), "{request}");
    }

    #[tokio::test]
    async fn sse_parsing_across_chunk_boundaries() {
        let chunks: Vec<reqwest::Result<Bytes>> = vec![
            Ok(Bytes::from_static(b"event: stdout\ndata: {\"da")),
            Ok(Bytes::from_static(
                b"ta\":\"hi\\n\"}\n\nevent: stderr\r\ndata: {\"data\":\"e\"}\r\n\r\n",
            )),
            Ok(Bytes::from_static(b": keep-alive\n\n")),
        ];
        let events: Vec<_> = sse_events(futures::stream::iter(chunks)).collect().await;
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[0].as_ref().unwrap(),
            &StepEvent::Stdout("hi\n".into())
        );
        assert_eq!(events[1].as_ref().unwrap(), &StepEvent::Stderr("e".into()));
    }
}
