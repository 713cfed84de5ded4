//! keyward's own client of one cluster, for redirected writes: a metadata cache (topic ->
//! partition leaders), one reused connection per broker, and the requests redirect needs:
//! Metadata, InitProducerId and Produce, and for the stream journal ([`super::journal`])
//! CreateTopics, ListOffsets and Fetch.
//!
//! Connections are made by the cluster's [`Dialer`], so they use its TLS and keyward's SASL
//! credentials for it. Each is [`Pipelined`]: the batches of every partition a broker leads
//! share its one connection, each written as soon as it is submitted, without waiting for
//! the answers to those before it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::produce_response::PartitionProduceResponse;
use kafka_protocol::messages::{
    ApiKey, BrokerId, CreateTopicsRequest, CreateTopicsResponse, FetchRequest, FetchResponse,
    InitProducerIdRequest, InitProducerIdResponse, ListOffsetsRequest, ListOffsetsResponse,
    MetadataRequest, MetadataResponse, ProduceRequest, ProduceResponse, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use tokio::sync::Mutex;

use crate::codec::errors::{
    COORDINATOR_LOAD_IN_PROGRESS, COORDINATOR_NOT_AVAILABLE, LEADER_NOT_AVAILABLE,
    NOT_LEADER_OR_FOLLOWER, TOPIC_ALREADY_EXISTS, UNKNOWN_TOPIC_OR_PARTITION,
};
use crate::proxy::upstream::{Dialer, Pipelined, Reply};

const METADATA_VERSION: i16 = 12;
const INIT_PRODUCER_ID_VERSION: i16 = 4;
const PRODUCE_VERSION: i16 = 9;
const CREATE_TOPICS_VERSION: i16 = 5;
const LIST_OFFSETS_VERSION: i16 = 7;
const FETCH_VERSION: i16 = 12;
const CLIENT_ID: &str = "keyward-redirect";

/// Where one partition's leader is.
#[derive(Debug, Clone)]
struct Leader {
    node_id: i32,
    error_code: i16,
}

pub struct ClusterClient {
    pub name: String,
    bootstrap: Vec<String>,
    dialer: Dialer,
    /// node id -> address
    brokers: std::sync::Mutex<HashMap<i32, String>>,
    /// topic -> partition -> leader
    leaders: std::sync::Mutex<HashMap<String, HashMap<i32, Leader>>>,
    conns: std::sync::Mutex<HashMap<i32, Arc<Mutex<Option<Pipelined>>>>>,
}

impl ClusterClient {
    pub fn new(bootstrap: Vec<String>, dialer: Dialer) -> Self {
        Self {
            name: dialer.cluster.clone(),
            bootstrap,
            dialer,
            brokers: std::sync::Mutex::new(HashMap::new()),
            leaders: std::sync::Mutex::new(HashMap::new()),
            conns: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The connection to node `node_id` (or any bootstrap broker for `None`): the open one,
    /// or a new one when there is none or it can no longer be used (broken, late to answer, or
    /// its authentication about to expire). Callers wanting the same node wait for one dial.
    async fn connection(&self, node_id: Option<i32>) -> anyhow::Result<Pipelined> {
        let key = node_id.unwrap_or(-1);
        let slot = {
            let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            conns.entry(key).or_default().clone()
        };
        let mut conn = slot.lock().await;
        if let Some(open) = conn.as_ref().filter(|c| c.is_usable()) {
            return Ok(open.clone());
        }
        let session = match node_id {
            None => self.dialer.session_any(&self.bootstrap, CLIENT_ID).await?,
            Some(id) => {
                let addr = self
                    .brokers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| anyhow!("broker {id} of cluster {} is unknown", self.name))?;
                self.dialer.session(&addr, CLIENT_ID).await?
            }
        };
        let open = session.pipelined();
        *conn = Some(open.clone());
        Ok(open)
    }

    /// Sends one request to node `node_id` (or any bootstrap broker for `None`) and awaits its
    /// response.
    async fn call<Req: Encodable, Resp: Decodable + 'static>(
        &self,
        node_id: Option<i32>,
        api: ApiKey,
        version: i16,
        request: &Req,
    ) -> anyhow::Result<Resp> {
        self.connection(node_id)
            .await?
            .call(api, version, request)
            .await
    }

    /// Refreshes the leaders of `topic`. Never creates it: a broker with
    /// `auto.create.topics.enable` (Kafka's default) would otherwise make a missing topic, with
    /// its default settings, on a Metadata request that names it (the protocol's default).
    pub async fn refresh(&self, topic: &str) -> anyhow::Result<()> {
        let request = MetadataRequest::default()
            .with_allow_auto_topic_creation(false)
            .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(
                TopicName(StrBytes::from_string(topic.to_owned())),
            ))]));
        let response: MetadataResponse = self
            .call(None, ApiKey::Metadata, METADATA_VERSION, &request)
            .await
            .with_context(|| format!("metadata from cluster {}", self.name))?;
        {
            let mut brokers = self.brokers.lock().unwrap_or_else(|e| e.into_inner());
            for b in &response.brokers {
                let addr = if b.host.contains(':') {
                    format!("[{}]:{}", b.host.as_str(), b.port)
                } else {
                    format!("{}:{}", b.host.as_str(), b.port)
                };
                brokers.insert(b.node_id.0, addr);
            }
        }
        let mut leaders = self.leaders.lock().unwrap_or_else(|e| e.into_inner());
        for t in &response.topics {
            let Some(name) = &t.name else { continue };
            let partitions = if t.error_code != 0 {
                // Remember the topic's error (no such topic, say) for every partition asked.
                HashMap::from([(
                    -1,
                    Leader {
                        node_id: -1,
                        error_code: t.error_code,
                    },
                )])
            } else {
                t.partitions
                    .iter()
                    .map(|p| {
                        (
                            p.partition_index,
                            Leader {
                                node_id: p.leader_id.0,
                                error_code: p.error_code,
                            },
                        )
                    })
                    .collect()
            };
            leaders.insert(name.0.to_string(), partitions);
        }
        Ok(())
    }

    /// The leader of a partition, or the Kafka error that says why there is none.
    async fn leader(
        &self,
        topic: &str,
        partition: i32,
        refresh: bool,
    ) -> anyhow::Result<Result<i32, i16>> {
        let cached = |this: &Self| {
            let leaders = this.leaders.lock().unwrap_or_else(|e| e.into_inner());
            leaders
                .get(topic)
                .map(|t| match (t.get(&partition), t.get(&-1)) {
                    (Some(l), _) if l.error_code == 0 && l.node_id >= 0 => Ok(l.node_id),
                    (Some(l), _) if l.error_code != 0 => Err(l.error_code),
                    (Some(_), _) => Err(LEADER_NOT_AVAILABLE),
                    (None, Some(t)) => Err(t.error_code),
                    (None, None) => Err(UNKNOWN_TOPIC_OR_PARTITION),
                })
        };
        if !refresh && let Some(found) = cached(self) {
            return Ok(found);
        }
        self.refresh(topic).await?;
        Ok(cached(self).unwrap_or(Err(UNKNOWN_TOPIC_OR_PARTITION)))
    }

    /// A producer id for keyward itself on this cluster.
    pub async fn init_producer_id(&self) -> anyhow::Result<(i64, i16)> {
        // Not transactional: the id must be null (the message's default is an empty string,
        // which brokers refuse as an invalid transactional id).
        let request = InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_transaction_timeout_ms(60_000)
            .with_producer_id((-1).into())
            .with_producer_epoch(-1);
        // A cluster that has just started answers COORDINATOR_LOAD_IN_PROGRESS (or NOT
        // AVAILABLE) for a moment, as a Kafka producer finds at its start: asked again, for up
        // to a second, before the batch waiting for it is given up.
        let mut response: InitProducerIdResponse;
        let mut tries = 0;
        loop {
            response = self
                .call(
                    None,
                    ApiKey::InitProducerId,
                    INIT_PRODUCER_ID_VERSION,
                    &request,
                )
                .await
                .with_context(|| format!("producer id from cluster {}", self.name))?;
            tries += 1;
            let loading = matches!(
                response.error_code,
                COORDINATOR_LOAD_IN_PROGRESS | COORDINATOR_NOT_AVAILABLE
            );
            if !loading || tries == 10 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if response.error_code != 0 {
            bail!(
                "cluster {} refused a producer id (error {})",
                self.name,
                response.error_code
            );
        }
        Ok((response.producer_id.0, response.producer_epoch))
    }

    /// Sends one batch to its partition's leader (looked up again first if `refresh`) and
    /// returns its answer to come. Batches submitted one after another for a partition are
    /// written to its leader in that order, without waiting for each other's answers; the
    /// answer says whether the broker refused the batch because the leader moved
    /// ([`is_stale_leader`]), for the caller to submit it again with `refresh`.
    pub async fn submit(
        &self,
        topic: &str,
        partition: i32,
        batch: Bytes,
        acks: i16,
        timeout_ms: i32,
        refresh: bool,
    ) -> Reply<PartitionProduceResponse> {
        let leader = match self.leader(topic, partition, refresh).await {
            Ok(Ok(node)) => node,
            Ok(Err(code)) => {
                let answer = error_response(partition, code);
                return Box::pin(std::future::ready(Ok(answer)));
            }
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let connection = match self.connection(Some(leader)).await {
            Ok(c) => c,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let request = ProduceRequest::default()
            .with_acks(acks)
            .with_timeout_ms(timeout_ms)
            .with_topic_data(vec![
                TopicProduceData::default()
                    .with_name(TopicName(StrBytes::from_string(topic.to_owned())))
                    .with_partition_data(vec![
                        PartitionProduceData::default()
                            .with_index(partition)
                            .with_records(Some(batch)),
                    ]),
            ]);
        let reply: Reply<ProduceResponse> =
            connection.send(ApiKey::Produce, PRODUCE_VERSION, &request);
        let cluster = self.name.clone();
        Box::pin(async move {
            reply
                .await?
                .responses
                .into_iter()
                .flat_map(|t| t.partition_responses)
                .find(|p| p.index == partition)
                .ok_or_else(|| anyhow!("cluster {cluster} left the partition out of its answer"))
        })
    }
}

impl ClusterClient {
    /// The leader of a partition, or an error naming the Kafka error that says why there is
    /// none.
    /// A cached error (a topic not created yet, say) is looked up again.
    async fn leader_of(&self, topic: &str, partition: i32, refresh: bool) -> anyhow::Result<i32> {
        let mut found = self.leader(topic, partition, refresh).await?;
        if found.is_err() && !refresh {
            found = self.leader(topic, partition, true).await?;
        }
        match found {
            Ok(node) => Ok(node),
            Err(code) => bail!(
                "cluster {}: no leader for {topic}[{partition}] (error {code})",
                self.name
            ),
        }
    }

    /// Creates a topic of one partition with the given configs, unless it exists.
    pub async fn create_topic(
        &self,
        topic: &str,
        replication_factor: i16,
        configs: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let request = CreateTopicsRequest::default()
            .with_timeout_ms(30_000)
            .with_topics(vec![
                CreatableTopic::default()
                    .with_name(TopicName(StrBytes::from_string(topic.to_owned())))
                    .with_num_partitions(1)
                    .with_replication_factor(replication_factor)
                    .with_configs(
                        configs
                            .iter()
                            .map(|(name, value)| {
                                CreatableTopicConfig::default()
                                    .with_name(StrBytes::from_string((*name).to_owned()))
                                    .with_value(Some(StrBytes::from_string((*value).to_owned())))
                            })
                            .collect(),
                    ),
            ]);
        // CreateTopics must go to the controller, which any broker forwards to (KIP-590).
        let response: CreateTopicsResponse = self
            .call(None, ApiKey::CreateTopics, CREATE_TOPICS_VERSION, &request)
            .await
            .with_context(|| format!("creating topic {topic} on cluster {}", self.name))?;
        match response.topics.first() {
            Some(t) if t.error_code == 0 || t.error_code == TOPIC_ALREADY_EXISTS => Ok(()),
            Some(t) => bail!(
                "cluster {} refused to create topic {topic} (error {}{})",
                self.name,
                t.error_code,
                detail(&t.error_message)
            ),
            None => bail!("cluster {} did not answer for topic {topic}", self.name),
        }
    }

    /// The latest offset of a partition (the high watermark: what a read_uncommitted reader
    /// can reach).
    pub async fn end_offset(&self, topic: &str, partition: i32) -> anyhow::Result<i64> {
        self.offset_at(topic, partition, -1).await
    }

    /// The first offset of a partition still in its log.
    pub async fn start_offset(&self, topic: &str, partition: i32) -> anyhow::Result<i64> {
        self.offset_at(topic, partition, -2).await
    }

    /// ListOffsets for one partition: `timestamp` -1 for the latest offset, -2 the earliest.
    async fn offset_at(&self, topic: &str, partition: i32, timestamp: i64) -> anyhow::Result<i64> {
        let mut refresh = false;
        for _ in 0..3 {
            let leader = self.leader_of(topic, partition, refresh).await?;
            let request = ListOffsetsRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_isolation_level(0)
                .with_topics(vec![
                    ListOffsetsTopic::default()
                        .with_name(TopicName(StrBytes::from_string(topic.to_owned())))
                        .with_partitions(vec![
                            ListOffsetsPartition::default()
                                .with_partition_index(partition)
                                .with_current_leader_epoch(-1)
                                .with_timestamp(timestamp),
                        ]),
                ]);
            let response: ListOffsetsResponse = self
                .call(
                    Some(leader),
                    ApiKey::ListOffsets,
                    LIST_OFFSETS_VERSION,
                    &request,
                )
                .await
                .with_context(|| format!("end offset of {topic} on cluster {}", self.name))?;
            let answer = response
                .topics
                .iter()
                .flat_map(|t| &t.partitions)
                .find(|p| p.partition_index == partition)
                .ok_or_else(|| anyhow!("cluster {} left {topic} out of its answer", self.name))?;
            if is_stale_leader(answer.error_code) {
                refresh = true;
                continue;
            }
            if answer.error_code != 0 {
                bail!(
                    "cluster {}: end offset of {topic}[{partition}]: error {}",
                    self.name,
                    answer.error_code
                );
            }
            return Ok(answer.offset);
        }
        bail!("cluster {}: {topic}[{partition}] keeps moving", self.name)
    }

    /// The record batches of a partition from `offset` on, waiting up to `max_wait_ms` for
    /// some to arrive; `refresh` looks the leader up again first. `Ok(Err(code))` is the
    /// partition's Kafka error (a leader that moved, an offset out of range).
    pub async fn fetch(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        max_wait_ms: i32,
        refresh: bool,
    ) -> anyhow::Result<Result<Bytes, i16>> {
        let leader = self.leader_of(topic, partition, refresh).await?;
        let request = FetchRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_max_wait_ms(max_wait_ms)
            .with_min_bytes(1)
            .with_max_bytes(8 * 1024 * 1024)
            .with_isolation_level(0)
            .with_session_id(0)
            .with_session_epoch(-1)
            .with_topics(vec![
                FetchTopic::default()
                    .with_topic(TopicName(StrBytes::from_string(topic.to_owned())))
                    .with_partitions(vec![
                        FetchPartition::default()
                            .with_partition(partition)
                            .with_current_leader_epoch(-1)
                            .with_fetch_offset(offset)
                            .with_log_start_offset(-1)
                            .with_partition_max_bytes(8 * 1024 * 1024),
                    ]),
            ]);
        let response: FetchResponse = self
            .call(Some(leader), ApiKey::Fetch, FETCH_VERSION, &request)
            .await
            .with_context(|| format!("reading {topic} on cluster {}", self.name))?;
        if response.error_code != 0 {
            bail!("cluster {}: fetch error {}", self.name, response.error_code);
        }
        let answer = response
            .responses
            .into_iter()
            .flat_map(|t| t.partitions)
            .find(|p| p.partition_index == partition)
            .ok_or_else(|| anyhow!("cluster {} left {topic} out of its answer", self.name))?;
        if answer.error_code != 0 {
            return Ok(Err(answer.error_code));
        }
        Ok(Ok(answer.records.unwrap_or_default()))
    }

    /// How many brokers the cluster has, as its metadata last said (0 before any).
    pub fn brokers_known(&self) -> usize {
        self.brokers.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A broker's error message, as `": message"` to follow an error code, or nothing.
pub fn detail(message: &Option<StrBytes>) -> String {
    message
        .as_ref()
        .map(|m| format!(": {}", m.as_str()))
        .unwrap_or_default()
}

/// Errors that say the partition's leader is not where keyward thought.
pub fn is_stale_leader(code: i16) -> bool {
    matches!(
        code,
        UNKNOWN_TOPIC_OR_PARTITION | LEADER_NOT_AVAILABLE | NOT_LEADER_OR_FOLLOWER
    )
}

fn error_response(partition: i32, code: i16) -> PartitionProduceResponse {
    PartitionProduceResponse::default()
        .with_index(partition)
        .with_error_code(code)
        .with_base_offset(-1)
}
