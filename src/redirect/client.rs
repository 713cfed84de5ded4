//! keyward's own client of one cluster, for redirected writes: a metadata cache (topic ->
//! partition leaders), one reused connection per broker, and the requests redirect needs:
//! Metadata, InitProducerId and Produce, and for the stream journal ([`super::journal`])
//! CreateTopics, ListOffsets and Fetch. At failback (`crate::proxy::failback`) it also asks a
//! group's coordinator for the group's committed offsets (FindCoordinator, OffsetFetch), and
//! for the positions kept for a switch (`crate::proxy::positions`) every broker for the groups
//! it coordinates and their offsets (ListGroups, OffsetFetch).
//!
//! Connections are made by the cluster's [`Dialer`], so they use its TLS and keyward's SASL
//! credentials for it. Each is [`Pipelined`]: the batches of every partition a broker leads
//! share its one connection, each written as soon as it is submitted, without waiting for
//! the answers to those before it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::{Buf, Bytes};
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::offset_fetch_request::{
    OffsetFetchRequestGroup, OffsetFetchRequestTopics,
};
use kafka_protocol::messages::offset_fetch_response::OffsetFetchResponseTopics;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::produce_response::PartitionProduceResponse;
use kafka_protocol::messages::{
    ApiKey, BrokerId, CreateTopicsRequest, CreateTopicsResponse, FetchRequest, FetchResponse,
    FindCoordinatorRequest, FindCoordinatorResponse, GroupId, InitProducerIdRequest,
    InitProducerIdResponse, ListGroupsRequest, ListGroupsResponse, ListOffsetsRequest,
    ListOffsetsResponse, MetadataRequest, MetadataResponse, OffsetFetchRequest,
    OffsetFetchResponse, ProduceRequest, ProduceResponse, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::records::{Record, RecordBatchDecoder};
use tokio::sync::Mutex;

use crate::codec::errors::{
    COORDINATOR_LOAD_IN_PROGRESS, COORDINATOR_NOT_AVAILABLE, LEADER_NOT_AVAILABLE, NOT_COORDINATOR,
    NOT_LEADER_OR_FOLLOWER, TOPIC_ALREADY_EXISTS, UNKNOWN_TOPIC_OR_PARTITION,
};
use crate::proxy::upstream::{Dialer, Pipelined, Reply};

const METADATA_VERSION: i16 = 12;
const INIT_PRODUCER_ID_VERSION: i16 = 4;
const PRODUCE_VERSION: i16 = 9;
const CREATE_TOPICS_VERSION: i16 = 5;
const LIST_OFFSETS_VERSION: i16 = 7;
const FETCH_VERSION: i16 = 12;
/// Batched keys (KIP-699).
const FIND_COORDINATOR_VERSION: i16 = 4;
/// Several groups per request, topics by name (v10 names them by id).
const OFFSET_FETCH_VERSION: i16 = 8;
/// Groups of both protocols, classic and KIP-848, with their states (v4); no type filter.
const LIST_GROUPS_VERSION: i16 = 4;
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
                brokers.insert(b.node_id.0, address(&b.host, b.port));
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

    /// Whether `topic` exists, as the cluster's metadata says now.
    pub async fn topic_exists(&self, topic: &str) -> anyhow::Result<bool> {
        self.refresh(topic).await?;
        let leaders = self.leaders.lock().unwrap_or_else(|e| e.into_inner());
        Ok(!matches!(
            leaders.get(topic).and_then(|t| t.get(&-1)),
            Some(l) if l.error_code == UNKNOWN_TOPIC_OR_PARTITION
        ))
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

    /// The offsets `group` has committed for `topics` (each a name and its partitions), as its
    /// coordinator answers; partitions with no commit, or an error of their own, are left out.
    pub async fn committed(
        &self,
        group: &str,
        topics: &[(String, Vec<i32>)],
    ) -> anyhow::Result<HashMap<(String, i32), i64>> {
        let request = OffsetFetchRequest::default()
            .with_require_stable(false)
            .with_groups(vec![
                OffsetFetchRequestGroup::default()
                    .with_group_id(GroupId(StrBytes::from_string(group.to_owned())))
                    .with_topics(Some(
                        topics
                            .iter()
                            .map(|(name, partitions)| {
                                OffsetFetchRequestTopics::default()
                                    .with_name(TopicName(StrBytes::from_string(name.clone())))
                                    .with_partition_indexes(partitions.clone())
                            })
                            .collect(),
                    )),
            ]);
        for _ in 0..3 {
            let coordinator = self.coordinator(group).await?;
            let response: OffsetFetchResponse = self
                .call(
                    Some(coordinator),
                    ApiKey::OffsetFetch,
                    OFFSET_FETCH_VERSION,
                    &request,
                )
                .await
                .with_context(|| format!("offsets of group {group} on cluster {}", self.name))?;
            let answer = response
                .groups
                .into_iter()
                .find(|g| g.group_id.as_str() == group)
                .ok_or_else(|| anyhow!("cluster {} left group {group} out", self.name))?;
            match answer.error_code {
                0 => {}
                NOT_COORDINATOR | COORDINATOR_LOAD_IN_PROGRESS | COORDINATOR_NOT_AVAILABLE => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                code => bail!(
                    "cluster {}: offsets of group {group}: error {code}",
                    self.name
                ),
            }
            return Ok(committed_offsets(answer.topics));
        }
        bail!(
            "cluster {}: group {group}'s coordinator keeps moving",
            self.name
        )
    }

    /// The node that coordinates `group`, its address learned.
    async fn coordinator(&self, group: &str) -> anyhow::Result<i32> {
        let request = FindCoordinatorRequest::default()
            .with_key_type(0)
            .with_coordinator_keys(vec![StrBytes::from_string(group.to_owned())]);
        let response: FindCoordinatorResponse = self
            .call(
                None,
                ApiKey::FindCoordinator,
                FIND_COORDINATOR_VERSION,
                &request,
            )
            .await
            .with_context(|| format!("coordinator of group {group} on cluster {}", self.name))?;
        let found = response
            .coordinators
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("cluster {} named no coordinator", self.name))?;
        if found.error_code != 0 {
            bail!(
                "cluster {}: coordinator of group {group}: error {}{}",
                self.name,
                found.error_code,
                detail(&found.error_message)
            );
        }
        self.brokers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(found.node_id.0, address(&found.host, found.port));
        Ok(found.node_id.0)
    }

    /// The node ids of the cluster's brokers, as its metadata says now.
    pub async fn broker_ids(&self) -> anyhow::Result<Vec<i32>> {
        let request = MetadataRequest::default()
            .with_allow_auto_topic_creation(false)
            .with_topics(Some(Vec::new()));
        let response: MetadataResponse = self
            .call(None, ApiKey::Metadata, METADATA_VERSION, &request)
            .await
            .with_context(|| format!("brokers of cluster {}", self.name))?;
        let mut brokers = self.brokers.lock().unwrap_or_else(|e| e.into_inner());
        Ok(response
            .brokers
            .iter()
            .map(|b| {
                brokers.insert(b.node_id.0, address(&b.host, b.port));
                b.node_id.0
            })
            .collect())
    }

    /// The consumer groups broker `node` coordinates (ListGroups goes to every broker: each
    /// answers for its own).
    pub async fn groups_of(&self, node: i32) -> anyhow::Result<Vec<String>> {
        let response: ListGroupsResponse = self
            .call(
                Some(node),
                ApiKey::ListGroups,
                LIST_GROUPS_VERSION,
                &ListGroupsRequest::default(),
            )
            .await
            .with_context(|| format!("groups of broker {node} of cluster {}", self.name))?;
        if response.error_code != 0 {
            bail!(
                "cluster {}: groups of broker {node}: error {}",
                self.name,
                response.error_code
            );
        }
        Ok(response
            .groups
            .into_iter()
            .map(|g| g.group_id.0.to_string())
            .collect())
    }

    /// Every offset `groups` have committed, asked of their coordinator `node`: group ->
    /// (topic, partition) -> offset. A group answered with an error (it moved to another
    /// coordinator, say) is left out, and so are partitions with no commit.
    pub async fn committed_by(
        &self,
        node: i32,
        groups: &[String],
    ) -> anyhow::Result<HashMap<String, HashMap<(String, i32), i64>>> {
        let request = OffsetFetchRequest::default()
            .with_require_stable(false)
            .with_groups(
                groups
                    .iter()
                    .map(|g| {
                        OffsetFetchRequestGroup::default()
                            .with_group_id(GroupId(StrBytes::from_string(g.clone())))
                            .with_topics(None)
                    })
                    .collect(),
            );
        let response: OffsetFetchResponse = self
            .call(
                Some(node),
                ApiKey::OffsetFetch,
                OFFSET_FETCH_VERSION,
                &request,
            )
            .await
            .with_context(|| {
                format!(
                    "groups' offsets from broker {node} of cluster {}",
                    self.name
                )
            })?;
        Ok(response
            .groups
            .into_iter()
            .filter(|g| g.error_code == 0)
            .map(|g| (g.group_id.0.to_string(), committed_offsets(g.topics)))
            .collect())
    }

    /// Reads a partition from its start to its end as it stands now, handing each record to
    /// `each`; returns how many records were read. Batches that cannot be decoded are skipped.
    pub async fn read_all(
        &self,
        topic: &str,
        partition: i32,
        each: impl FnMut(&Record),
    ) -> anyhow::Result<u64> {
        Ok(self.read_from(topic, partition, None, each).await?.0)
    }

    /// Reads a partition from `from` (its start when `None`, or when the log no longer holds
    /// `from`) to its end as it stands now, handing each record to `each`; returns how many
    /// records were read and the offset to read from next time.
    pub async fn read_from(
        &self,
        topic: &str,
        partition: i32,
        from: Option<i64>,
        mut each: impl FnMut(&Record),
    ) -> anyhow::Result<(u64, i64)> {
        let end = self.end_offset(topic, partition).await?;
        let start = self.start_offset(topic, partition).await?;
        // A `from` past the end: the topic was deleted and made again, read it whole.
        let mut at = match from {
            Some(f) if f <= end => f.max(start),
            _ => start,
        };
        let mut read = 0;
        let mut refresh = false;
        while at < end {
            let data = match self.fetch(topic, partition, at, 0, refresh).await? {
                Ok(data) => data,
                Err(code) if is_stale_leader(code) && !refresh => {
                    refresh = true;
                    continue;
                }
                // The log starts past `at` now (retention or compaction).
                Err(crate::codec::errors::OFFSET_OUT_OF_RANGE) => {
                    let start = self.start_offset(topic, partition).await?;
                    if start <= at {
                        bail!("cluster {}: {topic} has no offset {at}", self.name);
                    }
                    at = start;
                    continue;
                }
                Err(code) => bail!("cluster {}: reading {topic}: error {code}", self.name),
            };
            refresh = false;
            let before = at;
            for mut batch in whole_batches(data) {
                let after = batch_end(&batch);
                if let Ok(set) = RecordBatchDecoder::decode(&mut batch) {
                    for record in set.records.iter().filter(|r| r.offset >= at) {
                        each(record);
                        read += 1;
                    }
                }
                at = at.max(after);
            }
            if at == before {
                bail!(
                    "cluster {}: {topic} holds nothing at offset {at} before its end {end}",
                    self.name
                );
            }
        }
        Ok((read, at))
    }

    /// How many brokers the cluster has, as its metadata last said (0 before any).
    pub fn brokers_known(&self) -> usize {
        self.brokers.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The committed offsets of one group's OffsetFetch answer, by topic and partition; partitions
/// with no commit, or an error of their own, left out.
fn committed_offsets(topics: Vec<OffsetFetchResponseTopics>) -> HashMap<(String, i32), i64> {
    topics
        .into_iter()
        .flat_map(|t| {
            let name = t.name.0.to_string();
            t.partitions.into_iter().filter_map(move |p| {
                (p.error_code == 0 && p.committed_offset >= 0)
                    .then(|| ((name.clone(), p.partition_index), p.committed_offset))
            })
        })
        .collect()
}

/// A broker's `host:port`, an IPv6 host in brackets.
fn address(host: &str, port: i32) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
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

/// The whole record batches at the start of a fetched partition's data (a fetch may end in a
/// partial one).
pub(crate) fn whole_batches(mut data: Bytes) -> Vec<Bytes> {
    let mut out = Vec::new();
    while data.len() >= 12 {
        let len = i32::from_be_bytes([data[8], data[9], data[10], data[11]]);
        let Ok(len) = usize::try_from(len) else { break };
        if data.len() < 12 + len {
            break;
        }
        out.push(data.split_to(12 + len));
    }
    data.advance(data.len());
    out
}

/// The offset after a whole v2 record batch: its base offset plus its last offset delta, plus 1.
pub(crate) fn batch_end(batch: &[u8]) -> i64 {
    let base = i64::from_be_bytes(batch[0..8].try_into().unwrap_or_default());
    let last_delta = batch
        .get(23..27)
        .map_or(0, |b| i32::from_be_bytes(b.try_into().unwrap_or_default()));
    base + i64::from(last_delta) + 1
}
