//! One-shot jobs: a fresh sandbox per run, destroyed afterwards; the files
//! the code leaves in `output/` become artifacts; a job id runs once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use shared::ErrorCode;
use shared::agent::{StepStatus, validate_id};
use shared::client::PathContent;
use shared::dataplane::{ArtifactInfo, CreateSession, JOB_OUTPUT_DIR, JobResult, RunJob, RunStep};
use shared::server::ApiError;
use tokio::sync::watch;

use crate::auth::Caller;
use crate::sessions::{SessionService, artifact_error};

/// Job results kept for replays (the oldest are forgotten first).
const KEEP_RESULTS: usize = 10_000;
/// Output files collected per job, at most.
const MAX_OUTPUT_FILES: usize = 100;

type Outcome = Option<Result<JobResult, ApiError>>;

enum Entry {
    Running(watch::Receiver<Outcome>),
    Done(JobResult),
}

/// Runs jobs exactly once per (tenant, job id).
pub struct JobService {
    sessions: Arc<SessionService>,
    jobs: Mutex<HashMap<(String, String), Entry>>,
    order: Mutex<VecDeque<(String, String)>>,
}

impl JobService {
    pub fn new(sessions: Arc<SessionService>) -> Self {
        JobService {
            sessions,
            jobs: Mutex::new(HashMap::new()),
            order: Mutex::new(VecDeque::new()),
        }
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Entry>> {
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The saved result of a finished job.
    pub fn get(&self, caller: &Caller, job_id: &str) -> Result<JobResult, ApiError> {
        match self.jobs().get(&(caller.tenant.clone(), job_id.to_owned())) {
            Some(Entry::Done(r)) => Ok(JobResult {
                replayed: true,
                ..r.clone()
            }),
            _ => Err(ApiError::new(
                ErrorCode::JobNotFound,
                format!("no finished job {job_id}"),
            )),
        }
    }

    /// Runs a job, or returns the result of its first run. A caller that
    /// repeats an id while the first run is in progress waits for it.
    pub async fn run(&self, caller: &Caller, req: RunJob) -> Result<JobResult, ApiError> {
        validate_id("jobId", &req.job_id)
            .map_err(|m| ApiError::new(ErrorCode::InvalidArgument, m))?;
        let key = (caller.tenant.clone(), req.job_id.clone());
        enum Decision {
            Replay(JobResult),
            Wait(watch::Receiver<Outcome>),
            Run(watch::Sender<Outcome>),
        }
        // Decide under the lock; never await while holding it.
        let decision = {
            let mut jobs = self.jobs();
            match jobs.get(&key) {
                Some(Entry::Done(r)) => Decision::Replay(r.clone()),
                Some(Entry::Running(rx)) => Decision::Wait(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    jobs.insert(key.clone(), Entry::Running(rx));
                    Decision::Run(tx)
                }
            }
        };
        let tx = match decision {
            Decision::Replay(r) => {
                return Ok(JobResult {
                    replayed: true,
                    ..r
                });
            }
            Decision::Wait(mut rx) => {
                let vanished =
                    || ApiError::new(ErrorCode::Internal, "the first run of this job vanished");
                let done = rx
                    .wait_for(Option::is_some)
                    .await
                    .map_err(|_| vanished())?
                    .clone();
                return match done {
                    Some(Ok(r)) => Ok(JobResult {
                        replayed: true,
                        ..r
                    }),
                    Some(Err(e)) => Err(e),
                    None => Err(vanished()),
                };
            }
            Decision::Run(tx) => tx,
        };
        // A result saved by an earlier run of this data plane (file/redis).
        if let Ok(Some(saved)) = self
            .sessions
            .store()
            .get_job(&caller.tenant, &req.job_id)
            .await
        {
            self.jobs().insert(key.clone(), Entry::Done(saved.clone()));
            let _ = tx.send(Some(Ok(saved.clone())));
            return Ok(JobResult {
                replayed: true,
                ..saved
            });
        }
        let running = &self.sessions.metrics().jobs_running;
        running.inc();
        let outcome = self.execute(caller, &req).await;
        running.dec();
        if let Ok(r) = &outcome
            && let Err(e) = self
                .sessions
                .store()
                .put_job(&caller.tenant, &req.job_id, r)
                .await
        {
            tracing::warn!(job = %req.job_id, error = %e, "could not save the job result durably");
        }
        {
            let mut jobs = self.jobs();
            match &outcome {
                // A run that could not happen (no sandbox) may be retried.
                Err(_) => {
                    jobs.remove(&key);
                }
                Ok(r) => {
                    jobs.insert(key.clone(), Entry::Done(r.clone()));
                    let mut order = self
                        .order
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    order.push_back(key);
                    while order.len() > KEEP_RESULTS {
                        if let Some(old) = order.pop_front() {
                            jobs.remove(&old);
                        }
                    }
                }
            }
        }
        let _ = tx.send(Some(outcome.clone()));
        outcome
    }

    async fn execute(&self, caller: &Caller, req: &RunJob) -> Result<JobResult, ApiError> {
        let started = Instant::now();
        let timeout_ms = req.timeout_ms.unwrap_or(30_000);
        let session = self
            .sessions
            .create(
                caller,
                CreateSession {
                    tenant: None,
                    runtime: req.runtime.clone(),
                    ttl_seconds: Some(timeout_ms / 1000 + 120),
                    limits: req.limits.clone(),
                    env: req.env.clone(),
                    packages: req.packages.clone(),
                },
            )
            .await?;
        let sid = session.session_id;
        let result = self.run_in(caller, &sid, req).await;
        // The sandbox is single-use: destroyed whatever happened.
        if let Err(e) = self.sessions.delete(caller, &sid).await {
            tracing::warn!(job = %req.job_id, session = %sid, error = %e, "job sandbox teardown failed");
        }
        let (step, artifacts) = result?;
        tracing::info!(target: "audit", tenant = %caller.tenant, job = %req.job_id, status = ?step.status,
            duration_ms = step.duration_ms, artifacts = artifacts.len(), "job finished");
        Ok(JobResult {
            job_id: req.job_id.clone(),
            status: step.status,
            stdout: step.stdout,
            stderr: step.stderr,
            result: step.result,
            error: step.error,
            duration_ms: started.elapsed().as_millis() as u64,
            truncated: step.truncated,
            artifacts,
            replayed: false,
        })
    }

    async fn run_in(
        &self,
        caller: &Caller,
        sid: &str,
        req: &RunJob,
    ) -> Result<(shared::agent::StepResult, Vec<ArtifactInfo>), ApiError> {
        let step = self
            .sessions
            .step(
                caller,
                sid,
                RunStep {
                    step_id: Some(req.job_id.clone()),
                    code: req.code.clone(),
                    timeout_ms: req.timeout_ms,
                    mode: req.mode,
                    event: req.event.clone(),
                },
            )
            .await?;
        let artifacts = if step.status == StepStatus::Killed {
            Vec::new()
        } else {
            self.collect(caller, sid, &req.job_id).await?
        };
        Ok((step, artifacts))
    }

    /// Stores every file under `output/` (recursively) as an artifact.
    async fn collect(
        &self,
        caller: &Caller,
        sid: &str,
        job_id: &str,
    ) -> Result<Vec<ArtifactInfo>, ApiError> {
        let mut out = Vec::new();
        let mut dirs = vec![JOB_OUTPUT_DIR.to_owned()];
        while let Some(dir) = dirs.pop() {
            let listing = match self.sessions.read_path(caller, sid, &dir).await {
                Ok(PathContent::Dir(l)) => l,
                Ok(PathContent::File(_)) => continue,
                Err(e) if e.code == ErrorCode::FileNotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in listing.files {
                match entry.kind.as_str() {
                    "dir" => dirs.push(entry.path),
                    "file" if out.len() < MAX_OUTPUT_FILES => {
                        let PathContent::File(bytes) =
                            self.sessions.read_path(caller, sid, &entry.path).await?
                        else {
                            continue;
                        };
                        let name = entry
                            .path
                            .strip_prefix("output/")
                            .unwrap_or(&entry.path)
                            .replace('/', "_");
                        let body = futures::stream::iter([Ok::<Bytes, std::io::Error>(bytes)]);
                        let info = self
                            .sessions
                            .artifacts()
                            .put(&caller.tenant, &name, None, body)
                            .await
                            .map_err(artifact_error)?;
                        tracing::debug!(job = %job_id, artifact = %info.artifact_id, "job output stored");
                        out.push(info);
                    }
                    _ => {}
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}
