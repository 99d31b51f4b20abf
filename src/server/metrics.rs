//! The Prometheus metrics of `GET /metrics` (prometheus-client's registry and text encoding).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Status {
    /// The HTTP status answered (499: the client went away first).
    pub status: u16,
}

pub struct Metrics {
    pub registry: Registry,
    /// Jobs waiting in the queue (not the one running).
    pub queue_depth: Gauge,
    /// Requests by the status they were answered with.
    pub requests: Family<Status, Counter>,
    /// Seconds from request to answer, image requests only.
    pub request_seconds: Histogram,
    /// Seconds per sampling step.
    pub step_seconds: Histogram,
    /// Images generated.
    pub images: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mmdit");
        let queue_depth = Gauge::default();
        let requests = Family::<Status, Counter>::default();
        let request_seconds = Histogram::new(exponential_buckets(0.05, 2.0, 14));
        let step_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let images = Counter::default();
        registry.register(
            "queue_depth",
            "Jobs waiting in the queue",
            queue_depth.clone(),
        );
        registry.register("requests", "HTTP requests by status", requests.clone());
        registry.register(
            "request_seconds",
            "Image request latency in seconds",
            request_seconds.clone(),
        );
        registry.register(
            "step_seconds",
            "Sampling step time in seconds",
            step_seconds.clone(),
        );
        registry.register("images_generated", "Images generated", images.clone());
        Self {
            registry,
            queue_depth,
            requests,
            request_seconds,
            step_seconds,
            images,
        }
    }

    /// The metrics in Prometheus' text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
