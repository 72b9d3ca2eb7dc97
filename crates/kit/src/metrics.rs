//! Prometheus metrics: the recorder, the admin HTTP listener that serves them, and the
//! tower layer that counts and times every RPC by method and status code.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Latency buckets in seconds, from 100 µs (the recommendation hot path) to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];

/// Buckets for how late a scheduled campaign step ran, in seconds: from 100 ms (on time) to an
/// hour (the workers were down), with 60 s (the lateness alert's threshold) a bucket bound.
const LATENESS_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The exporter's configuration: histograms named `*_seconds` get [`LATENCY_BUCKETS`] (and are
/// rendered as Prometheus histograms, not summaries); campaign step lateness gets its own.
fn builder() -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    // A full-name matcher wins over a suffix matcher.
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full("relance_campaigns_step_lateness_seconds".into()),
            LATENESS_BUCKETS,
        )
}

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle).
pub fn recorder() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| match builder().and_then(|b| b.install_recorder()) {
            Ok(handle) => handle,
            Err(error) => {
                // Another recorder is installed (a test binary): keep a detached one.
                tracing::debug!(%error, "prometheus recorder not installed globally");
                PrometheusBuilder::new().build_recorder().handle()
            }
        })
        .clone()
}

/// Serves `/metrics` and `/livez` on `addr` until `shutdown`; returns the bound address.
pub async fn serve_admin(
    addr: SocketAddr,
    handle: PrometheusHandle,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route("/livez", get(|| std::future::ready("ok")));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "admin listener failed");
        }
    });
    Ok(bound)
}

/// Records `relance_grpc_requests_total{rpc,code}` and
/// `relance_grpc_request_duration_seconds{rpc}` for every call.
#[derive(Debug, Clone, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower_layer::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics { inner }
    }
}

/// See [`GrpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let rpc = rpc_label(request.uri().path());
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            let code = match &result {
                // An error status travels in the headers (trailers-only response); a success
                // is confirmed in the trailers, so a header without grpc-status means OK.
                Ok(response) => match response.headers().get("grpc-status") {
                    Some(value) => code_name(value.to_str().unwrap_or("2")),
                    None => "OK",
                },
                Err(_) => "UNAVAILABLE",
            };
            metrics::counter!("relance_grpc_requests_total", "rpc" => rpc.clone(), "code" => code)
                .increment(1);
            metrics::histogram!("relance_grpc_request_duration_seconds", "rpc" => rpc)
                .record(started.elapsed().as_secs_f64());
            result
        })
    }
}

/// `/relance.v1.Events/Track` → `Events/Track`; anything else keeps its path.
fn rpc_label(path: &str) -> String {
    let trimmed = path.trim_start_matches('/');
    match trimmed.strip_prefix("relance.v1.") {
        Some(rest) => rest.to_owned(),
        None => trimmed.to_owned(),
    }
}

fn code_name(numeric: &str) -> &'static str {
    match numeric {
        "0" => "OK",
        "1" => "CANCELLED",
        "3" => "INVALID_ARGUMENT",
        "4" => "DEADLINE_EXCEEDED",
        "5" => "NOT_FOUND",
        "6" => "ALREADY_EXISTS",
        "7" => "PERMISSION_DENIED",
        "8" => "RESOURCE_EXHAUSTED",
        "9" => "FAILED_PRECONDITION",
        "10" => "ABORTED",
        "11" => "OUT_OF_RANGE",
        "12" => "UNIMPLEMENTED",
        "13" => "INTERNAL",
        "14" => "UNAVAILABLE",
        "15" => "DATA_LOSS",
        "16" => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_lateness_has_buckets_past_the_alert_threshold() -> anyhow::Result<()> {
        let recorder = builder()?.build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::histogram!("relance_campaigns_step_lateness_seconds").record(90.0);
            metrics::histogram!("relance_grpc_request_duration_seconds").record(0.003);
        });
        let text = handle.render();
        for series in [
            r#"relance_campaigns_step_lateness_seconds_bucket{le="60"} 0"#,
            r#"relance_campaigns_step_lateness_seconds_bucket{le="120"} 1"#,
            r#"relance_grpc_request_duration_seconds_bucket{le="0.005"} 1"#,
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
        Ok(())
    }

    #[test]
    fn rpc_labels_drop_the_package() {
        assert_eq!(rpc_label("/relance.v1.Events/Track"), "Events/Track");
        assert_eq!(
            rpc_label("/grpc.health.v1.Health/Check"),
            "grpc.health.v1.Health/Check"
        );
    }
}
