//! Turns a [`ProducePlan`] into bytes on the wire: the request forwarded to the broker (the
//! original frame when nothing changes, or a copy holding only the forwarded partitions), and
//! the response the client gets (the broker's, keyward's own, or the two merged in the order the
//! client asked).

use std::collections::HashMap;

use bytes::Bytes;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::produce_response::{
    BatchIndexAndErrorMessage, PartitionProduceResponse, TopicProduceResponse,
};
use kafka_protocol::messages::{ApiKey, ProduceRequest, ProduceResponse, TopicName};
use kafka_protocol::protocol::{Encodable, StrBytes};

use super::rewrite::{self, Advertise, RewriteError};
use crate::codec::frame::{self, LENGTH_PREFIX};
use crate::codec::produce::ProduceView;
use crate::policy::produce::{Action, ProducePlan};

/// First Produce version whose responses carry `record_errors` and `error_message` (KIP-467).
const FIRST_RECORD_ERRORS: i16 = 8;
/// Kafka's UNKNOWN_SERVER_ERROR, for a partition the broker left out of its answer.
const UNKNOWN_SERVER_ERROR: i16 = -1;

/// keyward's own answer for one partition.
#[derive(Debug, Clone)]
pub struct LocalAnswer {
    pub error_code: i16,
    pub message: String,
    pub record_errors: Vec<(i32, String)>,
}

/// The shape of the client's request, remembered until its response is assembled: every
/// topic and partition in request order, with keyward's answer for those it did not forward.
#[derive(Debug, Clone)]
pub struct ProduceReply {
    pub version: i16,
    pub topics: Vec<(StrBytes, Vec<PartitionSlot>)>,
}

/// A partition of the request: its index, and keyward's answer if it was not forwarded.
pub type PartitionSlot = (i32, Option<LocalAnswer>);

impl ProduceReply {
    /// `table_hash` (a prefix of the table's content hash) is appended to every message, so a
    /// refused producer can tell which table refused it.
    pub fn new(
        version: i16,
        request: &ProduceView<'_>,
        plan: &ProducePlan,
        table_hash: &str,
    ) -> Self {
        let tagged = |m: &str| format!("{m} [ownership table {table_hash}]");
        let mut actions = plan.partitions.iter();
        let topics = request
            .topics
            .iter()
            .map(|t| {
                let partitions = t
                    .partitions
                    .iter()
                    .map(|p| {
                        let answer = match actions.next().map(|d| &d.action) {
                            Some(Action::Reject {
                                error_code,
                                message,
                                record_errors,
                                ..
                            }) => Some(LocalAnswer {
                                error_code: *error_code,
                                message: tagged(message),
                                record_errors: record_errors
                                    .iter()
                                    .map(|(i, m)| (*i, tagged(m)))
                                    .collect(),
                            }),
                            Some(Action::Hold { message, .. }) => Some(LocalAnswer {
                                error_code: crate::policy::produce::NOT_ENOUGH_REPLICAS,
                                message: tagged(message),
                                record_errors: Vec::new(),
                            }),
                            _ => None,
                        };
                        (p.index, answer)
                    })
                    .collect();
                (StrBytes::from_string(t.name.to_owned()), partitions)
            })
            .collect();
        Self { version, topics }
    }

    fn local_partition(&self, index: i32, answer: &LocalAnswer) -> PartitionProduceResponse {
        let mut p = PartitionProduceResponse::default()
            .with_index(index)
            .with_error_code(answer.error_code)
            .with_base_offset(-1);
        if self.version >= FIRST_RECORD_ERRORS {
            p = p
                .with_error_message(Some(StrBytes::from_string(answer.message.clone())))
                .with_record_errors(
                    answer
                        .record_errors
                        .iter()
                        .map(|(i, m)| {
                            BatchIndexAndErrorMessage::default()
                                .with_batch_index(*i)
                                .with_batch_index_error_message(Some(StrBytes::from_string(
                                    m.clone(),
                                )))
                        })
                        .collect(),
                );
        }
        p
    }

    /// The full response in request order, taking forwarded partitions from `broker`.
    fn assemble(&self, mut broker: ProduceResponse) -> ProduceResponse {
        let mut from_broker: HashMap<(StrBytes, i32), PartitionProduceResponse> = HashMap::new();
        for topic in broker.responses.drain(..) {
            for p in topic.partition_responses {
                from_broker.insert((topic.name.0.clone(), p.index), p);
            }
        }
        let responses = self
            .topics
            .iter()
            .map(|(name, partitions)| {
                let partition_responses = partitions
                    .iter()
                    .map(|(index, answer)| match answer {
                        Some(answer) => self.local_partition(*index, answer),
                        None => from_broker
                            .remove(&(name.clone(), *index))
                            .unwrap_or_else(|| {
                                self.local_partition(
                                    *index,
                                    &LocalAnswer {
                                        error_code: UNKNOWN_SERVER_ERROR,
                                        message: "the broker's response left this partition out"
                                            .to_owned(),
                                        record_errors: Vec::new(),
                                    },
                                )
                            }),
                    })
                    .collect();
                TopicProduceResponse::default()
                    .with_name(TopicName(name.clone()))
                    .with_partition_responses(partition_responses)
            })
            .collect();
        broker.responses = responses;
        broker
    }

    /// keyward's whole answer when no partition was forwarded.
    pub fn local_response(&self, correlation_id: i32) -> Result<Bytes, RewriteError> {
        let response = self.assemble(ProduceResponse::default());
        let mut header = correlation_id.to_be_bytes().to_vec();
        if ApiKey::Produce.response_header_version(self.version) >= 1 {
            header.push(0); // no tagged fields
        }
        let mut body = Vec::new();
        response
            .encode(&mut body, self.version)
            .map_err(|source| RewriteError::Encode {
                api: ApiKey::Produce,
                version: self.version,
                source,
            })?;
        Ok(frame::assemble(&header, &body))
    }

    /// The broker's answer for the forwarded partitions merged with keyward's for the rest.
    pub fn merge(&self, frame: &Bytes, to: &dyn Advertise) -> Result<Bytes, RewriteError> {
        rewrite::recode(
            frame,
            ApiKey::Produce,
            self.version,
            |r: &mut ProduceResponse| {
                rewrite::produce_endpoints(r, to)?;
                *r = self.assemble(std::mem::take(r));
                Ok(())
            },
        )
    }
}

/// A new request holding only the partitions the plan forwards. This is the one path that
/// copies record batches (once, into the new frame); requests that need no change are forwarded
/// as their original bytes.
pub fn forwarded_request(
    frame: &Bytes,
    header_len: usize,
    version: i16,
    request: &ProduceView<'_>,
    plan: &ProducePlan,
) -> Result<Bytes, RewriteError> {
    let mut decisions = plan.partitions.iter();
    let mut topic_data = Vec::new();
    for t in &request.topics {
        let mut partition_data = Vec::new();
        for p in &t.partitions {
            let forward = decisions.next().is_some_and(|d| d.action.is_forward());
            if forward {
                partition_data.push(
                    PartitionProduceData::default()
                        .with_index(p.index)
                        .with_records(p.records.map(|r| frame.slice_ref(r))),
                );
            }
        }
        if !partition_data.is_empty() {
            topic_data.push(
                TopicProduceData::default()
                    .with_name(TopicName(StrBytes::from_string(t.name.to_owned())))
                    .with_partition_data(partition_data),
            );
        }
    }
    let forwarded = ProduceRequest::default()
        .with_transactional_id(
            request
                .transactional_id
                .and_then(|id| std::str::from_utf8(id).ok())
                .map(|id| StrBytes::from_string(id.to_owned()).into()),
        )
        .with_acks(request.acks)
        .with_timeout_ms(request.timeout_ms)
        .with_topic_data(topic_data);
    let mut body = Vec::new();
    forwarded
        .encode(&mut body, version)
        .map_err(|source| RewriteError::Encode {
            api: ApiKey::Produce,
            version,
            source,
        })?;
    Ok(frame::assemble(
        &frame[LENGTH_PREFIX..LENGTH_PREFIX + header_len],
        &body,
    ))
}
