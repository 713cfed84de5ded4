//! One client connection: read requests, dispatch them, forward, and answer in request order.
//!
//! Two halves run side by side. The request half reads client frames, hands each one to its
//! API's handler (`super::handlers`; most APIs have none and are forwarded as their original
//! bytes), carries out the `Step` the handler returns, and for each request that is owed a
//! response pushes a [`Slot`] onto a bounded queue. The response half takes slots in order: a
//! slot that waits on the broker reads the broker's next response (brokers answer one connection
//! in request order), has it rewritten by its handler if needed, and writes it to the client; a
//! slot keyward answered itself is written as is. So responses leave in request order whether
//! the broker or keyward produced them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::ApiKey;

use metrics::counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::handlers::{
    self, Handling, Pending, Rewrite, Step, Viewed, api_versions, client_sasl, handling, produce,
};
use super::identity::{self, Authorizations, Identity, Requirement};
use super::produce::ProduceReply;
use super::rewrite::RewriteError;
use super::stream::{ReadHalf, Stream, WriteHalf};
use super::versions::{self, Admission};
use super::view::ViewError;
use super::{Advertiser, Shared};
use crate::codec::frame::{self, FrameError, FrameReader, LENGTH_PREFIX, RequestHead};
use crate::codec::produce::ProduceParseError;
use crate::codec::records::Inflater;
use crate::codec::wire::WireError;
use crate::config::ClientAuth;
use crate::policy::region_view::RegionView;
use crate::reload::Snapshot;

/// Which real broker a client connection is relayed to.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// The bootstrap listener: any broker of the serving cluster.
    Bootstrap,
    /// A virtual broker port: that node of that cluster (by index, see `brokers::Clusters`).
    Node(usize, i32),
}

/// When a request arrived and when it went to the broker, for the latency histograms.
#[derive(Clone, Copy)]
struct Timing {
    api_key: i16,
    received: Instant,
    sent: Instant,
}

/// What the response half does for one request.
enum Slot {
    /// Read the broker's next response, handle it as `Handling` says, pass it on.
    Broker {
        correlation_id: i32,
        handling: Handling,
        timing: Timing,
    },
    /// keyward answers this Produce itself (refusals, redirected writes), once every part of
    /// the answer is known.
    Reply(i32, ProduceReply, Timing),
    /// keyward's own answer to a request that is not Produce, ready to write (an ApiVersions
    /// request at a version keyward does not decode).
    Answer(Bytes, Timing),
    /// Close the client connection once everything before this is written, for the cause given
    /// (an acks=0 produce keyward refused: no response is owed, so closing is how the client
    /// learns; a Produce before the client authenticated, or a request at a version keyward
    /// does not offer, as a broker closes on either).
    Close(&'static str),
    /// keyward's own request on the client's connection (the authorization question): the
    /// broker's answer goes to keyward, not to the client.
    Internal {
        correlation_id: i32,
        answer: oneshot::Sender<Bytes>,
    },
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("client sent a malformed frame: {0}")]
    ClientFrame(#[from] FrameError),
    #[error("client sent a malformed request: {0}")]
    ClientRequest(WireError),
    #[error("client sent a malformed produce request: {0}")]
    Produce(#[from] ProduceParseError),
    #[error("broker sent a malformed frame: {0}")]
    BrokerFrame(FrameError),
    #[error("broker answered correlation id {got}, expected {expected}")]
    CorrelationMismatch { expected: i32, got: i32 },
    #[error("broker closed the connection")]
    BrokerClosed,
    #[error("rewriting a response: {0}")]
    Rewrite(#[from] RewriteError),
    #[error("asking the broker whether the client may write: {0}")]
    Authorization(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl ConnError {
    /// Bounded label for the protocol-error metric.
    fn kind(&self) -> &'static str {
        match self {
            ConnError::ClientFrame(_) => "client_frame",
            ConnError::ClientRequest(_) => "client_request",
            ConnError::Produce(_) => "client_produce",
            ConnError::BrokerFrame(_) => "broker_frame",
            ConnError::CorrelationMismatch { .. } => "broker_correlation",
            ConnError::BrokerClosed => "broker_closed",
            ConnError::Rewrite(_) => "rewrite",
            ConnError::Authorization(_) => "authorization",
            ConnError::Io(_) => "io",
        }
    }
}

/// Serves one client connection until either side closes or something is malformed; only this
/// connection is affected either way. `serving` is the cluster that served when the client
/// connected (the accept loop closes the connection when that changes). Returns why it ended (a
/// bounded metric label).
pub async fn serve(
    shared: Arc<Shared>,
    client: Stream,
    target: Target,
    serving: usize,
) -> &'static str {
    let cluster = match target {
        Target::Bootstrap => serving,
        Target::Node(cluster, _) => cluster,
    };
    if cluster != serving {
        // A port of a cluster that is not serving: the client holds stale metadata. Closing
        // sends it back to the bootstrap, which leads to the serving cluster.
        debug!("connection to a broker of a cluster that is not serving; closing");
        return "not_serving_cluster";
    }
    let state = shared.clusters.get(cluster);
    let dialer = &shared.dialers[cluster];
    let upstream = match target {
        Target::Bootstrap => dialer.connect_any(&state.bootstrap).await,
        Target::Node(_, id) => match state.real(id) {
            Some(b) => dialer.connect(&b.addr()).await,
            None => Err(anyhow::anyhow!(
                "node {id} is not a known broker of cluster {}",
                state.name
            )),
        },
    };
    let upstream = match upstream {
        Ok(u) => {
            counter!("keyward_upstream_connections_opened_total", "cluster" => state.name.clone())
                .increment(1);
            u
        }
        Err(e) => {
            if let Some(suppressed) = shared.unreachable_log.allow_counting() {
                warn!(
                    error = format!("{e:#}"),
                    suppressed, "cannot reach the broker; closing the client connection"
                );
            }
            counter!("keyward_upstream_connect_errors_total", "cluster" => state.name.clone())
                .increment(1);
            return "upstream_unreachable";
        }
    };
    match relay(&shared, cluster, client, upstream).await {
        Ok(cause) => {
            debug!(cause, "connection closed");
            cause
        }
        Err(ConnError::Io(e)) => {
            debug!(error = %e, "connection closed");
            "io_error"
        }
        Err(ConnError::BrokerClosed) => {
            debug!("the broker closed the connection");
            "broker_closed"
        }
        Err(e) => {
            counter!("keyward_protocol_errors_total", "kind" => e.kind()).increment(1);
            warn!(error = %e, "closing the connection");
            "protocol_error"
        }
    }
}

async fn relay(
    shared: &Arc<Shared>,
    cluster: usize,
    client: Stream,
    upstream: Stream,
) -> Result<&'static str, ConnError> {
    let peer = client.peer_ip();
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let (slots_tx, slots_rx) = mpsc::channel(shared.config.limits.max_in_flight);
    let activity = Activity::default();
    let identity = Identity::new(requirement(shared, cluster), peer);
    let requests = requests(
        shared,
        cluster,
        client_read,
        upstream_write,
        slots_tx,
        &activity,
        &identity,
    );
    let responses = responses(
        shared,
        cluster,
        upstream_read,
        client_write,
        slots_rx,
        &activity,
        &identity,
    );
    tokio::pin!(requests, responses);
    tokio::select! {
        r = &mut requests => match r {
            // Stop reading, but answer what is in flight: the request half has dropped its end
            // of the queue, so the response half ends once it has drained it.
            Ok("shutdown") => responses.await.map(|_| "shutdown"),
            other => other,
        },
        r = &mut responses => r,
    }
}

/// What cluster `cluster`'s listener asks of clients (see `clusters.<region>.client_auth`).
fn requirement(shared: &Shared, cluster: usize) -> Requirement {
    let name = &shared.clusters.get(cluster).name;
    match shared.config.clusters.get(name) {
        Some(c) if c.client_auth() == ClientAuth::None => Requirement::None {
            broker_sees_keyward: c.presents_certificate(),
        },
        // A cluster keyward cannot find in its config is treated as the strictest.
        _ => Requirement::Sasl,
    }
}

/// What the idle timeout looks at besides requests: responses still owed, and when the last one
/// was written. Shared by the two halves of one connection. On tokio's clock, like the timeout
/// it qualifies (so a test with paused time sees one clock).
struct Activity {
    started: tokio::time::Instant,
    owed: AtomicUsize,
    /// Milliseconds after `started` of the last response written.
    answered_at: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            started: tokio::time::Instant::now(),
            owed: AtomicUsize::new(0),
            answered_at: AtomicU64::new(0),
        }
    }
}

impl Activity {
    fn asked(&self) {
        self.owed.fetch_add(1, Ordering::Relaxed);
    }

    fn answered(&self) {
        let at = self.started.elapsed().as_millis() as u64;
        self.answered_at.store(at, Ordering::Relaxed);
        self.owed.fetch_sub(1, Ordering::Relaxed);
    }

    /// How long since the last response, or `None` while a response is owed.
    fn quiet_for(&self) -> Option<Duration> {
        if self.owed.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let at = Duration::from_millis(self.answered_at.load(Ordering::Relaxed));
        Some(self.started.elapsed().saturating_sub(at))
    }
}

async fn read_frame<R: AsyncRead + Unpin>(
    reader: &FrameReader,
    io: &mut R,
    buf: &mut BytesMut,
) -> Result<Option<Bytes>, std::io::Result<FrameError>> {
    loop {
        match reader.next_frame(buf) {
            Ok(Some(f)) => return Ok(Some(f)),
            Ok(None) => {}
            Err(e) => return Err(Ok(e)),
        }
        match io.read_buf(buf).await {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(Err(e)),
        }
    }
}

async fn requests(
    shared: &Shared,
    cluster: usize,
    mut client: ReadHalf,
    mut upstream: WriteHalf,
    slots: mpsc::Sender<Slot>,
    activity: &Activity,
    identity: &Identity,
) -> Result<&'static str, ConnError> {
    let reader = FrameReader::new(shared.config.limits.max_frame_bytes);
    let mut buf = BytesMut::with_capacity(READ_BUFFER);
    let mut inflater = Inflater::with_budget(
        shared.config.limits.max_decompressed_bytes,
        shared.decompression_budget.clone(),
    );
    let mut meters = produce::DecisionMeters::default();
    let mut guard = Guard {
        identity,
        authorizations: Authorizations::new(Duration::from_millis(
            shared.config.limits.authorization_ttl_ms,
        )),
        next_id: i32::MIN,
        named: false,
        clusters: (0, Vec::new()),
        streams: std::collections::HashSet::new(),
    };
    let idle = Duration::from_secs(shared.config.limits.idle_timeout_secs);
    let view = shared.view(cluster);
    let stop = shared.shutdown_token();
    let mut wait = idle;
    loop {
        let read = tokio::select! {
            read = tokio::time::timeout(wait, read_frame(&reader, &mut client, &mut buf)) => read,
            () = stop.cancelled() => return Ok("shutdown"),
        };
        wait = idle;
        let frame = match read {
            // Idle means nothing asked, nothing owed and nothing answered for the whole idle
            // timeout: a client waiting on a long fetch or a slow broker is not idle. (A read
            // cut short here loses no byte: read_buf is cancel-safe and a partial frame stays
            // in `buf`.)
            Err(_) => match activity.quiet_for() {
                None => continue,
                Some(quiet) if quiet < idle => {
                    wait = idle - quiet;
                    continue;
                }
                Some(_) => return Ok("idle"),
            },
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => return Ok("client_closed"),
            Ok(Err(Ok(e))) => return Err(ConnError::ClientFrame(e)),
            Ok(Err(Err(e))) => return Err(ConnError::Io(e)),
        };
        let received = Instant::now();
        shared.meters.bytes_received.increment(frame.len() as u64);
        let head = RequestHead::parse(&frame).map_err(ConnError::ClientRequest)?;
        shared.meters.api(head.api_key).requests.increment(1);
        if !guard.named
            && let Some(id) = identity::client_id(&frame, 1)
        {
            identity.set_client_id(id);
            guard.named = true;
        }
        let mut admission = versions::admit(head.api_key, head.api_version);
        if let (Some(_), Admission::Forward, Ok(key)) =
            (view, admission, ApiKey::try_from(head.api_key))
            && !super::view::admits(key, head.api_version)
        {
            admission = Admission::Refuse;
        }
        let step = match (admission, ApiKey::try_from(head.api_key)) {
            (Admission::Forward, Ok(ApiKey::Produce)) => {
                let mut io = BrokerIo {
                    upstream: &mut upstream,
                    slots: &slots,
                };
                let mut step = produce::request(
                    shared,
                    cluster,
                    frame,
                    head,
                    &mut inflater,
                    &mut meters,
                    &mut guard,
                    &mut io,
                )
                .await?;
                // The serving cluster sees producer ids as it issued them (`policy::producer_ids`).
                if let Some(view) = view
                    && let Some(bytes) = step.upstream.take()
                {
                    step.upstream =
                        Some(super::view::produce_request(bytes, head.api_version, view)?);
                }
                step
            }
            (Admission::Forward, Ok(ApiKey::SaslHandshake)) => {
                client_sasl::handshake(frame, head, identity)
            }
            (Admission::Forward, Ok(ApiKey::SaslAuthenticate)) => {
                client_sasl::authenticate(frame, head, identity)
            }
            (Admission::Forward, Ok(key)) => match view {
                Some(_) => viewed(shared, identity, cluster, frame, head, key),
                None if let Some(step) = held_in_failback(shared, identity, &frame, head, key) => {
                    step
                }
                None => {
                    // Not while the cluster that served is down: the answer would only wait.
                    let carried = (key == ApiKey::OffsetFetch)
                        .then(|| shared.failback.current())
                        .flatten()
                        .filter(|w| shared.clusters.get(w.from).is_up())
                        .and_then(|w| super::failback::ask(w, &frame, head.api_version));
                    let handling = match carried {
                        Some(asked) => Handling::CarryHome(Box::new(asked)),
                        // Members come back from C's coordinator (`handlers::group_heartbeat`).
                        None if key == ApiKey::ConsumerGroupHeartbeat
                            && shared.failback.current().is_some() =>
                        {
                            Handling::Rewrite(Rewrite::GroupHeartbeat(
                                head.api_version,
                                handlers::group_heartbeat::member_epoch(&frame, head.api_version),
                            ))
                        }
                        None => handling(key, head.api_version),
                    };
                    Step::forward(frame, head.correlation_id, handling)
                }
            },
            // `admit` refuses every API key this build cannot name, so only versions keyward
            // does not offer come here.
            (refused, _) => api_versions::unsupported(refused, identity.peer, &frame, head),
        };
        if let Some(Pending::Close(cause)) = step.slot {
            // Whatever part was forwarded goes out first; then the response half flushes what
            // is owed and closes, and this half reads no further request.
            if let Some(bytes) = &step.upstream {
                upstream.write_all(bytes).await?;
                upstream.flush().await?;
            }
            let _ = slots.send(Slot::Close(cause)).await;
            std::future::pending::<()>().await;
        }
        if let Some(bytes) = &step.upstream {
            upstream.write_all(bytes).await?;
            upstream.flush().await?;
        }
        let timing = Timing {
            api_key: head.api_key,
            received,
            sent: Instant::now(),
        };
        // A full queue stops keyward reading from this client: the backpressure that bounds a
        // pipelining client's memory here.
        let slot = match step.slot {
            Some(Pending::Broker(correlation_id, handling)) => Slot::Broker {
                correlation_id,
                handling,
                timing,
            },
            Some(Pending::Reply(correlation_id, reply)) => {
                Slot::Reply(correlation_id, reply, timing)
            }
            Some(Pending::Answer(bytes)) => Slot::Answer(bytes, timing),
            Some(Pending::Close(_)) | None => continue,
        };
        activity.asked();
        if slots.send(slot).await.is_err() {
            return Ok("client_closed");
        }
    }
}

/// keyward's own answer, on a local connection in a failback window, to a consumer kept open
/// across the switch (`super::failback`): its offset validations are held for a while, and its
/// KIP-848 membership from the other cluster's coordinator is fenced at its first heartbeat,
/// its commits refused until then.
/// `None` for every other request.
fn held_in_failback(
    shared: &Shared,
    identity: &Identity,
    frame: &Bytes,
    head: RequestHead,
    key: ApiKey,
) -> Option<Step> {
    if !matches!(
        key,
        ApiKey::OffsetForLeaderEpoch | ApiKey::ConsumerGroupHeartbeat | ApiKey::OffsetCommit
    ) {
        return None;
    }
    let window = shared.failback.current()?;
    let answer = match key {
        ApiKey::OffsetForLeaderEpoch if window.holds_validations() => {
            super::failback::held_validation_answer(frame, head.api_version, head.correlation_id)
                .map(|(answer, held)| {
                    counter!("keyward_failback_validations_held_total").increment(held as u64);
                    answer
                })
        }
        ApiKey::OffsetCommit => super::failback::refused_commit_answer(
            &window,
            frame,
            head.api_version,
            head.correlation_id,
        )?
        .map(|(answer, refused)| {
            counter!("keyward_failback_commits_refused_total").increment(refused as u64);
            answer
        }),
        ApiKey::ConsumerGroupHeartbeat => {
            let (member, epoch) = handlers::group_heartbeat::member(frame, head.api_version)?;
            if !window.fence(member, epoch) {
                return None;
            }
            counter!("keyward_failback_members_fenced_total").increment(1);
            info!(
                peer = ?identity.peer,
                member,
                epoch,
                "a KIP-848 member from the other cluster's coordinator is fenced here: it joins again, from its committed position carried home"
            );
            handlers::group_heartbeat::fenced_answer(head.api_version, head.correlation_id)
        }
        _ => return None,
    };
    Some(answered(identity, key, answer))
}

/// keyward's own answer to a request, or, where the request would not decode, the connection
/// closed.
fn answered(identity: &Identity, key: ApiKey, answer: anyhow::Result<Bytes>) -> Step {
    match answer {
        Ok(answer) => Step::answer(answer),
        Err(e) => {
            debug!(peer = ?identity.peer, error = %e, ?key, "malformed request keyward answers itself; closing");
            Step::close("malformed_request")
        }
    }
}

/// A request on a connection served by another region's cluster: its topic names mapped to
/// that cluster's (`super::view`), and the response's mapped back.
fn viewed(
    shared: &Shared,
    identity: &Identity,
    cluster: usize,
    frame: Bytes,
    head: RequestHead,
    key: ApiKey,
) -> Step {
    let inner = handlers::rewrite(key, head.api_version);
    if key == ApiKey::ConsumerGroupHeartbeat
        && let Some((member, epoch)) = handlers::group_heartbeat::member(&frame, head.api_version)
        && shared.failback.in_view.fence(member, epoch)
    {
        counter!("keyward_view_members_fenced_total", "serving" => shared.clusters.get(cluster).name.clone())
            .increment(1);
        info!(
            peer = ?identity.peer,
            member,
            epoch,
            "a KIP-848 member from the other cluster's coordinator is fenced through the view: it joins again, from its committed position translated"
        );
        let answer =
            handlers::group_heartbeat::fenced_answer(head.api_version, head.correlation_id);
        return answered(identity, key, answer);
    }
    let ids = shared.view_ids(cluster).expect("a connection with a view");
    let view = ids.view;
    match super::view::request(&frame, key, head.api_version, ids) {
        Ok(None) => Step::forward(frame, head.correlation_id, Handling::Rewrite(inner)),
        Ok(Some(mapped)) => {
            for topic in &mapped.unknown {
                if shared.view_log.allow() {
                    warn!(
                        peer = ?identity.peer,
                        topic = %topic,
                        serving = view.serving(),
                        "a client asked for a topic with no counterpart in the serving cluster; answered unknown"
                    );
                }
            }
            if !mapped.ask {
                let answer = super::view::unknown_topics_answer(
                    head.api_version,
                    head.correlation_id,
                    &mapped.unknown,
                );
                return answered(identity, key, answer);
            }
            let handling = Handling::Rewrite(Rewrite::View(Box::new(Viewed {
                inner,
                key,
                version: head.api_version,
                unknown: mapped.unknown,
                member_epoch: mapped.member_epoch,
                group: mapped.group,
            })));
            Step::forward(mapped.frame, head.correlation_id, handling)
        }
        Err(ViewError::Unmapped {
            api,
            topic,
            serving,
        }) => {
            if shared.view_log.allow() {
                warn!(
                    peer = ?identity.peer,
                    ?api,
                    topic,
                    serving,
                    "a client named a topic with no counterpart in the serving cluster; closing"
                );
            }
            Step::close("unmapped_topic")
        }
        Err(e @ ViewError::Pattern { .. }) => {
            if shared.view_log.allow() {
                warn!(peer = ?identity.peer, "{e}; closing");
            }
            Step::close("unmapped_topic")
        }
        Err(e) => {
            debug!(peer = ?identity.peer, error = %e, "malformed request in a region view; closing");
            Step::close("malformed_request")
        }
    }
}

/// A produce request's changes to redirect streams did not reach the stream journal: its
/// client is not answered, and the connection closes, so the client sends it again.
fn unsaved(error: &anyhow::Error) -> &'static str {
    warn!(
        error = format!("{error:#}"),
        "the stream journal refused a save; closing the connection unanswered, for the producer to retry"
    );
    "journal_unavailable"
}

/// What the request half knows of the client it serves, and keyward's own questions to the
/// broker about it.
pub(crate) struct Guard<'a> {
    pub(crate) identity: &'a Identity,
    pub(crate) authorizations: Authorizations,
    /// Correlation ids of keyward's own requests on this connection (the broker answers in
    /// order, so they need not differ from the client's; they are negative for readability).
    pub(crate) next_id: i32,
    /// The client id is known (the first request that carries one names it).
    named: bool,
    /// The cluster of each region of the table in force (by region id), and that table's
    /// version: worked out again only when the table changes.
    clusters: (u64, Vec<Option<usize>>),
    /// Idempotent streams this connection has had batches of, brought up to date with the
    /// stream journal when first seen here (`Redirector::adopt`).
    pub(crate) streams: std::collections::HashSet<crate::redirect::sequences::StreamKey>,
}

impl Guard<'_> {
    pub(crate) fn clusters_of(&mut self, shared: &Shared, snapshot: &Snapshot) -> &[Option<usize>] {
        if self.clusters.0 != snapshot.version || self.clusters.1.is_empty() {
            self.clusters = (
                snapshot.version,
                snapshot
                    .table
                    .regions()
                    .iter()
                    .map(|name| shared.clusters.index_of(name))
                    .collect(),
            );
        }
        &self.clusters.1
    }
}

/// The request half's way to the broker, for keyward's own requests between the client's.
pub(crate) struct BrokerIo<'a> {
    upstream: &'a mut WriteHalf,
    slots: &'a mpsc::Sender<Slot>,
}

/// How long keyward waits for the broker to answer its own question on a client's connection;
/// requests the client sent before are answered first.
const QUESTION_TIMEOUT: Duration = Duration::from_secs(30);

impl BrokerIo<'_> {
    /// Sends keyward's own request on the client's connection and waits for the answer,
    /// which the response half takes out of the stream in its turn.
    pub(crate) async fn ask(
        &mut self,
        correlation_id: i32,
        request: Bytes,
    ) -> Result<Bytes, ConnError> {
        self.upstream.write_all(&request).await?;
        self.upstream.flush().await?;
        let (answer, answered) = oneshot::channel();
        self.slots
            .send(Slot::Internal {
                correlation_id,
                answer,
            })
            .await
            .map_err(|_| ConnError::BrokerClosed)?;
        match tokio::time::timeout(QUESTION_TIMEOUT, answered).await {
            Ok(Ok(frame)) => Ok(frame),
            // The response half ended: the broker closed the connection (as a broker does
            // when a client sends an ordinary request before it has authenticated).
            Ok(Err(_)) => Err(ConnError::BrokerClosed),
            Err(_) => Err(ConnError::Authorization(format!(
                "no answer within {QUESTION_TIMEOUT:?}"
            ))),
        }
    }
}

async fn responses(
    shared: &Arc<Shared>,
    cluster: usize,
    mut upstream: ReadHalf,
    mut client: WriteHalf,
    mut slots: mpsc::Receiver<Slot>,
    activity: &Activity,
    identity: &Identity,
) -> Result<&'static str, ConnError> {
    let reader = FrameReader::new(shared.config.limits.max_frame_bytes);
    let mut buf = BytesMut::with_capacity(READ_BUFFER);
    while let Some(slot) = slots.recv().await {
        let (out, timing, broker_wait, handled) = match slot {
            Slot::Reply(correlation_id, mut reply, timing) => {
                if let Err(e) = reply.durable().await {
                    return Ok(unsaved(&e));
                }
                let out = reply.respond(correlation_id, Default::default()).await?;
                (out, timing, None, Instant::now())
            }
            Slot::Answer(out, timing) => (out, timing, None, Instant::now()),
            Slot::Close(cause) => {
                client.shutdown().await?;
                return Ok(cause);
            }
            Slot::Internal {
                correlation_id,
                answer,
            } => {
                let frame = next_response(&reader, &mut upstream, &mut buf, correlation_id).await?;
                // The request half may have given up waiting; then nobody needs the answer.
                let _ = answer.send(frame);
                continue;
            }
            Slot::Broker {
                correlation_id,
                handling: Handling::Rewrite(rewrite),
                timing,
            } if streams(shared, cluster, &rewrite) => {
                let (sent, arrived) = stream_response(
                    &reader,
                    &mut upstream,
                    &mut client,
                    &mut buf,
                    correlation_id,
                )
                .await?;
                let meters = shared.meters.api(timing.api_key);
                meters
                    .broker_seconds
                    .record((arrived - timing.sent).as_secs_f64());
                meters
                    .proxy_seconds
                    .record((timing.sent - timing.received).as_secs_f64());
                shared.meters.bytes_sent.increment(sent as u64);
                shared.meters.served(cluster, sent);
                activity.answered();
                continue;
            }
            Slot::Broker {
                correlation_id,
                handling,
                timing,
            } => {
                let frame = next_response(&reader, &mut upstream, &mut buf, correlation_id).await?;
                let arrived = Instant::now();
                if let Handling::Rewrite(Rewrite::SaslAuthenticate(v)) = handling {
                    client_sasl::answered(&frame, v, identity);
                }
                if let Handling::Rewrite(Rewrite::SaslHandshake(v)) = handling
                    && client_sasl::handshake_answered(shared, cluster, &frame, v)
                {
                    return Ok("client_auth_mismatch");
                }
                // Brokers a response names for the first time get their ports before the
                // client hears of them.
                let to = shared.advertiser(cluster);
                let out = match handling {
                    Handling::ProduceMerge(mut reply) => {
                        if let Err(e) = reply.durable().await {
                            return Ok(unsaved(&e));
                        }
                        let (correlation_id, broker) = reply.broker_response(&frame, &to)?;
                        to.ready().await;
                        reply.respond(correlation_id, broker).await?
                    }
                    Handling::Rewrite(rewrite) => {
                        let out = respond(shared, cluster, rewrite, frame, &to)?;
                        to.ready().await;
                        out
                    }
                    Handling::CarryHome(asked) => super::failback::respond(*asked, frame).await,
                };
                (out, timing, Some(arrived - timing.sent), arrived)
            }
        };
        client.write_all(&out).await?;
        client.flush().await?;
        let meters = shared.meters.api(timing.api_key);
        let done = Instant::now();
        match broker_wait {
            Some(wait) => {
                // The broker's response (rewritten or merged with keyward's answers): served
                // by this connection's cluster. keyward's own answers are not.
                shared.meters.served(cluster, out.len());
                meters.broker_seconds.record(wait.as_secs_f64());
                let proxy = (timing.sent - timing.received) + (done - handled);
                meters.proxy_seconds.record(proxy.as_secs_f64());
            }
            None => meters
                .proxy_seconds
                .record((done - timing.received).as_secs_f64()),
        }
        shared.meters.bytes_sent.increment(out.len() as u64);
        activity.answered();
    }
    Ok("client_closed")
}

/// The broker's next response, read whole, after checking that it answers `correlation_id`.
async fn next_response(
    reader: &FrameReader,
    upstream: &mut ReadHalf,
    buf: &mut BytesMut,
    correlation_id: i32,
) -> Result<Bytes, ConnError> {
    let frame = match read_frame(reader, upstream, buf).await {
        Ok(Some(f)) => f,
        Ok(None) => return Err(ConnError::BrokerClosed),
        Err(Ok(e)) => return Err(ConnError::BrokerFrame(e)),
        Err(Err(e)) => return Err(ConnError::Io(e)),
    };
    let got = frame::response_correlation_id(&frame)
        .map_err(|e| ConnError::BrokerFrame(FrameError::Header(e)))?;
    if got != correlation_id {
        return Err(ConnError::CorrelationMismatch {
            expected: correlation_id,
            got,
        });
    }
    Ok(frame)
}

/// Whether a response passes through untouched whatever it holds, so it can be relayed as it
/// arrives instead of being read whole first: everything keyward does not rewrite, and Fetch
/// responses too old to carry node endpoints while node ids are not renumbered. (Fetch v16+
/// may end with node endpoints, which change the length, so those are read whole.)
fn streams(shared: &Shared, cluster: usize, rewrite: &Rewrite) -> bool {
    match rewrite {
        Rewrite::Passthrough => true,
        Rewrite::Fetch(v) => {
            *v < handlers::fetch::NODE_ENDPOINTS && shared.clusters.get(cluster).node_offset == 0
        }
        _ => false,
    }
}

/// Bytes read from the broker per step of a relayed response: what bounds a connection's
/// memory however large the response.
const RELAY_CHUNK: usize = 256 * 1024;

/// The capacity each of a connection's two read buffers starts with. A frame that does not fit
/// grows its buffer as it arrives (`FrameReader`, [`RELAY_CHUNK`]), so this only has to hold
/// the small requests and responses most connections exchange: with 10,000 connections, every
/// KiB here is 20 MiB of address space, and the allocator keeps the pages a closed connection's
/// buffers touched for the next ones (`dev/bench --connections`, docs/performance.md).
const READ_BUFFER: usize = 8 * 1024;

/// Relays the broker's next response to the client as it arrives, after checking its length
/// and correlation id. Returns the bytes relayed and when the response started to arrive.
async fn stream_response(
    reader: &FrameReader,
    upstream: &mut ReadHalf,
    client: &mut WriteHalf,
    buf: &mut BytesMut,
    correlation_id: i32,
) -> Result<(usize, Instant), ConnError> {
    const HEAD: usize = LENGTH_PREFIX + 4;
    while buf.len() < HEAD {
        // Only the head until the length is known: a small response must not take a chunk.
        buf.reserve(HEAD - buf.len());
        if upstream.read_buf(buf).await? == 0 {
            return Err(ConnError::BrokerClosed);
        }
    }
    let arrived = Instant::now();
    let total = reader
        .frame_len(buf)
        .map_err(ConnError::BrokerFrame)?
        .expect("the prefix is buffered");
    if total < HEAD {
        return Err(ConnError::BrokerFrame(FrameError::Header(
            WireError::Truncated {
                needed: HEAD,
                at: 0,
            },
        )));
    }
    let got = frame::response_correlation_id(buf)
        .map_err(|e| ConnError::BrokerFrame(FrameError::Header(e)))?;
    if got != correlation_id {
        return Err(ConnError::CorrelationMismatch {
            expected: correlation_id,
            got,
        });
    }
    let mut left = total;
    while left > 0 {
        if buf.is_empty() {
            // The chunk written last is gone, so this reuses the same allocation.
            buf.reserve(left.min(RELAY_CHUNK));
            if upstream.read_buf(buf).await? == 0 {
                return Err(ConnError::BrokerClosed);
            }
        }
        let chunk = buf.split_to(left.min(buf.len()));
        client.write_all(&chunk).await?;
        left -= chunk.len();
    }
    client.flush().await?;
    Ok((total, arrived))
}

fn respond(
    shared: &Shared,
    cluster: usize,
    rewrite: Rewrite,
    frame: Bytes,
    to: &Advertiser,
) -> Result<Bytes, RewriteError> {
    match rewrite {
        Rewrite::Passthrough => Ok(frame),
        Rewrite::ApiVersions(v) => {
            let offered = match shared.view(cluster) {
                Some(_) => api_versions::Offered::View,
                None if shared.failback.current().is_some() => api_versions::Offered::Failback,
                None => api_versions::Offered::All,
            };
            api_versions::response(&frame, v, offered)
        }
        Rewrite::Metadata(v) => handlers::metadata::response(&frame, v, to, &|t| {
            super::alignment::observe(shared, cluster, t.iter().map(|t| (t.name, t.partitions)));
            let ids = &shared.clusters.get(cluster).topic_ids;
            ids.learn(t.iter().map(|t| (t.name, t.id)));
            if cluster == 0 {
                for t in t {
                    ids.learn_leader_epochs(t.name, t.leader_epochs);
                }
            }
        }),
        Rewrite::FindCoordinator(v) => handlers::find_coordinator::response(&frame, v, to),
        Rewrite::DescribeCluster(v) => handlers::describe_cluster::response(&frame, v, to),
        Rewrite::DescribeTopicPartitions(v) => {
            handlers::describe_topic_partitions::response(&frame, v, to)
        }
        Rewrite::Fetch(v) => handlers::fetch::response(&frame, v, to),
        Rewrite::Produce(v) => handlers::produce::response(&frame, v, to),
        Rewrite::GroupHeartbeat(v, epoch) => handlers::group_heartbeat::response(&frame, v, epoch),
        Rewrite::SaslAuthenticate(_) | Rewrite::SaslHandshake(_) => Ok(frame),
        Rewrite::View(viewed) => {
            let Viewed {
                inner,
                key,
                version,
                unknown,
                member_epoch,
                group,
            } = *viewed;
            let frame = respond(shared, cluster, inner, frame, to)?;
            let ids = shared
                .view_ids(cluster)
                .expect("a mapped request was sent on a connection with a view");
            let view = ids.view;
            let mut noticed = super::view::Noticed::default();
            // Positions kept for a switch (`super::positions`), for OffsetFetch answers.
            let kept = (key == ApiKey::OffsetFetch).then(|| shared.positions.load());
            let carry = |group: &str, topic: &str, partition: i32| {
                kept.as_ref()?
                    .carried(cluster, view, group, topic, partition)
            };
            let out = super::view::response(
                &frame,
                key,
                version,
                ids,
                &super::view::Asked {
                    unknown: &unknown,
                    member_epoch,
                    group: group.as_deref(),
                    carry: Some(&carry),
                },
                &mut noticed,
            )?;
            count_view_positions(view, &noticed.positions);
            let unplaced: u64 = super::view::ReadFrom::ALL
                .iter()
                .map(|&from| noticed.positions.get(from, super::view::Outcome::None))
                .sum();
            if unplaced > 0 && shared.view_log.allow() {
                warn!(
                    partitions = unplaced,
                    serving = view.serving(),
                    "a consumer group has no position through the view, neither in the serving cluster nor kept by keyward for the switch: it resumes by its auto.offset.reset"
                );
            }
            for topic in noticed.missing {
                if shared.view_log.allow() {
                    warn!(
                        topic,
                        mirror = view.to_serving(&topic),
                        serving = view.serving(),
                        "a topic's mirror is missing in the serving cluster: answered unknown (retriable) until MirrorMaker 2 creates it"
                    );
                }
            }
            Ok(out)
        }
    }
}

/// `keyward_view_offsets_total`: the positions consumer groups found, or did not, on the
/// serving cluster as they fetched them through the view.
fn count_view_positions(view: &RegionView, positions: &super::view::Positions) {
    for from in super::view::ReadFrom::ALL {
        for outcome in super::view::Outcome::ALL {
            let n = positions.get(from, outcome);
            if n > 0 {
                counter!(
                    "keyward_view_offsets_total",
                    "serving" => view.serving().to_owned(),
                    "reads" => from.label(),
                    "outcome" => outcome.label(),
                )
                .increment(n);
            }
        }
    }
    if positions.reread_at_most > 0 {
        counter!("keyward_view_rereads_at_most_total", "serving" => view.serving().to_owned())
            .increment(positions.reread_at_most);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected pair of plain streams.
    async fn pair() -> (Stream, Stream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        (Stream::Plain(a.unwrap()), Stream::Plain(b.unwrap().0))
    }

    fn response(correlation_id: i32, body_len: usize) -> Vec<u8> {
        let mut f = ((4 + body_len) as i32).to_be_bytes().to_vec();
        f.extend_from_slice(&correlation_id.to_be_bytes());
        f.extend((0..body_len).map(|i| (i % 251) as u8));
        f
    }

    #[tokio::test]
    async fn relayed_responses_arrive_whole_and_in_order_with_bounded_buffers() {
        let (broker, from_broker) = pair().await;
        let (to_client, mut client) = pair().await;
        let (mut upstream, _) = from_broker.into_split();
        let (_, mut downstream) = to_client.into_split();
        let (_, mut broker) = broker.into_split();
        let big = response(1, 3 * RELAY_CHUNK + 17);
        let small = response(2, 10);
        let sent = [big.clone(), small.clone()].concat();
        let writer = tokio::spawn(async move {
            // Odd-sized pieces, so frames straddle reads.
            for piece in sent.chunks(7_919) {
                broker.write_all(piece).await.unwrap();
            }
            broker
        });
        let reader = FrameReader::new(8 * 1024 * 1024);
        let mut buf = BytesMut::new();
        for (id, frame) in [(1, &big), (2, &small)] {
            let (n, _) = stream_response(&reader, &mut upstream, &mut downstream, &mut buf, id)
                .await
                .unwrap();
            assert_eq!(n, frame.len());
            assert!(buf.capacity() <= 2 * RELAY_CHUNK, "{}", buf.capacity());
        }
        let mut got = vec![0; big.len() + small.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [big, small].concat());

        // A response to another request ends the connection instead of reaching the client.
        let mut broker = writer.await.unwrap();
        broker.write_all(&response(9, 4)).await.unwrap();
        let e = stream_response(&reader, &mut upstream, &mut downstream, &mut buf, 3)
            .await
            .unwrap_err();
        assert!(matches!(
            e,
            ConnError::CorrelationMismatch {
                expected: 3,
                got: 9
            }
        ));
    }

    /// With 10,000 connections, a chunk reserved for every small response was 2.5 GiB of
    /// address space, and the allocator kept what closed connections had touched.
    #[tokio::test]
    async fn small_responses_leave_the_read_buffer_at_its_starting_size() {
        let (broker, from_broker) = pair().await;
        let (to_client, mut client) = pair().await;
        let (mut upstream, _) = from_broker.into_split();
        let (_, mut downstream) = to_client.into_split();
        let (_, mut broker) = broker.into_split();
        let reader = FrameReader::new(8 * 1024 * 1024);
        let mut buf = BytesMut::with_capacity(READ_BUFFER);
        for id in 1..=3 {
            let frame = response(id, 100);
            broker.write_all(&frame).await.unwrap();
            let (n, _) = stream_response(&reader, &mut upstream, &mut downstream, &mut buf, id)
                .await
                .unwrap();
            assert_eq!(n, frame.len());
            let mut got = vec![0; frame.len()];
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(got, frame);
            assert!(buf.capacity() <= READ_BUFFER, "{}", buf.capacity());
        }
    }
}
