//! One module per API keyward handles, as mini-redis has one file per command: what keyward does
//! with a request of that API (decide, answer, forward) and with the broker's response to it
//! (rewrite the addresses it carries). The connection loop (`super::conn`) reads a request,
//! dispatches it here by API key, and carries out what the handler returns; every other API is
//! relayed as its original bytes.
//!
//! Handlers never touch sockets themselves: the connection writes what they return, in request
//! order.

pub mod api_versions;
pub mod client_sasl;
pub mod describe_cluster;
pub mod describe_topic_partitions;
pub mod fetch;
pub mod find_coordinator;
pub mod group_heartbeat;
pub mod metadata;
pub mod produce;

use bytes::Bytes;
use kafka_protocol::messages::ApiKey;

use super::produce::ProduceReply;

/// The log targets of the lines handlers took over from the connection loop and from
/// `super::versions`: kept, so a log line reads as it did and filters such as
/// `KEYWARD_LOG=keyward::proxy::conn=debug` still select it.
const CONN_LOG: &str = "keyward::proxy::conn";
const VERSIONS_LOG: &str = "keyward::proxy::versions";

/// What one request turns into: bytes for the broker, and what the response half must do.
pub(crate) struct Step {
    pub(crate) upstream: Option<Bytes>,
    pub(crate) slot: Option<Pending>,
}

/// A response-half instruction before its timing is known.
pub(crate) enum Pending {
    Broker(i32, Handling),
    Reply(i32, ProduceReply),
    Answer(Bytes),
    Close(&'static str),
}

impl Step {
    pub(crate) fn forward(frame: Bytes, correlation_id: i32, handling: Handling) -> Self {
        Step {
            upstream: Some(frame),
            slot: Some(Pending::Broker(correlation_id, handling)),
        }
    }

    /// Answered by keyward; nothing goes to the broker.
    pub(crate) fn answer(frame: Bytes) -> Self {
        Step {
            upstream: None,
            slot: Some(Pending::Answer(frame)),
        }
    }

    pub(crate) fn close(cause: &'static str) -> Self {
        Step {
            upstream: None,
            slot: Some(Pending::Close(cause)),
        }
    }
}

/// What the response half does with the broker's response to a request.
pub(crate) enum Handling {
    /// Rewritten (or not) as it passes.
    Rewrite(Rewrite),
    /// A produce keyward forwarded in part: merge its own answers into the broker's.
    ProduceMerge(ProduceReply),
    /// An OffsetFetch after reads moved back here: positions carried home from the copies the
    /// group read during the failover (`super::super::failback`).
    CarryHome(Box<super::failback::Asked>),
}

/// What a broker response needs on its way to the client.
pub(crate) enum Rewrite {
    Passthrough,
    ApiVersions(i16),
    Metadata(i16),
    FindCoordinator(i16),
    DescribeCluster(i16),
    /// Node ids renumbered while another cluster serves.
    DescribeTopicPartitions(i16),
    Fetch(i16),
    /// A produce keyward forwarded whole (v10+ responses may carry node endpoints).
    Produce(i16),
    /// Passed on untouched; its error code tells whether the broker accepted the client's
    /// SASL step.
    SaslAuthenticate(i16),
    /// Passed on untouched when the broker refuses it; accepted by a cluster keyward was told
    /// does not authenticate clients, it closes the connection instead.
    SaslHandshake(i16),
    /// A KIP-848 heartbeat on a local connection during a failback window, at the member epoch
    /// it came with (`group_heartbeat`).
    GroupHeartbeat(i16, Option<i32>),
    /// A request whose topic names keyward mapped into a region view (`super::super::view`):
    /// the response is rewritten as `inner` says, then its names are mapped back.
    View(Box<Viewed>),
}

/// What mapping a response back into a region view needs.
pub(crate) struct Viewed {
    pub(crate) inner: Rewrite,
    pub(crate) key: ApiKey,
    pub(crate) version: i16,
    /// Topics the request left out, answered unknown (Metadata, DescribeTopicPartitions).
    pub(crate) unknown: Vec<kafka_protocol::protocol::StrBytes>,
    /// The member epoch a KIP-848 heartbeat came with.
    pub(crate) member_epoch: Option<i32>,
    /// The group a v1-v7 OffsetFetch asked about.
    pub(crate) group: Option<kafka_protocol::protocol::StrBytes>,
}

/// How the broker's response to a request of API `key` at `version` is handled.
pub(crate) fn handling(key: ApiKey, version: i16) -> Handling {
    Handling::Rewrite(rewrite(key, version))
}

/// What the broker's response to a request of API `key` at `version` needs on its way.
pub(crate) fn rewrite(key: ApiKey, version: i16) -> Rewrite {
    match key {
        ApiKey::ApiVersions => Rewrite::ApiVersions(version),
        ApiKey::Metadata => Rewrite::Metadata(version),
        ApiKey::FindCoordinator => Rewrite::FindCoordinator(version),
        ApiKey::DescribeCluster => Rewrite::DescribeCluster(version),
        ApiKey::DescribeTopicPartitions => Rewrite::DescribeTopicPartitions(version),
        ApiKey::Fetch => Rewrite::Fetch(version),
        ApiKey::SaslAuthenticate => Rewrite::SaslAuthenticate(version),
        _ => Rewrite::Passthrough,
    }
}
