//! Logs, traces and metrics: `tracing` to stderr (pretty or JSON), OpenTelemetry traces and
//! metrics over OTLP/gRPC when an endpoint is configured (and nothing exported otherwise), and
//! Prometheus text metrics ([`metrics`]).
//!
//! Invariant: no span or event carries a presented key, a signing secret or an admin token; spans
//! carry key ids, decisions and reasons.

pub mod grpc_metrics;
pub mod metrics;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{Resource, metrics::SdkMeterProvider, trace::SdkTracerProvider};
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

use crate::config::LogFormat;

/// Keeps the OpenTelemetry providers alive; flushes them when dropped.
#[derive(Default)]
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// The meter for OpenTelemetry metrics, when OTLP export is on.
    pub fn meter(&self) -> Option<opentelemetry::metrics::Meter> {
        use opentelemetry::metrics::MeterProvider as _;
        self.meter_provider.as_ref().map(|p| p.meter("keyfence"))
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.tracer_provider.take() {
            let _ = provider.shutdown();
        }
        if let Some(provider) = self.meter_provider.take() {
            let _ = provider.shutdown();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot set up OTLP export to {endpoint}: {reason}")]
    Otlp { endpoint: String, reason: String },
}

/// Installs the global subscriber. Must run inside the tokio runtime (the OTLP exporter's gRPC
/// channel lives on it).
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let fmt = match format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Pretty => fmt.boxed(),
    };
    let mut telemetry = Telemetry::default();
    let otel_layer = match otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let failed = |reason: String| TelemetryError::Otlp {
                endpoint: endpoint.to_owned(),
                reason,
            };
            let resource = Resource::builder().with_service_name("keyfence").build();
            let spans = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| failed(e.to_string()))?;
            let tracer_provider = SdkTracerProvider::builder()
                .with_batch_exporter(spans)
                .with_resource(resource.clone())
                .build();
            let metrics = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| failed(e.to_string()))?;
            let meter_provider = SdkMeterProvider::builder()
                .with_periodic_exporter(metrics)
                .with_resource(resource)
                .build();
            let tracer = tracer_provider.tracer("keyfence");
            telemetry.tracer_provider = Some(tracer_provider);
            telemetry.meter_provider = Some(meter_provider);
            Some(tracing_opentelemetry::layer().with_tracer(tracer))
        }
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel_layer)
        .init();
    Ok(telemetry)
}

use tracing_subscriber::Layer as _;
