//! Metric handles the data path uses on every request, created once so the hot path only
//! increments atomics. Names are public API (see README).

use kafka_protocol::messages::ApiKey;
use metrics::{Counter, Histogram, counter, histogram};

pub struct ApiMetrics {
    pub requests: Counter,
    /// Time spent in keyward: reading and deciding before the broker, and handling after.
    pub proxy_seconds: Histogram,
    /// Time waiting on the broker.
    pub broker_seconds: Histogram,
}

impl ApiMetrics {
    fn new(api: String) -> Self {
        Self {
            requests: counter!("keyward_requests_total", "api" => api.clone()),
            proxy_seconds: histogram!("keyward_request_duration_seconds", "api" => api.clone(), "part" => "proxy"),
            broker_seconds: histogram!("keyward_request_duration_seconds", "api" => api, "part" => "broker"),
        }
    }
}

pub struct RequestMetrics {
    by_key: Vec<Option<ApiMetrics>>,
    unknown: ApiMetrics,
    pub bytes_received: Counter,
    pub bytes_sent: Counter,
}

impl RequestMetrics {
    pub fn new() -> Self {
        let mut by_key: Vec<Option<ApiMetrics>> = Vec::new();
        for key in ApiKey::iter() {
            let index = key as usize;
            if by_key.len() <= index {
                by_key.resize_with(index + 1, || None);
            }
            by_key[index] = Some(ApiMetrics::new(format!("{key:?}")));
        }
        Self {
            by_key,
            unknown: ApiMetrics::new("unknown".to_owned()),
            bytes_received: counter!("keyward_client_bytes_received_total"),
            bytes_sent: counter!("keyward_client_bytes_sent_total"),
        }
    }

    pub fn api(&self, api_key: i16) -> &ApiMetrics {
        usize::try_from(api_key)
            .ok()
            .and_then(|i| self.by_key.get(i))
            .and_then(Option::as_ref)
            .unwrap_or(&self.unknown)
    }
}

impl Default for RequestMetrics {
    fn default() -> Self {
        Self::new()
    }
}
