//! One-shot jobs: a fresh sandbox per run, destroyed afterwards; the files
//! the code leaves in `output/` become artifacts; a job id runs once. A
//! cancel destroys a running job's sandbox, and a cancelled id (even one
//! cancelled before it arrived) never runs: its outcome is the cancellation.
//!
//! Outcomes (results and cancel markers) are kept per tenant, bounded in
//! count, bytes and time ([`kept`]): one tenant's flood only evicts its own.
//! With a Redis registry, a run first claims (tenant, job id) there
//! (`SET NX PX`), so two replicas never run the same id at once.

pub mod kept;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shared::CodedError;
use shared::ErrorCode;
use shared::agent::{StepError, StepResult, StepStatus, validate_id};
use shared::dataplane::{
    ArtifactInfo, CreateSession, JOB_CANCELLED, JOB_OUTPUT_DIR, JobResult, RunJob, RunStep,
};
use tokio::sync::watch;

use crate::auth::Caller;
use crate::registry::SessionRegistry;
use crate::sessions::{SessionRouter, artifact_error};
pub use kept::KeepLimits;
use kept::Kept;

/// Output files collected per job, at most.
const MAX_OUTPUT_FILES: usize = 100;
/// How long a cancel waits for the run to report. Longer only while the
/// run is still starting its sandbox: the cancel then answers with the
/// cancellation alone, and the run records the same outcome once it can.
const CANCEL_WAIT: Duration = Duration::from_secs(5);
/// How often a replica whose claim failed looks for the other's outcome.
const CLAIM_POLL: Duration = Duration::from_millis(250);

type Outcome = Option<Result<JobResult, CodedError>>;

/// What a cancel needs to reach a run in progress.
#[derive(Debug, Default)]
struct RunControl {
    /// The job's sandbox, once it exists.
    session: Option<String>,
    cancelled: bool,
}

/// A run in progress on this replica.
struct Running {
    outcome: watch::Receiver<Outcome>,
    control: Arc<Mutex<RunControl>>,
}

/// Runs in progress and kept outcomes, under one lock.
struct Jobs {
    running: HashMap<(String, String), Running>,
    kept: Kept,
}

impl Jobs {
    fn done(&mut self, key: &(String, String)) -> Option<JobResult> {
        self.kept.get(&key.0, &key.1).cloned()
    }

    fn known(&mut self, key: &(String, String)) -> bool {
        self.running.contains_key(key) || self.kept.contains(&key.0, &key.1)
    }

    /// Records an outcome for replays (bounded per tenant, see [`kept`]).
    fn remember(&mut self, key: &(String, String), result: JobResult) {
        self.running.remove(key);
        self.kept.insert(&key.0, &key.1, result);
    }
}

/// The associated data a saved job result is sealed under: its tenant and
/// id, so a record moved to another tenant or job does not open.
fn result_aad(tenant: &str, job_id: &str) -> String {
    format!("job:{tenant}/{job_id}")
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
    sessions: Arc<SessionRouter>,
    jobs: Mutex<Jobs>,
    /// Names this replica's claims in a shared registry.
    replica: String,
}

impl JobService {
    pub fn new(sessions: Arc<SessionRouter>, limits: KeepLimits) -> Self {
        let durable = !matches!(sessions.store(), SessionRegistry::Memory);
        JobService {
            sessions,
            jobs: Mutex::new(Jobs {
                running: HashMap::new(),
                kept: Kept::new(limits, durable),
            }),
            replica: hex::encode(rand::random::<[u8; 16]>()),
        }
    }

    fn jobs(&self) -> MutexGuard<'_, Jobs> {
        lock(&self.jobs)
    }

    fn lifetime(&self) -> Duration {
        self.jobs().kept.limits().lifetime
    }

    /// A result saved durably by an earlier run of this data plane (or by
    /// another replica), within its lifetime. Saved results are sealed with
    /// the KEK under [`result_aad`]: one altered, or moved to another tenant
    /// or job id, is 500 `integrity_error` (never a reason to run again).
    async fn stored(&self, caller: &Caller, job_id: &str) -> Result<Option<JobResult>, CodedError> {
        let sealed = match self
            .sessions
            .store()
            .get_job(&caller.tenant, job_id, self.lifetime())
            .await
        {
            Ok(Some(sealed)) => sealed,
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::warn!(job = %job_id, error = %e, "could not read the saved job result");
                return Ok(None);
            }
        };
        let opened = self
            .sessions
            .kek()
            .open_record(&sealed, &result_aad(&caller.tenant, job_id))
            .ok()
            .and_then(|plain| serde_json::from_slice::<JobResult>(&plain).ok())
            .filter(|r| r.job_id == job_id);
        match opened {
            Some(r) => Ok(Some(r)),
            None => {
                tracing::error!(tenant = %caller.tenant, job = %job_id, "a saved job result does not open: altered at rest or moved from another tenant or job");
                Err(CodedError::new(
                    ErrorCode::IntegrityError,
                    format!("the saved result of job {job_id} does not open"),
                ))
            }
        }
    }

    async fn save(&self, caller: &Caller, result: &JobResult) {
        let sealed = match serde_json::to_vec(result) {
            Ok(json) => self
                .sessions
                .kek()
                .seal_record(&json, &result_aad(&caller.tenant, &result.job_id)),
            Err(e) => {
                tracing::warn!(job = %result.job_id, error = %e, "could not encode the job result");
                return;
            }
        };
        if let Err(e) = self
            .sessions
            .store()
            .put_job(&caller.tenant, &result.job_id, &sealed, self.lifetime())
            .await
        {
            tracing::warn!(job = %result.job_id, error = %e, "could not save the job result durably");
        }
    }

    /// The saved outcome of a finished (or cancelled) job.
    pub async fn get(&self, caller: &Caller, job_id: &str) -> Result<JobResult, CodedError> {
        validate_id("jobId", job_id).map_err(|m| CodedError::new(ErrorCode::InvalidArgument, m))?;
        let key = (caller.tenant.to_string(), job_id.to_owned());
        let not_found =
            || CodedError::new(ErrorCode::JobNotFound, format!("no finished job {job_id}"));
        {
            let mut jobs = self.jobs();
            if let Some(r) = jobs.done(&key) {
                return Ok(replayed(r));
            }
            if jobs.running.contains_key(&key) {
                return Err(not_found());
            }
        }
        let saved = self.stored(caller, job_id).await?.ok_or_else(not_found)?;
        let mut jobs = self.jobs();
        if !jobs.known(&key) {
            jobs.remember(&key, saved.clone());
        }
        Ok(replayed(saved))
    }

    /// Cancels a job. Running: its sandbox is destroyed and the answer is
    /// the cancelled outcome (also what the run returns). Cancelled already:
    /// the same outcome again. Finished: 409 `job_finished`. Unknown: 404
    /// `job_not_found`, and the id is remembered as cancelled so a run that
    /// arrives later does not execute.
    pub async fn cancel(&self, caller: &Caller, job_id: &str) -> Result<JobResult, CodedError> {
        validate_id("jobId", job_id).map_err(|m| CodedError::new(ErrorCode::InvalidArgument, m))?;
        let key = (caller.tenant.to_string(), job_id.to_owned());
        // A result saved before a restart counts as the job's outcome.
        let saved = if self.jobs().known(&key) {
            None
        } else {
            self.stored(caller, job_id).await?
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
            if let Some(Running { outcome, control }) = jobs.running.get(&key) {
                let mut control = lock(control);
                control.cancelled = true;
                Decision::Running(outcome.clone(), control.session.clone())
            } else if let Some(r) = jobs.done(&key) {
                Decision::Ended(r)
            } else {
                match saved {
                    Some(r) => {
                        jobs.remember(&key, r.clone());
                        Decision::Ended(r)
                    }
                    None => {
                        let r = cancelled(job_id, None, 0);
                        jobs.remember(&key, r.clone());
                        Decision::Unknown(r)
                    }
                }
            }
        };
        match decision {
            Decision::Ended(r) if r.is_cancelled() => Ok(replayed(r)),
            Decision::Ended(r) => Err(finished(job_id, &r)),
            Decision::Unknown(r) => {
                // Durable like any outcome: a run after a restart is refused too.
                self.save(caller, &r).await;
                tracing::info!(target: "audit", tenant = %caller.tenant, job = %job_id, "unknown job cancelled; it will not run");
                Err(CodedError::new(
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
                    Some(Err(_)) | None => Ok(self.cancelled_unless_done(&key, job_id)),
                }
            }
        }
    }

    /// The job's outcome if it has one, else the cancellation, remembered.
    fn cancelled_unless_done(&self, key: &(String, String), job_id: &str) -> JobResult {
        let mut jobs = self.jobs();
        if let Some(r) = jobs.done(key) {
            return r;
        }
        // The run is still starting: it records the cancellation itself.
        if jobs.running.contains_key(key) {
            return cancelled(job_id, None, 0);
        }
        let r = cancelled(job_id, None, 0);
        jobs.remember(key, r.clone());
        r
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
    ) -> Result<JobResult, CodedError> {
        validate_id("jobId", &req.job_id)
            .map_err(|m| CodedError::new(ErrorCode::InvalidArgument, m))?;
        let key = (caller.tenant.to_string(), req.job_id.clone());
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
            if let Some(r) = jobs.done(&key) {
                Decision::Replay(r)
            } else if let Some(running) = jobs.running.get(&key) {
                Decision::Wait(running.outcome.clone())
            } else {
                let (tx, rx) = watch::channel(None);
                let control = Arc::new(Mutex::new(RunControl::default()));
                jobs.running.insert(
                    key.clone(),
                    Running {
                        outcome: rx.clone(),
                        control: control.clone(),
                    },
                );
                Decision::Run(tx, rx, control)
            }
        };
        let (tx, mut first, control) = match decision {
            Decision::Replay(r) => return Ok(replayed(r)),
            Decision::Wait(mut rx) => {
                let vanished =
                    || CodedError::new(ErrorCode::Internal, "the first run of this job vanished");
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
        // The run outlives the request, and stays in its trace.
        let span = tracing::info_span!("job.run", tenant_id = %caller.tenant, job_id = %req.job_id);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                this.run_detached(&caller, req, key, tx, control).await;
            },
            span,
        ));
        let vanished = || CodedError::new(ErrorCode::Internal, "the run of this job vanished");
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

    /// Claims the job in a shared registry (Redis), waiting while another
    /// replica holds it. `Ok(None)`: claimed, run it; `Ok(Some(r))`: the
    /// other replica's saved outcome.
    async fn claim(&self, caller: &Caller, req: &RunJob) -> Result<Option<JobResult>, CodedError> {
        let ttl =
            Duration::from_millis(req.timeout_ms.unwrap_or(30_000)) + Duration::from_secs(180);
        let deadline = Instant::now() + ttl;
        loop {
            match self
                .sessions
                .store()
                .claim_job(&caller.tenant, &req.job_id, &self.replica, ttl)
                .await
            {
                // Claimed: one more look, the holder may have saved and let go.
                Ok(true) => {
                    return match self.stored(caller, &req.job_id).await {
                        Ok(None) => Ok(None),
                        other => {
                            self.release(caller, &req.job_id).await;
                            other
                        }
                    };
                }
                Ok(false) => {}
                Err(e) => {
                    return Err(CodedError::new(
                        ErrorCode::StorageUnavailable,
                        format!("could not claim the job in the registry: {e}"),
                    ));
                }
            }
            if let Some(saved) = self.stored(caller, &req.job_id).await? {
                return Ok(Some(saved));
            }
            if Instant::now() >= deadline {
                return Err(CodedError::new(
                    ErrorCode::SessionBusy,
                    format!("job {} is running on another replica", req.job_id),
                ));
            }
            tokio::time::sleep(CLAIM_POLL).await;
        }
    }

    async fn release(&self, caller: &Caller, job_id: &str) {
        if let Err(e) = self
            .sessions
            .store()
            .release_job(&caller.tenant, job_id, &self.replica)
            .await
        {
            tracing::warn!(job = %job_id, error = %e, "could not release the job's claim; it expires on its own");
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
        match self.stored(caller, &req.job_id).await {
            Ok(None) => {}
            Ok(Some(saved)) => {
                self.jobs().remember(&key, saved.clone());
                let _ = tx.send(Some(Ok(replayed(saved))));
                return;
            }
            Err(e) => {
                self.jobs().running.remove(&key);
                let _ = tx.send(Some(Err(e)));
                return;
            }
        }
        // Another replica may run the same id: one claim wins.
        match self.claim(caller, &req).await {
            Ok(None) => {}
            Ok(Some(saved)) => {
                self.jobs().remember(&key, saved.clone());
                let _ = tx.send(Some(Ok(replayed(saved))));
                return;
            }
            Err(e) => {
                self.jobs().running.remove(&key);
                let _ = tx.send(Some(Err(e)));
                return;
            }
        }
        let running = &self.sessions.metrics().jobs_running;
        running.inc();
        let outcome = self.execute(caller, &req, &control).await;
        running.dec();
        if let Ok(r) = &outcome {
            self.save(caller, r).await;
        }
        // Saved first, then let go: a waiting replica finds the outcome.
        self.release(caller, &req.job_id).await;
        {
            let mut jobs = self.jobs();
            match &outcome {
                // A run that could not happen (no sandbox) may be retried.
                Err(_) => {
                    jobs.running.remove(&key);
                }
                Ok(r) => jobs.remember(&key, r.clone()),
            }
        }
        let _ = tx.send(Some(outcome));
    }

    async fn execute(
        &self,
        caller: &Caller,
        req: &RunJob,
        control: &Mutex<RunControl>,
    ) -> Result<JobResult, CodedError> {
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
                    secrets: req.secrets.clone(),
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
    ) -> Result<(StepResult, Vec<ArtifactInfo>), CodedError> {
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
            self.collect(caller, sid, &req.job_id, req.artifact_quota_bytes)
                .await?
        };
        Ok((step, artifacts))
    }

    /// Stores the files under `output/` (recursively) as artifacts, each
    /// streamed from the agent into the store (never held whole). Bounded:
    /// at most `MAX_OUTPUT_FILES` files, `MAX_OUTPUT_ENTRIES` entries
    /// listed and `MAX_OUTPUT_DEPTH` levels; files over the artifact limit
    /// are left out too. Whatever was left out is named in one more
    /// artifact, `OUTPUT_TRUNCATED`.
    async fn collect(
        &self,
        caller: &Caller,
        sid: &str,
        job_id: &str,
        quota: Option<u64>,
    ) -> Result<Vec<ArtifactInfo>, CodedError> {
        use crate::sessions::PathRead;
        use crate::workspace::artifacts::{ArtifactError, sanitize_name};
        const MAX_OUTPUT_ENTRIES: usize = 1_000;
        const MAX_OUTPUT_DEPTH: usize = 8;
        const OUTPUT_TRUNCATED: &str = "_output_truncated.txt";
        let mut out = Vec::new();
        let mut left_out: Vec<String> = Vec::new();
        let mut listed = 0usize;
        let mut over_files = 0usize;
        let mut dirs = vec![(JOB_OUTPUT_DIR.to_owned(), 1usize)];
        'walk: while let Some((dir, depth)) = dirs.pop() {
            let listing = match self.sessions.read_path_queued(caller, sid, &dir).await {
                Ok(PathRead::Dir(l)) => l,
                Ok(PathRead::File { .. }) => continue,
                Err(e) if e.code == ErrorCode::FileNotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in listing.files {
                listed += 1;
                if listed > MAX_OUTPUT_ENTRIES {
                    left_out.push(format!(
                        "output/ has more than {MAX_OUTPUT_ENTRIES} entries: the rest was not read"
                    ));
                    break 'walk;
                }
                match entry.kind.as_str() {
                    "dir" if depth < MAX_OUTPUT_DEPTH => dirs.push((entry.path, depth + 1)),
                    "dir" => left_out.push(format!(
                        "{}: deeper than {MAX_OUTPUT_DEPTH} levels",
                        sanitize_name(&entry.path)
                    )),
                    "file" if out.len() < MAX_OUTPUT_FILES => {
                        let PathRead::File { body, .. } = self
                            .sessions
                            .read_path_queued(caller, sid, &entry.path)
                            .await?
                        else {
                            continue;
                        };
                        // Names come from the sandbox: one name check, after
                        // separators and control characters are replaced.
                        let name = sanitize_name(
                            entry.path.strip_prefix("output/").unwrap_or(&entry.path),
                        );
                        match self
                            .sessions
                            .artifacts()
                            .put_meta_within(
                                &caller.tenant,
                                &name,
                                &shared::dataplane::ArtifactMeta {
                                    job_id: Some(job_id.to_string()),
                                    ..Default::default()
                                },
                                quota,
                                body,
                            )
                            .await
                        {
                            Ok(info) => {
                                tracing::debug!(job = %job_id, artifact = %info.artifact_id, "job output stored");
                                out.push(info);
                            }
                            Err(ArtifactError::TooLarge(max)) => left_out
                                .push(format!("{name}: larger than {max} bytes, not stored")),
                            Err(ArtifactError::QuotaExceeded { max, .. }) => {
                                self.sessions.metrics().artifact_quota_refusals.inc();
                                left_out.push(format!(
                                    "{name}: the tenant's artifact quota ({max} bytes) is used up, not stored"
                                ));
                            }
                            Err(e) => return Err(artifact_error(e)),
                        }
                    }
                    "file" => over_files += 1,
                    _ => {}
                }
            }
        }
        if over_files > 0 {
            left_out.push(format!(
                "more than {MAX_OUTPUT_FILES} files: {over_files} more were not stored"
            ));
        }
        if !left_out.is_empty() {
            tracing::info!(job = %job_id, left_out = left_out.len(), "job output truncated");
            let text = Bytes::from(left_out.join("\n") + "\n");
            // The note (at most a few KiB) is kept even past the quota: it
            // is what tells the caller that files were left out.
            let info = self
                .sessions
                .artifacts()
                .put_note(
                    &caller.tenant,
                    OUTPUT_TRUNCATED,
                    &shared::dataplane::ArtifactMeta {
                        job_id: Some(job_id.to_string()),
                        ..Default::default()
                    },
                    futures::stream::iter([Ok::<Bytes, std::io::Error>(text)]),
                )
                .await
                .map_err(artifact_error)?;
            out.push(info);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

/// A cancel that came after the job ended.
fn finished(job_id: &str, r: &JobResult) -> CodedError {
    let status = format!("{:?}", r.status).to_lowercase();
    CodedError::new(
        ErrorCode::JobFinished,
        format!("job {job_id} already finished ({status}); it cannot be cancelled"),
    )
}

/// `JobService` in front of the fake session agent (no sandbox): a job id
/// runs once per tenant, cancels, retries after a failed start, output.
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::sessions::fake_agent::{self, FakeAgent, caller};

    fn service(agent_url: &str, dir: &std::path::Path) -> Arc<JobService> {
        let sessions = Arc::new(fake_agent::router(agent_url, dir, 4));
        Arc::new(JobService::new(
            sessions,
            KeepLimits {
                per_tenant: 100,
                tenant_bytes: 1 << 20,
                total_bytes: 1 << 22,
                lifetime: Duration::from_secs(3600),
            },
        ))
    }

    fn job(id: &str, code: &str) -> RunJob {
        RunJob {
            job_id: id.into(),
            runtime: Some("python".into()),
            code: code.into(),
            mode: None,
            event: None,
            timeout_ms: None,
            limits: None,
            env: None,
            packages: None,
            artifact_quota_bytes: None,
            secrets: None,
        }
    }

    #[tokio::test]
    async fn a_job_id_runs_once_per_tenant_and_its_sandbox_is_destroyed() {
        let agent = FakeAgent::start().await;
        let dir = tempfile::tempdir().unwrap();
        let jobs = service(&agent.url, dir.path());
        let (acme, globex) = (caller("acme"), caller("globex"));

        let first = jobs.run(&acme, job("job-1", "40 + 2")).await.unwrap();
        assert_eq!(first.status, StepStatus::Ok);
        assert_eq!(first.result, Some(serde_json::json!("40 + 2")));
        assert!(!first.replayed);
        {
            let st = agent.state();
            assert_eq!((st.creates, st.steps, st.deletes), (1, 1, 1));
            assert!(st.sessions.is_empty(), "the job's sandbox is destroyed");
        }

        // The same id again (other code even): the first outcome, not a run.
        let again = jobs.run(&acme, job("job-1", "other")).await.unwrap();
        assert!(again.replayed);
        assert_eq!(again.result, first.result);
        assert_eq!(agent.state().creates, 1, "a repeated id never runs again");
        let got = jobs.get(&acme, "job-1").await.unwrap();
        assert!(got.replayed);
        assert_eq!(got.stdout, first.stdout);

        // Another tenant's job of the same id is its own, and runs.
        assert_eq!(
            jobs.get(&globex, "job-1").await.unwrap_err().code,
            ErrorCode::JobNotFound
        );
        let theirs = jobs.run(&globex, job("job-1", "7")).await.unwrap();
        assert!(!theirs.replayed);
        assert_eq!(theirs.result, Some(serde_json::json!("7")));
        assert_eq!(agent.state().creates, 2);

        // Concurrent repeats of a new id: one run, the rest wait for it.
        let runs: Vec<_> = (0..4)
            .map(|_| {
                let (jobs, acme) = (jobs.clone(), acme.clone());
                tokio::spawn(async move { jobs.run(&acme, job("job-2", "2")).await })
            })
            .collect();
        let mut fresh = 0;
        for r in runs {
            let r = r.await.unwrap().unwrap();
            assert_eq!(r.result, Some(serde_json::json!("2")));
            fresh += usize::from(!r.replayed);
        }
        assert_eq!(fresh, 1);
        assert_eq!(agent.state().creates, 3);

        // A bad id is refused before anything runs.
        let e = jobs.run(&acme, job("../x", "1")).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert_eq!(agent.state().creates, 3);
    }

    #[tokio::test]
    async fn cancel_of_an_unknown_job_is_404_and_the_id_never_runs() {
        let agent = FakeAgent::start().await;
        let dir = tempfile::tempdir().unwrap();
        let jobs = service(&agent.url, dir.path());
        let (acme, globex) = (caller("acme"), caller("globex"));

        let e = jobs.cancel(&acme, "ghost").await.unwrap_err();
        assert_eq!(
            (e.code, e.code.http_status()),
            (ErrorCode::JobNotFound, 404)
        );
        // The id arrives later: its outcome is the cancellation, no sandbox.
        let r = jobs.run(&acme, job("ghost", "1")).await.unwrap();
        assert!(r.is_cancelled(), "{r:?}");
        assert_eq!(r.status, StepStatus::Killed);
        assert_eq!(agent.state().creates, 0);
        // Cancelling it again replays the cancellation.
        assert!(jobs.cancel(&acme, "ghost").await.unwrap().is_cancelled());
        // The cancel was acme's: globex's job of that id runs.
        let r = jobs.run(&globex, job("ghost", "1")).await.unwrap();
        assert!(!r.is_cancelled());
        assert_eq!(agent.state().creates, 1);
        // A finished job cannot be cancelled: 409.
        let e = jobs.cancel(&globex, "ghost").await.unwrap_err();
        assert_eq!(
            (e.code, e.code.http_status()),
            (ErrorCode::JobFinished, 409)
        );
        assert_eq!(
            jobs.cancel(&acme, "../x").await.unwrap_err().code,
            ErrorCode::InvalidArgument
        );
    }

    #[tokio::test]
    async fn a_run_that_could_not_start_is_not_remembered_and_may_be_retried() {
        let agent = FakeAgent::start().await;
        let dir = tempfile::tempdir().unwrap();
        let jobs = service(&agent.url, dir.path());
        let acme = caller("acme");

        // The agent at capacity: its 429 passes through.
        agent.state().create_error = Some(ErrorCode::CapacityExhausted);
        let e = jobs.run(&acme, job("job-1", "1")).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::CapacityExhausted);
        assert_eq!(
            jobs.get(&acme, "job-1").await.unwrap_err().code,
            ErrorCode::JobNotFound
        );
        // The agent's step refused: the sandbox still goes.
        agent.state().create_error = None;
        agent.state().step_error = Some(ErrorCode::SessionBusy);
        let e = jobs.run(&acme, job("job-1", "1")).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::SessionBusy);
        assert!(agent.state().sessions.is_empty());
        // Once the agent is well, the same id runs.
        agent.state().step_error = None;
        let r = jobs.run(&acme, job("job-1", "1")).await.unwrap();
        assert!(!r.replayed);
        assert_eq!(r.status, StepStatus::Ok);
        assert_eq!(agent.state().creates, 2);
        assert_eq!(agent.state().steps, 1);

        // No agent at all: 503 without its address, nothing remembered.
        let url = fake_agent::closed_url();
        let port = url.rsplit(':').next().unwrap().to_owned();
        let down = service(&url, dir.path());
        let e = down.run(&acme, job("job-9", "1")).await.unwrap_err();
        assert_eq!(
            (e.code, e.code.http_status()),
            (ErrorCode::SandboxUnavailable, 503)
        );
        assert!(
            !e.message.contains("127.0.0.1") && !e.message.contains(&port),
            "{}",
            e.message
        );
        assert_eq!(
            down.get(&acme, "job-9").await.unwrap_err().code,
            ErrorCode::JobNotFound
        );
    }

    #[tokio::test]
    async fn files_under_output_become_the_tenants_artifacts() {
        let agent = FakeAgent::start().await;
        let dir = tempfile::tempdir().unwrap();
        let jobs = service(&agent.url, dir.path());
        let acme = caller("acme");
        {
            let mut st = agent.state();
            st.files.insert("output/b.txt".into(), b"bee".to_vec());
            st.files
                .insert("output/sub/a.csv".into(), b"1,2\n".to_vec());
            st.files
                .insert("scratch.txt".into(), b"not output".to_vec());
        }
        let r = jobs.run(&acme, job("job-out", "write")).await.unwrap();
        let names: Vec<&str> = r.artifacts.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["b.txt", "sub_a.csv"], "{names:?}");
        let sizes: Vec<u64> = r.artifacts.iter().map(|a| a.size).collect();
        assert_eq!(sizes, [3, 4]);
        // The replay names the same artifacts.
        let again = jobs.run(&acme, job("job-out", "write")).await.unwrap();
        assert_eq!(again.artifacts, r.artifacts);
    }

    #[tokio::test]
    async fn output_past_the_tenant_quota_is_left_out_and_named() {
        let agent = FakeAgent::start().await;
        let dir = tempfile::tempdir().unwrap();
        let jobs = service(&agent.url, dir.path());
        let acme = caller("acme");
        {
            let mut st = agent.state();
            st.files.insert("output/a.txt".into(), vec![b'a'; 600]);
            st.files.insert("output/b.txt".into(), vec![b'b'; 600]);
        }
        // Policy's quota for the tenant (1000 bytes): the first file fits.
        let mut req = job("job-quota", "write");
        req.artifact_quota_bytes = Some(1000);
        let r = jobs.run(&acme, req).await.unwrap();
        let names: Vec<&str> = r.artifacts.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["_output_truncated.txt", "a.txt"], "{names:?}");
        let note = r
            .artifacts
            .iter()
            .find(|a| a.name.starts_with('_'))
            .unwrap();
        assert_eq!(note.job_id.as_deref(), Some("job-quota"));
        let (_, stream) = jobs
            .sessions
            .artifacts()
            .get(
                &acme.tenant,
                &shared::ids::ArtifactId::parse(note.artifact_id.as_str()).unwrap(),
            )
            .await
            .unwrap();
        let parts: Vec<Bytes> = futures::StreamExt::collect::<Vec<_>>(stream)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let text = String::from_utf8(parts.concat()).unwrap();
        assert!(
            text.contains("b.txt: the tenant's artifact quota (1000 bytes) is used up"),
            "{text}"
        );
        assert_eq!(jobs.sessions.metrics().artifact_quota_refusals.get(), 1);
    }
}
