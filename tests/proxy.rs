//! keyward's data path in-process: `proxy::run` on `127.0.0.1:0` against a scripted fake broker
//! (`proxy/broker.rs`), driven by a client speaking Kafka frames (`proxy/harness.rs`). One test
//! binary (one link step); tests run one at a time (`harness::serial`), since the metrics
//! recorder is one per process.

#[path = "proxy/broker.rs"]
mod broker;
#[path = "proxy/harness.rs"]
mod harness;

use std::io::{Read, Write};
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::{
    ApiKey, FetchRequest, FetchResponse, MetadataRequest, MetadataResponse, ProduceResponse,
};
use tokio::time::Instant;

use broker::{Batch, FakeBroker, PRODUCER_ID, Script, broker_offset};
use harness::{
    FETCH_VERSION, Failover, Keyward, METADATA_VERSION, Options, PORTS_PER_CLUSTER,
    PRODUCE_VERSION, batch, foreign_key, key_rule, key_rule_on_foreign, owned_key, produce,
    producer_batch, request, response, sample,
};

const INVALID_RECORD: i16 = 87;
const NOT_LEADER_OR_FOLLOWER: i16 = 6;

fn metadata_request() -> MetadataRequest {
    MetadataRequest::default().with_topics(Some(Vec::new()))
}

/// `(topic, [(partition, error code, base offset, error message)])` in response order.
type Answered = Vec<(String, Vec<(i32, i16, i64, Option<String>)>)>;

fn answered(response: &ProduceResponse) -> Answered {
    response
        .responses
        .iter()
        .map(|t| {
            let partitions = t
                .partition_responses
                .iter()
                .map(|p| {
                    (
                        p.index,
                        p.error_code,
                        p.base_offset,
                        p.error_message.as_ref().map(|m| m.to_string()),
                    )
                })
                .collect();
            (t.name.0.to_string(), partitions)
        })
        .collect()
}

#[tokio::test]
async fn pipelined_responses_leave_in_request_order_whoever_answers() {
    let _serial = harness::serial().await;
    // The broker takes 50 ms over each answer; keyward's own answer is ready at once, so it
    // would overtake the broker's if keyward wrote answers as they became ready.
    let broker = FakeBroker::start(Script {
        delay: Duration::from_millis(50),
        ..Script::default()
    })
    .await;
    let keyward = Keyward::start(broker.addr, Options::table(key_rule("ordered", "ord"))).await;
    let mut client = keyward.connect().await;

    let refused = produce(1, &[("ord.a", vec![(0, batch(&[foreign_key(0)]))])]);
    let forwarded = produce(1, &[("ord.a", vec![(1, batch(&[owned_key(0)]))])]);
    client
        .send(ApiKey::Metadata, METADATA_VERSION, 11, &metadata_request())
        .await;
    client
        .send(ApiKey::Produce, PRODUCE_VERSION, 12, &refused)
        .await;
    client
        .send(ApiKey::Produce, PRODUCE_VERSION, 13, &forwarded)
        .await;
    client
        .send(ApiKey::Metadata, METADATA_VERSION, 14, &metadata_request())
        .await;

    let (id, first) = client
        .recv::<MetadataResponse>(ApiKey::Metadata, METADATA_VERSION)
        .await
        .unwrap();
    assert_eq!(id, 11);
    // Rewritten on the way: keyward's advertised host, not the broker's port.
    assert_eq!(first.brokers.len(), 1);
    assert_ne!(first.brokers[0].port, i32::from(broker.addr.port()));

    let (id, refusal) = client
        .recv::<ProduceResponse>(ApiKey::Produce, PRODUCE_VERSION)
        .await
        .unwrap();
    assert_eq!(id, 12);
    let refusal = answered(&refusal);
    assert_eq!(refusal.len(), 1);
    assert_eq!(refusal[0].1[0].1, INVALID_RECORD, "{refusal:?}");

    let (id, accepted) = client
        .recv::<ProduceResponse>(ApiKey::Produce, PRODUCE_VERSION)
        .await
        .unwrap();
    assert_eq!(id, 13);
    assert_eq!(
        answered(&accepted),
        vec![(
            "ord.a".to_owned(),
            vec![(1, 0, broker_offset("ord.a", 1), None)]
        )]
    );

    let (id, _) = client
        .recv::<MetadataResponse>(ApiKey::Metadata, METADATA_VERSION)
        .await
        .unwrap();
    assert_eq!(id, 14);

    // The refused write never reached the broker.
    assert_eq!(
        broker.produced(),
        vec![(1, vec![("ord.a".to_owned(), vec![1])])]
    );
}

#[tokio::test]
async fn a_partly_refused_produce_is_answered_in_the_clients_order_with_the_brokers_offsets() {
    let _serial = harness::serial().await;
    let broker = FakeBroker::start(Script::default()).await;
    let keyward = Keyward::start(broker.addr, Options::table(key_rule("merged", "mrg"))).await;
    let mut client = keyward.connect().await;

    // Owned and foreign partitions interleaved across two topics.
    let request = produce(
        1,
        &[
            (
                "mrg.a",
                vec![
                    (0, batch(&[owned_key(0)])),
                    (1, batch(&[foreign_key(0)])),
                    (2, batch(&[owned_key(1)])),
                ],
            ),
            (
                "mrg.b",
                vec![(3, batch(&[foreign_key(1)])), (0, batch(&[owned_key(2)]))],
            ),
        ],
    );
    client
        .send(ApiKey::Produce, PRODUCE_VERSION, 7, &request)
        .await;
    let (id, response) = client
        .recv::<ProduceResponse>(ApiKey::Produce, PRODUCE_VERSION)
        .await
        .unwrap();
    assert_eq!(id, 7);

    // Only the owned partitions went to the broker (which answers them in reverse order).
    assert_eq!(
        broker.produced(),
        vec![(
            1,
            vec![
                ("mrg.a".to_owned(), vec![0, 2]),
                ("mrg.b".to_owned(), vec![0])
            ]
        )]
    );
    let got = answered(&response);
    let shape: Vec<(String, Vec<(i32, i16)>)> = got
        .iter()
        .map(|(t, ps)| (t.clone(), ps.iter().map(|p| (p.0, p.1)).collect()))
        .collect();
    assert_eq!(
        shape,
        vec![
            (
                "mrg.a".to_owned(),
                vec![(0, 0), (1, INVALID_RECORD), (2, 0)]
            ),
            ("mrg.b".to_owned(), vec![(3, INVALID_RECORD), (0, 0)]),
        ]
    );
    for (topic, partitions) in &got {
        for (partition, code, offset, message) in partitions {
            if *code == 0 {
                assert_eq!(*offset, broker_offset(topic, *partition));
                assert_eq!(*message, None);
            } else {
                // keyward's own message: the rule, and the table that refused.
                let message = message.as_deref().unwrap();
                assert!(message.contains("merged"), "{message}");
                assert!(message.contains("[ownership table "), "{message}");
            }
        }
    }
    // The record errors name the refused record (batch index 0).
    let refused = &response.responses[0].partition_responses[1];
    assert_eq!(refused.record_errors.len(), 1);
    assert_eq!(refused.record_errors[0].batch_index, 0);
}

#[tokio::test]
async fn a_refused_acks0_produce_closes_the_connection_and_an_accepted_one_does_not() {
    let _serial = harness::serial().await;
    let broker = FakeBroker::start(Script::default()).await;
    let keyward = Keyward::start(broker.addr, Options::table(key_rule("unacked", "ack"))).await;

    // Accepted: no response is owed for it, and the connection serves the next request.
    let mut client = keyward.connect().await;
    let accepted = produce(0, &[("ack.a", vec![(0, batch(&[owned_key(0)]))])]);
    client
        .send(ApiKey::Produce, PRODUCE_VERSION, 1, &accepted)
        .await;
    client
        .send(ApiKey::Metadata, METADATA_VERSION, 2, &metadata_request())
        .await;
    let (id, _) = client
        .recv::<MetadataResponse>(ApiKey::Metadata, METADATA_VERSION)
        .await
        .expect("the connection stays open");
    assert_eq!(id, 2, "an acks=0 produce is answered with nothing");
    assert_eq!(
        broker.produced(),
        vec![(0, vec![("ack.a".to_owned(), vec![0])])]
    );

    // Refused: no response can carry the refusal, so keyward closes the connection.
    let mut client = keyward.connect().await;
    let refused = produce(0, &[("ack.a", vec![(0, batch(&[foreign_key(0)]))])]);
    client
        .send(ApiKey::Produce, PRODUCE_VERSION, 1, &refused)
        .await;
    client
        .send(ApiKey::Metadata, METADATA_VERSION, 2, &metadata_request())
        .await;
    let next = client.recv_frame(Duration::from_secs(10)).await;
    assert_eq!(next, Ok(None), "the connection is closed, nothing answered");
    assert_eq!(broker.produced().len(), 1, "the refused write was not sent");
}

/// Setup runs on real time (keyward's start-up probe, the connections); then tokio's clock is
/// paused, and with nothing else to do the runtime jumps it to the next timer: keyward's idle
/// timeouts, and the test's own waits. The sockets stay real (loopback, one thread).
#[tokio::test]
async fn an_idle_connection_is_closed_but_not_one_owed_a_response() {
    let _serial = harness::serial().await;
    let broker = FakeBroker::start(Script {
        hold_fetch: true,
        ..Script::default()
    })
    .await;
    let keyward = Keyward::start(
        broker.addr,
        Options {
            idle_timeout_secs: 60,
            ..Options::table(key_rule("idle", "idle"))
        },
    )
    .await;
    let idle = Duration::from_secs(60);

    let mut quiet = keyward.connect().await;
    quiet
        .send(ApiKey::Metadata, METADATA_VERSION, 1, &metadata_request())
        .await;
    quiet
        .recv::<MetadataResponse>(ApiKey::Metadata, METADATA_VERSION)
        .await
        .unwrap();
    let mut waiting = keyward.connect().await;
    waiting
        .send(ApiKey::Fetch, FETCH_VERSION, 1, &FetchRequest::default())
        .await;

    tokio::time::pause();
    let paused = tokio::time::Instant::now();
    // Nothing asked, owed or answered for the idle timeout: closed.
    assert_eq!(quiet.recv_frame(2 * idle).await, Ok(None));
    let closed_after = paused.elapsed();
    assert!(
        closed_after >= idle - Duration::from_secs(1),
        "{closed_after:?}"
    );
    assert!(
        closed_after <= idle + Duration::from_secs(1),
        "{closed_after:?}"
    );

    // A fetch the broker holds for three idle timeouts: the connection stays open.
    assert_eq!(waiting.recv_frame(3 * idle).await, Err(()));
    broker.release_fetch();
    let (id, _) = waiting
        .recv::<FetchResponse>(ApiKey::Fetch, FETCH_VERSION)
        .await
        .expect("still open when the answer comes");
    assert_eq!(id, 1);
    // Once answered, it is idle again: closed one idle timeout after the answer.
    let answered = tokio::time::Instant::now();
    assert_eq!(waiting.recv_frame(2 * idle).await, Ok(None));
    let closed_after = answered.elapsed();
    assert!(
        closed_after >= idle - Duration::from_secs(1),
        "{closed_after:?}"
    );
    assert!(
        closed_after <= idle + Duration::from_secs(1),
        "{closed_after:?}"
    );
}

#[tokio::test]
async fn metrics_count_forwarded_and_refused_records_and_produce_requests() {
    let _serial = harness::serial().await;
    let broker = FakeBroker::start(Script::default()).await;
    let keyward = Keyward::start(broker.addr, Options::table(key_rule("metered", "met"))).await;
    let before = keyward.metrics().await;
    let requests = |text: &str| sample(text, "keyward_requests_total", &[("api", "Produce")]);

    let mut client = keyward.connect().await;
    // 3 owned records in one batch and 2 foreign ones in another, in one request...
    let mixed = produce(
        1,
        &[(
            "met.a",
            vec![
                (0, batch(&[owned_key(0), owned_key(1), owned_key(2)])),
                (1, batch(&[foreign_key(0), foreign_key(1)])),
            ],
        )],
    );
    // ...then 4 owned records, and 1 foreign one alone.
    let owned = produce(
        1,
        &[(
            "met.a",
            vec![(
                2,
                batch(&[owned_key(3), owned_key(4), owned_key(5), owned_key(6)]),
            )],
        )],
    );
    let foreign = produce(1, &[("met.b", vec![(0, batch(&[foreign_key(2)]))])]);
    for (id, request) in [(1, &mixed), (2, &owned), (3, &foreign)] {
        client
            .send(ApiKey::Produce, PRODUCE_VERSION, id, request)
            .await;
        client
            .recv::<ProduceResponse>(ApiKey::Produce, PRODUCE_VERSION)
            .await
            .unwrap();
    }

    let after = keyward.metrics().await;
    let records = |decision: &str, owner: &str, reason: &str| {
        sample(
            &after,
            "keyward_produce_records_total",
            &[
                ("rule", "metered"),
                ("owner", owner),
                ("decision", decision),
                ("reason", reason),
            ],
        )
    };
    let batches = |decision: &str, owner: &str, reason: &str| {
        sample(
            &after,
            "keyward_produce_batches_total",
            &[
                ("rule", "metered"),
                ("owner", owner),
                ("decision", decision),
                ("reason", reason),
            ],
        )
    };
    assert_eq!(records("forwarded", "eu", "-"), Some(7.0), "{after}");
    assert_eq!(batches("forwarded", "eu", "-"), Some(2.0), "{after}");
    assert_eq!(
        records("rejected", "us", "foreign_owner"),
        Some(3.0),
        "{after}"
    );
    assert_eq!(
        batches("rejected", "us", "foreign_owner"),
        Some(2.0),
        "{after}"
    );
    assert_eq!(
        requests(&after).unwrap() - requests(&before).unwrap_or(0.0),
        3.0,
        "{after}"
    );
}

/// The virtual node ids and ports a Metadata answer names, in its order.
fn advertised(metadata: &MetadataResponse) -> Vec<(i32, i32)> {
    metadata
        .brokers
        .iter()
        .map(|b| (b.node_id.0, b.port))
        .collect()
}

/// Steps tokio's (paused) clock by `step` until `cluster` serves, at most `limit`; when it
/// does, the time it was first seen serving.
async fn serving_by(keyward: &Keyward, cluster: &str, step: Duration, limit: Duration) -> Instant {
    let started = Instant::now();
    while keyward.serving() != cluster {
        assert!(
            started.elapsed() <= limit,
            "{} still serves after {:?}, {cluster} expected",
            keyward.serving(),
            started.elapsed()
        );
        tokio::time::sleep(step).await;
    }
    Instant::now()
}

/// As [`an_idle_connection_is_closed_but_not_one_owed_a_response`]: set up on real time, then
/// tokio's clock paused, so the probes every second and the 30 s hold-down run on the clock the
/// test steps. The fake brokers answer (or refuse) at once over loopback, so no probe waits on
/// a socket while the runtime jumps the clock.
#[tokio::test]
async fn reads_leave_a_cluster_after_three_lost_probes_and_return_only_after_the_hold_down() {
    let _serial = harness::serial().await;
    let eu = FakeBroker::start(Script::default()).await;
    let us = FakeBroker::start(Script::default()).await;
    let interval = Duration::from_secs(1);
    let hold_down = Duration::from_secs(30);
    let keyward = Keyward::start(
        eu.addr,
        Options {
            us: Some(us.addr),
            failover: Some(Failover {
                probe_interval: interval,
                hold_down,
            }),
            ..Options::table(key_rule("failover", "fo"))
        },
    )
    .await;
    let base = i32::from(keyward.shared.config.listen.broker_port_base);
    let gauge = |text: &str, name: &str, cluster: &str| sample(text, name, &[("cluster", cluster)]);
    let switched = |text: &str| {
        sample(
            text,
            "keyward_client_connections_closed_total",
            &[("cause", "serving_cluster_changed")],
        )
        .unwrap_or(0.0)
    };

    let metrics = keyward.metrics().await;
    assert_eq!(gauge(&metrics, "keyward_serving_cluster", "eu"), Some(1.0));
    assert_eq!(gauge(&metrics, "keyward_serving_cluster", "us"), Some(0.0));
    let closed_before = switched(&metrics);
    // A client of eu, before anything fails: it is told of eu's node 0.
    let mut on_eu = keyward.connect().await;
    on_eu
        .send(ApiKey::Metadata, METADATA_VERSION, 1, &metadata_request())
        .await;
    let (_, metadata) = on_eu
        .recv::<MetadataResponse>(ApiKey::Metadata, METADATA_VERSION)
        .await
        .unwrap();
    assert_eq!(advertised(&metadata), vec![(0, base)]);

    tokio::time::pause();
    let step = interval / 4;
    eu.down();
    let down = Instant::now();
    // Two lost probes leave reads where they are; the third moves them to us.
    let left = serving_by(&keyward, "us", step, 5 * interval).await - down;
    assert!(left > 2 * interval, "{left:?}");
    assert!(left <= 3 * interval + step, "{left:?}");
    let metrics = keyward.metrics().await;
    assert_eq!(gauge(&metrics, "keyward_serving_cluster", "us"), Some(1.0));
    assert_eq!(gauge(&metrics, "keyward_serving_cluster", "eu"), Some(0.0));
    assert_eq!(gauge(&metrics, "keyward_cluster_up", "eu"), Some(0.0));
    // eu's client was closed so that it reconnects...
    assert_eq!(on_eu.recv_frame(interval).await, Ok(None));
    assert_eq!(switched(&keyward.metrics().await) - closed_before, 1.0);
    // ...to us, whose node 0 it is told of under a virtual id no eu node has.
    let served = |text: &str, cluster: &str| {
        sample(text, "keyward_served_bytes_total", &[("cluster", cluster)]).unwrap()
    };
    let before = keyward.metrics().await;
    let mut on_us = keyward.connect().await;
    on_us
        .send(ApiKey::Metadata, METADATA_VERSION, 1, &metadata_request())
        .await;
    let frame = on_us.recv_frame(interval).await.unwrap().unwrap();
    let on_the_wire = (frame.len() + 4) as f64;
    let (_, metadata) = response::<MetadataResponse>(frame, ApiKey::Metadata, METADATA_VERSION);
    let us_node = i32::from(PORTS_PER_CLUSTER);
    assert_eq!(advertised(&metadata), vec![(us_node, base + us_node)]);
    // What reads cost while us serves is counted against us's cluster, to the byte: the
    // response as the client received it (its length prefix included).
    let mut after = keyward.metrics().await;
    for _ in 0..10 {
        if served(&after, "us") > served(&before, "us") {
            break;
        }
        // The count follows the write to the client by a moment.
        tokio::time::sleep(Duration::from_millis(10)).await;
        after = keyward.metrics().await;
    }
    assert_eq!(served(&after, "us") - served(&before, "us"), on_the_wire);
    assert_eq!(served(&after, "eu"), served(&before, "eu"));

    eu.up();
    let up = Instant::now();
    // eu answers its next probe, but reads stay with us for the hold-down.
    tokio::time::sleep(hold_down / 2).await;
    let metrics = keyward.metrics().await;
    assert_eq!(gauge(&metrics, "keyward_cluster_up", "eu"), Some(1.0));
    assert_eq!(gauge(&metrics, "keyward_serving_cluster", "us"), Some(1.0));
    assert_eq!(keyward.serving(), "us");
    let back = serving_by(&keyward, "eu", step, hold_down + 3 * interval).await - up;
    assert!(back >= hold_down - interval, "{back:?}");
    assert!(back <= hold_down + 2 * interval, "{back:?}");
    let metrics = keyward.metrics().await;
    assert_eq!(gauge(&metrics, "keyward_serving_cluster", "eu"), Some(1.0));
    assert_eq!(gauge(&metrics, "keyward_serving_cluster", "us"), Some(0.0));
    assert_eq!(on_us.recv_frame(interval).await, Ok(None));
    assert_eq!(switched(&keyward.metrics().await) - closed_before, 2.0);
}

/// One frame read by a blocking client (length prefix removed).
fn read_frame_blocking(stream: &mut std::net::TcpStream) -> Bytes {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; i32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).unwrap();
    Bytes::from(body)
}

/// Polls as pending once, asking to be polled again: unlike `yield_now` (which waits for the
/// runtime to poll its sockets first), the task goes straight to the back of the run queue.
struct Requeue(bool);

impl std::future::Future for Requeue {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

/// The client is a plain thread that connects the moment it has read the answer. Meanwhile a
/// task of the runtime keyward runs on (one thread) sits in its run queue at every turn and,
/// once the broker has written the answer naming node 3, blocks the thread for 20 ms each
/// time it runs. The port manager, woken when keyward learns of node 3, queues behind it: were
/// the answer written before the port listens, the client would connect in those 20 ms and be
/// refused. Only keyward waiting for the port before answering makes the connection succeed.
#[test]
fn a_broker_named_for_the_first_time_accepts_connections_before_the_client_hears_of_it() {
    // One thread, as `#[tokio::test]`, but polling its sockets before every task rather than
    // every 61: the blocking task below then costs 20 ms per socket event, not 1.2 s.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .event_interval(1)
        .build()
        .unwrap()
        .block_on(ports_open_before_clients_hear_of_them());
}

async fn ports_open_before_clients_hear_of_them() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let _serial = harness::serial().await;
    let broker = Arc::new(FakeBroker::start(Script::default()).await);
    let keyward = Keyward::start(broker.addr, Options::table(key_rule("ports", "prt"))).await;
    // Node 3 joins after keyward's probe at start: keyward learns of it from the answer it
    // relays.
    broker.advertise(3);
    let port = |node: i32| i32::from(keyward.shared.config.listen.broker_port_base) + node;

    let busy = Arc::new(AtomicBool::new(true));
    let answered_before = broker.metadata_answers();
    let hog = tokio::spawn({
        let (busy, broker) = (busy.clone(), broker.clone());
        async move {
            while busy.load(Ordering::Relaxed) {
                if broker.metadata_answers() > answered_before {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Requeue(false).await;
            }
        }
    });
    let bootstrap = keyward.bootstrap;
    let client = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(bootstrap).unwrap();
        stream
            .write_all(&request(
                ApiKey::Metadata,
                METADATA_VERSION,
                1,
                &metadata_request(),
            ))
            .unwrap();
        let (_, metadata): (i32, MetadataResponse) = response(
            read_frame_blocking(&mut stream),
            ApiKey::Metadata,
            METADATA_VERSION,
        );
        let told = advertised(&metadata);
        let (_, new_port) = told.iter().copied().find(|(n, _)| *n == 3).unwrap();
        // At once: no retry, no wait.
        let connected = std::net::TcpStream::connect(("127.0.0.1", new_port as u16));
        busy.store(false, Ordering::Relaxed);
        let mut node3 = match connected {
            Ok(s) => s,
            Err(e) => return Err(format!("{told:?}: connecting to node 3 at once: {e}")),
        };
        node3
            .write_all(&request(
                ApiKey::Metadata,
                METADATA_VERSION,
                2,
                &metadata_request(),
            ))
            .unwrap();
        let (id, metadata): (i32, MetadataResponse) = response(
            read_frame_blocking(&mut node3),
            ApiKey::Metadata,
            METADATA_VERSION,
        );
        Ok((told, id, advertised(&metadata)))
    });
    let outcome = client.await.unwrap();
    hog.await.unwrap();
    let (told, id, through_node3) = outcome.unwrap();
    assert_eq!(told, vec![(0, port(0)), (3, port(3))]);
    assert_eq!(id, 2);
    assert_eq!(through_node3, told, "node 3's port relays to the cluster");
}

/// `(topic, partition, error code, base offset)` of every partition answered, in response order.
fn outcomes(response: &ProduceResponse) -> Vec<(String, i32, i16, i64)> {
    answered(response)
        .into_iter()
        .flat_map(|(t, ps)| {
            ps.into_iter()
                .map(move |(p, code, offset, _)| (t.clone(), p, code, offset))
        })
        .collect()
}

/// Fake brokers for eu (local) and us, and keyward in front of them with a `by: key` rule
/// `name` over topics `prefix.*` that redirects us's keys to us.
async fn redirecting(name: &str, prefix: &str) -> (FakeBroker, FakeBroker, Keyward) {
    redirecting_to(name, prefix, Script::default()).await
}

/// [`redirecting`], with us's broker answering as `us` scripts it.
async fn redirecting_to(name: &str, prefix: &str, us: Script) -> (FakeBroker, FakeBroker, Keyward) {
    let eu = FakeBroker::start(Script::default()).await;
    let us = FakeBroker::start(us).await;
    let keyward = Keyward::start(
        eu.addr,
        Options {
            us: Some(us.addr),
            ..Options::table(key_rule_on_foreign(name, prefix, "redirect"))
        },
    )
    .await;
    (eu, us, keyward)
}

fn redirected(topic: &str, partition: i32, base_sequence: i32, records: i32) -> Batch {
    Batch {
        topic: topic.to_owned(),
        partition,
        producer_id: PRODUCER_ID,
        producer_epoch: 0,
        base_sequence,
        records,
    }
}

#[tokio::test]
async fn foreign_writes_are_produced_to_the_owners_cluster_under_keywards_producer_in_sequence() {
    let _serial = harness::serial().await;
    let (eu, us, keyward) = redirecting("redirected", "red").await;
    let mut client = keyward.connect().await;

    // Three requests of two foreign records each, to one partition.
    for (id, nth) in [(1, 0), (2, 2), (3, 4)] {
        let request = produce(
            1,
            &[(
                "red.a",
                vec![(1, batch(&[foreign_key(nth), foreign_key(nth + 1)]))],
            )],
        );
        client
            .send(ApiKey::Produce, PRODUCE_VERSION, id, &request)
            .await;
        let (got, answer) = client
            .recv::<ProduceResponse>(ApiKey::Produce, PRODUCE_VERSION)
            .await
            .unwrap();
        assert_eq!(got, id);
        assert_eq!(
            outcomes(&answer),
            vec![("red.a".to_owned(), 1, 0, broker_offset("red.a", 1))]
        );
    }
    assert_eq!(
        us.batches(),
        vec![
            redirected("red.a", 1, 0, 2),
            redirected("red.a", 1, 2, 2),
            redirected("red.a", 1, 4, 2),
        ]
    );
    assert_eq!(eu.produced(), vec![], "eu never sees us's records");

    // Owned, foreign, owned: each to its cluster, answered in the client's order.
    let mixed = produce(
        1,
        &[(
            "red.b",
            vec![
                (2, batch(&[owned_key(0)])),
                (1, batch(&[foreign_key(6)])),
                (0, batch(&[owned_key(1), owned_key(2)])),
            ],
        )],
    );
    client
        .send(ApiKey::Produce, PRODUCE_VERSION, 4, &mixed)
        .await;
    let (got, answer) = client
        .recv::<ProduceResponse>(ApiKey::Produce, PRODUCE_VERSION)
        .await
        .unwrap();
    assert_eq!(got, 4);
    assert_eq!(
        outcomes(&answer),
        [2, 1, 0]
            .map(|p| ("red.b".to_owned(), p, 0, broker_offset("red.b", p)))
            .to_vec()
    );
    assert_eq!(
        eu.produced(),
        vec![(1, vec![("red.b".to_owned(), vec![2, 0])])]
    );
    // A new partition numbers from 0 under the same producer id.
    assert_eq!(us.batches()[3..], [redirected("red.b", 1, 0, 1)]);
    // keyward looked the topics' leaders up on us without letting us create them (a broker
    // with auto.create.topics.enable, Kafka's default, would have on the protocol's default).
    assert!(us.metadata_answers() > 0);
    assert_eq!(us.auto_create_asked(), 0);
}

#[tokio::test]
async fn a_redirected_write_the_owner_answers_not_leader_is_retried_with_the_same_sequence() {
    let _serial = harness::serial().await;
    let (eu, us, keyward) = redirecting("retried", "ret").await;
    let mut client = keyward.connect().await;
    let send = |nth: usize| {
        produce(
            1,
            &[(
                "ret.a",
                vec![(0, batch(&[foreign_key(nth), foreign_key(nth + 1)]))],
            )],
        )
    };

    for (id, nth) in [(1, 0), (2, 2), (3, 4)] {
        if id == 2 {
            // The leader moved: the first attempt of the second write is refused.
            us.fail_next_produce(NOT_LEADER_OR_FOLLOWER);
        }
        client
            .send(ApiKey::Produce, PRODUCE_VERSION, id, &send(nth))
            .await;
        let (got, answer) = client
            .recv::<ProduceResponse>(ApiKey::Produce, PRODUCE_VERSION)
            .await
            .unwrap();
        assert_eq!(got, id);
        assert_eq!(
            outcomes(&answer),
            vec![("ret.a".to_owned(), 0, 0, broker_offset("ret.a", 0))],
            "request {id}"
        );
    }
    // The refused attempt and its retry carry the same sequence; the next write goes on
    // from there.
    assert_eq!(
        us.batches(),
        vec![
            redirected("ret.a", 0, 0, 2),
            redirected("ret.a", 0, 2, 2),
            redirected("ret.a", 0, 2, 2),
            redirected("ret.a", 0, 4, 2),
        ]
    );
    assert_eq!(eu.produced(), vec![]);
}

/// A batch mixing owners under `on_foreign: redirect` is split: the owned records go to eu on
/// the client's connection, renumbered so eu sees the producer's records without a gap, the
/// foreign ones to us under keyward's producer. The client's retry after a failed part sends
/// no part that landed again, and the local part keeps its number so eu can deduplicate it.
#[tokio::test]
async fn a_mixed_batch_is_split_and_its_retry_sends_no_landed_part_twice() {
    let _serial = harness::serial().await;
    let (eu, us, keyward) = redirecting("split", "spl").await;
    let mut client = keyward.connect().await;
    const CLIENT: i64 = 77;
    // owned, foreign, owned, foreign, foreign: client sequences 0..5.
    let first = producer_batch(
        &[
            owned_key(0),
            foreign_key(0),
            owned_key(1),
            foreign_key(1),
            foreign_key(2),
        ],
        CLIENT,
        0,
    );
    let send = |batch: &bytes::Bytes| produce(-1, &[("spl.a", vec![(0, batch.clone())])]);

    // The local part fails once (eu is not the leader for a moment): the client gets that
    // error for the whole batch, although the foreign part landed in us.
    eu.fail_next_produce(NOT_LEADER_OR_FOLLOWER);
    client
        .send(ApiKey::Produce, PRODUCE_VERSION, 1, &send(&first))
        .await;
    let (_, answer) = client
        .recv::<ProduceResponse>(ApiKey::Produce, PRODUCE_VERSION)
        .await
        .unwrap();
    assert_eq!(
        outcomes(&answer),
        vec![("spl.a".to_owned(), 0, NOT_LEADER_OR_FOLLOWER, -1)]
    );
    // The client retries the same batch: success, with the local part's offset.
    client
        .send(ApiKey::Produce, PRODUCE_VERSION, 2, &send(&first))
        .await;
    let (_, answer) = client
        .recv::<ProduceResponse>(ApiKey::Produce, PRODUCE_VERSION)
        .await
        .unwrap();
    assert_eq!(
        outcomes(&answer),
        vec![("spl.a".to_owned(), 0, 0, broker_offset("spl.a", 0))]
    );
    // The next batch (client sequences 5..7, one owned, one foreign) follows on both sides.
    let second = producer_batch(&[foreign_key(3), owned_key(2)], CLIENT, 5);
    client
        .send(ApiKey::Produce, PRODUCE_VERSION, 3, &send(&second))
        .await;
    let (_, answer) = client
        .recv::<ProduceResponse>(ApiKey::Produce, PRODUCE_VERSION)
        .await
        .unwrap();
    assert_eq!(outcomes(&answer)[0].2, 0);

    let local = |base_sequence, records| Batch {
        topic: "spl.a".to_owned(),
        partition: 0,
        producer_id: CLIENT,
        producer_epoch: 0,
        base_sequence,
        records,
    };
    // eu: the 2 owned records numbered 0 (twice: the refused attempt and its retry, which a
    // real broker would deduplicate had the first landed), then the next owned record as 2.
    assert_eq!(eu.batches(), vec![local(0, 2), local(0, 2), local(2, 1)]);
    // us: the 3 foreign records once, then the next one, under keyward's own numbering.
    assert_eq!(
        us.batches(),
        vec![redirected("spl.a", 0, 0, 3), redirected("spl.a", 0, 3, 1)]
    );
    let text = keyward.metrics().await;
    let records = |decision: &str, owner: &str| {
        sample(
            &text,
            "keyward_produce_records_total",
            &[
                ("rule", "split"),
                ("owner", owner),
                ("decision", decision),
                ("reason", "split"),
            ],
        )
    };
    // Counted per part, each attempt: 2 + 2 + 1 owned, 3 + 3 + 1 foreign.
    assert_eq!(records("forwarded", "eu"), Some(5.0), "{text}");
    assert_eq!(records("redirected", "us"), Some(7.0), "{text}");
}

/// A redirect pipeline with nothing to write for 5 minutes ends (tokio's clock paused after
/// setup); the next write to its partition starts another, which goes on with keyward's
/// numbering where the first stopped, so the owner's cluster sees no gap.
#[tokio::test]
async fn an_idle_redirect_pipeline_ends_and_the_next_goes_on_with_its_numbering() {
    let _serial = harness::serial().await;
    let (_eu, us, keyward) = redirecting("reaped", "rea").await;
    let mut client = keyward.connect().await;
    let running = |text: &str| sample(text, "keyward_redirect_pipelines", &[("cluster", "us")]);
    let write = |nth: usize| {
        produce(
            1,
            &[(
                "rea.a",
                vec![(0, batch(&[foreign_key(nth), foreign_key(nth + 1)]))],
            )],
        )
    };
    client
        .send(ApiKey::Produce, PRODUCE_VERSION, 1, &write(0))
        .await;
    let (_, answer) = client
        .recv::<ProduceResponse>(ApiKey::Produce, PRODUCE_VERSION)
        .await
        .unwrap();
    assert_eq!(outcomes(&answer)[0].2, 0);
    let before = running(&keyward.metrics().await).unwrap_or(0.0);
    assert!(before >= 1.0, "a pipeline runs for us");

    tokio::time::pause();
    tokio::time::sleep(Duration::from_secs(4 * 60)).await;
    assert_eq!(
        running(&keyward.metrics().await),
        Some(before),
        "not idle for long enough yet"
    );
    tokio::time::sleep(Duration::from_secs(2 * 60)).await;
    assert_eq!(
        running(&keyward.metrics().await),
        Some(before - 1.0),
        "idle for 5 minutes: ended"
    );
    tokio::time::resume();

    client
        .send(ApiKey::Produce, PRODUCE_VERSION, 2, &write(2))
        .await;
    let (_, answer) = client
        .recv::<ProduceResponse>(ApiKey::Produce, PRODUCE_VERSION)
        .await
        .unwrap();
    assert_eq!(outcomes(&answer)[0].2, 0);
    assert_eq!(
        us.batches(),
        vec![redirected("rea.a", 0, 0, 2), redirected("rea.a", 0, 2, 2)]
    );
    assert_eq!(running(&keyward.metrics().await), Some(before));
}

/// us at the far end of a slow link, numbering keyward's batches as a broker does.
fn distant(latency_ms: u64) -> Script {
    Script {
        latency: Duration::from_millis(latency_ms),
        check_sequences: true,
        ..Script::default()
    }
}

/// One Produce answer: its correlation id and [`outcomes`].
type Answer = (i32, Vec<(String, i32, i16, i64)>);

/// Sends `count` Produce requests on `client` without waiting, request `i` (correlation id
/// `i + 1`) holding, for each of `partitions` of `topic`, one batch of the foreign keys
/// `2i` and `2i + 1`; then reads every answer, in order, as `(correlation id, outcomes)`.
async fn produce_pipelined(
    client: &mut harness::Client,
    topic: &str,
    partitions: &[i32],
    count: usize,
) -> Vec<Answer> {
    for i in 0..count {
        let batches = partitions
            .iter()
            .map(|&p| (p, batch(&[foreign_key(2 * i), foreign_key(2 * i + 1)])))
            .collect();
        let request = produce(1, &[(topic, batches)]);
        client
            .send(ApiKey::Produce, PRODUCE_VERSION, i as i32 + 1, &request)
            .await;
    }
    let mut answers = Vec::new();
    for _ in 0..count {
        let (id, answer) = client
            .recv::<ProduceResponse>(ApiKey::Produce, PRODUCE_VERSION)
            .await
            .unwrap();
        answers.push((id, outcomes(&answer)));
    }
    answers
}

/// Every answer success, in request order, with the broker's offsets for `partitions`.
fn all_landed(topic: &str, partitions: &[i32], count: usize) -> Vec<Answer> {
    (1..=count as i32)
        .map(|id| {
            let answered = partitions
                .iter()
                .map(|&p| (topic.to_owned(), p, 0, broker_offset(topic, p)))
                .collect();
            (id, answered)
        })
        .collect()
}

/// Redirect keeps up to 5 batches in flight per target partition, as an idempotent producer
/// does, and every partition the owner's broker leads shares one connection to it: with
/// 8 requests for each of two partitions sent at once to a broker 300 ms away, the broker has
/// 10 unanswered at one moment, and appends each partition's batches once, in order, numbered
/// without a gap.
#[tokio::test]
async fn redirect_keeps_five_batches_in_flight_per_partition_to_a_distant_owner() {
    let _serial = harness::serial().await;
    let (eu, us, keyward) = redirecting_to("inflight", "inf", distant(300)).await;
    let mut client = keyward.connect().await;

    let answers = produce_pipelined(&mut client, "inf.a", &[0, 1], 8).await;

    assert_eq!(answers, all_landed("inf.a", &[0, 1], 8));
    assert_eq!(us.most_produce_in_flight(), 10, "5 per partition");
    assert_eq!(
        us.produce_connections(),
        1,
        "both partitions on one connection"
    );
    for partition in [0, 1] {
        let appended: Vec<Batch> = us
            .appended()
            .into_iter()
            .filter(|b| b.partition == partition)
            .collect();
        let expected: Vec<Batch> = (0..8)
            .map(|i| redirected("inf.a", partition, 2 * i, 2))
            .collect();
        assert_eq!(appended, expected, "partition {partition}");
    }
    assert_eq!(us.batches().len(), 16, "nothing was sent twice");
    assert_eq!(eu.produced(), vec![]);
}

/// When the oldest batch in flight is refused (the leader moved), the broker refuses the four
/// behind it as out of order; keyward settles all five, then sends them again in order with
/// the same numbers, and every batch lands once.
#[tokio::test]
async fn a_refused_batch_in_a_full_window_is_sent_again_with_those_behind_it_in_order() {
    let _serial = harness::serial().await;
    let (_eu, us, keyward) = redirecting_to("window", "win", distant(100)).await;
    let mut client = keyward.connect().await;
    us.fail_next_produce(NOT_LEADER_OR_FOLLOWER);

    let answers = produce_pipelined(&mut client, "win.a", &[0], 8).await;

    assert_eq!(answers, all_landed("win.a", &[0], 8));
    let expected: Vec<Batch> = (0..8).map(|i| redirected("win.a", 0, 2 * i, 2)).collect();
    assert_eq!(us.appended(), expected);
    let sent: Vec<i32> = us.batches().iter().map(|b| b.base_sequence).collect();
    assert_eq!(
        sent[..10],
        [0, 2, 4, 6, 8, 0, 2, 4, 6, 8],
        "the first window, refused, then sent again in order"
    );
    assert_eq!(sent[10..], [10, 12, 14]);
}

/// A connection lost while five batches are in flight leaves it unknown whether they landed:
/// keyward sends them again with the same producer id and numbers, and the broker, which had
/// appended them, recognises every one as a duplicate. Each lands once.
#[tokio::test]
async fn batches_in_flight_on_a_lost_connection_are_sent_again_and_land_once() {
    let _serial = harness::serial().await;
    let (_eu, us, keyward) = redirecting_to("lost", "lst", distant(500)).await;
    let mut client = keyward.connect().await;

    let writing = tokio::spawn(async move {
        let answers = produce_pipelined(&mut client, "lst.a", &[0], 5).await;
        (client, answers)
    });
    // Every batch has reached the broker and none is answered yet: the link drops.
    let waited = Instant::now();
    while us.batches().len() < 5 {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "batches never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    us.down();
    tokio::time::sleep(Duration::from_millis(200)).await;
    us.up();
    let (_client, answers) = writing.await.unwrap();

    assert_eq!(answers, all_landed("lst.a", &[0], 5));
    let expected: Vec<Batch> = (0..5).map(|i| redirected("lst.a", 0, 2 * i, 2)).collect();
    assert_eq!(us.appended(), expected, "each appended once");
    let sent: Vec<i32> = us.batches().iter().map(|b| b.base_sequence).collect();
    assert_eq!(
        sent,
        [0, 2, 4, 6, 8, 0, 2, 4, 6, 8],
        "sent again with the same numbers"
    );
}

/// A redirected batch whose answer is lost after its deadline: the broker wrote it, keyward
/// cannot know, and tells the client its request timed out. The client sends the same batch
/// again; keyward sends it with the producer id, epoch and sequence of the first attempt, so
/// the broker recognises it, and the batch is in the owner's cluster once. The client's next
/// batch follows it there.
#[tokio::test]
async fn a_redirected_batch_retried_after_its_answer_was_lost_lands_once() {
    let _serial = harness::serial().await;
    let (eu, us, keyward) = redirecting_to("late", "lat", distant(1_000)).await;
    let mut client = keyward.connect().await;
    const CLIENT: i64 = 42;
    const REQUEST_TIMED_OUT: i16 = 7;
    let first = producer_batch(&[foreign_key(0), foreign_key(1)], CLIENT, 0);
    // keyward answers a redirected batch 4/5 of the request's timeout after it arrived.
    let send =
        |batch: &Bytes| produce(-1, &[("lat.a", vec![(0, batch.clone())])]).with_timeout_ms(1_000);

    let sent = Instant::now();
    client
        .send(ApiKey::Produce, PRODUCE_VERSION, 1, &send(&first))
        .await;
    while us.appended().is_empty() {
        assert!(sent.elapsed() < Duration::from_secs(5), "never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Past keyward's deadline and before the broker's answer leaves: the link drops.
    tokio::time::sleep_until(sent + Duration::from_millis(900)).await;
    us.down();
    let (_, answer) = client
        .recv::<ProduceResponse>(ApiKey::Produce, PRODUCE_VERSION)
        .await
        .unwrap();
    assert_eq!(
        outcomes(&answer),
        vec![("lat.a".to_owned(), 0, REQUEST_TIMED_OUT, -1)]
    );
    us.up();

    for (id, batch) in [
        (2, &first),
        (3, &producer_batch(&[foreign_key(2)], CLIENT, 2)),
    ] {
        client
            .send(ApiKey::Produce, PRODUCE_VERSION, id, &send(batch))
            .await;
        let (_, answer) = client
            .recv::<ProduceResponse>(ApiKey::Produce, PRODUCE_VERSION)
            .await
            .unwrap();
        assert_eq!(outcomes(&answer)[0].2, 0, "request {id}: {answer:?}");
    }
    let sent: Vec<(i32, i32)> = us
        .batches()
        .iter()
        .map(|b| (b.base_sequence, b.records))
        .collect();
    assert_eq!(
        sent,
        [(0, 2), (0, 2), (2, 1)],
        "the retry carries the first attempt's numbers"
    );
    assert_eq!(
        us.appended()
            .iter()
            .map(|b| (b.base_sequence, b.records))
            .collect::<Vec<_>>(),
        [(0, 2), (2, 1)],
        "each batch once"
    );
    assert_eq!(eu.produced(), vec![]);
}

/// Every client producer whose batches keyward redirects has a producer id of its own on the
/// target, numbered per partition from its own batches only. Two producers writing one
/// partition each keep a gap-free numbering there, and a batch the target refuses for good
/// leaves no gap behind it: the producer's next batch takes its numbers.
#[tokio::test]
async fn each_client_producer_is_numbered_on_its_own_and_a_refused_batch_leaves_no_gap() {
    let _serial = harness::serial().await;
    let checking = Script {
        check_sequences: true,
        ..Script::default()
    };
    let (eu, us, keyward) = redirecting_to("own", "own", checking).await;
    let mut client = keyward.connect().await;
    const A: i64 = 11;
    const B: i64 = 12;
    const MESSAGE_TOO_LARGE: i16 = 10;
    let writes = [
        (A, 0, 2, 0),
        (B, 0, 1, 0),
        (A, 2, 1, MESSAGE_TOO_LARGE),
        (A, 3, 2, 0),
        (B, 1, 1, 0),
    ];
    for (id, &(producer, seq, records, code)) in writes.iter().enumerate() {
        let keys: Vec<Vec<u8>> = (0..records)
            .map(|i| foreign_key((seq + i) as usize))
            .collect();
        if code != 0 {
            us.fail_next_produce(code);
        }
        let request = produce(
            -1,
            &[("own.a", vec![(0, producer_batch(&keys, producer, seq))])],
        );
        client
            .send(ApiKey::Produce, PRODUCE_VERSION, id as i32, &request)
            .await;
        let (_, answer) = client
            .recv::<ProduceResponse>(ApiKey::Produce, PRODUCE_VERSION)
            .await
            .unwrap();
        assert_eq!(outcomes(&answer)[0].2, code, "write {id}");
    }
    let appended: Vec<(i64, i32, i32)> = us
        .appended()
        .iter()
        .map(|b| (b.producer_id, b.base_sequence, b.records))
        .collect();
    let (a, b) = (PRODUCER_ID, PRODUCER_ID + 1);
    assert_eq!(appended, [(a, 0, 2), (b, 0, 1), (a, 2, 2), (b, 1, 1)]);
    assert_eq!(eu.produced(), vec![]);
}

/// At shutdown, redirect pipelines write what is queued before they end: with 8 batches sent
/// to a broker 200 ms away (5 in flight, 3 waiting) when keyward is told to stop, the client
/// gets all 8 answers and the broker appends all 8, once each, in order.
#[tokio::test]
async fn redirect_pipelines_write_what_is_queued_before_keyward_stops() {
    let _serial = harness::serial().await;
    let (_eu, us, keyward) = redirecting_to("drain", "drn", distant(200)).await;
    let mut client = keyward.connect().await;
    // Known to keyward's producer first, so the 8 below are all queued at once.
    let warm = produce_pipelined(&mut client, "drn.a", &[1], 1).await;
    assert_eq!(warm, all_landed("drn.a", &[1], 1));

    let writing = tokio::spawn(async move {
        let answers = produce_pipelined(&mut client, "drn.a", &[0], 8).await;
        (client, answers)
    });
    let waited = Instant::now();
    while us.batches().iter().filter(|b| b.partition == 0).count() < 5 {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "batches never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    keyward.shared.shutdown_token().cancel();
    let (_client, answers) = writing.await.unwrap();

    assert_eq!(answers, all_landed("drn.a", &[0], 8));
    let appended: Vec<Batch> = us
        .appended()
        .into_iter()
        .filter(|b| b.partition == 0)
        .collect();
    let expected: Vec<Batch> = (0..8).map(|i| redirected("drn.a", 0, 2 * i, 2)).collect();
    assert_eq!(appended, expected);
}
