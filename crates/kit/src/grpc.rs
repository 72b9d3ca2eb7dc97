//! The gRPC server every service runs in: health, reflection, gRPC-Web for browsers (with
//! CORS), API-key auth, per-RPC metrics, a span per call joined to the caller's trace, and a
//! graceful shutdown that stops accepting and drains the calls in flight.

use std::convert::Infallible;
use std::time::Duration;

use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic_health::ServingStatus;
use tonic_web::GrpcWebLayer;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer, ExposeHeaders};

use crate::auth::AuthLayer;
use crate::metrics::GrpcMetricsLayer;
use crate::platform::Platform;

/// The services one process serves, gathered before the server starts.
#[derive(Default)]
pub struct GrpcServer {
    routes: RoutesBuilder,
    names: Vec<&'static str>,
}

impl std::fmt::Debug for GrpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcServer")
            .field("services", &self.names)
            .finish()
    }
}

impl GrpcServer {
    /// An empty server.
    pub fn new() -> GrpcServer {
        GrpcServer::default()
    }

    /// Adds one tonic service.
    pub fn add_service<S>(&mut self, service: S)
    where
        S: tower_service::Service<
                http::Request<Body>,
                Response = http::Response<Body>,
                Error = Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(service);
    }

    /// The names of the services added so far.
    pub fn service_names(&self) -> &[&'static str] {
        &self.names
    }

    /// Serves on `listener` until the platform's shutdown token is cancelled, then drains.
    pub async fn serve(
        self,
        platform: &Platform,
        listener: tokio::net::TcpListener,
    ) -> anyhow::Result<()> {
        let (health, health_service) = tonic_health::server::health_reporter();
        for name in &self.names {
            health
                .set_service_status(*name, ServingStatus::Serving)
                .await;
        }
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(relance_proto::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let mut routes = self.routes;
        routes.add_service(health_service);
        routes.add_service(reflection);

        // Browsers call Track and Recommend through gRPC-Web: allow any origin (the API key
        // is what authorises) and expose the gRPC status headers.
        let cors = CorsLayer::new()
            .allow_origin(AllowOrigin::mirror_request())
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers(ExposeHeaders::list([
                http::HeaderName::from_static("grpc-status"),
                http::HeaderName::from_static("grpc-message"),
            ]))
            .max_age(Duration::from_secs(86_400));

        let shutdown = platform.shutdown.clone();
        let drained_health = health.clone();
        let names = self.names.clone();
        let signal = async move {
            shutdown.cancelled().await;
            for name in names {
                drained_health
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
            tracing::info!("shutting down: draining in-flight calls");
        };
        tonic::transport::Server::builder()
            .accept_http1(true)
            .trace_fn(rpc_span)
            .layer(cors)
            .layer(GrpcWebLayer::new())
            .layer(GrpcMetricsLayer)
            .layer(AuthLayer::new(platform.keys.clone()))
            .add_routes(routes.routes())
            .serve_with_incoming_shutdown(
                // Without TCP_NODELAY, an answer written after an await waits for the
                // client's delayed ACK (~40 ms): every call between services paid it.
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                signal,
            )
            .await?;
        Ok(())
    }
}

/// One span per call, a child of the caller's trace when it sent `traceparent`.
fn rpc_span(request: &http::Request<()>) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let span = tracing::info_span!("rpc", rpc = %request.uri().path(), otel.kind = "server");
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(request.headers()))
    });
    let _ = span.set_parent(parent);
    span
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|key| key.as_str()).collect()
    }
}
