//! keyward's mapping of a client's request into a region view (`proxy::view::request`), and its
//! own answer to an offset validation held in a failback window
//! (`proxy::failback::held_validation_answer`), on arbitrary bytes as a client could send them.
//!
//! Input layout: byte 0 picks the API among those the view maps (`view::MAPPED`), byte 1 the
//! version within its range; the rest is the request body, behind a header keyward builds. Both
//! must never panic, nor abort on a count that sizes an allocation (libFuzzer's malloc limit
//! reports one): the published kafka-protocol 0.18 did, from a few bytes.
#![no_main]

use kafka_protocol::messages::{ApiKey, RequestHeader};
use kafka_protocol::protocol::{Encodable, StrBytes};
use keyward::codec::frame;
use keyward::policy::region_view::RegionView;
use keyward::policy::replication::Naming;
use keyward::proxy::topic_ids::TopicIds;
use keyward::proxy::{failback, view};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [pick, v, body @ ..] = data else {
        return;
    };
    let (key, min, max) = view::MAPPED[usize::from(*pick) % view::MAPPED.len()];
    let version = min + (i16::from(*v) % (max - min + 1));
    let mut head = Vec::new();
    RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(7)
        .with_client_id(Some(StrBytes::from_static_str("fuzz")))
        .encode(&mut head, key.request_header_version(version))
        .expect("a header encodes");
    let request = frame::assemble(&head, body);
    let regions = ["eu".to_owned(), "us".to_owned()];
    let region_view = RegionView::new("us", "eu", &regions, Naming { separator: ".".into() });
    let (local, serving) = (TopicIds::default(), TopicIds::default());
    let ids = view::Ids { view: &region_view, local: &local, serving: &serving };
    let _ = view::request(&request, key, version, ids);
    if key == ApiKey::OffsetForLeaderEpoch {
        let _ = failback::held_validation_answer(&request, version, 7);
    }
});
