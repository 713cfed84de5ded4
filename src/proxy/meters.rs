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
    /// `keyward_served_bytes_total` by cluster index (see `super::brokers::Clusters`): bytes of
    /// the broker's responses written to clients, so operators can price reads served by
    /// another region's cluster during a read failover.
    served: Vec<Counter>,
}

impl RequestMetrics {
    /// `clusters`: every cluster's name, by cluster index.
    pub fn new<'a>(clusters: impl IntoIterator<Item = &'a str>) -> Self {
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
            served: clusters
                .into_iter()
                .map(|name| {
                    let c = counter!("keyward_served_bytes_total", "cluster" => name.to_owned());
                    // Exported at 0, so a rate sees every cluster before it serves.
                    c.absolute(0);
                    c
                })
                .collect(),
        }
    }

    /// Counts `bytes` of a broker response from cluster `cluster` written to a client.
    pub fn served(&self, cluster: usize, bytes: usize) {
        if let Some(c) = self.served.get(cluster) {
            c.increment(bytes as u64);
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

/// Records and bytes keyward's producer wrote to one owner region's cluster for writes another
/// region's clients sent here (`on_foreign: redirect`): what redirect costs in cross-region
/// transfer. Counted once per batch that landed (the broker wrote it, or recognised it as
/// already written), never per attempt.
pub struct Redirected {
    /// `keyward_redirected_bytes_total`: the record batch bytes keyward sent, as the owner's
    /// broker stores them (headers rewritten in place, same length).
    pub bytes: Counter,
    /// `keyward_redirected_records_total`.
    pub records: Counter,
}

impl Redirected {
    /// From this instance's region `from` to the owner region `to`; exported at 0.
    pub fn new(from: &str, to: &str) -> Self {
        let labels = [("from", from.to_owned()), ("to", to.to_owned())];
        let bytes = counter!("keyward_redirected_bytes_total", &labels);
        let records = counter!("keyward_redirected_records_total", &labels);
        bytes.absolute(0);
        records.absolute(0);
        Self { bytes, records }
    }

    /// One batch of `records` records, `bytes` long, landed in the owner's cluster.
    pub fn landed(&self, bytes: usize, records: i32) {
        self.bytes.increment(bytes as u64);
        self.records.increment(u64::try_from(records).unwrap_or(0));
    }
}
