//! The region view on the wire: while another region's cluster serves a connection, the topic
//! names of every request and response that carries them are mapped (`policy::region_view`),
//! so a client of region R reads R's topics from the serving cluster's mirrors of them.
//!
//! Mapped, in both directions: Metadata, Fetch, ListOffsets, OffsetFetch, OffsetCommit,
//! OffsetForLeaderEpoch, DescribeTopicPartitions (the admin client's describe), KIP-848's
//! ConsumerGroupHeartbeat (subscribed names, a subscription by pattern refused; owned and
//! assigned partitions by id) and ConsumerGroupDescribe, and the classic group protocol's
//! JoinGroup, SyncGroup and DescribeGroups (the consumer protocol's bytes inside them).
//!
//! Topic ids are mapped too ([`Ids`]): a client is shown, for each topic, the id the local
//! cluster gave it, the one it knew before the switch and will know after the failback, so a
//! client that stays connected across a switch sees no topic deleted and created again
//! (franz-go fails such a topic). keyward knows the local cluster's ids from Metadata seen
//! before the switch (`super::topic_ids`); an id it cannot map, because it never saw the local
//! one, or the serving cluster's, passes as it is. Producer ids are mapped too (`policy::producer_ids`): in InitProducerId
//! both ways, and in the batches of Produce requests ([`produce_request`]), so that no id is
//! ever shared by two producers in either cluster. Passed as they are: the APIs
//! that carry no topic name ([`PASSED`]; Produce is decided by the ownership policy, against
//! the topic's own name, which is the same in every region). Every other API is withheld from
//! ApiVersions on such a connection and closes it if asked anyway, since passing it would
//! name another region's topic under R's name.
//!
//! A request naming a topic with no counterpart in the serving cluster (an internal topic, a
//! name MM2 never makes) is refused: in Metadata and DescribeTopicPartitions the topic is
//! answered `UNKNOWN_TOPIC_OR_PARTITION` by keyward and never asked of the broker; anywhere
//! else the connection closes. Metadata requests never create topics here: a missing mirror is MM2's to
//! create, and the client is told the topic is unknown (retriable) while it is missing.

use bytes::Bytes;
use kafka_protocol::messages::describe_topic_partitions_response::DescribeTopicPartitionsResponseTopic;
use kafka_protocol::messages::metadata_response::MetadataResponseTopic;
use kafka_protocol::messages::{
    ApiKey, ConsumerGroupDescribeResponse, ConsumerGroupHeartbeatRequest,
    ConsumerGroupHeartbeatResponse, ConsumerProtocolAssignment, ConsumerProtocolSubscription,
    DescribeGroupsResponse, DescribeTopicPartitionsRequest, DescribeTopicPartitionsResponse,
    FetchRequest, FetchResponse, InitProducerIdRequest, InitProducerIdResponse, JoinGroupRequest,
    JoinGroupResponse, ListOffsetsRequest, ListOffsetsResponse, MetadataRequest, MetadataResponse,
    OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse,
    OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse, ProducerId, SyncGroupRequest,
    SyncGroupResponse, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use uuid::Uuid;

use super::handlers::fetch as fetch_handler;
use super::rewrite::{Recoded, RewriteError, recode, recode_behind};
use super::topic_ids::TopicIds;
use crate::codec::errors::UNKNOWN_TOPIC_OR_PARTITION;
use crate::codec::frame::{self, LENGTH_PREFIX};
use crate::codec::produce::{self as produce_codec, ProduceParseError};
use crate::codec::records;
use crate::policy::offset_syncs;
use crate::policy::producer_ids::ProducerIds;
use crate::policy::region_view::RegionView;

/// APIs that carry no topic name (or, for Produce, one the ownership policy decides by its own
/// name): offered and passed as they are in a view.
pub const PASSED: &[ApiKey] = &[
    ApiKey::ApiVersions,
    ApiKey::SaslHandshake,
    ApiKey::SaslAuthenticate,
    ApiKey::Produce,
    ApiKey::FindCoordinator,
    ApiKey::Heartbeat,
    ApiKey::LeaveGroup,
    ApiKey::ListGroups,
    ApiKey::DescribeCluster,
    ApiKey::GetTelemetrySubscriptions,
    ApiKey::PushTelemetry,
];

/// APIs whose topic names are mapped, with the versions keyward maps (both the request's and
/// the response's types decode them).
pub const MAPPED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Metadata, 0, 13),
    (ApiKey::Fetch, 4, 18),
    (ApiKey::ListOffsets, 1, 10),
    (ApiKey::OffsetFetch, 1, 9),
    (ApiKey::OffsetCommit, 2, 9),
    (ApiKey::OffsetForLeaderEpoch, 2, 4),
    (ApiKey::ConsumerGroupHeartbeat, 0, 1),
    (ApiKey::ConsumerGroupDescribe, 0, 1),
    (ApiKey::InitProducerId, 0, 5),
    (ApiKey::DescribeTopicPartitions, 0, 0),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::DescribeGroups, 0, 6),
];

/// The classic group protocol's type for consumers: its members' subscriptions and assignments
/// are `ConsumerProtocolSubscription` and `ConsumerProtocolAssignment` bytes, which name topics.
const CONSUMER_PROTOCOL: &str = "consumer";

/// A leader epoch left out: the broker checks none, and a client takes none as newer or older.
const NO_EPOCH: i32 = -1;

/// First Fetch version that names topics by id only.
const FETCH_BY_ID: i16 = 13;

/// The topic ids on both sides of a view: the local cluster's, which this region's clients
/// know, and the serving cluster's. Ids map through names: the local cluster's `orders` is the
/// serving cluster's `eu.orders` (`RegionView`).
#[derive(Clone, Copy)]
pub struct Ids<'a> {
    pub view: &'a RegionView,
    pub local: &'a TopicIds,
    pub serving: &'a TopicIds,
}

impl Ids<'_> {
    /// The serving cluster's id of the topic a client knows by `id`; `id` itself when keyward
    /// cannot tell (it never saw one of the two, or the client was given the serving cluster's
    /// own id because the local one was unknown).
    pub fn to_serving(&self, id: Uuid) -> Uuid {
        self.local
            .name(id)
            .and_then(|name| self.view.to_serving(&name))
            .and_then(|name| self.serving.id(&name))
            .unwrap_or(id)
    }

    /// The id a client is shown for the serving cluster's topic `id`; `id` itself when keyward
    /// cannot tell.
    pub fn to_client(&self, id: Uuid) -> Uuid {
        self.serving
            .name(id)
            .and_then(|name| self.view.to_client(&name))
            .and_then(|name| self.local.id(&name))
            .unwrap_or(id)
    }

    /// The id a client is shown for the topic it calls `name`, whose id in the serving cluster
    /// is `id`.
    fn named(&self, name: &str, id: Uuid) -> Uuid {
        match self.local.id(name) {
            Some(local) if !id.is_nil() => local,
            _ => id,
        }
    }
}

/// The version range offered for `key` in a view, given the range offered otherwise; `None`
/// withholds it.
pub fn offer(key: ApiKey, min: i16, max: i16) -> Option<(i16, i16)> {
    if PASSED.contains(&key) {
        return Some((min, max));
    }
    let &(_, our_min, our_max) = MAPPED.iter().find(|(k, _, _)| *k == key)?;
    let (min, max) = (min.max(our_min), max.min(our_max));
    (min <= max).then_some((min, max))
}

/// Whether a request of `key` at `version` may be sent in a view.
pub fn admits(key: ApiKey, version: i16) -> bool {
    offer(key, version, version).is_some()
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("cannot decode {api:?} v{version} request: {source}")]
    Decode {
        api: ApiKey,
        version: i16,
        source: anyhow::Error,
    },
    #[error("cannot encode {api:?} v{version} request: {source}")]
    Encode {
        api: ApiKey,
        version: i16,
        source: anyhow::Error,
    },
    #[error("malformed request header: {0}")]
    Header(#[from] crate::codec::wire::WireError),
    /// A request names a topic the serving cluster has no counterpart of.
    #[error("{api:?} names topic {topic:?}, which has no counterpart in {serving}'s cluster")]
    Unmapped {
        api: ApiKey,
        topic: String,
        serving: String,
    },
    /// A KIP-848 subscription by regular expression: the broker would match it against the
    /// serving cluster's own names.
    #[error(
        "a consumer subscribes by the pattern {regex:?}, which cannot be matched against this region's topic names while {serving}'s cluster serves"
    )]
    Pattern { regex: String, serving: String },
}

/// A request with its topic names mapped to the serving cluster's.
#[derive(Debug)]
pub struct Mapped {
    pub frame: Bytes,
    /// Metadata and DescribeTopicPartitions: topics the client asked for that were left out of
    /// the request, to be answered `UNKNOWN_TOPIC_OR_PARTITION` in the response.
    pub unknown: Vec<StrBytes>,
    /// ConsumerGroupHeartbeat only: the member epoch it came with.
    pub member_epoch: Option<i32>,
    /// OffsetFetch v1-v7 only (later answers name their groups): the group asked about.
    pub group: Option<StrBytes>,
    /// False when nothing is left to ask the broker: every topic named is in `unknown`, and
    /// keyward answers the request itself ([`unknown_topics_answer`]).
    pub ask: bool,
}

/// Where the serving cluster keeps a topic a client names: what decides whether a consumer
/// group's position on it can be there at a switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFrom {
    /// The serving cluster's copy of one of the local region's topics (`us.orders` for us's
    /// `orders`): MM2's group-offset sync translates groups' positions into it, when enabled.
    Copy,
    /// The serving cluster's own topic, which the local region copies (`orders` for us's
    /// `eu.orders`): a group's position on the copy is in the local cluster only, so nothing
    /// carries it there at the switch.
    Origin,
    /// A third region's topic, copied into both clusters.
    Other,
}

impl ReadFrom {
    pub const ALL: [ReadFrom; 3] = [ReadFrom::Copy, ReadFrom::Origin, ReadFrom::Other];

    /// Its label in `keyward_view_offsets_total`.
    pub fn label(self) -> &'static str {
        match self {
            ReadFrom::Copy => "copy",
            ReadFrom::Origin => "origin",
            ReadFrom::Other => "other",
        }
    }

    fn of(view: &RegionView, client_name: &str) -> Self {
        if view.serving_origin(client_name).is_some() {
            ReadFrom::Origin
        } else if view.own_copy(client_name).is_some() {
            ReadFrom::Copy
        } else {
            ReadFrom::Other
        }
    }
}

/// What an OffsetFetch answer through the view showed of a partition's committed position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The serving cluster had one.
    Found,
    /// It had none, and keyward kept none to carry: the consumer resumes by its
    /// `auto.offset.reset`.
    None,
    /// keyward answered the group's position on the local cluster's topic, kept for the
    /// switch and translated (`super::positions`), which was ahead of the serving cluster's
    /// answer (or it had none).
    Carried,
}

impl Outcome {
    pub const ALL: [Outcome; 3] = [Outcome::Found, Outcome::None, Outcome::Carried];

    /// Its label in `keyward_view_offsets_total`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Found => "found",
            Outcome::None => "none",
            Outcome::Carried => "carried",
        }
    }
}

/// The committed positions an OffsetFetch answer through the view carried, by where the topic
/// is read from and what the answer showed. Partitions answered with an error are not counted.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Positions {
    counts: [[u64; 3]; 3],
    /// For the carried positions: how many records the groups may read again at most, those
    /// between the offset sync used and the kept position.
    pub reread_at_most: u64,
}

impl Positions {
    fn add(&mut self, from: ReadFrom, outcome: Outcome) {
        self.counts[from as usize][outcome as usize] += 1;
    }

    /// How many partitions were answered so.
    pub fn get(&self, from: ReadFrom, outcome: Outcome) -> u64 {
        self.counts[from as usize][outcome as usize]
    }
}

/// A group's position to answer where the serving cluster has none: `(group, topic as the client
/// names it, partition)` to the translated position (`super::positions::Kept::carried`).
pub type Carry<'a> = &'a dyn Fn(&str, &str, i32) -> Option<offset_syncs::Translated>;

/// What a response through the view showed that keyward reports (logs and metrics).
#[derive(Debug, Default)]
pub struct Noticed {
    /// Topics the serving cluster does not have (Metadata answered `UNKNOWN_TOPIC_OR_PARTITION`).
    pub missing: Vec<String>,
    /// OffsetFetch only.
    pub positions: Positions,
}

/// What the response to a mapped request needs to know of the request.
#[derive(Default)]
pub struct Asked<'a> {
    /// [`Mapped::unknown`].
    pub unknown: &'a [StrBytes],
    /// [`Mapped::member_epoch`].
    pub member_epoch: Option<i32>,
    /// [`Mapped::group`].
    pub group: Option<&'a str>,
    /// OffsetFetch: positions kept for a switch.
    pub carry: Option<Carry<'a>>,
}

/// Maps the topic names of a request in the serving cluster's terms. `None` when the request
/// carries none (it goes as it came).
pub fn request(
    frame: &Bytes,
    key: ApiKey,
    version: i16,
    ids: Ids<'_>,
) -> Result<Option<Mapped>, ViewError> {
    let view = ids.view;
    let to_serving = |name: &mut TopicName| -> Result<(), ViewError> {
        match view.to_serving(name.0.as_str()) {
            Some(mapped) => {
                name.0 = StrBytes::from_string(mapped);
                Ok(())
            }
            None => Err(ViewError::Unmapped {
                api: key,
                topic: name.0.to_string(),
                serving: view.serving().to_owned(),
            }),
        }
    };
    let mut unknown = Vec::new();
    let mut member_epoch = None;
    let mut group = None;
    let mut ask = true;
    let frame = match key {
        ApiKey::Metadata => recode_request(frame, key, version, |r: &mut MetadataRequest| {
            if let Some(topics) = &mut r.topics {
                let asked = topics.len();
                topics.retain_mut(|t| match &mut t.name {
                    Some(name) => match view.to_serving(name.0.as_str()) {
                        Some(mapped) => {
                            name.0 = StrBytes::from_string(mapped);
                            true
                        }
                        None => {
                            unknown.push(name.0.clone());
                            false
                        }
                    },
                    None => {
                        t.topic_id = ids.to_serving(t.topic_id);
                        true
                    }
                });
                // v0 reads an empty list as "every topic".
                if version == 0 && asked > 0 && topics.is_empty() {
                    return Err(ViewError::Unmapped {
                        api: key,
                        topic: unknown[0].to_string(),
                        serving: view.serving().to_owned(),
                    });
                }
            }
            if version >= 4 {
                r.allow_auto_topic_creation = false;
            }
            Ok(())
        })?,
        ApiKey::Fetch => recode_request(frame, key, version, |r: &mut FetchRequest| {
            let by_id = version >= FETCH_BY_ID;
            for t in &mut r.topics {
                match by_id {
                    true => t.topic_id = ids.to_serving(t.topic_id),
                    false => to_serving(&mut t.topic)?,
                }
            }
            for t in &mut r.forgotten_topics_data {
                match by_id {
                    true => t.topic_id = ids.to_serving(t.topic_id),
                    false => to_serving(&mut t.topic)?,
                }
            }
            // The epochs a client holds are the local cluster's (see the Metadata response):
            // the serving cluster does not check them.
            for p in r.topics.iter_mut().flat_map(|t| t.partitions.iter_mut()) {
                p.current_leader_epoch = NO_EPOCH;
                p.last_fetched_epoch = NO_EPOCH;
            }
            Ok(())
        })?,
        ApiKey::ListOffsets => {
            recode_request(frame, key, version, |r: &mut ListOffsetsRequest| {
                for p in r.topics.iter_mut().flat_map(|t| t.partitions.iter_mut()) {
                    p.current_leader_epoch = NO_EPOCH;
                }
                r.topics
                    .iter_mut()
                    .try_for_each(|t| to_serving(&mut t.name))
            })?
        }
        ApiKey::OffsetFetch => {
            recode_request(frame, key, version, |r: &mut OffsetFetchRequest| {
                if version < 8 {
                    group = Some(r.group_id.0.clone());
                }
                for t in r.topics.iter_mut().flatten() {
                    to_serving(&mut t.name)?;
                }
                for t in r
                    .groups
                    .iter_mut()
                    .flat_map(|g| g.topics.iter_mut().flatten())
                {
                    to_serving(&mut t.name)?;
                }
                Ok(())
            })?
        }
        ApiKey::OffsetCommit => {
            recode_request(frame, key, version, |r: &mut OffsetCommitRequest| {
                for p in r.topics.iter_mut().flat_map(|t| t.partitions.iter_mut()) {
                    p.committed_leader_epoch = NO_EPOCH;
                }
                r.topics
                    .iter_mut()
                    .try_for_each(|t| to_serving(&mut t.name))
            })?
        }
        ApiKey::OffsetForLeaderEpoch => recode_request(
            frame,
            key,
            version,
            |r: &mut OffsetForLeaderEpochRequest| {
                for p in r.topics.iter_mut().flat_map(|t| t.partitions.iter_mut()) {
                    p.current_leader_epoch = NO_EPOCH;
                }
                r.topics
                    .iter_mut()
                    .try_for_each(|t| to_serving(&mut t.topic))
            },
        )?,
        // Like Metadata: a topic with no counterpart is answered unknown by keyward. A request
        // left with none to ask is answered here (an empty list would ask for every topic).
        // The cursor names a topic of an earlier answer, so it maps.
        ApiKey::DescribeTopicPartitions => recode_request(
            frame,
            key,
            version,
            |r: &mut DescribeTopicPartitionsRequest| {
                let asked = r.topics.len();
                r.topics
                    .retain_mut(|t| match view.to_serving(t.name.0.as_str()) {
                        Some(mapped) => {
                            t.name.0 = StrBytes::from_string(mapped);
                            true
                        }
                        None => {
                            unknown.push(t.name.0.clone());
                            false
                        }
                    });
                ask = asked == 0 || !r.topics.is_empty();
                r.cursor
                    .iter_mut()
                    .try_for_each(|c| to_serving(&mut c.topic_name))
            },
        )?,
        ApiKey::ConsumerGroupHeartbeat => recode_request(
            frame,
            key,
            version,
            |r: &mut ConsumerGroupHeartbeatRequest| {
                if let Some(regex) = &r.subscribed_topic_regex {
                    return Err(ViewError::Pattern {
                        regex: regex.to_string(),
                        serving: view.serving().to_owned(),
                    });
                }
                member_epoch = Some(r.member_epoch);
                for t in r.topic_partitions.iter_mut().flatten() {
                    t.topic_id = ids.to_serving(t.topic_id);
                }
                r.subscribed_topic_names
                    .iter_mut()
                    .flatten()
                    .try_for_each(to_serving)
            },
        )?,
        // The request names groups only; the response names topics.
        ApiKey::ConsumerGroupDescribe | ApiKey::DescribeGroups => frame.clone(),
        // The classic consumer protocol's subscriptions and assignments name topics inside
        // member-written bytes. A classic group's coordinator never reads them, but one of a
        // group with KIP-848 members too does: mapped both ways, every member and the
        // coordinator each see the names they know.
        ApiKey::JoinGroup => recode_request(frame, key, version, |r: &mut JoinGroupRequest| {
            if r.protocol_type.as_str() == CONSUMER_PROTOCOL {
                for p in &mut r.protocols {
                    map_member_bytes(&mut p.metadata, subscription, &|n| view.to_serving(n));
                }
            }
            Ok(())
        })?,
        ApiKey::SyncGroup => recode_request(frame, key, version, |r: &mut SyncGroupRequest| {
            if consumer_type(r.protocol_type.as_deref()) {
                for a in &mut r.assignments {
                    map_member_bytes(&mut a.assignment, assignment, &|n| view.to_serving(n));
                }
            }
            Ok(())
        })?,
        ApiKey::InitProducerId => {
            let ids = producer_ids(view);
            recode_request(frame, key, version, |r: &mut InitProducerIdRequest| {
                r.producer_id = ProducerId(ids.to_serving(r.producer_id.0));
                Ok(())
            })?
        }
        _ => return Ok(None),
    };
    Ok(Some(Mapped {
        frame,
        unknown,
        member_epoch,
        group,
        ask,
    }))
}

/// Maps the topic names of the broker's response to a [`request`] back to the client's.
/// `unknown` are the topics a Metadata request left out, answered here as unknown. Topics with
/// no name in the view (the serving cluster's internal topics, in answers that list every
/// topic) are left out. The client's names of topics whose mirror the serving cluster does
/// not have (Metadata answered `UNKNOWN_TOPIC_OR_PARTITION`) are added to `noticed`, and so are
/// the positions an OffsetFetch answer carried.
pub fn response(
    frame: &Bytes,
    key: ApiKey,
    version: i16,
    ids: Ids<'_>,
    asked: &Asked<'_>,
    noticed: &mut Noticed,
) -> Result<Bytes, RewriteError> {
    let view = ids.view;
    let unknown = asked.unknown;
    // A name the view does not have, where the request named the topic: the broker answered
    // about a topic keyward did not ask for.
    let to_client = |name: &mut TopicName| -> Result<(), RewriteError> {
        let mapped =
            view.to_client(name.0.as_str())
                .ok_or_else(|| RewriteError::UnmappedTopic {
                    api: key,
                    topic: name.0.to_string(),
                })?;
        name.0 = StrBytes::from_string(mapped);
        Ok(())
    };
    // Keeps the topic, renamed, if it has a name in the view.
    let keep = |name: &mut TopicName| match view.to_client(name.0.as_str()) {
        Some(mapped) => {
            name.0 = StrBytes::from_string(mapped);
            true
        }
        None => false,
    };
    match key {
        ApiKey::Metadata => recode(frame, key, version, |r: &mut MetadataResponse| {
            r.topics.retain_mut(|t| t.name.as_mut().is_none_or(keep));
            // Leader epochs as the local cluster last gave them, never the serving cluster's:
            // a client takes metadata whose epoch went down for stale and keeps a leader it
            // cannot reach (librdkafka, franz-go, even with no epoch at all for franz-go), in
            // both directions of a switch. The local cluster's only grow.
            if version >= 7 {
                for t in &mut r.topics {
                    let Some(name) = &t.name else { continue };
                    for p in &mut t.partitions {
                        p.leader_epoch = ids
                            .local
                            .leader_epoch(name, p.partition_index)
                            .unwrap_or(NO_EPOCH);
                    }
                }
            }
            if version >= 10 {
                for t in &mut r.topics {
                    t.topic_id = match &t.name {
                        Some(name) => ids.named(name, t.topic_id),
                        None => ids.to_client(t.topic_id),
                    };
                }
            }
            noticed.missing.extend(
                r.topics
                    .iter()
                    .filter(|t| t.error_code == UNKNOWN_TOPIC_OR_PARTITION)
                    .filter_map(|t| Some(t.name.as_ref()?.0.to_string())),
            );
            r.topics.extend(unknown.iter().map(|name| {
                MetadataResponseTopic::default()
                    .with_error_code(UNKNOWN_TOPIC_OR_PARTITION)
                    .with_name(Some(TopicName(name.clone())))
            }));
            Ok(())
        }),
        // As Metadata, and so is the cursor to the next page: the serving cluster pages in the
        // order of its own names, which a client only hands back. A cursor at a topic with no
        // name in the view (listing every topic, when a page ends inside one of the serving
        // cluster's internal topics) cannot be handed back: the answer fails, and the
        // connection closes.
        ApiKey::DescribeTopicPartitions => recode(
            frame,
            key,
            version,
            |r: &mut DescribeTopicPartitionsResponse| {
                r.topics.retain_mut(|t| t.name.as_mut().is_none_or(keep));
                for t in &mut r.topics {
                    let Some(name) = &t.name else {
                        t.topic_id = ids.to_client(t.topic_id);
                        continue;
                    };
                    t.topic_id = ids.named(name, t.topic_id);
                    for p in &mut t.partitions {
                        p.leader_epoch = ids
                            .local
                            .leader_epoch(name, p.partition_index)
                            .unwrap_or(NO_EPOCH);
                    }
                }
                r.next_cursor
                    .iter_mut()
                    .try_for_each(|c| to_client(&mut c.topic_name))?;
                noticed.missing.extend(
                    r.topics
                        .iter()
                        .filter(|t| t.error_code == UNKNOWN_TOPIC_OR_PARTITION)
                        .filter_map(|t| Some(t.name.as_ref()?.0.to_string())),
                );
                r.topics.extend(unknown.iter().map(unknown_topic));
                Ok(())
            },
        ),
        ApiKey::Fetch if version < FETCH_BY_ID => {
            recode(frame, key, version, |r: &mut FetchResponse| {
                r.responses
                    .iter_mut()
                    .try_for_each(|t| to_client(&mut t.topic))
            })
        }
        ApiKey::Fetch => fetch_response_ids(frame, version, ids),
        ApiKey::ConsumerGroupHeartbeat => recode(
            frame,
            key,
            version,
            |r: &mut ConsumerGroupHeartbeatResponse| {
                super::handlers::group_heartbeat::join_again(r, asked.member_epoch);
                for t in r
                    .assignment
                    .iter_mut()
                    .flat_map(|a| &mut a.topic_partitions)
                {
                    t.topic_id = ids.to_client(t.topic_id);
                }
                Ok(())
            },
        ),
        ApiKey::ListOffsets => recode(frame, key, version, |r: &mut ListOffsetsResponse| {
            for p in r.topics.iter_mut().flat_map(|t| t.partitions.iter_mut()) {
                p.leader_epoch = NO_EPOCH;
            }
            r.topics.iter_mut().try_for_each(|t| to_client(&mut t.name))
        }),
        // A request for every topic a group committed is answered with all of them: those with
        // no name in the view are left out. Epochs of commits made here are the serving
        // cluster's: none is shown.
        // Where the group's position kept for the switch, translated, is ahead of the serving
        // cluster's answer (none, or MM2's translation from longer ago), it is answered.
        ApiKey::OffsetFetch => recode(frame, key, version, |r: &mut OffsetFetchResponse| {
            let positions = &mut noticed.positions;
            let mut answer = |group: Option<&str>, topic: &str, from, offset: &mut i64, p: i32| {
                let carried = match (group, asked.carry) {
                    (Some(group), Some(carry)) if from != ReadFrom::Other => {
                        carry(group, topic, p).filter(|t| t.offset > *offset)
                    }
                    _ => None,
                };
                let outcome = match carried {
                    Some(t) => {
                        *offset = t.offset;
                        positions.reread_at_most += t.reread_at_most.max(0) as u64;
                        Outcome::Carried
                    }
                    None if *offset >= 0 => Outcome::Found,
                    None => Outcome::None,
                };
                positions.add(from, outcome);
            };
            r.topics.retain_mut(|t| keep(&mut t.name));
            for t in &mut r.topics {
                let from = ReadFrom::of(view, t.name.0.as_str());
                for p in &mut t.partitions {
                    p.committed_leader_epoch = NO_EPOCH;
                    if p.error_code == 0 {
                        let i = p.partition_index;
                        answer(asked.group, &t.name.0, from, &mut p.committed_offset, i);
                    }
                }
            }
            for g in &mut r.groups {
                g.topics.retain_mut(|t| keep(&mut t.name));
                for t in &mut g.topics {
                    let from = ReadFrom::of(view, t.name.0.as_str());
                    for p in &mut t.partitions {
                        p.committed_leader_epoch = NO_EPOCH;
                        if g.error_code == 0 && p.error_code == 0 {
                            let i = p.partition_index;
                            let group = Some(g.group_id.0.as_str());
                            answer(group, &t.name.0, from, &mut p.committed_offset, i);
                        }
                    }
                }
            }
            Ok(())
        }),
        ApiKey::OffsetCommit => recode(frame, key, version, |r: &mut OffsetCommitResponse| {
            r.topics.iter_mut().try_for_each(|t| to_client(&mut t.name))
        }),
        ApiKey::OffsetForLeaderEpoch => recode(
            frame,
            key,
            version,
            |r: &mut OffsetForLeaderEpochResponse| {
                r.topics
                    .iter_mut()
                    .try_for_each(|t| to_client(&mut t.topic))
            },
        ),
        ApiKey::ConsumerGroupDescribe => recode(
            frame,
            key,
            version,
            |r: &mut ConsumerGroupDescribeResponse| {
                for m in r.groups.iter_mut().flat_map(|g| g.members.iter_mut()) {
                    m.subscribed_topic_names.retain_mut(keep);
                    for a in [&mut m.assignment, &mut m.target_assignment] {
                        a.topic_partitions.retain_mut(|t| keep(&mut t.topic_name));
                        for t in &mut a.topic_partitions {
                            t.topic_id = ids.named(&t.topic_name, t.topic_id);
                        }
                    }
                }
                Ok(())
            },
        ),
        ApiKey::JoinGroup => recode(frame, key, version, |r: &mut JoinGroupResponse| {
            if consumer_type(r.protocol_type.as_deref()) {
                for m in &mut r.members {
                    map_member_bytes(&mut m.metadata, subscription, &|n| view.to_client(n));
                }
            }
            Ok(())
        }),
        ApiKey::SyncGroup => recode(frame, key, version, |r: &mut SyncGroupResponse| {
            if consumer_type(r.protocol_type.as_deref()) {
                map_member_bytes(&mut r.assignment, assignment, &|n| view.to_client(n));
            }
            Ok(())
        }),
        ApiKey::DescribeGroups => recode(frame, key, version, |r: &mut DescribeGroupsResponse| {
            for g in &mut r.groups {
                if g.protocol_type.as_str() != CONSUMER_PROTOCOL {
                    continue;
                }
                for m in &mut g.members {
                    let to_client = |n: &str| view.to_client(n);
                    map_member_bytes(&mut m.member_metadata, subscription, &to_client);
                    map_member_bytes(&mut m.member_assignment, assignment, &to_client);
                }
            }
            Ok(())
        }),
        ApiKey::InitProducerId => {
            let ids = producer_ids(view);
            recode(frame, key, version, |r: &mut InitProducerIdResponse| {
                r.producer_id = ProducerId(ids.to_client(r.producer_id.0));
                Ok(())
            })
        }
        _ => Ok(frame.clone()),
    }
}

/// Whether group bytes are the consumer protocol's, by the protocol type where the message
/// names it; where it does not (SyncGroup before v5, JoinGroup answers before v7), by their
/// decoding exactly as the consumer protocol's ([`map_member_bytes`]).
fn consumer_type(protocol_type: Option<&str>) -> bool {
    protocol_type.is_none_or(|t| t == CONSUMER_PROTOCOL)
}

/// A name mapping: [`RegionView::to_serving`] or [`RegionView::to_client`].
type Rename<'a> = dyn Fn(&str) -> Option<String> + 'a;

/// Maps the topic names of one member's consumer-protocol bytes (a version, then the message at
/// that version) in place with `edit`. They stay as they are when they do not decode exactly
/// as that message (another protocol's, or a version this build does not know) or when a name
/// has no counterpart: a classic group's coordinator never reads them, so they cost nothing
/// there.
fn map_member_bytes<T: Decodable + Encodable>(
    bytes: &mut Bytes,
    edit: fn(&mut T, &Rename<'_>) -> Option<()>,
    rename: &Rename<'_>,
) {
    use bytes::{Buf, BufMut};
    let mut body = bytes.clone();
    if body.remaining() < 2 {
        return;
    }
    let version = body.get_i16();
    let Ok(mut message) = T::decode(&mut body, version) else {
        return;
    };
    if body.has_remaining() || edit(&mut message, rename).is_none() {
        return;
    }
    let mut out = bytes::BytesMut::with_capacity(bytes.len() + 16);
    out.put_i16(version);
    if message.encode(&mut out, version).is_ok() {
        *bytes = out.freeze();
    }
}

/// A member's subscription: the topics, and the partitions it owns (cooperative protocols).
fn subscription(s: &mut ConsumerProtocolSubscription, rename: &Rename<'_>) -> Option<()> {
    for topic in &mut s.topics {
        *topic = StrBytes::from_string(rename(topic.as_str())?);
    }
    for owned in &mut s.owned_partitions {
        owned.topic.0 = StrBytes::from_string(rename(owned.topic.0.as_str())?);
    }
    Some(())
}

/// A member's assignment: the partitions of each topic.
fn assignment(a: &mut ConsumerProtocolAssignment, rename: &Rename<'_>) -> Option<()> {
    for assigned in &mut a.assigned_partitions {
        assigned.topic.0 = StrBytes::from_string(rename(assigned.topic.0.as_str())?);
    }
    Some(())
}

/// A DescribeTopicPartitions answer's entry for a topic the serving cluster has no counterpart
/// of: unknown, as the broker answers a topic it does not have.
fn unknown_topic(name: &StrBytes) -> DescribeTopicPartitionsResponseTopic {
    DescribeTopicPartitionsResponseTopic::default()
        .with_error_code(UNKNOWN_TOPIC_OR_PARTITION)
        .with_name(Some(TopicName(name.clone())))
}

/// keyward's own answer to a DescribeTopicPartitions request none of whose topics has a
/// counterpart in the serving cluster ([`Mapped::ask`]): each of them unknown.
pub fn unknown_topics_answer(
    version: i16,
    correlation_id: i32,
    unknown: &[StrBytes],
) -> anyhow::Result<Bytes> {
    let answer = DescribeTopicPartitionsResponse::default()
        .with_topics(unknown.iter().map(unknown_topic).collect());
    super::rewrite::answer(
        ApiKey::DescribeTopicPartitions,
        version,
        correlation_id,
        &answer,
    )
}

/// A Fetch response (v13+) with each topic's id as the client knows it: the broker's bytes when
/// no id changes, otherwise one copy with the ids written over in place (records untouched).
fn fetch_response_ids(frame: &Bytes, version: i16, ids: Ids<'_>) -> Result<Bytes, RewriteError> {
    let header_len =
        frame::response_header_len(frame, ApiKey::Fetch.response_header_version(version))?;
    let body_at = LENGTH_PREFIX + header_len;
    let mut out: Option<bytes::BytesMut> = None;
    for at in fetch_handler::topic_id_offsets(&frame[body_at..])? {
        let at = body_at + at..body_at + at + 16;
        let id = Uuid::from_slice(&frame[at.clone()]).expect("16 bytes");
        let mapped = ids.to_client(id);
        if mapped != id {
            let out = out.get_or_insert_with(|| bytes::BytesMut::from(&frame[..]));
            out[at].copy_from_slice(mapped.as_bytes());
        }
    }
    Ok(out.map_or_else(|| frame.clone(), bytes::BytesMut::freeze))
}

fn producer_ids(view: &RegionView) -> ProducerIds {
    ProducerIds::new(view.local(), view.serving())
}

/// A Produce request on its way to the serving cluster, every batch's producer id as that
/// cluster must see it (`policy::producer_ids`). The bytes as they came when no id changes;
/// otherwise a copy with each changed batch's id and CRC written again (same length). A batch
/// whose CRC does not hold is left as it is, for the broker to refuse.
pub fn produce_request(
    frame: Bytes,
    version: i16,
    view: &RegionView,
) -> Result<Bytes, ProduceParseError> {
    let ids = producer_ids(view);
    let api = ApiKey::Produce;
    let header_len = frame::request_header_len(&frame, api.request_header_version(version))
        .map_err(ProduceParseError::Wire)?;
    let body = &frame[frame::LENGTH_PREFIX + header_len..];
    let request = produce_codec::parse(body, version)?;
    let mut changed = Vec::new();
    for data in request
        .topics
        .iter()
        .flat_map(|t| &t.partitions)
        .filter_map(|p| p.records)
    {
        for batch in records::batches(data).flatten() {
            let id = ids.to_serving(batch.header.producer_id);
            if id != batch.header.producer_id && batch.verify_crc() {
                let at = batch.raw().as_ptr() as usize - frame.as_ptr() as usize;
                changed.push((at..at + batch.raw().len(), id));
            }
        }
    }
    if changed.is_empty() {
        return Ok(frame);
    }
    let mut out = bytes::BytesMut::from(&frame[..]);
    for (batch, id) in changed {
        records::set_producer_id(&mut out[batch], id);
    }
    Ok(out.freeze())
}

/// Decodes a request body, lets `edit` change it, and re-encodes it behind the client's own
/// header.
fn recode_request<T, F>(
    frame: &Bytes,
    api: ApiKey,
    version: i16,
    edit: F,
) -> Result<Bytes, ViewError>
where
    T: Decodable + Encodable,
    F: FnOnce(&mut T) -> Result<(), ViewError>,
{
    let header_len = frame::request_header_len(frame, api.request_header_version(version))?;
    recode_behind(frame, header_len, version, edit).map_err(|e| match e {
        Recoded::Decode(source) => ViewError::Decode {
            api,
            version,
            source,
        },
        Recoded::Edit(e) => e,
        Recoded::Encode(source) => ViewError::Encode {
            api,
            version,
            source,
        },
    })
}

#[cfg(test)]
pub(crate) mod tests {
    //! Every mapped API at every version it is mapped at, in both directions: us's keyward,
    //! its reads served by eu's cluster.
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic, ForgottenTopic};
    use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
    use kafka_protocol::messages::list_offsets_request::ListOffsetsTopic;
    use kafka_protocol::messages::list_offsets_response::ListOffsetsTopicResponse;
    use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
    use kafka_protocol::messages::offset_commit_request::OffsetCommitRequestTopic;
    use kafka_protocol::messages::offset_commit_response::OffsetCommitResponseTopic;
    use kafka_protocol::messages::offset_fetch_request::{
        OffsetFetchRequestGroup, OffsetFetchRequestTopic, OffsetFetchRequestTopics,
    };
    use kafka_protocol::messages::offset_fetch_response::{
        OffsetFetchResponseGroup, OffsetFetchResponseTopic, OffsetFetchResponseTopics,
    };
    use kafka_protocol::messages::offset_for_leader_epoch_request::OffsetForLeaderTopic;
    use kafka_protocol::messages::offset_for_leader_epoch_response::OffsetForLeaderTopicResult;
    use uuid::Uuid;

    use super::*;
    use crate::codec::errors::{GROUP_ID_NOT_FOUND, UNKNOWN_MEMBER_ID};
    use crate::codec::frame::LENGTH_PREFIX;
    use crate::policy::replication::Naming;
    use crate::proxy::rewrite::testing::{decode_body, response_frame};
    use crate::proxy::upstream::encode_request;

    /// us's keyward, its reads served by eu's cluster.
    pub(crate) fn view() -> RegionView {
        RegionView::new(
            "us",
            "eu",
            &["eu".into(), "us".into()],
            Naming {
                separator: ".".into(),
            },
        )
    }

    /// The topic ids us and eu gave: us's `orders` is 1 and eu's copy of it, `us.orders`, is
    /// 11; eu's own `orders` is 12 and us's copy of it, `eu.orders`, is 2. `fresh` is a topic
    /// whose id us has seen and eu's not yet.
    pub(crate) fn ids() -> Ids<'static> {
        let local: &'static TopicIds = Box::leak(Box::default());
        local.learn([("orders", id(1)), ("eu.orders", id(2)), ("fresh", id(3))]);
        local.learn_leader_epochs("orders", &[(0, 7)]);
        let serving: &'static TopicIds = Box::leak(Box::default());
        serving.learn([("us.orders", id(11)), ("orders", id(12))]);
        Ids {
            view: Box::leak(Box::new(view())),
            local,
            serving,
        }
    }

    pub(crate) fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    pub(crate) fn name(s: &'static str) -> TopicName {
        TopicName(StrBytes::from_static_str(s))
    }

    fn names<'a>(names: impl IntoIterator<Item = &'a TopicName>) -> Vec<&'a str> {
        names.into_iter().map(|n| n.0.as_str()).collect()
    }

    /// The request `request` at `version`, mapped, decoded again.
    fn mapped<T: Encodable + Decodable>(key: ApiKey, version: i16, request: &T) -> Mapped {
        let frame = encode_request("t", 7, key, version, request).unwrap();
        request_mapped(&frame, key, version).expect("names to map")
    }

    fn request_mapped(frame: &Bytes, key: ApiKey, version: i16) -> Option<Mapped> {
        super::request(frame, key, version, ids()).unwrap()
    }

    fn decode_request<T: Decodable>(frame: &Bytes, key: ApiKey, version: i16) -> T {
        let len = frame::request_header_len(frame, key.request_header_version(version)).unwrap();
        // The client's header went out as it came.
        assert_eq!(frame::RequestHead::parse(frame).unwrap().correlation_id, 7);
        T::decode(&mut frame.slice(LENGTH_PREFIX + len..), version).unwrap()
    }

    /// The response `body` at `version`, mapped back, decoded again.
    fn back<T: Encodable + Decodable>(
        key: ApiKey,
        version: i16,
        body: &T,
        unknown: &[StrBytes],
    ) -> T {
        let frame = response_frame(key, version, body);
        let out = super::response(
            &frame,
            key,
            version,
            ids(),
            &Asked {
                unknown,
                ..Asked::default()
            },
            &mut Noticed::default(),
        )
        .unwrap();
        decode_body(&out, key, version)
    }

    fn versions(key: ApiKey) -> std::ops::RangeInclusive<i16> {
        let &(_, min, max) = MAPPED.iter().find(|(k, _, _)| *k == key).unwrap();
        min..=max
    }

    #[test]
    fn metadata_in_every_version() {
        for v in versions(ApiKey::Metadata) {
            let request = MetadataRequest::default().with_topics(Some(vec![
                MetadataRequestTopic::default().with_name(Some(name("orders"))),
                MetadataRequestTopic::default().with_name(Some(name("eu.orders"))),
                MetadataRequestTopic::default().with_name(Some(name("__consumer_offsets"))),
            ]));
            let m = mapped(ApiKey::Metadata, v, &request);
            let sent: MetadataRequest = decode_request(&m.frame, ApiKey::Metadata, v);
            let sent_names: Vec<_> = sent
                .topics
                .unwrap()
                .into_iter()
                .map(|t| t.name.unwrap())
                .collect();
            assert_eq!(names(&sent_names), ["us.orders", "orders"], "v{v}");
            assert_eq!(
                m.unknown,
                [StrBytes::from_static_str("__consumer_offsets")],
                "v{v}"
            );
            assert_eq!(
                sent.allow_auto_topic_creation,
                v < 4,
                "v{v}: a mirror is MM2's to create"
            );

            let topic = |n| MetadataResponseTopic::default().with_name(Some(name(n)));
            let answer = MetadataResponse::default().with_topics(vec![
                topic("us.orders"),
                topic("orders"),
                topic("__consumer_offsets").with_is_internal(v >= 1),
                topic("us.eu.orders"),
            ]);
            let got = back(ApiKey::Metadata, v, &answer, &m.unknown);
            // The serving cluster has no mirror of `orders` yet: its name is reported missing.
            let answer = MetadataResponse::default().with_topics(vec![
                topic("us.orders").with_error_code(UNKNOWN_TOPIC_OR_PARTITION),
            ]);
            let mut noticed = Noticed::default();
            let frame = response_frame(ApiKey::Metadata, v, &answer);
            super::response(
                &frame,
                ApiKey::Metadata,
                v,
                ids(),
                &Asked::default(),
                &mut noticed,
            )
            .unwrap();
            assert_eq!(noticed.missing, ["orders"], "v{v}");
            let got_names: Vec<_> = got.topics.iter().map(|t| t.name.clone().unwrap()).collect();
            assert_eq!(
                names(&got_names),
                ["orders", "eu.orders", "__consumer_offsets"],
                "v{v}"
            );
            assert_eq!(got.topics[2].error_code, UNKNOWN_TOPIC_OR_PARTITION);
            assert_eq!(got.topics[0].error_code, 0);
            if v < 10 {
                continue;
            }
            // From v10 topics have ids: a client is shown the local cluster's, and a request by
            // id goes out with the serving cluster's.
            let by_id = MetadataRequest::default().with_topics(Some(vec![
                MetadataRequestTopic::default()
                    .with_name(None)
                    .with_topic_id(id(1)),
            ]));
            let m = mapped(ApiKey::Metadata, v, &by_id);
            let sent: MetadataRequest = decode_request(&m.frame, ApiKey::Metadata, v);
            assert_eq!(sent.topics.unwrap()[0].topic_id, id(11), "v{v}");
            let answer = MetadataResponse::default().with_topics(vec![
                topic("us.orders").with_topic_id(id(11)),
                topic("orders").with_topic_id(id(12)),
                topic("us.audit").with_topic_id(id(13)),
            ]);
            let got = back(ApiKey::Metadata, v, &answer, &[]);
            let shown: Vec<_> = got
                .topics
                .iter()
                .map(|t| (t.name.as_ref().unwrap().as_str(), t.topic_id))
                .collect();
            assert_eq!(
                shown,
                [("orders", id(1)), ("eu.orders", id(2)), ("audit", id(13))],
                "v{v}: a topic whose local id keyward never saw keeps the serving cluster's"
            );
        }
    }

    #[test]
    fn describe_topic_partitions_in_every_version() {
        use kafka_protocol::messages::describe_topic_partitions_request::{
            Cursor as AskedCursor, TopicRequest,
        };
        use kafka_protocol::messages::describe_topic_partitions_response::{
            Cursor, DescribeTopicPartitionsResponsePartition,
        };
        let key = ApiKey::DescribeTopicPartitions;
        for v in versions(key) {
            let topic = |n| TopicRequest::default().with_name(name(n));
            let request = DescribeTopicPartitionsRequest::default()
                .with_topics(vec![
                    topic("eu.orders"),
                    topic("orders"),
                    topic("__consumer_offsets"),
                ])
                .with_cursor(Some(
                    AskedCursor::default()
                        .with_topic_name(name("orders"))
                        .with_partition_index(3),
                ));
            let m = mapped(key, v, &request);
            assert!(m.ask);
            let sent: DescribeTopicPartitionsRequest = decode_request(&m.frame, key, v);
            let sent_names: Vec<_> = sent.topics.iter().map(|t| &t.name).collect();
            assert_eq!(names(sent_names), ["orders", "us.orders"], "v{v}");
            assert_eq!(sent.cursor.unwrap().topic_name.0.as_str(), "us.orders");
            assert_eq!(m.unknown, [StrBytes::from_static_str("__consumer_offsets")]);

            // eu's answer: its copy of us's `orders` (id 11, eu's epoch 3), its own `orders`
            // (id 12), and the next page at its copy's partition 4.
            let partition = DescribeTopicPartitionsResponsePartition::default()
                .with_partition_index(0)
                .with_leader_epoch(3);
            let described = |n, i| {
                DescribeTopicPartitionsResponseTopic::default()
                    .with_name(Some(name(n)))
                    .with_topic_id(id(i))
                    .with_partitions(vec![partition.clone()])
            };
            let answer = DescribeTopicPartitionsResponse::default()
                .with_topics(vec![described("orders", 12), described("us.orders", 11)])
                .with_next_cursor(Some(
                    Cursor::default()
                        .with_topic_name(name("us.orders"))
                        .with_partition_index(4),
                ));
            let got = back(key, v, &answer, &m.unknown);
            let got_names: Vec<_> = got.topics.iter().filter_map(|t| t.name.as_ref()).collect();
            assert_eq!(
                names(got_names),
                ["eu.orders", "orders", "__consumer_offsets"],
                "v{v}"
            );
            // The ids and leader epochs us gave (none known for us's `eu.orders`).
            let shown: Vec<_> = got
                .topics
                .iter()
                .map(|t| (t.topic_id, t.partitions.first().map(|p| p.leader_epoch)))
                .collect();
            assert_eq!(
                shown,
                [
                    (id(2), Some(NO_EPOCH)),
                    (id(1), Some(7)),
                    (Uuid::nil(), None)
                ]
            );
            assert_eq!(got.topics[2].error_code, UNKNOWN_TOPIC_OR_PARTITION);
            let next = got.next_cursor.unwrap();
            assert_eq!(
                (next.topic_name.0.as_str(), next.partition_index),
                ("orders", 4)
            );

            // Every topic in a listing of all of them: the serving cluster's internal ones are
            // left out, and a page ending inside one cannot be handed back.
            let all = DescribeTopicPartitionsRequest::default();
            assert!(mapped(key, v, &all).ask);
            let answer = DescribeTopicPartitionsResponse::default().with_topics(vec![
                described("__consumer_offsets", 50),
                described("orders", 12),
            ]);
            let got = back(key, v, &answer, &[]);
            assert_eq!(got.topics.len(), 1);
            assert_eq!(got.topics[0].name.as_ref().unwrap().0.as_str(), "eu.orders");
            let cut = answer.with_next_cursor(Some(
                Cursor::default().with_topic_name(name("__consumer_offsets")),
            ));
            let f = response_frame(key, v, &cut);
            let asked = Asked::default();
            assert!(super::response(&f, key, v, ids(), &asked, &mut Noticed::default()).is_err());
        }
    }

    #[test]
    fn describe_topic_partitions_naming_nothing_mappable_is_answered_by_keyward() {
        use kafka_protocol::messages::describe_topic_partitions_request::TopicRequest;
        let key = ApiKey::DescribeTopicPartitions;
        for v in versions(key) {
            let request = DescribeTopicPartitionsRequest::default().with_topics(vec![
                TopicRequest::default().with_name(name("__consumer_offsets")),
            ]);
            let m = mapped(key, v, &request);
            assert!(!m.ask, "an empty list would ask for every topic");
            let answer = unknown_topics_answer(v, 7, &m.unknown).unwrap();
            let head = frame::response_header_len(&answer, key.response_header_version(v));
            assert!(head.is_ok());
            assert_eq!(i32::from_be_bytes(answer[4..8].try_into().unwrap()), 7);
            let got: DescribeTopicPartitionsResponse = decode_body(&answer, key, v);
            assert_eq!(got.topics.len(), 1);
            assert_eq!(got.topics[0].error_code, UNKNOWN_TOPIC_OR_PARTITION);
            assert_eq!(
                got.topics[0].name.as_ref().unwrap().0.as_str(),
                "__consumer_offsets"
            );
        }
    }

    fn member_bytes<T: Encodable>(version: i16, message: &T) -> Bytes {
        use bytes::BufMut;
        let mut out = bytes::BytesMut::new();
        out.put_i16(version);
        message.encode(&mut out, version).unwrap();
        out.freeze()
    }

    fn member_message<T: Decodable>(bytes: &Bytes) -> (i16, T) {
        use bytes::Buf;
        let mut body = bytes.clone();
        let version = body.get_i16();
        let message = T::decode(&mut body, version).unwrap();
        assert!(!body.has_remaining());
        (version, message)
    }

    /// A subscription to us's `orders` and `eu.orders`, owning `orders` partition 0 (from
    /// consumer-protocol v1), in `names` (this region's, or eu's).
    fn subscribed(version: i16, names: [&'static str; 2]) -> Bytes {
        use kafka_protocol::messages::consumer_protocol_subscription::TopicPartition;
        let mut s = ConsumerProtocolSubscription::default()
            .with_topics(names.iter().map(|n| StrBytes::from_static_str(n)).collect())
            .with_user_data(Some(Bytes::from_static(b"sticky state")));
        if version >= 1 {
            s.owned_partitions = vec![
                TopicPartition::default()
                    .with_topic(name(names[0]))
                    .with_partitions(vec![0]),
            ];
        }
        member_bytes(version, &s)
    }

    /// An assignment of partition 0 of each of `names`.
    fn assigned(version: i16, names: [&'static str; 2]) -> Bytes {
        use kafka_protocol::messages::consumer_protocol_assignment::TopicPartition;
        let a = ConsumerProtocolAssignment::default().with_assigned_partitions(
            names
                .iter()
                .map(|n| {
                    TopicPartition::default()
                        .with_topic(name(n))
                        .with_partitions(vec![0])
                })
                .collect(),
        );
        member_bytes(version, &a)
    }

    /// The classic consumer protocol's subscriptions and assignments, in every version of
    /// JoinGroup, SyncGroup and DescribeGroups and every consumer-protocol version: this
    /// region's names to the serving cluster's and back; another protocol's bytes, and a
    /// subscription naming a topic with no counterpart, as they came.
    #[test]
    fn classic_group_membership_in_every_version() {
        use kafka_protocol::messages::describe_groups_response::{
            DescribedGroup, DescribedGroupMember,
        };
        use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
        use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
        use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
        const OURS: [&str; 2] = ["orders", "eu.orders"];
        const EUS: [&str; 2] = ["us.orders", "orders"];
        let connect = Bytes::from_static(b"\x00\x01connect's own assignment");
        for cv in 0..=3 {
            let subscription_names = |b: &Bytes| {
                let (v, s): (i16, ConsumerProtocolSubscription) = member_message(b);
                assert_eq!(v, cv);
                assert_eq!(s.user_data.as_deref(), Some(&b"sticky state"[..]));
                let owned: Vec<_> = s
                    .owned_partitions
                    .iter()
                    .map(|p| p.topic.0.to_string())
                    .collect();
                (
                    s.topics.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
                    owned,
                )
            };
            let assignment_names = |b: &Bytes| {
                let (_, a): (i16, ConsumerProtocolAssignment) = member_message(b);
                a.assigned_partitions
                    .iter()
                    .map(|p| p.topic.0.to_string())
                    .collect::<Vec<_>>()
            };
            let owned = |first: &str| {
                if cv >= 1 {
                    vec![first.to_owned()]
                } else {
                    vec![]
                }
            };
            for v in versions(ApiKey::JoinGroup) {
                let protocol =
                    |metadata| JoinGroupRequestProtocol::default().with_metadata(metadata);
                let request = JoinGroupRequest::default()
                    .with_protocol_type(StrBytes::from_static_str("consumer"))
                    .with_protocols(vec![protocol(subscribed(cv, OURS))]);
                let sent: JoinGroupRequest = decode_request(
                    &mapped(ApiKey::JoinGroup, v, &request).frame,
                    ApiKey::JoinGroup,
                    v,
                );
                assert_eq!(
                    subscription_names(&sent.protocols[0].metadata),
                    (EUS.map(String::from).to_vec(), owned("us.orders")),
                    "v{v}"
                );
                // Another protocol's, and a topic with no counterpart: as they came.
                let other = request
                    .clone()
                    .with_protocol_type(StrBytes::from_static_str("connect"))
                    .with_protocols(vec![protocol(connect.clone())]);
                let sent: JoinGroupRequest = decode_request(
                    &mapped(ApiKey::JoinGroup, v, &other).frame,
                    ApiKey::JoinGroup,
                    v,
                );
                assert_eq!(sent.protocols[0].metadata, connect);
                let internal = subscribed(cv, ["orders", "__consumer_offsets"]);
                let odd = request
                    .clone()
                    .with_protocols(vec![protocol(internal.clone())]);
                let sent: JoinGroupRequest = decode_request(
                    &mapped(ApiKey::JoinGroup, v, &odd).frame,
                    ApiKey::JoinGroup,
                    v,
                );
                assert_eq!(sent.protocols[0].metadata, internal);

                let mut answer = JoinGroupResponse::default().with_members(vec![
                    JoinGroupResponseMember::default().with_metadata(subscribed(cv, EUS)),
                ]);
                if v >= 7 {
                    answer.protocol_type = Some(StrBytes::from_static_str("consumer"));
                }
                let got = back(ApiKey::JoinGroup, v, &answer, &[]);
                assert_eq!(
                    subscription_names(&got.members[0].metadata),
                    (OURS.map(String::from).to_vec(), owned("orders")),
                    "v{v}"
                );
            }
            for v in versions(ApiKey::SyncGroup) {
                let mut request = SyncGroupRequest::default().with_assignments(vec![
                    SyncGroupRequestAssignment::default().with_assignment(assigned(cv, OURS)),
                    SyncGroupRequestAssignment::default().with_assignment(connect.clone()),
                ]);
                if v >= 5 {
                    request.protocol_type = Some(StrBytes::from_static_str("consumer"));
                }
                let sent: SyncGroupRequest = decode_request(
                    &mapped(ApiKey::SyncGroup, v, &request).frame,
                    ApiKey::SyncGroup,
                    v,
                );
                assert_eq!(
                    assignment_names(&sent.assignments[0].assignment),
                    EUS,
                    "v{v}"
                );
                assert_eq!(sent.assignments[1].assignment, connect);
                let answer = SyncGroupResponse::default().with_assignment(assigned(cv, EUS));
                let got = back(ApiKey::SyncGroup, v, &answer, &[]);
                assert_eq!(assignment_names(&got.assignment), OURS, "v{v}");
                if v >= 5 {
                    let theirs =
                        answer.with_protocol_type(Some(StrBytes::from_static_str("connect")));
                    let got = back(ApiKey::SyncGroup, v, &theirs, &[]);
                    assert_eq!(got.assignment, assigned(cv, EUS));
                }
            }
            for v in versions(ApiKey::DescribeGroups) {
                let member = DescribedGroupMember::default()
                    .with_member_metadata(subscribed(cv, EUS))
                    .with_member_assignment(assigned(cv, EUS));
                let group = |protocol_type| {
                    DescribedGroup::default()
                        .with_protocol_type(StrBytes::from_static_str(protocol_type))
                        .with_members(vec![member.clone()])
                };
                let answer = DescribeGroupsResponse::default()
                    .with_groups(vec![group("consumer"), group("connect")]);
                let got = back(ApiKey::DescribeGroups, v, &answer, &[]);
                let ours = &got.groups[0].members[0];
                assert_eq!(subscription_names(&ours.member_metadata).0, OURS, "v{v}");
                assert_eq!(assignment_names(&ours.member_assignment), OURS, "v{v}");
                assert_eq!(got.groups[1].members[0], member, "v{v}");
            }
        }
    }

    /// A request naming an array count near 2^31 in a few bytes: refused as malformed, where
    /// the published kafka-protocol 0.18 sized an allocation by the count and aborted the
    /// process (vendor/kafka-protocol/README.keyward.md).
    #[test]
    fn a_request_naming_an_impossible_count_is_refused_not_aborted() {
        for (key, version) in [
            (ApiKey::Metadata, 0),
            (ApiKey::Fetch, 12),
            (ApiKey::OffsetCommit, 9),
            (ApiKey::JoinGroup, 5),
        ] {
            let mut head = Vec::new();
            kafka_protocol::messages::RequestHeader::default()
                .with_request_api_key(key as i16)
                .with_request_api_version(version)
                .with_correlation_id(7)
                .with_client_id(Some(StrBytes::from_static_str("c")))
                .encode(&mut head, key.request_header_version(version))
                .unwrap();
            // Every field a request starts with, as 0x7f bytes: counts of about 2^31.
            let frame = frame::assemble(&head, &[0x7f; 64]);
            assert!(
                super::request(&frame, key, version, ids()).is_err(),
                "{key:?} v{version}"
            );
        }
        // The consumer protocol's member bytes likewise: left as they came.
        let mut lying = Bytes::from_static(b"\x00\x00\x7f\xff\xff\xff");
        let before = lying.clone();
        map_member_bytes(&mut lying, assignment, &|n| view().to_serving(n));
        assert_eq!(lying, before);
    }

    #[test]
    fn a_metadata_v0_request_for_nothing_mappable_is_refused_rather_than_asking_for_every_topic() {
        let request = MetadataRequest::default().with_topics(Some(vec![
            MetadataRequestTopic::default().with_name(Some(name("__consumer_offsets"))),
        ]));
        let frame = encode_request("t", 7, ApiKey::Metadata, 0, &request).unwrap();
        assert!(matches!(
            super::request(&frame, ApiKey::Metadata, 0, ids()),
            Err(ViewError::Unmapped { .. })
        ));
        // From v1 on, an empty list asks for no topic.
        let frame = encode_request("t", 7, ApiKey::Metadata, 1, &request).unwrap();
        let m = request_mapped(&frame, ApiKey::Metadata, 1).unwrap();
        let sent: MetadataRequest = decode_request(&m.frame, ApiKey::Metadata, 1);
        assert_eq!(sent.topics.map(|t| t.len()), Some(0));
    }

    /// v4-v12 name topics; v13+ name them by id: the client's ids (the local cluster's) go out
    /// as the serving cluster's and come back as the client's, an id keyward cannot map as it
    /// came, and records untouched.
    #[test]
    fn fetch_in_every_version() {
        for v in versions(ApiKey::Fetch) {
            let by_id = v >= FETCH_BY_ID;
            let topic = |n, i| {
                match by_id {
                    true => FetchTopic::default().with_topic_id(id(i)),
                    false => FetchTopic::default().with_topic(name(n)),
                }
                .with_partitions(vec![FetchPartition::default()])
            };
            let mut request = FetchRequest::default().with_topics(vec![
                topic("orders", 1),
                topic("eu.orders", 2),
                topic("fresh", 99),
            ]);
            if v >= 7 {
                request.forgotten_topics_data = vec![match by_id {
                    true => ForgottenTopic::default().with_topic_id(id(1)),
                    false => ForgottenTopic::default().with_topic(name("orders")),
                }];
            }
            if !by_id {
                request.topics.pop();
            }
            let m = mapped(ApiKey::Fetch, v, &request);
            let sent: FetchRequest = decode_request(&m.frame, ApiKey::Fetch, v);
            let response_topic = |n, i| match by_id {
                true => FetchableTopicResponse::default().with_topic_id(id(i)),
                false => FetchableTopicResponse::default().with_topic(name(n)),
            };
            let mut answer = FetchResponse::default().with_responses(vec![
                response_topic("us.orders", 11),
                response_topic("orders", 12),
            ]);
            for t in &mut answer.responses {
                t.partitions = vec![
                    PartitionData::default()
                        .with_records(Some(Bytes::from_static(b"records")))
                        .with_aborted_transactions(Some(vec![Default::default()])),
                ];
            }
            if by_id {
                assert_eq!(
                    sent.topics.iter().map(|t| t.topic_id).collect::<Vec<_>>(),
                    [id(11), id(12), id(99)],
                    "v{v}: an id keyward cannot map goes as it came"
                );
                assert_eq!(sent.forgotten_topics_data[0].topic_id, id(11));
                answer.responses.push(response_topic("", 99));
                let got = back(ApiKey::Fetch, v, &answer, &[]);
                assert_eq!(
                    got.responses.iter().map(|t| t.topic_id).collect::<Vec<_>>(),
                    [id(1), id(2), id(99)],
                    "v{v}"
                );
                assert_eq!(
                    got.responses[1].partitions[0].records.as_deref(),
                    Some(&b"records"[..])
                );
                // Nothing to map: the broker's bytes, not a copy.
                let only = FetchResponse::default().with_responses(vec![response_topic("", 99)]);
                let f = response_frame(ApiKey::Fetch, v, &only);
                let out = super::response(
                    &f,
                    ApiKey::Fetch,
                    v,
                    ids(),
                    &Asked::default(),
                    &mut Noticed::default(),
                );
                assert_eq!(out.unwrap().as_ptr(), f.as_ptr(), "v{v}");
                continue;
            }
            assert_eq!(
                names(sent.topics.iter().map(|t| &t.topic)),
                ["us.orders", "orders"],
                "v{v}"
            );
            if v >= 7 {
                assert_eq!(
                    names(sent.forgotten_topics_data.iter().map(|t| &t.topic)),
                    ["us.orders"]
                );
            }
            let got = back(ApiKey::Fetch, v, &answer, &[]);
            assert_eq!(
                names(got.responses.iter().map(|t| &t.topic)),
                ["orders", "eu.orders"],
                "v{v}"
            );
        }
    }

    #[test]
    fn list_offsets_in_every_version() {
        for v in versions(ApiKey::ListOffsets) {
            let request = ListOffsetsRequest::default().with_topics(vec![
                ListOffsetsTopic::default().with_name(name("orders")),
                ListOffsetsTopic::default().with_name(name("eu.orders")),
            ]);
            let m = mapped(ApiKey::ListOffsets, v, &request);
            let sent: ListOffsetsRequest = decode_request(&m.frame, ApiKey::ListOffsets, v);
            assert_eq!(
                names(sent.topics.iter().map(|t| &t.name)),
                ["us.orders", "orders"],
                "v{v}"
            );
            let answer = ListOffsetsResponse::default().with_topics(vec![
                ListOffsetsTopicResponse::default().with_name(name("us.orders")),
                ListOffsetsTopicResponse::default().with_name(name("orders")),
            ]);
            let got = back(ApiKey::ListOffsets, v, &answer, &[]);
            assert_eq!(
                names(got.topics.iter().map(|t| &t.name)),
                ["orders", "eu.orders"],
                "v{v}"
            );
        }
    }

    #[test]
    fn offset_fetch_in_every_version() {
        for v in versions(ApiKey::OffsetFetch) {
            let request = if v < 8 {
                OffsetFetchRequest::default().with_topics(Some(vec![
                    OffsetFetchRequestTopic::default().with_name(name("orders")),
                    OffsetFetchRequestTopic::default().with_name(name("eu.orders")),
                ]))
            } else {
                OffsetFetchRequest::default().with_groups(vec![
                    OffsetFetchRequestGroup::default().with_topics(Some(vec![
                        OffsetFetchRequestTopics::default().with_name(name("orders")),
                        OffsetFetchRequestTopics::default().with_name(name("eu.orders")),
                    ])),
                ])
            };
            let m = mapped(ApiKey::OffsetFetch, v, &request);
            let sent: OffsetFetchRequest = decode_request(&m.frame, ApiKey::OffsetFetch, v);
            let sent_names = if v < 8 {
                sent.topics
                    .unwrap()
                    .into_iter()
                    .map(|t| t.name)
                    .collect::<Vec<_>>()
            } else {
                sent.groups[0]
                    .topics
                    .clone()
                    .unwrap()
                    .into_iter()
                    .map(|t| t.name)
                    .collect()
            };
            assert_eq!(names(&sent_names), ["us.orders", "orders"], "v{v}");

            // Every topic the group committed, the serving cluster's internal ones included.
            let committed = ["us.orders", "orders", "__consumer_offsets"];
            let answer = if v < 8 {
                OffsetFetchResponse::default().with_topics(
                    committed
                        .map(|n| OffsetFetchResponseTopic::default().with_name(name(n)))
                        .to_vec(),
                )
            } else {
                OffsetFetchResponse::default().with_groups(vec![
                    OffsetFetchResponseGroup::default().with_topics(
                        committed
                            .map(|n| OffsetFetchResponseTopics::default().with_name(name(n)))
                            .to_vec(),
                    ),
                ])
            };
            let got = back(ApiKey::OffsetFetch, v, &answer, &[]);
            let got_names = if v < 8 {
                got.topics.into_iter().map(|t| t.name).collect::<Vec<_>>()
            } else {
                got.groups[0]
                    .topics
                    .clone()
                    .into_iter()
                    .map(|t| t.name)
                    .collect()
            };
            assert_eq!(names(&got_names), ["orders", "eu.orders"], "v{v}");
        }
    }

    /// Each partition an OffsetFetch answer carries is counted by where its topic is read from
    /// and what the answer showed: us's `orders` is eu's copy `us.orders` (MM2 may sync
    /// positions there), us's `eu.orders` is eu's own `orders` (nothing does). Where the group's
    /// position kept for the switch, translated, is ahead of eu's answer, it is answered
    /// (`carried`); where eu's is at or ahead of it, eu's stands. Partitions and groups answered
    /// with an error are not counted. v1-v7 name the group in the request only.
    #[test]
    fn offset_fetch_answers_carry_and_count_positions_in_every_version() {
        use kafka_protocol::messages::offset_fetch_response::{
            OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
        };
        const UNSTABLE_OFFSET_COMMIT: i16 = 88;
        // (offset, error) per partition, per topic as eu names it.
        let answered: [(&str, &[(i64, i16)]); 2] = [
            (
                "us.orders",
                &[(5, 0), (-1, 0), (-1, UNSTABLE_OFFSET_COMMIT)],
            ),
            ("orders", &[(-1, 0), (9, 0), (-1, 0)]),
        ];
        // Kept for group g, translated: on `orders` 3 (behind eu's 5: eu's stands) and 41
        // (eu has none); on `eu.orders` 5 (behind eu's 9) and 42 (eu has none).
        let carry = |group: &str, topic: &str, partition: i32| {
            let offset = match (group, topic, partition) {
                ("g", "orders", 0) => 3,
                ("g", "orders", 1) => 41,
                ("g", "eu.orders", 1) => 5,
                ("g", "eu.orders", 2) => 42,
                _ => return None,
            };
            Some(offset_syncs::Translated {
                offset,
                reread_at_most: 2,
            })
        };
        for v in versions(ApiKey::OffsetFetch) {
            let request = if v < 8 {
                OffsetFetchRequest::default()
                    .with_group_id(kafka_protocol::messages::GroupId(
                        StrBytes::from_static_str("g"),
                    ))
                    .with_topics(Some(vec![
                        OffsetFetchRequestTopic::default().with_name(name("eu.orders")),
                    ]))
            } else {
                OffsetFetchRequest::default()
            };
            let group = mapped(ApiKey::OffsetFetch, v, &request).group;
            assert_eq!(group.as_deref(), (v < 8).then_some("g"), "v{v}");
            let answer = |group_error: i16| {
                if v < 8 {
                    OffsetFetchResponse::default().with_topics(
                        answered
                            .iter()
                            .map(|(n, parts)| {
                                OffsetFetchResponseTopic::default()
                                    .with_name(name(n))
                                    .with_partitions(
                                        parts
                                            .iter()
                                            .enumerate()
                                            .map(|(i, &(offset, error))| {
                                                OffsetFetchResponsePartition::default()
                                                    .with_partition_index(i as i32)
                                                    .with_committed_offset(offset)
                                                    .with_error_code(error)
                                            })
                                            .collect(),
                                    )
                            })
                            .collect(),
                    )
                } else {
                    OffsetFetchResponse::default().with_groups(vec![
                        OffsetFetchResponseGroup::default()
                            .with_group_id(kafka_protocol::messages::GroupId(
                                StrBytes::from_static_str("g"),
                            ))
                            .with_error_code(group_error)
                            .with_topics(
                                answered
                                    .iter()
                                    .map(|(n, parts)| {
                                        OffsetFetchResponseTopics::default()
                                            .with_name(name(n))
                                            .with_partitions(
                                                parts
                                                    .iter()
                                                    .enumerate()
                                                    .map(|(i, &(offset, error))| {
                                                        OffsetFetchResponsePartitions::default()
                                                            .with_partition_index(i as i32)
                                                            .with_committed_offset(offset)
                                                            .with_error_code(error)
                                                    })
                                                    .collect(),
                                            )
                                    })
                                    .collect(),
                            ),
                    ])
                }
            };
            let through = |body: &OffsetFetchResponse, carry: Option<Carry<'_>>| {
                let mut noticed = Noticed::default();
                let out = super::response(
                    &response_frame(ApiKey::OffsetFetch, v, body),
                    ApiKey::OffsetFetch,
                    v,
                    ids(),
                    &Asked {
                        group: group.as_deref(),
                        carry,
                        ..Asked::default()
                    },
                    &mut noticed,
                )
                .unwrap();
                let got: OffsetFetchResponse = decode_body(&out, ApiKey::OffsetFetch, v);
                let offsets: Vec<(String, Vec<i64>)> = if v < 8 {
                    got.topics
                        .iter()
                        .map(|t| {
                            let o = t.partitions.iter().map(|p| p.committed_offset);
                            (t.name.0.to_string(), o.collect())
                        })
                        .collect()
                } else {
                    got.groups[0]
                        .topics
                        .iter()
                        .map(|t| {
                            let o = t.partitions.iter().map(|p| p.committed_offset);
                            (t.name.0.to_string(), o.collect())
                        })
                        .collect()
                };
                (noticed.positions, offsets)
            };
            let counts = |p: &Positions| {
                ReadFrom::ALL.map(|from| Outcome::ALL.map(|outcome| p.get(from, outcome)))
            };
            // [found, none, carried] for copy, origin, other.
            let (p, offsets) = through(&answer(0), Some(&carry));
            assert_eq!(counts(&p), [[1, 0, 1], [1, 1, 1], [0, 0, 0]], "v{v}");
            assert_eq!(p.reread_at_most, 4, "v{v}");
            assert_eq!(
                offsets,
                [
                    ("orders".to_owned(), vec![5, 41, -1]),
                    ("eu.orders".to_owned(), vec![-1, 9, 42]),
                ],
                "v{v}"
            );
            // Nothing kept: nothing carried.
            let (p, _) = through(&answer(0), None);
            assert_eq!(counts(&p), [[1, 1, 0], [1, 2, 0], [0, 0, 0]], "v{v}");
            if v >= 8 {
                let (p, _) = through(&answer(UNSTABLE_OFFSET_COMMIT), Some(&carry));
                assert_eq!(
                    p,
                    Positions::default(),
                    "v{v}: a group answered with an error"
                );
            }
        }
    }

    #[test]
    fn offset_commit_in_every_version() {
        for v in versions(ApiKey::OffsetCommit) {
            let request = OffsetCommitRequest::default().with_topics(vec![
                OffsetCommitRequestTopic::default().with_name(name("orders")),
                OffsetCommitRequestTopic::default().with_name(name("eu.orders")),
            ]);
            let m = mapped(ApiKey::OffsetCommit, v, &request);
            let sent: OffsetCommitRequest = decode_request(&m.frame, ApiKey::OffsetCommit, v);
            assert_eq!(
                names(sent.topics.iter().map(|t| &t.name)),
                ["us.orders", "orders"],
                "v{v}"
            );
            let answer = OffsetCommitResponse::default().with_topics(vec![
                OffsetCommitResponseTopic::default().with_name(name("us.orders")),
                OffsetCommitResponseTopic::default().with_name(name("orders")),
            ]);
            let got = back(ApiKey::OffsetCommit, v, &answer, &[]);
            assert_eq!(
                names(got.topics.iter().map(|t| &t.name)),
                ["orders", "eu.orders"],
                "v{v}"
            );
        }
    }

    #[test]
    fn offset_for_leader_epoch_in_every_version() {
        for v in versions(ApiKey::OffsetForLeaderEpoch) {
            let request = OffsetForLeaderEpochRequest::default().with_topics(vec![
                OffsetForLeaderTopic::default().with_topic(name("orders")),
                OffsetForLeaderTopic::default().with_topic(name("eu.orders")),
            ]);
            let m = mapped(ApiKey::OffsetForLeaderEpoch, v, &request);
            let sent: OffsetForLeaderEpochRequest =
                decode_request(&m.frame, ApiKey::OffsetForLeaderEpoch, v);
            assert_eq!(
                names(sent.topics.iter().map(|t| &t.topic)),
                ["us.orders", "orders"],
                "v{v}"
            );
            let answer = OffsetForLeaderEpochResponse::default().with_topics(vec![
                OffsetForLeaderTopicResult::default().with_topic(name("us.orders")),
                OffsetForLeaderTopicResult::default().with_topic(name("orders")),
            ]);
            let got = back(ApiKey::OffsetForLeaderEpoch, v, &answer, &[]);
            assert_eq!(
                names(got.topics.iter().map(|t| &t.topic)),
                ["orders", "eu.orders"],
                "v{v}"
            );
        }
    }

    #[test]
    fn consumer_group_heartbeat_in_every_version() {
        for v in versions(ApiKey::ConsumerGroupHeartbeat) {
            use kafka_protocol::messages::consumer_group_heartbeat_request::TopicPartitions as Owned;
            use kafka_protocol::messages::consumer_group_heartbeat_response::{
                Assignment, TopicPartitions as Assigned,
            };
            // The partitions a member owns, by the ids it knows (the local cluster's).
            let request = ConsumerGroupHeartbeatRequest::default()
                .with_subscribed_topic_names(Some(vec![name("orders"), name("eu.orders")]))
                .with_topic_partitions(Some(
                    [1, 2, 99]
                        .map(|i| Owned::default().with_topic_id(id(i)))
                        .to_vec(),
                ));
            let m = mapped(ApiKey::ConsumerGroupHeartbeat, v, &request);
            let sent: ConsumerGroupHeartbeatRequest =
                decode_request(&m.frame, ApiKey::ConsumerGroupHeartbeat, v);
            assert_eq!(
                names(&sent.subscribed_topic_names.unwrap()),
                ["us.orders", "orders"],
                "v{v}"
            );
            let owned: Vec<_> = sent
                .topic_partitions
                .unwrap()
                .iter()
                .map(|t| t.topic_id)
                .collect();
            assert_eq!(owned, [id(11), id(12), id(99)], "v{v}");
            // The assignment, by the serving cluster's ids, comes back by the client's.
            let answer = ConsumerGroupHeartbeatResponse::default().with_assignment(Some(
                Assignment::default().with_topic_partitions(
                    [11, 12, 99]
                        .map(|i| {
                            Assigned::default()
                                .with_topic_id(id(i))
                                .with_partitions(vec![0])
                        })
                        .to_vec(),
                ),
            ));
            let got = back(ApiKey::ConsumerGroupHeartbeat, v, &answer, &[]);
            let assigned: Vec<_> = got
                .assignment
                .unwrap()
                .topic_partitions
                .iter()
                .map(|t| t.topic_id)
                .collect();
            assert_eq!(assigned, [id(1), id(2), id(99)], "v{v}");
            // A pattern (v1+) would be matched against eu's own names.
            if v == 0 {
                continue;
            }
            let request = ConsumerGroupHeartbeatRequest::default()
                .with_subscribed_topic_regex(Some(StrBytes::from_static_str("orders.*")));
            let frame =
                encode_request("t", 7, ApiKey::ConsumerGroupHeartbeat, v, &request).unwrap();
            let err = super::request(&frame, ApiKey::ConsumerGroupHeartbeat, v, ids()).unwrap_err();
            assert!(matches!(err, ViewError::Pattern { .. }), "v{v}: {err}");
        }
    }

    /// A member whose epoch came from the coordinator of the cluster that served before the
    /// switch, answered "not a consumer group" (the group is MM2's empty classic one here), is
    /// told its membership is unknown, so that it joins again; a member joining (epoch 0) gets
    /// the broker's answer as it is.
    #[test]
    fn a_member_from_another_clusters_coordinator_is_told_to_join_again() {
        for v in versions(ApiKey::ConsumerGroupHeartbeat) {
            let answer = ConsumerGroupHeartbeatResponse::default()
                .with_error_code(GROUP_ID_NOT_FOUND)
                .with_error_message(Some(StrBytes::from_static_str("not a consumer group")));
            let frame = response_frame(ApiKey::ConsumerGroupHeartbeat, v, &answer);
            for (epoch, code) in [(Some(2), UNKNOWN_MEMBER_ID), (Some(0), GROUP_ID_NOT_FOUND)] {
                let asked = Asked {
                    member_epoch: epoch,
                    ..Asked::default()
                };
                let out = super::response(
                    &frame,
                    ApiKey::ConsumerGroupHeartbeat,
                    v,
                    ids(),
                    &asked,
                    &mut Noticed::default(),
                )
                .unwrap();
                let got: ConsumerGroupHeartbeatResponse =
                    decode_body(&out, ApiKey::ConsumerGroupHeartbeat, v);
                assert_eq!(got.error_code, code, "v{v}, epoch {epoch:?}");
            }
            let request = ConsumerGroupHeartbeatRequest::default().with_member_epoch(5);
            assert_eq!(
                mapped(ApiKey::ConsumerGroupHeartbeat, v, &request).member_epoch,
                Some(5)
            );
        }
    }

    /// Clients see the local cluster's leader epochs, never the serving cluster's, and the
    /// epochs they send are not checked there.
    #[test]
    fn leader_epochs_are_the_local_cluster_s_in_every_version() {
        use kafka_protocol::messages::list_offsets_request::ListOffsetsPartition;
        use kafka_protocol::messages::list_offsets_response::ListOffsetsPartitionResponse;
        use kafka_protocol::messages::metadata_response::MetadataResponsePartition;
        use kafka_protocol::messages::offset_commit_request::OffsetCommitRequestPartition;
        use kafka_protocol::messages::offset_for_leader_epoch_request::OffsetForLeaderPartition;
        for v in versions(ApiKey::Metadata).filter(|v| *v >= 7) {
            let partition = |p| {
                MetadataResponsePartition::default()
                    .with_partition_index(p)
                    .with_leader_epoch(42)
            };
            let answer = MetadataResponse::default().with_topics(vec![
                MetadataResponseTopic::default()
                    .with_name(Some(name("us.orders")))
                    .with_partitions(vec![partition(0), partition(1)]),
            ]);
            let got = back(ApiKey::Metadata, v, &answer, &[]);
            let epochs: Vec<_> = got.topics[0]
                .partitions
                .iter()
                .map(|p| p.leader_epoch)
                .collect();
            assert_eq!(
                epochs,
                [7, NO_EPOCH],
                "v{v}: us's epoch for partition 0, none known for 1"
            );
        }
        for v in versions(ApiKey::Fetch).filter(|v| *v >= 9) {
            let mut p = FetchPartition::default().with_current_leader_epoch(7);
            if v >= 12 {
                p.last_fetched_epoch = 6;
            }
            let topic = match v >= FETCH_BY_ID {
                true => FetchTopic::default().with_topic_id(id(1)),
                false => FetchTopic::default().with_topic(name("orders")),
            };
            let request = FetchRequest::default().with_topics(vec![topic.with_partitions(vec![p])]);
            let sent: FetchRequest =
                decode_request(&mapped(ApiKey::Fetch, v, &request).frame, ApiKey::Fetch, v);
            let p = &sent.topics[0].partitions[0];
            assert_eq!(
                (p.current_leader_epoch, p.last_fetched_epoch),
                (NO_EPOCH, NO_EPOCH),
                "v{v}"
            );
        }
        for v in versions(ApiKey::ListOffsets).filter(|v| *v >= 4) {
            let request = ListOffsetsRequest::default().with_topics(vec![
                ListOffsetsTopic::default()
                    .with_name(name("orders"))
                    .with_partitions(vec![
                        ListOffsetsPartition::default().with_current_leader_epoch(7),
                    ]),
            ]);
            let sent: ListOffsetsRequest = decode_request(
                &mapped(ApiKey::ListOffsets, v, &request).frame,
                ApiKey::ListOffsets,
                v,
            );
            assert_eq!(
                sent.topics[0].partitions[0].current_leader_epoch, NO_EPOCH,
                "v{v}"
            );
            let answer = ListOffsetsResponse::default().with_topics(vec![
                ListOffsetsTopicResponse::default()
                    .with_name(name("us.orders"))
                    .with_partitions(vec![
                        ListOffsetsPartitionResponse::default().with_leader_epoch(42),
                    ]),
            ]);
            let got = back(ApiKey::ListOffsets, v, &answer, &[]);
            assert_eq!(got.topics[0].partitions[0].leader_epoch, NO_EPOCH, "v{v}");
        }
        for v in versions(ApiKey::OffsetForLeaderEpoch) {
            let request = OffsetForLeaderEpochRequest::default().with_topics(vec![
                OffsetForLeaderTopic::default()
                    .with_topic(name("orders"))
                    .with_partitions(vec![
                        OffsetForLeaderPartition::default().with_current_leader_epoch(7),
                    ]),
            ]);
            let frame = mapped(ApiKey::OffsetForLeaderEpoch, v, &request).frame;
            let sent: OffsetForLeaderEpochRequest =
                decode_request(&frame, ApiKey::OffsetForLeaderEpoch, v);
            assert_eq!(
                sent.topics[0].partitions[0].current_leader_epoch, NO_EPOCH,
                "v{v}"
            );
        }
        for v in versions(ApiKey::OffsetCommit).filter(|v| *v >= 6) {
            let request = OffsetCommitRequest::default().with_topics(vec![
                OffsetCommitRequestTopic::default()
                    .with_name(name("orders"))
                    .with_partitions(vec![
                        OffsetCommitRequestPartition::default().with_committed_leader_epoch(7),
                    ]),
            ]);
            let sent: OffsetCommitRequest = decode_request(
                &mapped(ApiKey::OffsetCommit, v, &request).frame,
                ApiKey::OffsetCommit,
                v,
            );
            assert_eq!(
                sent.topics[0].partitions[0].committed_leader_epoch, NO_EPOCH,
                "v{v}"
            );
        }
    }

    #[test]
    fn consumer_group_describe_in_every_version() {
        use kafka_protocol::messages::consumer_group_describe_response::{
            Assignment, DescribedGroup, Member, TopicPartitions,
        };
        for v in versions(ApiKey::ConsumerGroupDescribe) {
            let request = kafka_protocol::messages::ConsumerGroupDescribeRequest::default();
            let frame = encode_request("t", 7, ApiKey::ConsumerGroupDescribe, v, &request).unwrap();
            let m = request_mapped(&frame, ApiKey::ConsumerGroupDescribe, v).unwrap();
            assert_eq!(m.frame, frame, "the request names no topic");
            let assignment = |names: &[&'static str]| {
                Assignment::default().with_topic_partitions(
                    names
                        .iter()
                        .map(|&n| {
                            TopicPartitions::default()
                                .with_topic_name(name(n))
                                .with_topic_id(match n {
                                    "us.orders" => id(11),
                                    "orders" => id(12),
                                    _ => id(98),
                                })
                        })
                        .collect(),
                )
            };
            let member = Member::default()
                .with_subscribed_topic_names(vec![name("us.orders"), name("orders")])
                .with_assignment(assignment(&["us.orders", "__consumer_offsets"]))
                .with_target_assignment(assignment(&["orders"]));
            let answer = ConsumerGroupDescribeResponse::default()
                .with_groups(vec![DescribedGroup::default().with_members(vec![member])]);
            let got = back(ApiKey::ConsumerGroupDescribe, v, &answer, &[]);
            let member = &got.groups[0].members[0];
            assert_eq!(
                names(&member.subscribed_topic_names),
                ["orders", "eu.orders"],
                "v{v}"
            );
            assert_eq!(
                names(
                    member
                        .assignment
                        .topic_partitions
                        .iter()
                        .map(|t| &t.topic_name)
                ),
                ["orders"]
            );
            assert_eq!(
                names(
                    member
                        .target_assignment
                        .topic_partitions
                        .iter()
                        .map(|t| &t.topic_name)
                ),
                ["eu.orders"]
            );
            let ids_of = |a: &Assignment| {
                a.topic_partitions
                    .iter()
                    .map(|t| t.topic_id)
                    .collect::<Vec<_>>()
            };
            assert_eq!(ids_of(&member.assignment), [id(1)], "v{v}");
            assert_eq!(ids_of(&member.target_assignment), [id(2)], "v{v}");
        }
    }

    #[test]
    fn a_topic_without_a_counterpart_is_refused_where_it_cannot_be_answered_unknown() {
        let request = ListOffsetsRequest::default().with_topics(vec![
            ListOffsetsTopic::default().with_name(name("__consumer_offsets")),
        ]);
        let frame = encode_request("t", 7, ApiKey::ListOffsets, 5, &request).unwrap();
        let err = super::request(&frame, ApiKey::ListOffsets, 5, ids()).unwrap_err();
        assert!(
            err.to_string()
                .contains("\"__consumer_offsets\", which has no counterpart in eu's cluster"),
            "{err}"
        );
        // A broker naming a topic nobody asked for fails the response, never passes it on.
        let answer = ListOffsetsResponse::default().with_topics(vec![
            ListOffsetsTopicResponse::default().with_name(name("__consumer_offsets")),
        ]);
        let f = response_frame(ApiKey::ListOffsets, 5, &answer);
        assert!(
            super::response(
                &f,
                ApiKey::ListOffsets,
                5,
                ids(),
                &Asked::default(),
                &mut Noticed::default()
            )
            .is_err()
        );
    }

    #[test]
    fn only_apis_without_topic_names_or_mapped_ones_are_offered() {
        assert_eq!(offer(ApiKey::Fetch, 0, 17), Some((4, 17)));
        assert_eq!(offer(ApiKey::OffsetCommit, 2, 10), Some((2, 9)));
        assert_eq!(offer(ApiKey::JoinGroup, 0, 9), Some((0, 9)));
        assert_eq!(offer(ApiKey::SyncGroup, 0, 5), Some((0, 5)));
        assert_eq!(offer(ApiKey::DescribeGroups, 0, 6), Some((0, 6)));
        assert_eq!(offer(ApiKey::ConsumerGroupHeartbeat, 0, 1), Some((0, 1)));
        assert_eq!(offer(ApiKey::DescribeTopicPartitions, 0, 0), Some((0, 0)));
        for withheld in [
            ApiKey::CreateTopics,
            ApiKey::DeleteTopics,
            ApiKey::DeleteRecords,
            ApiKey::DescribeConfigs,
            ApiKey::TxnOffsetCommit,
            ApiKey::AddPartitionsToTxn,
            ApiKey::OffsetDelete,
        ] {
            assert_eq!(offer(withheld, 0, 5), None, "{withheld:?}");
            assert!(!admits(withheld, 0));
        }
    }

    #[test]
    fn init_producer_id_in_every_version() {
        use crate::policy::producer_ids::base;
        for v in versions(ApiKey::InitProducerId) {
            // From v3 a client may name its id, to have its epoch bumped.
            let request = InitProducerIdRequest::default()
                .with_producer_id(ProducerId(if v >= 3 { base("eu") + 41 } else { -1 }));
            let sent: InitProducerIdRequest = decode_request(
                &mapped(ApiKey::InitProducerId, v, &request).frame,
                ApiKey::InitProducerId,
                v,
            );
            assert_eq!(sent.producer_id.0, if v >= 3 { 41 } else { -1 }, "v{v}");
            let answer = InitProducerIdResponse::default().with_producer_id(ProducerId(42));
            let got = back(ApiKey::InitProducerId, v, &answer, &[]);
            assert_eq!(got.producer_id.0, base("eu") + 42, "v{v}");
        }
    }

    #[test]
    fn produce_batches_reach_the_serving_cluster_under_the_ids_it_knows() {
        use kafka_protocol::messages::ProduceRequest;
        use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
        use kafka_protocol::records::Compression;

        use crate::codec::records::Batch;
        use crate::policy::producer_ids::base;
        use crate::testkit;

        let batch = |producer_id: i64| {
            let record = kafka_protocol::records::Record {
                producer_id,
                producer_epoch: 0,
                ..testkit::record(Some(b"k"), Some(b"v"), &[])
            };
            testkit::batch(&[record.clone(), record], Compression::None)
        };
        let frame = |ids: &[i64]| {
            let partitions = ids.iter().enumerate().map(|(i, id)| {
                PartitionProduceData::default()
                    .with_index(i as i32)
                    .with_records(Some(batch(*id)))
            });
            let request = ProduceRequest::default()
                .with_acks(-1)
                .with_topic_data(vec![
                    TopicProduceData::default()
                        .with_name(name("orders"))
                        .with_partition_data(partitions.collect()),
                ]);
            encode_request("t", 7, ApiKey::Produce, 9, &request).unwrap()
        };
        // eu's own id back in its place, us's id in us's range, no id and ap's as they are.
        let sent =
            produce_request(frame(&[base("eu") + 5, 5, -1, base("ap") + 5]), 9, &view()).unwrap();
        let request: ProduceRequest = decode_request(&sent, ApiKey::Produce, 9);
        let ids: Vec<i64> = request.topic_data[0]
            .partition_data
            .iter()
            .map(|p| {
                let (batch, _) = Batch::parse(p.records.as_ref().unwrap()).unwrap();
                assert!(batch.verify_crc());
                batch.header.producer_id
            })
            .collect();
        assert_eq!(ids, [5, base("us") + 5, -1, base("ap") + 5]);
        // A batch whose CRC does not hold keeps its id (and its CRC), for the broker to refuse.
        let mut corrupt = frame(&[base("eu") + 5]).to_vec();
        // The last record's value, `v`: inside the bytes the CRC covers.
        let value = corrupt.iter().rposition(|b| *b == b'v').unwrap();
        corrupt[value] = b'w';
        let sent = produce_request(Bytes::from(corrupt.clone()), 9, &view()).unwrap();
        assert_eq!(&sent[..], &corrupt[..]);
        // Nothing to change: the very bytes that came.
        let untouched = frame(&[-1, base("ap") + 5]);
        let sent = produce_request(untouched.clone(), 9, &view()).unwrap();
        assert_eq!(sent.as_ptr(), untouched.as_ptr());
    }
}
