//! The warm pool: sandboxes started ahead of time with the default limits,
//! idle until a session claims one. A claimed sandbox belongs to that session
//! until it is destroyed; nothing returns to the pool.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shared::agent::Runtime;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::kernels::Kernel;
use crate::workspace::Workspace;

/// A started, idle sandbox and its workspace.
#[derive(Debug)]
pub struct WarmSandbox {
    pub kernel: Kernel,
    pub workspace: Workspace,
}

/// Parses `SESSION_AGENT_WARM_POOL` (`python=2,node=1`).
pub fn parse_targets(spec: &str) -> Result<BTreeMap<Runtime, usize>, String> {
    let mut out = BTreeMap::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, count) = part
            .split_once('=')
            .ok_or_else(|| format!("SESSION_AGENT_WARM_POOL: {part:?} is not runtime=count"))?;
        let runtime = Runtime::parse(name.trim()).ok_or_else(|| {
            format!("SESSION_AGENT_WARM_POOL: unknown runtime {name:?} (python, node, bash)")
        })?;
        let count: usize = count
            .trim()
            .parse()
            .map_err(|_| format!("SESSION_AGENT_WARM_POOL: {count:?} is not a count"))?;
        if count > 64 {
            return Err(format!(
                "SESSION_AGENT_WARM_POOL: {count} idle sandboxes per runtime is more than 64"
            ));
        }
        out.insert(runtime, count);
    }
    Ok(out)
}

/// Idle sandboxes per runtime, refilled in the background.
#[derive(Debug)]
pub struct WarmPool {
    targets: BTreeMap<Runtime, usize>,
    idle: Mutex<BTreeMap<Runtime, VecDeque<WarmSandbox>>>,
    wake: Notify,
    /// No more refills (a single-use agent has served its session).
    retired: std::sync::atomic::AtomicBool,
}

impl WarmPool {
    pub fn new(targets: BTreeMap<Runtime, usize>) -> Arc<Self> {
        Arc::new(WarmPool {
            targets,
            idle: Mutex::new(BTreeMap::new()),
            wake: Notify::new(),
            retired: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Stops refilling for good: a single-use agent (a `k8s` runtime pod)
    /// pre-starts its one interpreter so the pod's claim is a warm start,
    /// and starts no other once its session exists.
    pub fn retire(&self) {
        self.retired
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Takes an idle sandbox, if one is ready, and wakes the filler.
    pub fn claim(&self, runtime: Runtime) -> Option<WarmSandbox> {
        let taken = self.lock().get_mut(&runtime).and_then(VecDeque::pop_front);
        self.wake.notify_one();
        taken
    }

    /// Idle sandboxes per runtime (for health and metrics).
    pub fn sizes(&self) -> BTreeMap<String, usize> {
        let idle = self.lock();
        self.targets
            .keys()
            .map(|r| (r.as_str().to_owned(), idle.get(r).map_or(0, VecDeque::len)))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Runtime, VecDeque<WarmSandbox>>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn missing(&self) -> Option<Runtime> {
        if self.retired.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        let idle = self.lock();
        self.targets
            .iter()
            .find(|(r, want)| idle.get(r).map_or(0, VecDeque::len) < **want)
            .map(|(r, _)| *r)
    }

    /// Keeps the pool at its targets until `shutdown`, starting one sandbox
    /// at a time (cold starts cost ~0.1 CPU-second each), then destroys
    /// everything idle.
    pub async fn run_filler<F, Fut>(self: Arc<Self>, start: F, shutdown: CancellationToken)
    where
        F: Fn(Runtime) -> Fut,
        Fut: std::future::Future<Output = Result<WarmSandbox, String>>,
    {
        let mut backoff = Duration::from_millis(200);
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            match self.missing() {
                Some(runtime) => {
                    // A start is never abandoned midway, shutdown or not:
                    // dropping it would SIGKILL the launcher and leave its
                    // runsc state and cgroups behind. It is bounded by the
                    // ready timeout, and a sandbox that comes up during
                    // shutdown is destroyed with the idle ones below.
                    let started = start(runtime).await;
                    match started {
                        Ok(warm) => {
                            backoff = Duration::from_millis(200);
                            self.lock().entry(runtime).or_default().push_back(warm);
                        }
                        Err(e) => {
                            tracing::warn!(runtime = %runtime, error = %e, retry_in_ms = backoff.as_millis() as u64,
                                "warm pool could not start a sandbox");
                            tokio::select! {
                                _ = tokio::time::sleep(backoff) => {}
                                _ = shutdown.cancelled() => break,
                            }
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                        }
                    }
                }
                None => {
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
        }
        self.drain().await;
    }

    /// Destroys every idle sandbox.
    pub async fn drain(&self) {
        let all: Vec<WarmSandbox> = std::mem::take(&mut *self.lock())
            .into_values()
            .flatten()
            .collect();
        futures::future::join_all(all.into_iter().map(|w| async move {
            w.kernel.destroy().await;
            w.workspace.destroy();
        }))
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retired_pool_asks_for_nothing() {
        let pool = WarmPool::new(parse_targets("python=1").unwrap());
        assert_eq!(pool.missing(), Some(Runtime::Python));
        pool.retire();
        assert_eq!(pool.missing(), None);
    }

    #[test]
    fn targets() {
        let t = parse_targets("python=2, node=1").unwrap();
        assert_eq!(t.get(&Runtime::Python), Some(&2));
        assert_eq!(t.get(&Runtime::Node), Some(&1));
        assert!(parse_targets("").unwrap().is_empty());
        assert!(
            parse_targets("ruby=1")
                .unwrap_err()
                .contains("unknown runtime")
        );
        assert!(parse_targets("python").is_err());
        assert!(parse_targets("python=x").is_err());
    }
}
