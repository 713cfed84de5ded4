//! The Produce request view and the ownership decision behind it, on arbitrary request bodies:
//! corrupt batches, bad CRCs, truncated varints, lying lengths, bad compression and
//! decompression bombs all arrive here first from a client.
//!
//! Input layout: byte 0 picks the request (bits 0-3: version 3 + n % 10; bit 4: the proxy's
//! region, eu or us; bit 5: the table, plain or with us frozen), the rest is the request body
//! (after the request header). Checks that one decision comes back per partition and that what
//! the decision reports stays within what the request holds.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use keyward::codec::produce::{self, MAX_VERSION, MIN_VERSION};
use keyward::codec::records::Inflater;
use keyward::ownership::Table;
use keyward::policy::produce::{Action, Destination, Placement, Split, decide, split_batch};
use libfuzzer_sys::fuzz_target;

/// Small enough that a bomb is cut off quickly, big enough for real batches.
const MAX_DECOMPRESSED: usize = 1 << 20;

/// Every kind of rule, with short topic globs so mutated names still land on one; the last rule
/// sends every other topic through key inspection.
const TABLE: &str = r#"
rules:
  - name: orders
    topics: ["orders*", "o*"]
    by: key
    slots: 16
    owners: { eu: ["0-7"], us: ["8-15"] }
    null_key: reject
  - name: redirected
    topics: ["r*"]
    by: key
    slots: 4
    owners: { eu: ["0-1"], us: ["2-3"] }
    null_key: us
    on_foreign: redirect
  - name: watched
    topics: ["w*"]
    by: key
    slots: 3
    owners: { eu: ["0"], us: ["1-2"] }
    null_key: local
    on_foreign: audit
  - name: tenants
    topics: ["tenant*", "t*"]
    by: header
    header: tenant
    owners: { eu: [acme, globex], us: [initech] }
    unmatched: reject
  - name: tenants-lenient
    topics: ["h*"]
    by: header
    header: h
    owners: { eu: [a], us: [b] }
    unmatched: local
    on_foreign: redirect
  - name: inventory
    topics: ["inventory*", "i*"]
    by: partition
    owners: { eu: ["0-1"], us: ["2-3"] }
  - name: audit-log
    topics: ["audit*", "a*"]
    by: topic
    owner: eu
  - name: telemetry
    topics: ["metrics*", "m*"]
    owner: any
  - name: everything-else
    topics: ["*"]
    by: key
    slots: 65536
    owners: { eu: ["0-32767"], us: ["32768-65535"] }
    null_key: eu
"#;

fn tables() -> &'static [Table; 2] {
    static TABLES: OnceLock<[Table; 2]> = OnceLock::new();
    TABLES.get_or_init(|| {
        let regions = ["eu".to_owned(), "us".to_owned()];
        let parse = |text: &str| {
            Table::parse(text, Path::new("fuzz-ownership.yaml"), &regions)
                .unwrap_or_else(|e| panic!("the fuzz table must be valid: {e}"))
        };
        [parse(TABLE), parse(&format!("{TABLE}frozen: [us]\n"))]
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let version = MIN_VERSION + i16::from(selector & 0x0f) % (MAX_VERSION - MIN_VERSION + 1);
    let table = &tables()[usize::from(selector >> 5 & 1)];
    let local = table
        .region_id(if selector & 0x10 == 0 { "eu" } else { "us" })
        .expect("known region");

    let Ok(view) = produce::parse(body, version) else {
        return;
    };
    let mut inflater = Inflater::new(MAX_DECOMPRESSED);
    let mut plan = decide(&view, table, local, &mut inflater);
    assert_eq!(plan.partitions.len(), view.partition_count());
    assert!(inflater.buffer_bytes() <= MAX_DECOMPRESSED + 1);

    let partitions = view.topics.iter().flat_map(|t| &t.partitions);
    for (decision, partition) in plan.partitions.iter().zip(partitions) {
        let records_len = partition.records.map_or(0, <[u8]>::len);
        // Every batch takes at least a 61-byte header.
        assert!(decision.batches as usize <= records_len / 61);
        if let Action::Reject { record_errors, .. } = &decision.action {
            assert!(record_errors.len() <= 100, "record_errors are capped");
        }
        if decision.rule.is_some() {
            assert!(decision.rule.unwrap() < table.rules().len());
        }
    }
    let forwarded = plan
        .partitions
        .iter()
        .filter(|p| p.action.is_forward())
        .count();
    assert_eq!(plan.all_forward(), forwarded == plan.partitions.len());
    assert_eq!(plan.none_forward(), forwarded == 0);
    // Placed while another region's cluster serves the connection: nothing of this region's
    // is forwarded, and every partition gets exactly one final route.
    let placement = Placement {
        clusters: &[Some(0), Some(1)],
        connection: 1,
        local_name: "local",
        connection_name: "serving",
    };
    let destinations = plan.place(&view, table, &placement);
    assert_eq!(destinations.len(), plan.partitions.len());
    assert!(
        !plan
            .partitions
            .iter()
            .any(|p| p.writes_local && p.action.is_forward())
    );
    for (decision, destination) in plan.partitions.iter().zip(&destinations) {
        match destination {
            Destination::Cluster(c) => {
                assert_ne!(*c, 1, "the connection's own cluster is reached directly");
                assert!(matches!(decision.action, Action::Redirect { .. }));
            }
            // Held instead while another cluster serves: only a split with no local record
            // goes on, and never to the connection's own cluster.
            Destination::Split(parts) => {
                assert!(!decision.writes_local);
                assert!(parts.iter().all(|&(_, c)| c != 1));
            }
            Destination::Answer(_) => assert!(!decision.action.is_forward()),
            Destination::Connection => {}
        }
    }
    // Placed normally: every batch decided split splits into parts that hold each of its
    // records exactly once, or fails cleanly.
    let mut plan = decide(&view, table, local, &mut inflater);
    let placement = Placement {
        connection: 0,
        ..placement
    };
    let destinations = plan.place(&view, table, &placement);
    let partitions = view
        .topics
        .iter()
        .flat_map(|t| t.partitions.iter().map(move |p| (t.name, p)));
    for ((decision, destination), (topic, p)) in
        plan.partitions.iter().zip(&destinations).zip(partitions)
    {
        let (
            Destination::Split(_),
            Action::Split {
                local: stays,
                foreign,
            },
        ) = (destination, &decision.action)
        else {
            continue;
        };
        let records = p.records.unwrap_or_default();
        let Some(rule) = decision.rule else { continue };
        if let Ok(Split::Parts(parts)) = split_batch(
            table,
            rule,
            local,
            topic,
            p.index,
            records,
            foreign,
            &mut inflater,
        ) {
            let mut covered: Vec<usize> = parts
                .iter()
                .flat_map(|part| part.runs.iter().cloned().flatten())
                .collect();
            covered.sort_unstable();
            assert!(
                covered.iter().enumerate().all(|(i, &c)| i == c),
                "each record once"
            );
            assert_eq!(covered.len() as u32, decision.records);
            let local_records = parts
                .iter()
                .find(|part| part.part == 0)
                .map_or(0, |part| part.records);
            assert_eq!(local_records as u32, *stays);
        }
    }
});
