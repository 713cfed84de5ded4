//! keyward's data path in-process: `proxy::run` on `127.0.0.1:0` against a scripted fake broker
//! (`proxy/broker.rs`), driven by a client speaking Kafka frames (`proxy/harness.rs`). One test
//! binary (one link step); tests run one at a time (`harness::serial`), since the metrics
//! recorder is one per process.

#[path = "proxy/broker.rs"]
mod broker;
#[path = "proxy/harness.rs"]
mod harness;

use std::time::Duration;

use kafka_protocol::messages::{
    ApiKey, FetchRequest, FetchResponse, MetadataRequest, MetadataResponse, ProduceResponse,
};

use broker::{FakeBroker, Script, broker_offset};
use harness::{
    FETCH_VERSION, Keyward, METADATA_VERSION, Options, PRODUCE_VERSION, batch, foreign_key,
    key_rule, owned_key, produce, sample,
};

const INVALID_RECORD: i16 = 87;

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
