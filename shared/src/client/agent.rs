//! The session agent's API (`/v1/...`), called by the data plane with each
//! session's token.

use bytes::Bytes;
use futures::Stream;
use reqwest::{Method, RequestBuilder};

use super::{
    ClientError, Endpoint, MAX_BUFFERED_FILE, PathContent, PathStream, StepEvent, decode,
    default_http, expect_empty, files_path, path_content, path_stream, segment, sse, success,
};
use crate::agent::{
    ADMIN_TOKEN_HEADER, CreateSessionRequest, FileList, Health, SESSION_TOKEN_HEADER, SessionInfo,
    SessionList, StepRequest, StepResult,
};

const SESSIONS: &str = "/v1/sessions";

/// A client bound to one agent base URL (`http://127.0.0.1:9000`).
#[derive(Clone)]
pub struct AgentClient {
    endpoint: Endpoint,
    /// The agent's admin credential, sent on session creation.
    admin_token: Option<std::sync::Arc<str>>,
}

impl std::fmt::Debug for AgentClient {
    // The credential is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("endpoint", &self.endpoint)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl AgentClient {
    /// A client with TCP_NODELAY and a connect timeout.
    pub fn new(base_url: impl Into<String>) -> Result<Self, ClientError> {
        Ok(Self::with_http(base_url, default_http()?))
    }

    /// A client sharing an existing connection pool.
    pub fn with_http(base_url: impl Into<String>, http: reqwest::Client) -> Self {
        Self {
            endpoint: Endpoint::new(base_url, http),
            admin_token: None,
        }
    }

    /// The same client, creating sessions with the agent's admin credential
    /// (`SESSION_AGENT_ADMIN_TOKEN`): an agent that enforces auth refuses
    /// creation without it.
    pub fn with_admin_token(mut self, admin_token: Option<String>) -> Self {
        self.admin_token = admin_token.map(Into::into);
        self
    }

    /// The same client, sending `x-request-id` and `traceparent` so the
    /// agent's logs join the caller's.
    pub fn with_context(&self, request_id: Option<String>, traceparent: Option<String>) -> Self {
        Self {
            endpoint: self.endpoint.with_context(request_id, traceparent),
            admin_token: self.admin_token.clone(),
        }
    }

    fn req(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let rb = self.endpoint.request(method, path);
        match token {
            Some(t) => rb.header(SESSION_TOKEN_HEADER, t),
            None => rb,
        }
    }

    /// `GET /v1/health`.
    pub async fn health(&self) -> Result<Health, ClientError> {
        decode(self.req(Method::GET, "/v1/health", None).send().await?).await
    }

    /// `POST /v1/sessions`; the token in `req` is also sent as the header,
    /// with the admin credential when the client has one.
    pub async fn create_session(
        &self,
        req: &CreateSessionRequest,
    ) -> Result<SessionInfo, ClientError> {
        let mut rb = self
            .req(Method::POST, SESSIONS, req.token.as_deref())
            .json(req);
        if let Some(admin) = &self.admin_token {
            rb = rb.header(ADMIN_TOKEN_HEADER, &**admin);
        }
        decode(rb.send().await?).await
    }

    /// `GET /v1/sessions/{id}`.
    pub async fn get_session(
        &self,
        id: &str,
        token: Option<&str>,
    ) -> Result<SessionInfo, ClientError> {
        let path = format!("{SESSIONS}/{}", segment(id));
        decode(self.req(Method::GET, &path, token).send().await?).await
    }

    /// `GET /v1/sessions`.
    pub async fn list_sessions(&self, token: Option<&str>) -> Result<SessionList, ClientError> {
        decode(self.req(Method::GET, SESSIONS, token).send().await?).await
    }

    /// `DELETE /v1/sessions/{id}`.
    pub async fn delete_session(&self, id: &str, token: Option<&str>) -> Result<(), ClientError> {
        let path = format!("{SESSIONS}/{}", segment(id));
        expect_empty(self.req(Method::DELETE, &path, token).send().await?).await
    }

    /// `GET /v1/sessions` with the admin credential: every session.
    pub async fn list_all_sessions(&self, admin_token: &str) -> Result<SessionList, ClientError> {
        let rb = self
            .req(Method::GET, SESSIONS, None)
            .header(ADMIN_TOKEN_HEADER, admin_token);
        decode(rb.send().await?).await
    }

    /// `DELETE /v1/sessions/{id}` with the admin credential.
    pub async fn admin_delete_session(
        &self,
        id: &str,
        admin_token: &str,
    ) -> Result<(), ClientError> {
        let path = format!("{SESSIONS}/{}", segment(id));
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
        Ok(sse::step_events(success(resp).await?.bytes_stream()))
    }

    /// Lists a workspace directory (`""` is the root).
    pub async fn list_files(
        &self,
        id: &str,
        dir: &str,
        token: Option<&str>,
    ) -> Result<FileList, ClientError> {
        let path = files_path(SESSIONS, id, dir);
        decode(self.req(Method::GET, &path, token).send().await?).await
    }

    /// Reads a small workspace file whole (at most [`MAX_BUFFERED_FILE`]
    /// bytes; larger files: [`Self::open_path`]).
    pub async fn read_file(
        &self,
        id: &str,
        file: &str,
        token: Option<&str>,
    ) -> Result<Bytes, ClientError> {
        match self.open_path(id, file, token).await? {
            PathStream::File(f) => f.bytes_limited(MAX_BUFFERED_FILE).await,
            PathStream::Dir(_) => Err(ClientError::Protocol {
                status: 200,
                detail: format!("{file} is a directory"),
            }),
        }
    }

    /// Reads a workspace path: a file's bytes (at most
    /// [`MAX_BUFFERED_FILE`]) or a directory's listing.
    pub async fn read_path(
        &self,
        id: &str,
        path: &str,
        token: Option<&str>,
    ) -> Result<PathContent, ClientError> {
        let resp = self
            .req(Method::GET, &files_path(SESSIONS, id, path), token)
            .send()
            .await?;
        path_content(resp, MAX_BUFFERED_FILE).await
    }

    /// Opens a workspace path: a file's bytes as a stream (nothing buffers
    /// the whole file) or a directory's listing.
    pub async fn open_path(
        &self,
        id: &str,
        path: &str,
        token: Option<&str>,
    ) -> Result<PathStream, ClientError> {
        let resp = self
            .req(Method::GET, &files_path(SESSIONS, id, path), token)
            .send()
            .await?;
        path_stream(resp).await
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
            .req(Method::PUT, &files_path(SESSIONS, id, file), token)
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
            self.req(Method::DELETE, &files_path(SESSIONS, id, file), token)
                .send()
                .await?,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn context_headers_reach_the_agent() {
        let body = r#"{"status":"ok","isolation":"none","sessions":0,"warmPool":{},"version":"t"}"#;
        let (base, request) = crate::client::testing::answer_once(200, body).await;
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned();
        let client = AgentClient::new(base)
            .unwrap()
            .with_context(Some("req-42".into()), Some(tp.clone()));
        client.health().await.unwrap();
        let request = request.await.unwrap();
        assert!(request.contains("x-request-id: req-42"), "{request}");
        assert!(request.contains(&format!("traceparent: {tp}")), "{request}");
    }

    /// With an OpenTelemetry layer, the next hop gets the calling span's
    /// context (its spans become that span's children), not the one passed
    /// on from the caller.
    #[tokio::test(flavor = "current_thread")]
    async fn the_calling_spans_trace_context_is_injected() {
        use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
        use tracing::Instrument;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        use tracing_subscriber::prelude::*;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let _guard = tracing::subscriber::set_default(subscriber);
        crate::telemetry::mark_installed_for_tests();
        let body = r#"{"status":"ok","isolation":"none","sessions":0,"warmPool":{},"version":"t"}"#;
        let (base, request) = crate::client::testing::answer_once(200, body).await;
        let stale = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned();
        let client = AgentClient::new(base)
            .unwrap()
            .with_context(Some("req-42".into()), Some(stale.clone()));
        let span = tracing::info_span!("step");
        let sc = span.context().span().span_context().clone();
        client.health().instrument(span).await.unwrap();
        let request = request.await.unwrap();
        let expected = format!("traceparent: 00-{}-{}-01", sc.trace_id(), sc.span_id());
        assert!(request.contains(&expected), "{request}");
        assert!(!request.contains(&stale), "{request}");
        assert_eq!(request.matches("traceparent:").count(), 1, "{request}");
        assert!(request.contains("x-request-id: req-42"), "{request}");
        let _ = provider.shutdown();
    }

    #[tokio::test]
    async fn create_carries_the_admin_credential_and_debug_hides_it() {
        let body = r#"{"code":"unauthorized","message":"no"}"#;
        let (base, request) = crate::client::testing::answer_once(401, body).await;
        let admin = "adm1n-credential-adm1n-credential-adm1n-cred".to_owned();
        let client = AgentClient::new(base)
            .unwrap()
            .with_admin_token(Some(admin.clone()))
            .with_context(Some("req-1".into()), None);
        assert!(!format!("{client:?}").contains(&admin));
        let req = CreateSessionRequest {
            session_id: "s1".into(),
            runtime: "python".into(),
            token: None,
            limits: None,
            env: None,
            ttl_seconds: None,
            idle_timeout_seconds: None,
            packages_dir: None,
            secrets: None,
        };
        let e = client.create_session(&req).await.unwrap_err();
        assert_eq!(e.code(), Some(crate::ErrorCode::Unauthorized));
        let request = request.await.unwrap();
        assert!(
            request.contains(&format!("{ADMIN_TOKEN_HEADER}: {admin}")),
            "{request}"
        );
    }
}
