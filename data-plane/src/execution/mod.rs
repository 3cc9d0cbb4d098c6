//! One-shot jobs: a fresh sandbox per run, destroyed afterwards; the files
//! the code leaves in `output/` become artifacts; a job id runs once. A
//! cancel destroys a running job's sandbox, and a cancelled id (even one
//! cancelled before it arrived) never runs: its outcome is the cancellation.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shared::ErrorCode;
use shared::agent::{StepError, StepResult, StepStatus, validate_id};
use shared::client::PathContent;
use shared::dataplane::{
    ArtifactInfo, CreateSession, JOB_CANCELLED, JOB_OUTPUT_DIR, JobResult, RunJob, RunStep,
};
use shared::server::ApiError;
use tokio::sync::watch;

use crate::auth::Caller;
use crate::sessions::{SessionService, artifact_error};

/// Job results kept for replays (the oldest are forgotten first).
const KEEP_RESULTS: usize = 10_000;
/// Output files collected per job, at most.
const MAX_OUTPUT_FILES: usize = 100;
/// How long a cancel waits for the run to report. Longer only while the
/// run is still starting its sandbox: the cancel then answers with the
/// cancellation alone, and the run records the same outcome once it can.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

type Outcome = Option<Result<JobResult, ApiError>>;

/// What a cancel needs to reach a run in progress.
#[derive(Debug, Default)]
struct RunControl {
    /// The job's sandbox, once it exists.
    session: Option<String>,
    cancelled: bool,
}

enum Entry {
    Running {
        outcome: watch::Receiver<Outcome>,
        control: Arc<Mutex<RunControl>>,
    },
    Done(JobResult),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The outcome of a cancelled job: what it printed until the kill, no
/// result, no artifacts.
fn cancelled(job_id: &str, step: Option<&StepResult>, duration_ms: u64) -> JobResult {
    JobResult {
        job_id: job_id.to_owned(),
        status: StepStatus::Killed,
        stdout: step.map(|s| s.stdout.clone()).unwrap_or_default(),
        stderr: step.map(|s| s.stderr.clone()).unwrap_or_default(),
        result: None,
        error: Some(StepError {
            kind: JOB_CANCELLED.into(),
            message: "the job was cancelled".into(),
            traceback: String::new(),
        }),
        duration_ms,
        truncated: step.is_some_and(|s| s.truncated),
        artifacts: Vec::new(),
        replayed: false,
    }
}

fn replayed(r: JobResult) -> JobResult {
    JobResult {
        replayed: true,
        ..r
    }
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

    fn jobs(&self) -> MutexGuard<'_, HashMap<(String, String), Entry>> {
        lock(&self.jobs)
    }

    /// Records a job's outcome for replays, forgetting the oldest beyond
    /// [`KEEP_RESULTS`]. Called with the jobs lock held (always taken first).
    fn remember(
        &self,
        jobs: &mut HashMap<(String, String), Entry>,
        key: (String, String),
        result: JobResult,
    ) {
        jobs.insert(key.clone(), Entry::Done(result));
        let mut order = lock(&self.order);
        order.push_back(key);
        while order.len() > KEEP_RESULTS {
            if let Some(old) = order.pop_front() {
                jobs.remove(&old);
            }
        }
    }

    /// A result saved durably by an earlier run of this data plane.
    async fn stored(&self, caller: &Caller, job_id: &str) -> Option<JobResult> {
        match self.sessions.store().get_job(&caller.tenant, job_id).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(job = %job_id, error = %e, "could not read the saved job result");
                None
            }
        }
    }

    async fn save(&self, caller: &Caller, result: &JobResult) {
        if let Err(e) = self
            .sessions
            .store()
            .put_job(&caller.tenant, &result.job_id, result)
            .await
        {
            tracing::warn!(job = %result.job_id, error = %e, "could not save the job result durably");
        }
    }

    /// The saved outcome of a finished (or cancelled) job.
    pub async fn get(&self, caller: &Caller, job_id: &str) -> Result<JobResult, ApiError> {
        validate_id("jobId", job_id).map_err(|m| ApiError::new(ErrorCode::InvalidArgument, m))?;
        let key = (caller.tenant.clone(), job_id.to_owned());
        let not_found =
            || ApiError::new(ErrorCode::JobNotFound, format!("no finished job {job_id}"));
        match self.jobs().get(&key) {
            Some(Entry::Done(r)) => return Ok(replayed(r.clone())),
            Some(Entry::Running { .. }) => return Err(not_found()),
            None => {}
        }
        let saved = self.stored(caller, job_id).await.ok_or_else(not_found)?;
        let mut jobs = self.jobs();
        if !jobs.contains_key(&key) {
            self.remember(&mut jobs, key, saved.clone());
        }
        Ok(replayed(saved))
    }

    /// Cancels a job. Running: its sandbox is destroyed and the answer is
    /// the cancelled outcome (also what the run returns). Cancelled already:
    /// the same outcome again. Finished: 409 `job_finished`. Unknown: 404
    /// `job_not_found`, and the id is remembered as cancelled so a run that
    /// arrives later does not execute.
    pub async fn cancel(&self, caller: &Caller, job_id: &str) -> Result<JobResult, ApiError> {
        validate_id("jobId", job_id).map_err(|m| ApiError::new(ErrorCode::InvalidArgument, m))?;
        let key = (caller.tenant.clone(), job_id.to_owned());
        // A result saved before a restart counts as the job's outcome.
        let saved = if self.jobs().contains_key(&key) {
            None
        } else {
            self.stored(caller, job_id).await
        };
        enum Decision {
            Running(watch::Receiver<Outcome>, Option<String>),
            Ended(JobResult),
            Unknown(JobResult),
        }
        // Decide under the lock (the map may have changed while the store
        // answered); never await while holding it.
        let decision = {
            let mut jobs = self.jobs();
            match jobs.get(&key) {
                Some(Entry::Running { outcome, control }) => {
                    let mut control = lock(control);
                    control.cancelled = true;
                    Decision::Running(outcome.clone(), control.session.clone())
                }
                Some(Entry::Done(r)) => Decision::Ended(r.clone()),
                None => match saved {
                    Some(r) => {
                        self.remember(&mut jobs, key.clone(), r.clone());
                        Decision::Ended(r)
                    }
                    None => {
                        let r = cancelled(job_id, None, 0);
                        self.remember(&mut jobs, key.clone(), r.clone());
                        Decision::Unknown(r)
                    }
                },
            }
        };
        match decision {
            Decision::Ended(r) if r.is_cancelled() => Ok(replayed(r)),
            Decision::Ended(r) => Err(finished(job_id, &r)),
            Decision::Unknown(r) => {
                // Durable like any outcome: a run after a restart is refused too.
                self.save(caller, &r).await;
                tracing::info!(target: "audit", tenant = %caller.tenant, job = %job_id, "unknown job cancelled; it will not run");
                Err(ApiError::new(
                    ErrorCode::JobNotFound,
                    format!("no job {job_id}; it is now cancelled and will not run if it arrives"),
                ))
            }
            Decision::Running(mut outcome, session) => {
                tracing::info!(target: "audit", tenant = %caller.tenant, job = %job_id, "running job cancelled");
                if let Some(sid) = session {
                    // Destroying the sandbox ends the step (`killed`); without
                    // a sandbox yet, the run sees the flag once it has one.
                    match self.sessions.delete(caller, &sid).await {
                        Ok(()) => {}
                        Err(e) if e.code == ErrorCode::SessionNotFound => {}
                        Err(e) => {
                            tracing::warn!(job = %job_id, session = %sid, error = %e, "could not destroy the cancelled job's sandbox; its run will retry");
                        }
                    }
                }
                let reported = match tokio::time::timeout(
                    CANCEL_WAIT,
                    outcome.wait_for(Option::is_some),
                )
                .await
                {
                    Ok(Ok(done)) => done.clone(),
                    _ => None,
                };
                match reported {
                    Some(Ok(r)) if r.is_cancelled() => Ok(r),
                    // The code and its output were done before the kill.
                    Some(Ok(r)) => Err(finished(job_id, &r)),
                    // Still starting, or the run failed before it could
                    // start (and would be retried): remember the cancel.
                    Some(Err(_)) | None => Ok(self.cancelled_unless_done(key, job_id)),
                }
            }
        }
    }

    /// The job's outcome if it has one, else the cancellation, remembered.
    fn cancelled_unless_done(&self, key: (String, String), job_id: &str) -> JobResult {
        let mut jobs = self.jobs();
        match jobs.get(&key) {
            Some(Entry::Done(r)) => r.clone(),
            // The run is still starting: it records the cancellation itself.
            Some(Entry::Running { .. }) => cancelled(job_id, None, 0),
            None => {
                let r = cancelled(job_id, None, 0);
                self.remember(&mut jobs, key, r.clone());
                r
            }
        }
    }

    /// Runs a job, or returns the outcome of its first run (or of its
    /// cancellation). A caller that repeats an id while the first run is in
    /// progress waits for it.
    ///
    /// The run itself is a task of its own: it goes on when the caller
    /// disconnects (a control plane that dies mid-job retries with the same
    /// id and must find the outcome here, not a run cut short).
    pub async fn run(
        self: &Arc<Self>,
        caller: &Caller,
        req: RunJob,
    ) -> Result<JobResult, ApiError> {
        validate_id("jobId", &req.job_id)
            .map_err(|m| ApiError::new(ErrorCode::InvalidArgument, m))?;
        let key = (caller.tenant.clone(), req.job_id.clone());
        enum Decision {
            Replay(JobResult),
            Wait(watch::Receiver<Outcome>),
            Run(
                watch::Sender<Outcome>,
                watch::Receiver<Outcome>,
                Arc<Mutex<RunControl>>,
            ),
        }
        // Decide under the lock; never await while holding it.
        let decision = {
            let mut jobs = self.jobs();
            match jobs.get(&key) {
                Some(Entry::Done(r)) => Decision::Replay(r.clone()),
                Some(Entry::Running { outcome, .. }) => Decision::Wait(outcome.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    let control = Arc::new(Mutex::new(RunControl::default()));
                    jobs.insert(
                        key.clone(),
                        Entry::Running {
                            outcome: rx.clone(),
                            control: control.clone(),
                        },
                    );
                    Decision::Run(tx, rx, control)
                }
            }
        };
        let (tx, mut first, control) = match decision {
            Decision::Replay(r) => return Ok(replayed(r)),
            Decision::Wait(mut rx) => {
                let vanished =
                    || ApiError::new(ErrorCode::Internal, "the first run of this job vanished");
                let done = rx
                    .wait_for(Option::is_some)
                    .await
                    .map_err(|_| vanished())?
                    .clone();
                return match done {
                    Some(Ok(r)) => Ok(replayed(r)),
                    Some(Err(e)) => Err(e),
                    None => Err(vanished()),
                };
            }
            Decision::Run(tx, rx, control) => (tx, rx, control),
        };
        let this = self.clone();
        let caller = caller.clone();
        tokio::spawn(async move {
            this.run_detached(&caller, req, key, tx, control).await;
        });
        let vanished = || ApiError::new(ErrorCode::Internal, "the run of this job vanished");
        let done = first
            .wait_for(Option::is_some)
            .await
            .map_err(|_| vanished())?
            .clone();
        match done {
            Some(outcome) => outcome,
            None => Err(vanished()),
        }
    }

    /// The run proper, to its end whoever waits for it.
    async fn run_detached(
        &self,
        caller: &Caller,
        req: RunJob,
        key: (String, String),
        tx: watch::Sender<Outcome>,
        control: Arc<Mutex<RunControl>>,
    ) {
        // An outcome saved by an earlier run of this data plane (file/redis),
        // a cancellation included.
        if let Some(saved) = self.stored(caller, &req.job_id).await {
            self.remember(&mut self.jobs(), key, saved.clone());
            let _ = tx.send(Some(Ok(replayed(saved))));
            return;
        }
        let running = &self.sessions.metrics().jobs_running;
        running.inc();
        let outcome = self.execute(caller, &req, &control).await;
        running.dec();
        if let Ok(r) = &outcome {
            self.save(caller, r).await;
        }
        {
            let mut jobs = self.jobs();
            match &outcome {
                // A run that could not happen (no sandbox) may be retried.
                Err(_) => {
                    jobs.remove(&key);
                }
                Ok(r) => self.remember(&mut jobs, key, r.clone()),
            }
        }
        let _ = tx.send(Some(outcome));
    }

    async fn execute(
        &self,
        caller: &Caller,
        req: &RunJob,
        control: &Mutex<RunControl>,
    ) -> Result<JobResult, ApiError> {
        let started = Instant::now();
        let elapsed_ms = || started.elapsed().as_millis() as u64;
        // Cancelled while this run looked for a saved outcome: no sandbox.
        if lock(control).cancelled {
            return Ok(self.cancelled_run(caller, req, None, 0));
        }
        let timeout_ms = req.timeout_ms.unwrap_or(30_000);
        let created = self
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
            .await;
        let sid = match created {
            Ok(session) => session.session_id,
            Err(_) if lock(control).cancelled => {
                return Ok(self.cancelled_run(caller, req, None, elapsed_ms()));
            }
            Err(e) => return Err(e),
        };
        // Either the cancel sees the session (and destroys it) or this run
        // sees the cancel: both are decided under the control lock.
        let proceed = {
            let mut c = lock(control);
            if !c.cancelled {
                c.session = Some(sid.clone());
            }
            !c.cancelled
        };
        let result = if proceed {
            Some(self.run_in(caller, &sid, req).await)
        } else {
            None
        };
        // The sandbox is single-use: destroyed whatever happened.
        match self.sessions.delete(caller, &sid).await {
            Ok(()) => {}
            // A cancel destroyed it first.
            Err(e) if e.code == ErrorCode::SessionNotFound => {}
            Err(e) => {
                tracing::warn!(job = %req.job_id, session = %sid, error = %e, "job sandbox teardown failed");
            }
        }
        let was_cancelled = lock(control).cancelled;
        let (step, artifacts) = match result {
            // The code and its output collection were done before the kill
            // took effect: the job finished, the cancel came too late.
            Some(Ok((step, artifacts))) if !was_cancelled || step.status != StepStatus::Killed => {
                (step, artifacts)
            }
            Some(Ok((step, _))) => {
                return Ok(self.cancelled_run(caller, req, Some(&step), elapsed_ms()));
            }
            Some(Err(e)) if !was_cancelled => return Err(e),
            Some(Err(_)) | None => {
                return Ok(self.cancelled_run(caller, req, None, elapsed_ms()));
            }
        };
        tracing::info!(target: "audit", tenant = %caller.tenant, job = %req.job_id, status = ?step.status,
            duration_ms = step.duration_ms, artifacts = artifacts.len(), "job finished");
        Ok(JobResult {
            job_id: req.job_id.clone(),
            status: step.status,
            stdout: step.stdout,
            stderr: step.stderr,
            result: step.result,
            error: step.error,
            duration_ms: elapsed_ms(),
            truncated: step.truncated,
            artifacts,
            replayed: false,
        })
    }

    fn cancelled_run(
        &self,
        caller: &Caller,
        req: &RunJob,
        step: Option<&StepResult>,
        duration_ms: u64,
    ) -> JobResult {
        tracing::info!(target: "audit", tenant = %caller.tenant, job = %req.job_id, duration_ms, "job cancelled");
        cancelled(&req.job_id, step, duration_ms)
    }

    async fn run_in(
        &self,
        caller: &Caller,
        sid: &str,
        req: &RunJob,
    ) -> Result<(StepResult, Vec<ArtifactInfo>), ApiError> {
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

/// A cancel that came after the job ended.
fn finished(job_id: &str, r: &JobResult) -> ApiError {
    let status = format!("{:?}", r.status).to_lowercase();
    ApiError::new(
        ErrorCode::JobFinished,
        format!("job {job_id} already finished ({status}); it cannot be cancelled"),
    )
}
