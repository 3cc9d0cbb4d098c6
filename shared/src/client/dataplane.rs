//! The data plane's internal API (`/internal/v1/...`), called by the control
//! plane. Every call acts for one tenant, named by the service credential
//! the caller mints: `DataPlaneClient::as_tenant(credential)` gives the
//! [`TenantClient`] that sends it.

use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use reqwest::{Method, RequestBuilder};

use super::{
    ClientError, Endpoint, MAX_BUFFERED_FILE, PathContent, PathStream, StepEvent, decode,
    default_http, expect_empty, files_path, path_content, path_stream, segment, sse, success,
};
use crate::agent::{FileList, StepResult};
use crate::dataplane::{
    ArtifactFilter, ArtifactInfo, ArtifactList, ArtifactMeta, CreateSession, JobResult,
    ProbeStatus, RunJob, RunStep, RuntimeList, STEP_MARGIN_MS, SessionView, SessionViewList,
};

const SESSIONS: &str = "/internal/v1/sessions";
const ARTIFACTS: &str = "/internal/v1/artifacts";
const JOBS: &str = "/internal/v1/jobs";

/// A client bound to one data plane base URL (`http://127.0.0.1:8081`).
/// Cheap to clone: clones share one connection pool.
#[derive(Debug, Clone)]
pub struct DataPlaneClient {
    endpoint: Endpoint,
    timeout: Duration,
}

impl DataPlaneClient {
    /// Bound on a call that runs no code, unless [`Self::with_timeout`] says
    /// otherwise (the control plane's `DATA_PLANE_TIMEOUT` default).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// A client with TCP_NODELAY and a connect timeout.
    pub fn new(base_url: impl Into<String>) -> Result<Self, ClientError> {
        Ok(Self::with_http(base_url, default_http()?))
    }

    /// A client sharing an existing connection pool.
    pub fn with_http(base_url: impl Into<String>, http: reqwest::Client) -> Self {
        Self {
            endpoint: Endpoint::new(base_url, http),
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    /// The same client with another bound on each call; code-running calls
    /// get it on top of the code's own time.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The same client, sending `x-request-id` and `traceparent` so the data
    /// plane's (and the agent's) logs join the caller's.
    pub fn with_context(&self, request_id: Option<String>, traceparent: Option<String>) -> Self {
        Self {
            endpoint: self.endpoint.with_context(request_id, traceparent),
            timeout: self.timeout,
        }
    }

    /// The client acting for the tenant `credential` names: it is sent as
    /// `Authorization: Bearer` with every call. Minting it is the caller's job.
    pub fn as_tenant(&self, credential: impl Into<String>) -> TenantClient {
        TenantClient {
            endpoint: self.endpoint.clone(),
            timeout: self.timeout,
            credential: credential.into(),
        }
    }

    /// `GET /healthz`: the process is up.
    pub async fn health(&self) -> Result<ProbeStatus, ClientError> {
        self.probe("/healthz").await
    }

    /// `GET /readyz`: the agent and the session registry answer (503
    /// `sandbox_unavailable` otherwise).
    pub async fn ready(&self) -> Result<ProbeStatus, ClientError> {
        self.probe("/readyz").await
    }

    async fn probe(&self, path: &str) -> Result<ProbeStatus, ClientError> {
        let rb = self
            .endpoint
            .request(Method::GET, path)
            .timeout(self.timeout);
        decode(rb.send().await?).await
    }
}

/// A [`DataPlaneClient`] acting for one tenant (its service credential).
#[derive(Clone)]
pub struct TenantClient {
    endpoint: Endpoint,
    timeout: Duration,
    /// The service credential; never printed.
    credential: String,
}

impl std::fmt::Debug for TenantClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantClient")
            .field("endpoint", &self.endpoint.base)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A streamed artifact download: what the headers say, then the bytes as
/// they arrive. A bit altered at rest ends the stream with an error part way.
#[derive(Debug)]
pub struct ArtifactDownload {
    /// 200 for the whole artifact, 206 for a range.
    pub status: u16,
    /// Bytes in this body (`content-length`).
    pub size: Option<u64>,
    /// SHA-256 of the plaintext, hex (`x-artifact-sha256`).
    pub sha256: Option<String>,
    /// `bytes a-b/size` of a 206.
    pub content_range: Option<String>,
    response: reqwest::Response,
}

impl ArtifactDownload {
    /// The bytes, chunk by chunk.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, ClientError>> + Send + 'static {
        self.response.bytes_stream().map_err(ClientError::from)
    }

    /// All the bytes at once (for small artifacts).
    pub async fn bytes(self) -> Result<Bytes, ClientError> {
        Ok(self.response.bytes().await?)
    }
}

/// Appends `k=v` pairs (those present) and `label=k=v` ones to a query.
fn push_query(
    path: &mut String,
    pairs: &[(&str, &Option<String>)],
    labels: &std::collections::BTreeMap<String, String>,
) {
    let mut sep = if path.ends_with('?') { "" } else { "&" };
    for (k, v) in pairs {
        if let Some(v) = v {
            path.push_str(&format!("{sep}{k}={}", segment(v)));
            sep = "&";
        }
    }
    for (k, v) in labels {
        path.push_str(&format!("{sep}label={}", segment(&format!("{k}={v}"))));
        sep = "&";
    }
}

impl TenantClient {
    /// The same client, sending `x-request-id` and `traceparent`.
    pub fn with_context(&self, request_id: Option<String>, traceparent: Option<String>) -> Self {
        Self {
            endpoint: self.endpoint.with_context(request_id, traceparent),
            timeout: self.timeout,
            credential: self.credential.clone(),
        }
    }

    /// A credentialed request bounded by `bound` (`None`: a streamed body
    /// of unknown length, bounded only by the connect timeout).
    fn req(&self, method: Method, path: &str, bound: Option<Duration>) -> RequestBuilder {
        let rb = self
            .endpoint
            .request(method, path)
            .bearer_auth(&self.credential);
        match bound {
            Some(b) => rb.timeout(b),
            None => rb,
        }
    }

    /// A request that runs no code: bounded by the client's timeout.
    fn call(&self, method: Method, path: &str) -> RequestBuilder {
        self.req(method, path, Some(self.timeout))
    }

    /// The bound of a call whose code may run for `code_timeout`: outlasts
    /// the data plane's own bound, so its coded answer arrives first.
    fn code_bound(&self, code_timeout: Duration) -> Duration {
        code_timeout + Duration::from_millis(STEP_MARGIN_MS) + self.timeout
    }

    /// `GET /internal/v1/runtimes`.
    pub async fn runtimes(&self) -> Result<RuntimeList, ClientError> {
        let path = "/internal/v1/runtimes";
        decode(self.call(Method::GET, path).send().await?).await
    }

    /// `POST /internal/v1/sessions`: a sandbox, ready for steps. Bounded by
    /// the client's timeout: pass a longer one (`with_timeout`) when sandbox
    /// starts or package installs may take longer.
    pub async fn create_session(&self, req: &CreateSession) -> Result<SessionView, ClientError> {
        let rb = self.call(Method::POST, SESSIONS).json(req);
        decode(rb.send().await?).await
    }

    /// `GET /internal/v1/sessions/{id}`.
    pub async fn get_session(&self, id: &str) -> Result<SessionView, ClientError> {
        let path = format!("{SESSIONS}/{}", segment(id));
        decode(self.call(Method::GET, &path).send().await?).await
    }

    /// `GET /internal/v1/sessions`: the tenant's live sessions.
    pub async fn list_sessions(&self) -> Result<SessionViewList, ClientError> {
        decode(self.call(Method::GET, SESSIONS).send().await?).await
    }

    /// `DELETE /internal/v1/sessions/{id}`: the sandbox, its workspace and
    /// its artifacts are destroyed.
    pub async fn delete_session(&self, id: &str) -> Result<(), ClientError> {
        let path = format!("{SESSIONS}/{}", segment(id));
        expect_empty(self.call(Method::DELETE, &path).send().await?).await
    }

    /// `POST /internal/v1/sessions/{id}/steps`, waiting for the result.
    /// `code_timeout` is how long the code may run (the step's `timeoutMs`,
    /// else the session's `limits.timeoutMs`).
    pub async fn step(
        &self,
        id: &str,
        step: &RunStep,
        code_timeout: Duration,
    ) -> Result<StepResult, ClientError> {
        let path = format!("{SESSIONS}/{}/steps", segment(id));
        let rb = self
            .req(Method::POST, &path, Some(self.code_bound(code_timeout)))
            .json(step);
        decode(rb.send().await?).await
    }

    /// The same step with `Accept: text/event-stream`: output as it is
    /// printed, then the result (or a coded error event). The whole stream
    /// is bounded like [`Self::step`].
    pub async fn step_stream(
        &self,
        id: &str,
        step: &RunStep,
        code_timeout: Duration,
    ) -> Result<impl Stream<Item = Result<StepEvent, ClientError>> + use<>, ClientError> {
        let path = format!("{SESSIONS}/{}/steps", segment(id));
        let resp = self
            .req(Method::POST, &path, Some(self.code_bound(code_timeout)))
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .json(step)
            .send()
            .await?;
        Ok(sse::step_events(success(resp).await?.bytes_stream()))
    }

    /// Lists a workspace directory (`""` is the root).
    pub async fn list_files(&self, id: &str, dir: &str) -> Result<FileList, ClientError> {
        let path = files_path(SESSIONS, id, dir);
        decode(self.call(Method::GET, &path).send().await?).await
    }

    /// Reads a workspace path: a file's bytes (at most
    /// [`MAX_BUFFERED_FILE`]; larger files: [`Self::open_path`]) or a
    /// directory's listing.
    pub async fn read_path(&self, id: &str, path: &str) -> Result<PathContent, ClientError> {
        let url = files_path(SESSIONS, id, path);
        path_content(
            self.call(Method::GET, &url).send().await?,
            MAX_BUFFERED_FILE,
        )
        .await
    }

    /// Opens a workspace path: a file's bytes as a stream, or a directory's
    /// listing. Bounded only by the connect timeout, like an artifact
    /// download (a large file takes as long as it takes).
    pub async fn open_path(&self, id: &str, path: &str) -> Result<PathStream, ClientError> {
        let url = files_path(SESSIONS, id, path);
        path_stream(self.req(Method::GET, &url, None).send().await?).await
    }

    /// Reads a workspace file; a directory is a [`ClientError::Protocol`]
    /// (use [`Self::read_path`] when either may come back).
    pub async fn read_file(&self, id: &str, file: &str) -> Result<Bytes, ClientError> {
        match self.read_path(id, file).await? {
            PathContent::File(bytes) => Ok(bytes),
            PathContent::Dir(_) => Err(ClientError::Protocol {
                status: 200,
                detail: format!("{file} is a directory"),
            }),
        }
    }

    /// Writes (creates or replaces) a workspace file; parents are created.
    pub async fn write_file(
        &self,
        id: &str,
        file: &str,
        body: impl Into<reqwest::Body>,
    ) -> Result<(), ClientError> {
        let rb = self
            .call(Method::PUT, &files_path(SESSIONS, id, file))
            .body(body);
        expect_empty(rb.send().await?).await
    }

    /// Deletes a workspace file, symlink or directory tree.
    pub async fn delete_file(&self, id: &str, file: &str) -> Result<(), ClientError> {
        let path = files_path(SESSIONS, id, file);
        expect_empty(self.call(Method::DELETE, &path).send().await?).await
    }

    /// `POST /internal/v1/artifacts`: stores `body` (stream it with
    /// `reqwest::Body::wrap_stream`) encrypted; with `session_id` it is
    /// deleted with that session. Not bounded in total: a large upload takes
    /// as long as it takes (wrap the call in a timeout to bound it).
    pub async fn upload_artifact(
        &self,
        name: &str,
        session_id: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Result<ArtifactInfo, ClientError> {
        let meta = ArtifactMeta {
            session_id: session_id.map(str::to_owned),
            ..ArtifactMeta::default()
        };
        self.upload_artifact_meta(name, &meta, body).await
    }

    /// As [`Self::upload_artifact`], with the session, job, workflow and
    /// labels it is attached to (`sessionId=&jobId=&workflowId=&label=k=v`).
    pub async fn upload_artifact_meta(
        &self,
        name: &str,
        meta: &ArtifactMeta,
        body: impl Into<reqwest::Body>,
    ) -> Result<ArtifactInfo, ClientError> {
        self.upload_artifact_within(name, meta, None, body).await
    }

    /// As [`Self::upload_artifact_meta`], under the tenant's quota on stored
    /// artifact bytes (`quotaBytes`; the data plane's default when `None`).
    pub async fn upload_artifact_within(
        &self,
        name: &str,
        meta: &ArtifactMeta,
        quota_bytes: Option<u64>,
        body: impl Into<reqwest::Body>,
    ) -> Result<ArtifactInfo, ClientError> {
        let mut path = format!("{ARTIFACTS}?name={}", segment(name));
        let quota = quota_bytes.map(|q| q.to_string());
        push_query(
            &mut path,
            &[
                ("sessionId", &meta.session_id),
                ("jobId", &meta.job_id),
                ("workflowId", &meta.workflow_id),
                ("quotaBytes", &quota),
            ],
            &meta.labels,
        );
        let rb = self.req(Method::POST, &path, None).body(body);
        decode(rb.send().await?).await
    }

    /// `GET /internal/v1/artifacts?sessionId=&jobId=&workflowId=&label=k=v&limit=&cursor=`:
    /// one page of the tenant's artifacts, ordered by id.
    pub async fn list_artifacts(
        &self,
        filter: &ArtifactFilter,
    ) -> Result<ArtifactList, ClientError> {
        let mut path = format!("{ARTIFACTS}?");
        let limit = filter.limit.map(|l| l.to_string());
        push_query(
            &mut path,
            &[
                ("sessionId", &filter.session_id),
                ("jobId", &filter.job_id),
                ("workflowId", &filter.workflow_id),
                ("limit", &limit),
                ("cursor", &filter.cursor),
            ],
            &filter.labels,
        );
        decode(self.call(Method::GET, &path).send().await?).await
    }

    /// `GET /internal/v1/artifacts/{id}`: the decrypted bytes, streamed.
    /// Bounded only by the connect timeout, since a large body takes as long
    /// as it takes (wrap the call in a timeout to bound the response head).
    pub async fn download_artifact(&self, id: &str) -> Result<ArtifactDownload, ClientError> {
        self.download_artifact_range(id, None).await
    }

    /// As [`Self::download_artifact`]; with `range` (`start..=end`, inside
    /// the artifact) only those bytes, answered 206: the data plane opens
    /// only the encrypted chunks that hold them.
    pub async fn download_artifact_range(
        &self,
        id: &str,
        range: Option<(u64, u64)>,
    ) -> Result<ArtifactDownload, ClientError> {
        let path = format!("{ARTIFACTS}/{}", segment(id));
        let mut rb = self.req(Method::GET, &path, None);
        if let Some((start, end)) = range {
            rb = rb.header(reqwest::header::RANGE, format!("bytes={start}-{end}"));
        }
        let resp = success(rb.send().await?).await?;
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let sha256 = header("x-artifact-sha256");
        let content_range = header("content-range");
        Ok(ArtifactDownload {
            status: resp.status().as_u16(),
            size: resp.content_length(),
            sha256,
            content_range,
            response: resp,
        })
    }

    /// `GET /internal/v1/artifacts/{id}/info`.
    pub async fn artifact_info(&self, id: &str) -> Result<ArtifactInfo, ClientError> {
        let path = format!("{ARTIFACTS}/{}/info", segment(id));
        decode(self.call(Method::GET, &path).send().await?).await
    }

    /// `DELETE /internal/v1/artifacts/{id}`: its data key is destroyed first.
    pub async fn delete_artifact(&self, id: &str) -> Result<(), ClientError> {
        let path = format!("{ARTIFACTS}/{}", segment(id));
        expect_empty(self.call(Method::DELETE, &path).send().await?).await
    }

    /// `POST /internal/v1/jobs`: runs the job once per id (a repeat replays
    /// the first outcome). `job_timeout` is how long it may take, sandbox
    /// start and the code's own timeout included.
    pub async fn run_job(
        &self,
        job: &RunJob,
        job_timeout: Duration,
    ) -> Result<JobResult, ClientError> {
        let rb = self
            .req(Method::POST, JOBS, Some(self.code_bound(job_timeout)))
            .json(job);
        decode(rb.send().await?).await
    }

    /// `GET /internal/v1/jobs/{id}`: the outcome of a finished job.
    pub async fn get_job(&self, id: &str) -> Result<JobResult, ClientError> {
        let path = format!("{JOBS}/{}", segment(id));
        decode(self.call(Method::GET, &path).send().await?).await
    }

    /// `POST /internal/v1/jobs/{id}/cancel`: the cancelled outcome
    /// ([`JobResult::is_cancelled`]); 409 `job_finished` when the job ended
    /// first; 404 `job_not_found` when the id is unknown, which still keeps
    /// it from ever running.
    pub async fn cancel_job(&self, id: &str) -> Result<JobResult, ClientError> {
        let path = format!("{JOBS}/{}/cancel", segment(id));
        decode(self.call(Method::POST, &path).send().await?).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::testing::answer_once;

    #[tokio::test]
    async fn credential_context_and_encoded_paths_reach_the_data_plane() {
        let (base, request) = answer_once(204, "").await;
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned();
        let client = DataPlaneClient::new(base)
            .unwrap()
            .with_context(Some("req-7".into()), Some(tp.clone()))
            .as_tenant("the.jwt");
        client.delete_file("ses-1", "a/../b c").await.unwrap();
        let request = request.await.unwrap();
        assert!(
            request.starts_with("delete /internal/v1/sessions/ses-1/files/a%2f..%2fb%20c "),
            "{request}"
        );
        assert!(
            request.contains("authorization: bearer the.jwt"),
            "{request}"
        );
        assert!(request.contains("x-request-id: req-7"), "{request}");
        assert!(request.contains(&format!("traceparent: {tp}")), "{request}");
        assert!(!format!("{client:?}").contains("the.jwt"));
    }

    #[tokio::test]
    async fn artifact_names_are_encoded_in_the_query() {
        let body = r#"{"artifactId":"a","tenant":"t","name":"x&y=z","size":1,"sha256":"00","createdAtMs":1}"#;
        let (base, request) = answer_once(201, body).await;
        let client = DataPlaneClient::new(base).unwrap().as_tenant("jwt");
        let info = client
            .upload_artifact("x&y=z", Some("ses 1"), "b")
            .await
            .unwrap();
        assert_eq!(info.artifact_id, "a");
        let request = request.await.unwrap();
        assert!(
            request.starts_with("post /internal/v1/artifacts?name=x%26y%3dz&sessionid=ses%201 "),
            "{request}"
        );
    }

    #[tokio::test]
    async fn a_coded_error_is_api_and_anything_else_protocol() {
        let coded = r#"{"code":"job_finished","message":"job j finished"}"#;
        let (base, _) = answer_once(409, coded).await;
        let client = DataPlaneClient::new(base).unwrap().as_tenant("jwt");
        let err = client.cancel_job("j").await.unwrap_err();
        assert!(
            matches!(&err, ClientError::Api { status: 409, .. }),
            "{err:?}"
        );
        assert_eq!(err.code(), Some(crate::ErrorCode::JobFinished));
        let (base, _) = answer_once(502, "<html>bad gateway</html>").await;
        let client = DataPlaneClient::new(base).unwrap().as_tenant("jwt");
        let err = client.get_job("j").await.unwrap_err();
        assert!(
            matches!(&err, ClientError::Protocol { status: 502, .. }),
            "{err:?}"
        );
    }
}
