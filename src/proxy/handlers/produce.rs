//! Produce: the request is parsed, decided against one snapshot of the ownership table and
//! placed (`crate::policy::produce`); redirects the client may not make become refusals
//! (asking the broker about the client, `crate::proxy::identity`); the decisions are counted as
//! they will be carried out; and each partition's destination becomes a [`Route`]: the client's
//! connection, keyward's producer on another cluster, or keyward's own answer. What goes on the
//! wire for those routes (the forwarded request, the merged response) is
//! `crate::proxy::produce`'s. A produce forwarded whole has the KIP-951 node endpoints of its
//! response (v10+) advertised at keyward.

use std::collections::HashMap;

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, ProduceResponse};
use metrics::{Counter, counter};
use tracing::{info, warn};

use super::{CONN_LOG, Handling, Pending, Rewrite, Step};
use crate::codec::frame::{self, LENGTH_PREFIX, RequestHead};
use crate::codec::produce;
use crate::codec::records::Inflater;
use crate::codec::split::Part;
use crate::ownership::{OnForeign, RegionId};
use crate::policy::produce::{
    Action, Destination, HoldReason, INVALID_RECORD, Placement, ProducePlan, RejectKind, Split,
    SplitError, decide, first_audited_owner, split_batch,
};
use crate::proxy::Shared;
use crate::proxy::conn::{BrokerIo, ConnError, Guard};
use crate::proxy::identity::{self, Identity, Standing, Verdict};
use crate::proxy::produce::{ProduceReply, Route, forwarded_request};
use crate::proxy::rewrite::{Advertise, RewriteError, recode};
use crate::redirect::{Bookings, Redirector};
use crate::reload::Snapshot;

#[allow(clippy::too_many_arguments)]
pub(crate) async fn request(
    shared: &Shared,
    cluster: usize,
    frame: Bytes,
    head: RequestHead,
    inflater: &mut Inflater,
    meters: &mut DecisionMeters,
    guard: &mut Guard<'_>,
    io: &mut BrokerIo<'_>,
) -> Result<Step, ConnError> {
    let version = head.api_version;
    let header_version = ApiKey::Produce.request_header_version(version);
    let header_len =
        frame::request_header_len(&frame, header_version).map_err(ConnError::ClientRequest)?;
    let request = produce::parse(&frame[LENGTH_PREFIX + header_len..], version)?;
    // One snapshot decides the whole request, even if a reload lands meanwhile.
    let snapshot = shared.ownership.snapshot();
    let mut plan = decide(&request, &snapshot.table, snapshot.local, inflater);
    let clusters = guard.clusters_of(shared, &snapshot);
    let placement = Placement {
        clusters,
        connection: cluster,
        local_name: &shared.config.region,
        connection_name: &shared.clusters.get(cluster).name,
    };
    let mut destinations = plan.place(&request, &snapshot.table, &placement);
    // Only a request the broker takes whole is none of keyward's business; for anything else
    // (an answer of keyward's own, a redirect, an audit) keyward must know who is asking.
    let acts = !plan
        .partitions
        .iter()
        .all(|p| matches!(p.action, Action::Forward { audited: 0 }));
    let authorized = if acts && guard.identity.standing() == Standing::Anonymous {
        Authorized::Unauthenticated
    } else {
        authorize_redirects(
            shared,
            cluster,
            &request,
            &mut plan,
            &mut destinations,
            acts,
            guard,
            io,
        )
        .await?
    };
    if let Authorized::Unauthenticated = authorized {
        if shared.rejection_log.allow() {
            let who = guard.identity.who();
            warn!(
                target: CONN_LOG,
                client_id = who.client_id,
                "a Produce before the client authenticated; closing the connection, as the broker does"
            );
        }
        return Ok(Step::close("unauthenticated"));
    }
    let mut parts = if destinations
        .iter()
        .any(|d| matches!(d, Destination::Split(_)))
    {
        split_batches(&snapshot, &request, &mut plan, &mut destinations, inflater)
    } else {
        Vec::new()
    };
    record_decisions(
        shared,
        &snapshot,
        &request,
        &plan,
        meters,
        guard.identity,
        inflater,
    );

    // A stream first seen on this connection may have been another instance's (or this
    // process's before a restart): carried on from the stream journal before its batches are
    // numbered.
    // Only streams a redirect rule decides: no other producer waits for the journal.
    if shared.redirector.journals(cluster) {
        let rules = snapshot.table.rules();
        let redirects = |rule: Option<usize>| {
            rule.and_then(|i| rules.get(i))
                .is_some_and(|r| r.on_foreign == OnForeign::Redirect)
        };
        let mut decided = plan.partitions.iter();
        let new: Vec<_> = request
            .topics
            .iter()
            .flat_map(|t| t.partitions.iter().map(move |p| (t.name, p)))
            .filter_map(|(topic, p)| {
                let d = decided.next()?;
                if !redirects(d.rule) {
                    return None;
                }
                Redirector::stream_of(topic, p.index, p.records?)
                    .filter(|key| !guard.streams.contains(key))
            })
            .collect();
        if !new.is_empty() {
            if let Err(e) = shared.redirector.adopt(&new).await {
                warn!(target: CONN_LOG, error = format!("{e:#}"), "the stream journal cannot be read; closing the connection, for the producer to retry");
                return Ok(Step::close("journal_unavailable"));
            }
            guard.streams.extend(new);
        }
    }

    // Carry the routes out.
    let mut bookings = Bookings::default();
    let mut routes = Vec::with_capacity(destinations.len());
    let mut decided = plan.partitions.iter().zip(destinations).enumerate();
    for topic in &request.topics {
        for p in &topic.partitions {
            let Some((i, (d, destination))) = decided.next() else {
                break;
            };
            let route = match destination {
                Destination::Connection if d.action.is_forward() => Route::Upstream(
                    p.records
                        .and_then(|r| shared.redirector.local_batch(topic.name, p.index, r)),
                ),
                // A redirect to the cluster this connection writes to (reads failed over to
                // the owner's cluster) goes as the client sent it.
                Destination::Connection => Route::Upstream(None),
                Destination::Answer(answer) => Route::Answer(answer),
                Destination::Split(targets) => {
                    let built = parts.get_mut(i).and_then(Option::take).unwrap_or_default();
                    let records = p.records.unwrap_or_default();
                    carry_out_split(
                        shared,
                        &mut bookings,
                        &snapshot,
                        (topic.name, p.index),
                        records,
                        &targets,
                        built,
                        &request,
                        guard.identity,
                    )
                    .await
                }
                Destination::Cluster(target) => {
                    if shared.rejection_log.allow() {
                        let who = guard.identity.who();
                        let owner = d.owner.map_or("-", |o| snapshot.table.region_name(o));
                        info!(
                            target: CONN_LOG,
                            rule = d
                                .rule
                                .and_then(|i| snapshot.table.rules().get(i))
                                .map_or("-", |r| r.name.as_str()),
                            owner,
                            client_id = who.client_id,
                            user = who.user,
                            records = d.records,
                            "redirecting a batch of topic {:?} partition {} to region {owner}'s cluster",
                            topic.name,
                            p.index
                        );
                    }
                    Route::Redirect(
                        shared
                            .redirector
                            .redirect(
                                &mut bookings,
                                target,
                                topic.name,
                                p.index,
                                frame.slice_ref(p.records.unwrap_or_default()),
                                request.acks,
                                request.timeout_ms,
                            )
                            .await,
                    )
                }
            };
            routes.push(route);
        }
    }
    let mut durable = match shared.redirector.carry_out(cluster, bookings).await {
        Ok(durable) => durable,
        Err(e) => {
            warn!(target: CONN_LOG, error = format!("{e:#}"), "the stream journal refused a save; closing the connection before anything that depends on it is sent");
            return Ok(Step::close("journal_unavailable"));
        }
    };

    let acks0 = request.acks == 0;
    let untouched = routes.iter().all(Route::is_untouched);
    // Nothing to hold an acknowledgement back on (no answer is owed, or keyward adds none of
    // its own): the save is waited for here instead.
    if (acks0 || untouched)
        && let Some(save) = durable.take()
        && let Err(e) = save.await
    {
        warn!(target: CONN_LOG, error = format!("{e:#}"), "the stream journal refused a save; closing the connection");
        return Ok(Step::close("journal_unavailable"));
    }
    let any_upstream = routes.iter().any(Route::is_upstream);
    let answered = routes.iter().any(|r| matches!(r, Route::Answer(_)));
    let path = if untouched {
        "forwarded"
    } else if !any_upstream {
        "answered"
    } else {
        "partial"
    };
    counter!("keyward_produce_requests_total", "path" => path).increment(1);
    if untouched {
        let slot = (!acks0).then_some(Pending::Broker(
            head.correlation_id,
            Handling::Rewrite(Rewrite::Produce(version)),
        ));
        return Ok(Step {
            upstream: Some(frame),
            slot,
        });
    }

    let upstream = if any_upstream {
        Some(forwarded_request(
            &frame, header_len, version, &request, &routes,
        )?)
    } else {
        None
    };
    let reply = ProduceReply::new(version, &request, routes, snapshot.short_hash()).after(durable);
    let slot = if acks0 {
        if answered {
            counter!("keyward_acks0_rejections_total").increment(1);
            warn!(
                target: CONN_LOG,
                "refused part of an acks=0 produce; closing the connection as a broker does, so the producer notices"
            );
            Some(Pending::Close("acks0_rejected"))
        } else {
            None
        }
    } else if upstream.is_some() {
        Some(Pending::Broker(
            head.correlation_id,
            Handling::ProduceMerge(reply),
        ))
    } else {
        Some(Pending::Reply(head.correlation_id, reply))
    };
    Ok(Step { upstream, slot })
}

/// Sends a split batch's parts on: the local part (part 0) is numbered first, so the local
/// cluster sees the client producer's records without a gap, then every other part goes to its
/// owner's cluster through keyward's producer.
#[allow(clippy::too_many_arguments)]
async fn carry_out_split(
    shared: &Shared,
    bookings: &mut Bookings,
    snapshot: &Snapshot,
    (topic, partition): (&str, i32),
    client_batch: &[u8],
    targets: &[(RegionId, usize)],
    parts: Vec<Part>,
    request: &produce::ProduceView<'_>,
    identity: &Identity,
) -> Route {
    let local_records = parts
        .iter()
        .find(|part| part.part == 0)
        .map_or(0, |part| part.records);
    let mut upstream = None;
    let mut redirected = Vec::with_capacity(targets.len());
    if local_records == 0 {
        // No local part: its numbering still counts the records that went elsewhere.
        shared
            .redirector
            .local_part(bookings, topic, partition, client_batch, Bytes::new(), 0);
    }
    if shared.rejection_log.allow() {
        let who = identity.who();
        let elsewhere: Vec<String> = parts
            .iter()
            .filter(|part| part.part > 0)
            .filter_map(|part| {
                let (owner, _) = targets.get(part.part - 1)?;
                Some(format!(
                    "{} to region {}",
                    part.records,
                    snapshot.table.region_name(*owner)
                ))
            })
            .collect();
        info!(
            target: CONN_LOG,
            client_id = who.client_id,
            user = who.user,
            "splitting a batch of topic {topic:?} partition {partition}: {local_records} records stay, {}",
            elsewhere.join(", ")
        );
    }
    for part in parts {
        if part.part == 0 {
            upstream = Some(shared.redirector.local_part(
                bookings,
                topic,
                partition,
                client_batch,
                part.batch,
                part.records as i32,
            ));
            continue;
        }
        let Some(&(_, cluster)) = targets.get(part.part - 1) else {
            continue;
        };
        redirected.push(
            shared
                .redirector
                .redirect_part(
                    bookings,
                    cluster,
                    topic,
                    partition,
                    part.batch,
                    request.acks,
                    request.timeout_ms,
                )
                .await,
        );
    }
    Route::Split {
        upstream,
        redirected,
    }
}

/// Turns every redirect the client may not make into a refusal, as the broker of the cluster
/// it connects to would refuse the write; and, for a client whose authentication is not yet
/// proven, proves it first (the broker answers keyward's question only for an authenticated
/// client, and closes the connection otherwise).
#[allow(clippy::too_many_arguments)]
async fn authorize_redirects(
    shared: &Shared,
    cluster: usize,
    request: &produce::ProduceView<'_>,
    plan: &mut ProducePlan,
    destinations: &mut [Destination],
    acts: bool,
    guard: &mut Guard<'_>,
    io: &mut BrokerIo<'_>,
) -> Result<Authorized, ConnError> {
    let unproven = acts && guard.identity.standing() == Standing::Unproven;
    let redirects = destinations.iter().any(redirects_through_keyward);
    if !unproven && !redirects {
        // Nothing to ask: the common case costs no allocation here.
        return Ok(Authorized::Checked);
    }
    // The topic of each partition, in request order.
    let topics: Vec<&str> = request
        .topics
        .iter()
        .flat_map(|t| t.partitions.iter().map(|_| t.name))
        .collect();
    // Topics with a partition going through keyward's producer to another cluster.
    let mut redirected: Vec<&str> = Vec::new();
    for (topic, destination) in topics.iter().zip(destinations.iter()) {
        if redirects_through_keyward(destination) && !redirected.contains(topic) {
            redirected.push(topic);
        }
    }
    let ask: Vec<&str> = if guard.identity.broker_sees_client() {
        redirected
            .iter()
            .copied()
            .filter(|t| guard.authorizations.get(t).is_none())
            .collect()
    } else {
        Vec::new()
    };
    let mut fresh: Vec<(&str, Verdict)> = Vec::new();
    if !ask.is_empty() || unproven {
        guard.next_id = guard.next_id.wrapping_add(1);
        let id = guard.next_id;
        let question = identity::authorization_request(id, &ask)
            .map_err(|e| ConnError::Authorization(format!("{e:#}")))?;
        let answer = io.ask(id, question).await?;
        let answer = identity::answer(&answer, &ask)
            .map_err(|e| ConnError::Authorization(format!("{e:#}")))?;
        if !answer.served {
            // The broker would not serve keyward's question: the client's SASL exchange is not
            // over. The broker closes the connection; keyward does the same, having done
            // nothing for the client.
            return Ok(Authorized::Unauthenticated);
        }
        guard.identity.confirm();
        for (topic, verdict) in ask.iter().zip(answer.verdicts) {
            guard
                .authorizations
                .insert((*topic).to_owned(), verdict.clone());
            fresh.push((topic, verdict));
        }
    }
    if redirected.is_empty() {
        return Ok(Authorized::Checked);
    }
    let verdict_for = |topic: &str| -> Verdict {
        if !guard.identity.broker_sees_client() {
            return Verdict::Denied(
                identity::TOPIC_AUTHORIZATION_FAILED,
                format!(
                    "the cluster this client connects to does not authenticate clients and sees keyward's own certificate (clusters.{}.tls.cert), so it cannot say whether this client may write; keyward redirects nothing for it",
                    shared.clusters.get(cluster).name
                ),
            );
        }
        // What was just asked, or what is remembered; nothing is redirected unchecked.
        fresh
            .iter()
            .find(|(t, _)| *t == topic)
            .map(|(_, v)| v.clone())
            .or_else(|| guard.authorizations.get(topic).cloned())
            .unwrap_or_else(|| {
                Verdict::Denied(
                    identity::TOPIC_AUTHORIZATION_FAILED,
                    "keyward could not check whether this client may write it".into(),
                )
            })
    };
    for (i, topic) in topics.iter().enumerate() {
        if !redirects_through_keyward(&destinations[i]) {
            continue;
        }
        if let Verdict::Denied(code, message) = verdict_for(topic) {
            let kind = if code == identity::TOPIC_AUTHORIZATION_FAILED {
                RejectKind::NotAuthorized
            } else {
                RejectKind::UnverifiedTopic
            };
            destinations[i] = plan.refuse(i, kind, code, message);
        }
    }
    Ok(Authorized::Checked)
}

/// Whether a destination writes through keyward's own producer (which the client must be
/// allowed to make it do).
fn redirects_through_keyward(destination: &Destination) -> bool {
    matches!(destination, Destination::Cluster(_) | Destination::Split(_))
}

/// Splits every batch placed [`Destination::Split`] into its parts, in request order (`None`
/// for every other partition). A batch that cannot be split now (decompression memory in use)
/// is held, one that cannot be split at all is refused, before anything is counted.
fn split_batches(
    snapshot: &Snapshot,
    request: &produce::ProduceView<'_>,
    plan: &mut ProducePlan,
    destinations: &mut [Destination],
    inflater: &mut Inflater,
) -> Vec<Option<Vec<Part>>> {
    let mut split = Vec::with_capacity(destinations.len());
    let partitions = request
        .topics
        .iter()
        .flat_map(|t| t.partitions.iter().map(move |p| (t.name, p)));
    for (i, (topic, p)) in partitions.enumerate() {
        let (Some(Destination::Split(_)), Some(decision)) =
            (destinations.get(i), plan.partitions.get(i))
        else {
            split.push(None);
            continue;
        };
        let Action::Split { foreign, .. } = &decision.action else {
            split.push(None);
            continue;
        };
        let result = split_batch(
            &snapshot.table,
            decision.rule.unwrap_or(usize::MAX),
            snapshot.local,
            topic,
            p.index,
            p.records.unwrap_or_default(),
            foreign,
            inflater,
        );
        let failure = match result {
            Ok(Split::Parts(parts)) => {
                split.push(Some(parts));
                continue;
            }
            Ok(Split::Whole { .. }) => SplitError::PartOutOfRange { part: 0, parts: 0 },
            Err(e) => e,
        };
        let message = format!(
            "keyward could not split the record batch for {topic}-{} between regions: {failure}",
            p.index
        );
        destinations[i] = if failure.is_retriable() {
            plan.hold(i, HoldReason::MemoryBudget, message)
        } else {
            plan.refuse(i, RejectKind::Unredirectable, INVALID_RECORD, message)
        };
        split.push(None);
    }
    split
}

/// The outcome of [`authorize_redirects`].
enum Authorized {
    /// Every redirect the client may not make is a refusal now.
    Checked,
    /// The client turned out not to be authenticated.
    Unauthenticated,
}

/// Per-connection cache of the decision counters, so deciding a partition increments two
/// atomics instead of building label strings and looking counters up in the registry. Emptied
/// when the table changes (rule numbers may mean other rules then).
#[derive(Default)]
pub(crate) struct DecisionMeters {
    table_version: u64,
    handles: HashMap<DecisionLabels, (Counter, Counter)>,
}

type DecisionLabels = (Option<usize>, Option<RegionId>, &'static str, &'static str);

fn record_decisions(
    shared: &Shared,
    snapshot: &Snapshot,
    request: &produce::ProduceView<'_>,
    plan: &ProducePlan,
    meters: &mut DecisionMeters,
    identity: &Identity,
    inflater: &mut Inflater,
) {
    let table = &snapshot.table;
    if meters.table_version != snapshot.version {
        meters.handles.clear();
        meters.table_version = snapshot.version;
    }
    // The topic, partition and records of each decision, in request order, for the log.
    let mut written = request.topics.iter().flat_map(|t| {
        t.partitions
            .iter()
            .map(move |p| (t.name, p.index, p.records))
    });
    for p in &plan.partitions {
        let (topic, partition, records) = written.next().unwrap_or(("-", -1, None));
        let rule_name = || {
            p.rule
                .and_then(|i| table.rules().get(i))
                .map_or("-", |r| r.name.as_str())
        };
        let mut count = |owner: Option<RegionId>, decision, reason, batches: u32, records: u32| {
            let (b, r) = meters
                .handles
                .entry((p.rule, owner, decision, reason))
                .or_insert_with(|| {
                    let labels = [
                        ("rule", rule_name().to_owned()),
                        (
                            "owner",
                            owner.map_or("-", |o| table.region_name(o)).to_owned(),
                        ),
                        ("decision", decision.to_owned()),
                        ("reason", reason.to_owned()),
                    ];
                    (
                        counter!("keyward_produce_batches_total", &labels),
                        counter!("keyward_produce_records_total", &labels),
                    )
                });
            b.increment(u64::from(batches));
            r.increment(u64::from(records));
        };
        let (decision, reason) = match &p.action {
            Action::Forward { audited } if *audited > 0 => ("audited", "-"),
            Action::Forward { .. } => ("forwarded", "-"),
            Action::Reject { kind, .. } => ("rejected", kind.as_str()),
            Action::Hold { reason, .. } => ("held", reason.as_str()),
            Action::Redirect { .. } => ("redirected", "-"),
            Action::Split { local, foreign } => {
                // Each part is a batch of its own on the wire: counted where it goes.
                if *local > 0 {
                    count(p.owner, "forwarded", "split", 1, *local);
                }
                for &(owner, records) in foreign {
                    count(Some(owner), "redirected", "split", 1, records);
                }
                continue;
            }
        };
        count(p.owner, decision, reason, p.batches, p.records);
        if let Action::Forward { audited } = p.action
            && audited > 0
            && let Some(suppressed) = shared.audit_log.allow_counting()
        {
            let owner = p.rule.and_then(|rule| {
                first_audited_owner(
                    table,
                    rule,
                    snapshot.local,
                    topic,
                    partition,
                    records.unwrap_or_default(),
                    inflater,
                )
            });
            let who = identity.who();
            info!(
                target: CONN_LOG,
                rule = rule_name(),
                owner = owner.map_or("-", |o| table.region_name(o)),
                decision,
                client_id = who.client_id,
                user = who.user,
                topic,
                partition,
                records = audited,
                suppressed,
                "audited: {audited} of {} records owned by another region written to the local cluster",
                p.records
            );
        }
        let owner_name = || p.owner.map_or("-", |o| table.region_name(o));
        if let Action::Reject { message, .. } | Action::Hold { message, .. } = &p.action
            && shared.rejection_log.allow()
        {
            let who = identity.who();
            info!(
                target: CONN_LOG,
                rule = rule_name(),
                owner = owner_name(),
                decision,
                reason,
                client_id = who.client_id,
                user = who.user,
                topic,
                partition,
                "{message}"
            );
        }
    }
}

/// First Produce version whose responses may carry node endpoints (KIP-951).
const FIRST_PRODUCE_NODE_ENDPOINTS: i16 = 10;

/// The broker's response to a produce keyward forwarded whole.
pub fn response(frame: &Bytes, version: i16, to: &dyn Advertise) -> Result<Bytes, RewriteError> {
    if version < FIRST_PRODUCE_NODE_ENDPOINTS {
        return Ok(frame.clone());
    }
    recode(
        frame,
        ApiKey::Produce,
        version,
        |r: &mut ProduceResponse| endpoints(r, to),
    )
}

/// Rewrites the KIP-951 node endpoints a Produce response (v10+) may carry.
pub fn endpoints(r: &mut ProduceResponse, to: &dyn Advertise) -> Result<(), RewriteError> {
    for e in &mut r.node_endpoints {
        (e.node_id.0, e.host, e.port) = to.advertise(e.node_id.0, &e.host, e.port)?;
    }
    if to.renumbers() {
        for p in r
            .responses
            .iter_mut()
            .flat_map(|t| t.partition_responses.iter_mut())
        {
            p.current_leader.leader_id.0 = to.node_id(p.current_leader.leader_id.0)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::rewrite::testing::To;
    use kafka_protocol::messages::BrokerId;
    use kafka_protocol::protocol::StrBytes;

    #[test]
    fn produce_endpoints_are_rewritten() {
        use kafka_protocol::messages::produce_response::NodeEndpoint as ProduceEndpoint;
        let mut r = ProduceResponse::default().with_node_endpoints(vec![
            ProduceEndpoint::default()
                .with_node_id(BrokerId(2))
                .with_host(StrBytes::from_static_str("10.0.0.2"))
                .with_port(9092),
        ]);
        endpoints(&mut r, &To).unwrap();
        assert_eq!(
            (r.node_endpoints[0].host.as_str(), r.node_endpoints[0].port),
            ("proxy", 9002)
        );
    }
}
