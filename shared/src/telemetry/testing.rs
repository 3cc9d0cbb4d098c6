//! Span capture for hermetic tests: an OpenTelemetry layer on this thread
//! whose exporter keeps every finished span in memory, so a test can check
//! the attributes a request span would carry to a collector without one.
//! (Hidden from the docs; used by the planes' tests.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::prelude::*;

/// One finished span as an exporter received it.
#[derive(Debug, Clone)]
pub struct CapturedSpan {
    /// The span's name (`otel.name` when set).
    pub name: String,
    /// Its trace id (32 hex digits).
    pub trace_id: String,
    /// Its attributes, as text.
    pub attributes: HashMap<String, String>,
}

#[derive(Debug, Clone, Default)]
struct Sink(Arc<Mutex<Vec<CapturedSpan>>>);

impl SpanExporter for Sink {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut out = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for s in batch {
            out.push(CapturedSpan {
                name: s.name.to_string(),
                trace_id: s.span_context.trace_id().to_string(),
                attributes: s
                    .attributes
                    .iter()
                    .map(|kv| (kv.key.to_string(), kv.value.to_string()))
                    .collect(),
            });
        }
        Ok(())
    }
}

/// Captures the spans of this thread while alive (install it at the start
/// of a `current_thread` test, so spawned tasks run under it too).
pub struct SpanCapture {
    sink: Sink,
    provider: SdkTracerProvider,
    _guard: tracing::subscriber::DefaultGuard,
}

impl SpanCapture {
    /// Installs the capturing layer as this thread's subscriber and marks
    /// the OpenTelemetry layer installed (as `init` would with an endpoint).
    pub fn start() -> SpanCapture {
        let sink = Sink::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(sink.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let guard = tracing::subscriber::set_default(subscriber);
        super::mark_installed_for_tests();
        SpanCapture {
            sink,
            provider,
            _guard: guard,
        }
    }

    /// Every span finished so far.
    pub fn spans(&self) -> Vec<CapturedSpan> {
        let _ = self.provider.force_flush();
        self.sink
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The finished spans named `name`.
    pub fn named(&self, name: &str) -> Vec<CapturedSpan> {
        self.spans()
            .into_iter()
            .filter(|s| s.name == name)
            .collect()
    }

    /// The finished spans named `name`, once there are `count` of them (or
    /// after 30 s, whatever there are): a span ends when its last handle
    /// is dropped, which may be on another thread after the response (the
    /// SQLite driver's worker holds the span of the command it runs).
    #[cfg(feature = "server")]
    pub async fn wait_named(&self, name: &str, count: usize) -> Vec<CapturedSpan> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let spans = self.named(name);
            if spans.len() >= count || std::time::Instant::now() > deadline {
                return spans;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

impl Drop for SpanCapture {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}
