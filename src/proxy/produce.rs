//! Turns the decision for a Produce request into bytes on the wire: the request forwarded to the
//! broker (the original frame when nothing changes, or a new one holding only the partitions that
//! go there), and the response the client gets (the broker's, keyward's own, the results of
//! redirected writes, or all of them merged in the order the client asked).

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::produce_response::{
    BatchIndexAndErrorMessage, PartitionProduceResponse, TopicProduceResponse,
};
use kafka_protocol::messages::{ApiKey, ProduceRequest, ProduceResponse, TopicName};
use kafka_protocol::protocol::{Encodable, StrBytes};
use metrics::histogram;

use super::handlers;
use super::rewrite::{self, Advertise, RewriteError};
use crate::codec::errors::UNKNOWN_SERVER_ERROR;
use crate::codec::frame::{self, LENGTH_PREFIX};
use crate::codec::produce::ProduceView;
use crate::redirect::Durable;
use crate::redirect::sequences::Outcome;

/// First Produce version whose responses carry `record_errors` and `error_message` (KIP-467).
const FIRST_RECORD_ERRORS: i16 = 8;

pub use crate::policy::produce::LocalAnswer;

/// Where one partition of a Produce request goes.
pub enum Route {
    /// To the broker this connection relays to; with a replacement batch when its sequence
    /// numbers had to be renumbered.
    Upstream(Option<Bytes>),
    /// Answered by keyward.
    Answer(LocalAnswer),
    /// Produced to another region's cluster; the result arrives here.
    Redirect(Outcome),
    /// Split between clusters: the local part (if the batch had local records) to the broker
    /// this connection relays to, and the others' outcomes. Answered as one batch.
    Split {
        upstream: Option<Bytes>,
        redirected: Vec<Outcome>,
    },
}

impl Route {
    pub fn is_upstream(&self) -> bool {
        matches!(
            self,
            Route::Upstream(_)
                | Route::Split {
                    upstream: Some(_),
                    ..
                }
        )
    }

    /// Upstream with the client's own bytes.
    pub fn is_untouched(&self) -> bool {
        matches!(self, Route::Upstream(None))
    }
}

enum Answer {
    Broker,
    Local(LocalAnswer),
    Redirected(Outcome),
    /// A split batch: the broker's answer for its local part (if it had one) and the
    /// outcomes of the others.
    Split {
        broker: bool,
        redirected: Vec<Outcome>,
    },
}

/// The shape of the client's request, remembered until its response is assembled: every topic
/// and partition in request order, with where its answer comes from.
pub struct ProduceReply {
    version: i16,
    topics: Vec<(StrBytes, Vec<(i32, Answer)>)>,
    /// The stream journal's save of what the request changed: the client is answered only
    /// once it landed ([`crate::redirect::Redirector::carry_out`]).
    durable: Option<Durable>,
}

impl ProduceReply {
    /// `routes` are in request order (topic by topic). `table_hash` (a prefix of the table's
    /// content hash) is appended to keyward's messages, so a refused producer can tell which
    /// table refused it.
    pub fn new(
        version: i16,
        request: &ProduceView<'_>,
        routes: Vec<Route>,
        table_hash: &str,
    ) -> Self {
        let tagged = |m: &str| format!("{m} [ownership table {table_hash}]");
        let mut routes = routes.into_iter();
        let topics = request
            .topics
            .iter()
            .map(|t| {
                let partitions = t
                    .partitions
                    .iter()
                    .map(|p| {
                        let answer = match routes.next() {
                            Some(Route::Answer(a)) => Answer::Local(LocalAnswer {
                                error_code: a.error_code,
                                message: tagged(&a.message),
                                record_errors: a
                                    .record_errors
                                    .iter()
                                    .map(|(i, m)| (*i, tagged(m)))
                                    .collect(),
                            }),
                            Some(Route::Redirect(o)) => Answer::Redirected(o),
                            Some(Route::Split {
                                upstream,
                                redirected,
                            }) => Answer::Split {
                                broker: upstream.is_some(),
                                redirected,
                            },
                            Some(Route::Upstream(_)) | None => Answer::Broker,
                        };
                        (p.index, answer)
                    })
                    .collect();
                (StrBytes::from_string(t.name.to_owned()), partitions)
            })
            .collect();
        Self {
            version,
            topics,
            durable: None,
        }
    }

    /// The answer waits for `durable` too.
    pub fn after(mut self, durable: Option<Durable>) -> Self {
        self.durable = durable;
        self
    }

    /// Waits until what the request changed is in the stream journal; an error means the
    /// client must not be answered. The redirected parts' answers are waited for first, so
    /// `keyward_journal_answer_wait_seconds` is what the journal adds to the answer.
    pub async fn durable(&mut self) -> anyhow::Result<()> {
        let Some(durable) = self.durable.take() else {
            return Ok(());
        };
        for (_, partitions) in &self.topics {
            for (_, answer) in partitions {
                match answer {
                    Answer::Redirected(outcome) => {
                        outcome_of(outcome).await;
                    }
                    Answer::Split { redirected, .. } => {
                        for outcome in redirected {
                            outcome_of(outcome).await;
                        }
                    }
                    Answer::Broker | Answer::Local(_) => {}
                }
            }
        }
        let answered = Instant::now();
        let saved = durable.await;
        histogram!("keyward_journal_answer_wait_seconds").record(answered.elapsed());
        saved
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

    /// A redirected write's answer, with only the fields every version has: offsets and the
    /// error.
    fn redirected_partition(
        &self,
        index: i32,
        result: &PartitionProduceResponse,
    ) -> PartitionProduceResponse {
        let mut p = PartitionProduceResponse::default()
            .with_index(index)
            .with_error_code(result.error_code)
            .with_base_offset(result.base_offset)
            .with_log_append_time_ms(result.log_append_time_ms)
            .with_log_start_offset(result.log_start_offset);
        if self.version >= FIRST_RECORD_ERRORS && result.error_code != 0 {
            p = p.with_error_message(result.error_message.clone());
        }
        p
    }

    /// A split batch's one answer: success only when every part landed, with the offsets of
    /// the local part (the part the client's connection wrote), or of the first redirected
    /// part when the batch had no local records. Otherwise the first failure (the local
    /// part's first), which the client retries; a retry writes no part that landed twice.
    fn split_partition(
        &self,
        index: i32,
        local: Option<PartitionProduceResponse>,
        redirected: Vec<PartitionProduceResponse>,
    ) -> PartitionProduceResponse {
        if let Some(local) = &local
            && local.error_code != 0
        {
            return local.clone();
        }
        if let Some(failed) = redirected.iter().find(|r| r.error_code != 0) {
            return self.redirected_partition(index, failed);
        }
        match (local, redirected.first()) {
            (Some(local), _) => local,
            (None, Some(first)) => self.redirected_partition(index, first),
            (None, None) => self.local_partition(
                index,
                &LocalAnswer {
                    error_code: UNKNOWN_SERVER_ERROR,
                    message: "a split batch had no part".to_owned(),
                    record_errors: Vec::new(),
                },
            ),
        }
    }

    /// The full response in request order, taking forwarded partitions from `broker` and
    /// redirected ones from their outcomes (waiting for them).
    async fn assemble(&self, mut broker: ProduceResponse) -> ProduceResponse {
        let mut from_broker: HashMap<(StrBytes, i32), PartitionProduceResponse> = HashMap::new();
        for topic in broker.responses.drain(..) {
            for p in topic.partition_responses {
                from_broker.insert((topic.name.0.clone(), p.index), p);
            }
        }
        let missing = LocalAnswer {
            error_code: UNKNOWN_SERVER_ERROR,
            message: "the broker's response left this partition out".to_owned(),
            record_errors: Vec::new(),
        };
        let mut responses = Vec::with_capacity(self.topics.len());
        for (name, partitions) in &self.topics {
            let mut partition_responses = Vec::with_capacity(partitions.len());
            for (index, answer) in partitions {
                let p = match answer {
                    Answer::Local(a) => self.local_partition(*index, a),
                    Answer::Broker => from_broker
                        .remove(&(name.clone(), *index))
                        .unwrap_or_else(|| self.local_partition(*index, &missing)),
                    Answer::Redirected(outcome) => {
                        let result = outcome_of(outcome).await;
                        self.redirected_partition(*index, &result)
                    }
                    Answer::Split { broker, redirected } => {
                        let local = broker.then(|| {
                            from_broker
                                .remove(&(name.clone(), *index))
                                .unwrap_or_else(|| self.local_partition(*index, &missing))
                        });
                        let mut parts = Vec::with_capacity(redirected.len());
                        for outcome in redirected {
                            parts.push(outcome_of(outcome).await);
                        }
                        self.split_partition(*index, local, parts)
                    }
                };
                partition_responses.push(p);
            }
            responses.push(
                TopicProduceResponse::default()
                    .with_name(TopicName(name.clone()))
                    .with_partition_responses(partition_responses),
            );
        }
        broker.responses = responses;
        broker
    }

    fn encode(
        &self,
        correlation_id: i32,
        response: &ProduceResponse,
    ) -> Result<Bytes, RewriteError> {
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

    /// The broker's response to the forwarded partitions, decoded and with its addresses
    /// rewritten; pass it to [`Self::respond`].
    pub fn broker_response(
        &self,
        frame: &Bytes,
        to: &dyn Advertise,
    ) -> Result<(i32, ProduceResponse), RewriteError> {
        let mut response: ProduceResponse = rewrite::decode(frame, ApiKey::Produce, self.version)?;
        handlers::produce::endpoints(&mut response, to)?;
        Ok((frame::response_correlation_id(frame)?, response))
    }

    /// The client's response: `broker`'s answers for the forwarded partitions (an empty
    /// response when none was forwarded) merged with keyward's and the redirected writes'.
    pub async fn respond(
        &self,
        correlation_id: i32,
        broker: ProduceResponse,
    ) -> Result<Bytes, RewriteError> {
        let response = self.assemble(broker).await;
        self.encode(correlation_id, &response)
    }
}

/// A redirected write's outcome, waiting for it.
async fn outcome_of(outcome: &Outcome) -> PartitionProduceResponse {
    let mut outcome = outcome.clone();
    match outcome.wait_for(Option::is_some).await {
        Ok(r) => r.clone().unwrap_or_default(),
        Err(_) => PartitionProduceResponse::default().with_error_code(UNKNOWN_SERVER_ERROR),
    }
}

/// A new request holding only the partitions routed upstream, with their replacement batches.
/// This is the one path that copies record batches (once, into the new frame); a request that
/// needs no change is forwarded as its original bytes.
pub fn forwarded_request(
    frame: &Bytes,
    header_len: usize,
    version: i16,
    request: &ProduceView<'_>,
    routes: &[Route],
) -> Result<Bytes, RewriteError> {
    let mut routes = routes.iter();
    let mut topic_data = Vec::new();
    for t in &request.topics {
        let mut partition_data = Vec::new();
        for p in &t.partitions {
            let records = match routes.next() {
                Some(Route::Upstream(Some(replacement))) => Some(replacement.clone()),
                Some(Route::Upstream(None)) => p.records.map(|r| frame.slice_ref(r)),
                Some(Route::Split {
                    upstream: Some(part),
                    ..
                }) => Some(part.clone()),
                _ => continue,
            };
            partition_data.push(
                PartitionProduceData::default()
                    .with_index(p.index)
                    .with_records(records),
            );
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
