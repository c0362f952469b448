//! gRPC server metrics for both listeners: requests by method and status code, and latency by
//! method, as a tower layer around each router.
//!
//! The status of a unary gRPC call usually arrives in the response's trailers, so the layer
//! wraps the response body and counts the call when the trailers (or a trailers-only response's
//! headers) go by; a call whose body ends without a status counts as `UNKNOWN`. Every counter is
//! created up front and found by index, so a request costs a few comparisons and two atomic adds,
//! and no allocation.
//!
//! Must not import: `access`, `authz` or `grpc` (it names method paths, never services).

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use http_body::{Body, Frame, SizeHint};
use prometheus_client::{
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

/// The methods counted by name; anything else counts as `other`.
const METHODS: [&str; 18] = [
    "/keyfence.v1.Authorizer/Authorize",
    "/envoy.service.auth.v3.Authorization/Check",
    "/keyfence.v1.Admin/CreateKey",
    "/keyfence.v1.Admin/GetKey",
    "/keyfence.v1.Admin/ListKeys",
    "/keyfence.v1.Admin/UpdateKey",
    "/keyfence.v1.Admin/RevokeKey",
    "/keyfence.v1.Admin/RotateKey",
    "/keyfence.v1.Admin/GetAllowlist",
    "/keyfence.v1.Admin/AddAllowlistEntries",
    "/keyfence.v1.Admin/ReplaceAllowlist",
    "/keyfence.v1.Admin/RemoveAllowlistEntries",
    "/keyfence.v1.Admin/CheckAccess",
    "/keyfence.v1.Admin/ListAccessLogs",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];
const OTHER: usize = METHODS.len();
/// gRPC status codes 0..=16, then `UNKNOWN` again for a missing or unreadable status.
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];
const UNKNOWN: usize = 2;

fn method_index(path: &str) -> usize {
    METHODS.iter().position(|m| *m == path).unwrap_or(OTHER)
}

fn method_name(index: usize) -> &'static str {
    METHODS.get(index).copied().unwrap_or("other")
}

/// The counters and histograms, created up front.
pub struct GrpcMetrics {
    /// `requests[method * CODES.len() + code]`.
    requests: Vec<Counter>,
    /// `seconds[method]`.
    seconds: Vec<Histogram>,
}

impl GrpcMetrics {
    pub fn register(registry: &mut Registry) -> GrpcMetrics {
        let requests = Family::<[(&'static str, &'static str); 2], Counter>::default();
        registry.register(
            "grpc_server_requests",
            "gRPC calls handled, by method and status code",
            requests.clone(),
        );
        let seconds =
            Family::<[(&'static str, &'static str); 1], Histogram>::new_with_constructor(|| {
                Histogram::new([
                    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1,
                    0.5, 2.5,
                ])
            });
        registry.register(
            "grpc_server_duration_seconds",
            "Time from a gRPC call's request to its status, by method",
            seconds.clone(),
        );
        let methods = 0..=OTHER;
        GrpcMetrics {
            requests: methods
                .clone()
                .flat_map(|m| {
                    let requests = &requests;
                    CODES.iter().map(move |code| {
                        requests
                            .get_or_create(&[("method", method_name(m)), ("code", code)])
                            .clone()
                    })
                })
                .collect(),
            seconds: methods
                .map(|m| seconds.get_or_create(&[("method", method_name(m))]).clone())
                .collect(),
        }
    }

    fn record(&self, method: usize, code: usize, started: Instant) {
        self.requests[method * CODES.len() + code.min(CODES.len() - 1)].inc();
        self.seconds[method].observe(started.elapsed().as_secs_f64());
    }
}

fn status_code(headers: &http::HeaderMap) -> Option<usize> {
    let value = headers.get("grpc-status")?;
    value
        .to_str()
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|code| *code < CODES.len())
        .or(Some(UNKNOWN))
}

/// The tower layer that counts every call of a listener.
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    metrics: Arc<GrpcMetrics>,
}

impl GrpcMetricsLayer {
    pub fn new(metrics: Arc<GrpcMetrics>) -> GrpcMetricsLayer {
        GrpcMetricsLayer { metrics }
    }
}

impl<S> tower_layer::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<GrpcMetrics>,
}

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for GrpcMetricsService<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future = CountedResponse<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let method = method_index(request.uri().path());
        let started = Instant::now();
        CountedResponse {
            response: self.inner.call(request),
            pending: Some(Pending {
                metrics: self.metrics.clone(),
                method,
                started,
            }),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner service's response future, wrapped without a heap allocation: when the response
    /// arrives, its body is wrapped to count the call.
    pub struct CountedResponse<F> {
        #[pin]
        response: F,
        pending: Option<Pending>,
    }
}

impl<F, ResBody, E> Future for CountedResponse<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<CountedBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match this.response.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(result) => result?,
        };
        let mut pending = this.pending.take();
        // A trailers-only response carries its status in the headers.
        if let Some(code) = status_code(response.headers())
            && let Some(pending) = pending.take()
        {
            pending.finish(code);
        }
        Poll::Ready(Ok(response.map(|body| CountedBody { body, pending })))
    }
}

/// A call not yet counted.
struct Pending {
    metrics: Arc<GrpcMetrics>,
    method: usize,
    started: Instant,
}

impl Pending {
    fn finish(self, code: usize) {
        self.metrics.record(self.method, code, self.started);
    }
}

pin_project_lite::pin_project! {
    /// A response body that counts its call when the status goes by, or when it ends or is
    /// dropped without one.
    pub struct CountedBody<B> {
        #[pin]
        body: B,
        pending: Option<Pending>,
    }

    impl<B> PinnedDrop for CountedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(pending) = this.project().pending.take() {
                pending.finish(UNKNOWN);
            }
        }
    }
}

impl<B: Body> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.body.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(trailers) = frame.trailers_ref()
            && let Some(pending) = this.pending.take()
        {
            pending.finish(status_code(trailers).unwrap_or(UNKNOWN));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_and_codes_map_to_their_counters() {
        assert_eq!(method_index("/keyfence.v1.Authorizer/Authorize"), 0);
        assert_eq!(method_index("/unknown.Service/Method"), OTHER);
        assert_eq!(method_name(OTHER), "other");
        let mut headers = http::HeaderMap::new();
        assert_eq!(status_code(&headers), None);
        headers.insert("grpc-status", "8".parse().unwrap());
        assert_eq!(CODES[status_code(&headers).unwrap()], "RESOURCE_EXHAUSTED");
        headers.insert("grpc-status", "99".parse().unwrap());
        assert_eq!(status_code(&headers), Some(UNKNOWN));
    }
}
