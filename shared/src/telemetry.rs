//! Logging and tracing set-up shared by every binary, and the W3C trace
//! context (`traceparent`, `tracestate`) carried between the planes.
//!
//! Without `OTEL_EXPORTER_OTLP_ENDPOINT` the subscriber is exactly the
//! logging one: no OpenTelemetry layer, no exporter, no propagator; a span
//! costs what it cost before. With it, a `tracing-opentelemetry` layer turns
//! the spans into OpenTelemetry spans, a batch processor exports them over
//! OTLP/HTTP (protobuf) from a thread of its own, and JSON log lines inside
//! a span carry its `trace_id` and `span_id`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer, filter::LevelFilter, fmt, prelude::*};

/// The only OTLP protocol built in (the specification's default).
pub const OTLP_HTTP_PROTOBUF: &str = "http/protobuf";

/// OpenTelemetry settings, the standard `OTEL_*` variables (flattened into
/// each binary's configuration).
#[derive(Debug, Clone, Default, PartialEq, clap::Args)]
pub struct TelemetryConfig {
    /// OTLP/HTTP collector base URL (`http://otel-collector:4318`); spans
    /// are posted to `<url>/v1/traces`. Unset: nothing is exported and no
    /// OpenTelemetry layer is installed.
    #[arg(
        long = "otel-exporter-otlp-endpoint",
        env = "OTEL_EXPORTER_OTLP_ENDPOINT"
    )]
    pub otlp_endpoint: Option<String>,
    /// OTLP protocol; only `http/protobuf` is built in.
    #[arg(
        long = "otel-exporter-otlp-protocol",
        env = "OTEL_EXPORTER_OTLP_PROTOCOL",
        default_value = OTLP_HTTP_PROTOBUF
    )]
    pub otlp_protocol: String,
    /// `service.name` of the exported spans (default: the binary's name).
    #[arg(long = "otel-service-name", env = "OTEL_SERVICE_NAME")]
    pub service_name: Option<String>,
    /// Sampler: always_on, always_off, traceidratio, parentbased_always_on,
    /// parentbased_always_off or parentbased_traceidratio.
    #[arg(
        long = "otel-traces-sampler",
        env = "OTEL_TRACES_SAMPLER",
        default_value = "parentbased_always_on"
    )]
    pub traces_sampler: String,
    /// The ratio (0..=1) of the `*traceidratio` samplers (default 1).
    #[arg(long = "otel-traces-sampler-arg", env = "OTEL_TRACES_SAMPLER_ARG")]
    pub traces_sampler_arg: Option<String>,
}

impl TelemetryConfig {
    /// Whether spans are exported (an endpoint is set).
    pub fn exporting(&self) -> bool {
        self.otlp_endpoint.as_deref().is_some_and(|e| !e.is_empty())
    }

    /// Checks every value, naming the variable of the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(endpoint) = self.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
            let rest = endpoint.strip_prefix("http://").ok_or_else(|| {
                if endpoint.starts_with("https://") {
                    format!(
                        "OTEL_EXPORTER_OTLP_ENDPOINT {endpoint:?}: TLS to the collector is not built in; \
                         use an http:// collector (a node-local agent or an in-cluster service)"
                    )
                } else {
                    format!("OTEL_EXPORTER_OTLP_ENDPOINT {endpoint:?} is not an http:// URL")
                }
            })?;
            let host = rest.split('/').next().unwrap_or_default();
            if host.is_empty() || endpoint.contains(char::is_whitespace) {
                return Err(format!(
                    "OTEL_EXPORTER_OTLP_ENDPOINT {endpoint:?} names no host"
                ));
            }
        }
        if self.otlp_protocol != OTLP_HTTP_PROTOBUF {
            return Err(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL {:?} is not supported: only {OTLP_HTTP_PROTOBUF} is built in",
                self.otlp_protocol
            ));
        }
        if self.service_name.as_deref().is_some_and(|n| n.len() > 255) {
            return Err("OTEL_SERVICE_NAME is longer than 255 bytes".into());
        }
        self.sampler().map(|_| ())
    }

    /// The sampler `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` name.
    fn sampler(&self) -> Result<Sampler, String> {
        let ratio = match self.traces_sampler_arg.as_deref() {
            None | Some("") => 1.0,
            Some(arg) => arg
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| {
                    format!("OTEL_TRACES_SAMPLER_ARG {arg:?} is not a ratio between 0 and 1")
                })?,
        };
        Ok(match self.traces_sampler.as_str() {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::TraceIdRatioBased(ratio),
            "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            "parentbased_traceidratio" => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
            }
            other => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER {other:?} is not one of always_on, always_off, traceidratio, \
                     parentbased_always_on, parentbased_always_off, parentbased_traceidratio"
                ));
            }
        })
    }
}

/// Set once an OpenTelemetry layer is installed: the fast path that keeps
/// trace-context work off requests when nothing is exported.
static OTEL_INSTALLED: AtomicBool = AtomicBool::new(false);

/// Whether this process installed an OpenTelemetry layer.
pub fn otel_installed() -> bool {
    OTEL_INSTALLED.load(Ordering::Relaxed)
}

/// What [`init`] installed; [`Telemetry::shutdown`] flushes the spans still
/// buffered (call it on the way out, after the servers have drained).
#[must_use = "call shutdown() on exit, or buffered spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether an OpenTelemetry layer (and exporter) was installed.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is buffered and stops the exporter (bounded: a
    /// collector that does not answer costs at most a few seconds).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown_with_timeout(Duration::from_secs(5))
        {
            tracing::warn!(error = %e, "flushing the trace exporter failed");
        }
    }
}

/// Installs the global subscriber: JSON lines when `LOG_FORMAT=json`,
/// human-readable otherwise; level from `RUST_LOG` (default `info`); and,
/// when `config` names an endpoint, the OpenTelemetry layer exporting the
/// spans of `service` (`OTEL_SERVICE_NAME` overrides the name).
pub fn init(service: &str, config: &TelemetryConfig) -> Result<Telemetry, String> {
    config.validate()?;
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let (subscriber, provider) = build_subscriber(service, config, json)?;
    // A second init (tests) keeps the first subscriber.
    if tracing::subscriber::set_global_default(subscriber).is_ok() && provider.is_some() {
        OTEL_INSTALLED.store(true, Ordering::Relaxed);
    }
    Ok(Telemetry { provider })
}

type BoxedSubscriber = Box<dyn Subscriber + Send + Sync + 'static>;

/// The subscriber [`init`] installs, and the tracer provider when spans are
/// exported. Without an endpoint: the logging layers alone, as before
/// OpenTelemetry existed here.
pub fn build_subscriber(
    service: &str,
    config: &TelemetryConfig,
    json: bool,
) -> Result<(BoxedSubscriber, Option<SdkTracerProvider>), String> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let Some(endpoint) = config.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) else {
        let registry = tracing_subscriber::registry().with(filter);
        let subscriber: BoxedSubscriber = if json {
            Box::new(registry.with(fmt::layer().json().with_current_span(true)))
        } else {
            Box::new(registry.with(fmt::layer().with_target(false)))
        };
        return Ok((subscriber, None));
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| format!("OTEL_EXPORTER_OTLP_ENDPOINT {endpoint:?}: {e}"))?;
    let name = config
        .service_name
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| service.to_owned());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(config.sampler()?)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(name)
                .build(),
        )
        .build();
    let tracer = provider.tracer(service.to_owned());
    // Spans of `info` and above go to the collector whatever RUST_LOG says
    // about the log lines.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(LevelFilter::INFO);
    let registry = tracing_subscriber::registry().with(otel);
    let subscriber: BoxedSubscriber = if json {
        Box::new(
            registry.with(
                fmt::layer()
                    .json()
                    .with_current_span(true)
                    .event_format(WithTraceIds(fmt::format().json().with_current_span(true)))
                    .with_filter(filter),
            ),
        )
    } else {
        Box::new(registry.with(fmt::layer().with_target(false).with_filter(filter)))
    };
    Ok((subscriber, Some(provider)))
}

/// The JSON event format with the current OpenTelemetry `trace_id` and
/// `span_id` added at the top level of each line written inside a span.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        // The context tracing-opentelemetry activates on entering a span.
        let cx = opentelemetry::Context::current();
        let span = cx.span();
        let sc = span.span_context();
        if !sc.is_valid() {
            return self.0.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        // The JSON format writes one object and a newline.
        match line.strip_suffix("}\n") {
            Some(body) => writeln!(
                writer,
                "{body},\"trace_id\":\"{}\",\"span_id\":\"{}\"}}",
                sc.trace_id(),
                sc.span_id()
            ),
            None => writer.write_str(&line),
        }
    }
}

/// How a server treats the trace context a caller sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncomingTrace {
    /// The request joins the caller's trace (the planes behind the control
    /// plane, called only by the plane in front of them).
    Parent,
    /// The request starts a trace of its own with a link to the caller's
    /// (the public edge: an outside caller neither picks our trace ids nor
    /// forces sampling).
    Link,
}

/// A header map as the propagator reads it (names lowercased).
struct Carrier(HashMap<String, String>);

impl opentelemetry::propagation::Extractor for Carrier {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

impl opentelemetry::propagation::Injector for Carrier {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

/// Ties `span` (not yet entered) to the caller's trace context, as
/// `incoming` says. A missing or malformed `traceparent` is ignored (the
/// span starts a new trace), never an error. Does nothing without an
/// OpenTelemetry layer.
pub fn accept_trace_context(
    span: &tracing::Span,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
    incoming: IncomingTrace,
) {
    let Some(traceparent) = traceparent else {
        return;
    };
    if !otel_installed() {
        return;
    }
    let mut carrier = HashMap::with_capacity(2);
    carrier.insert("traceparent".to_owned(), traceparent.to_owned());
    if let Some(state) = tracestate {
        carrier.insert("tracestate".to_owned(), state.to_owned());
    }
    let cx = TraceContextPropagator::new().extract(&Carrier(carrier));
    let remote = cx.span().span_context().clone();
    if !remote.is_valid() {
        return;
    }
    match incoming {
        IncomingTrace::Parent => {
            let _ = span.set_parent(cx);
        }
        IncomingTrace::Link => span.add_link(remote),
    }
}

/// The `traceparent` (and `tracestate`) of the span being executed, for the
/// next hop or for a job's record; `None` without an OpenTelemetry layer.
pub fn current_trace_context() -> Option<Vec<(&'static str, String)>> {
    if !otel_installed() {
        return None;
    }
    let cx = opentelemetry::Context::current();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = Carrier(HashMap::with_capacity(2));
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    let mut out = Vec::with_capacity(2);
    for name in ["traceparent", "tracestate"] {
        if let Some(v) = carrier.0.remove(name).filter(|v| !v.is_empty()) {
            out.push((name, v));
        }
    }
    Some(out)
}

/// The `traceparent` of the span being executed (see
/// [`current_trace_context`]).
pub fn current_traceparent() -> Option<String> {
    current_trace_context()?
        .into_iter()
        .find_map(|(k, v)| (k == "traceparent").then_some(v))
}

/// Marks the OpenTelemetry layer installed, for tests that install their
/// own subscriber with [`build_subscriber`] instead of [`init`].
#[doc(hidden)]
pub fn mark_installed_for_tests() {
    OTEL_INSTALLED.store(true, Ordering::Relaxed);
}

#[doc(hidden)]
pub mod testing;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn exporting_to(endpoint: &str) -> TelemetryConfig {
        TelemetryConfig {
            otlp_endpoint: Some(endpoint.into()),
            otlp_protocol: OTLP_HTTP_PROTOBUF.into(),
            traces_sampler: "parentbased_always_on".into(),
            ..Default::default()
        }
    }

    fn unset() -> TelemetryConfig {
        TelemetryConfig {
            otlp_protocol: OTLP_HTTP_PROTOBUF.into(),
            traces_sampler: "parentbased_always_on".into(),
            ..Default::default()
        }
    }

    /// Issue 19 §5: without OTEL_EXPORTER_OTLP_ENDPOINT there is no
    /// OpenTelemetry layer: a span has no OpenTelemetry context, and
    /// nothing is propagated or exported. With it, the same span has one.
    #[test]
    fn without_an_endpoint_no_opentelemetry_layer_is_installed() {
        for config in [
            unset(),
            TelemetryConfig {
                otlp_endpoint: Some(String::new()),
                ..unset()
            },
        ] {
            assert!(!config.exporting());
            let (subscriber, provider) = build_subscriber("test", &config, true).unwrap();
            assert!(provider.is_none());
            tracing::subscriber::with_default(subscriber, || {
                let span = tracing::info_span!("request");
                let _in = span.enter();
                assert!(!span.context().span().span_context().is_valid());
                assert!(
                    !opentelemetry::Context::current()
                        .span()
                        .span_context()
                        .is_valid()
                );
            });
        }
        // A closed loopback port: the exporter is built, nothing leaves
        // the machine.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let (subscriber, provider) =
            build_subscriber("test", &exporting_to(&endpoint), true).unwrap();
        let provider = provider.unwrap();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request");
            let _in = span.enter();
            assert!(span.context().span().span_context().is_valid());
        });
        let _ = provider.shutdown_with_timeout(Duration::from_secs(1));
    }

    #[test]
    fn bad_values_are_refused_naming_the_variable() {
        for (config, variable) in [
            (
                exporting_to("collector:4318"),
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (
                exporting_to("https://c:4318"),
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (exporting_to("http:///v1"), "OTEL_EXPORTER_OTLP_ENDPOINT"),
            (
                TelemetryConfig {
                    otlp_protocol: "grpc".into(),
                    ..unset()
                },
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ),
            (
                TelemetryConfig {
                    traces_sampler: "sometimes".into(),
                    ..unset()
                },
                "OTEL_TRACES_SAMPLER",
            ),
            (
                TelemetryConfig {
                    traces_sampler: "traceidratio".into(),
                    traces_sampler_arg: Some("2".into()),
                    ..unset()
                },
                "OTEL_TRACES_SAMPLER_ARG",
            ),
        ] {
            let err = config.validate().unwrap_err();
            assert!(err.contains(variable), "{err}");
        }
        exporting_to("http://otel-collector:4318/")
            .validate()
            .unwrap();
        unset().validate().unwrap();
    }

    /// Log lines inside a span carry its trace and span ids (JSON format).
    #[test]
    fn json_lines_carry_the_trace_id() {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let sink = buf.clone();
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")))
            .with(
                fmt::layer()
                    .json()
                    .event_format(WithTraceIds(fmt::format().json().with_current_span(true)))
                    .with_writer(move || sink.clone()),
            );
        let trace_id = tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside");
            let span = tracing::info_span!("request", job_id = "job_1");
            let _in = span.enter();
            tracing::info!("inside");
            span.context().span().span_context().trace_id().to_string()
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].get("trace_id").is_none(), "{text}");
        assert_eq!(lines[1]["trace_id"], trace_id.as_str(), "{text}");
        assert_eq!(lines[1]["span_id"].as_str().unwrap().len(), 16, "{text}");
        assert_eq!(lines[1]["span"]["job_id"], "job_1", "{text}");
    }
}
