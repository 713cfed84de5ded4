//! The two YAML parsers an operator feeds keyward: the ownership table (regions eu and us) and
//! the static config, on arbitrary UTF-8. A table that parses is then used: every rule asked
//! about keys, headers and partitions, verdicts for both regions, its canonical form, hash and
//! a diff against a fixed table.
#![no_main]

use std::path::Path;

use keyward::config::Config;
use keyward::ownership::{Query, Subject, Table};
use libfuzzer_sys::fuzz_target;

const BASE: &str = r#"
rules:
  - name: orders
    topics: ["orders.*"]
    by: key
    slots: 4
    owners: { eu: ["0-1"], us: ["2-3"] }
default: allow
"#;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let regions = ["eu".to_owned(), "us".to_owned()];
    if let Ok(table) = Table::parse(text, Path::new("ownership.yaml"), &regions) {
        exercise(&table, &regions);
    }
    if let Ok(config) = Config::parse(text, Path::new("keyward.yaml")) {
        let _ = config.ownership_path();
        let regions = config.regions();
        assert!(regions.contains(&config.region));
        let _ = config.local_cluster();
        assert_eq!(config.clusters_in_id_order().len(), regions.len());
        let _ = config.broker_bind();
    }
});

fn exercise(table: &Table, regions: &[String]) {
    let base = Table::parse(BASE, Path::new("base.yaml"), regions).expect("valid base table");
    let _ = table.summary();
    let _ = table.canonical_json();
    assert_eq!(table.content_hash(), table.content_hash());
    let _ = table.diff_summary(&base);
    let _ = base.diff_summary(table);
    let _ = table.default_claim();
    let locals: Vec<_> = regions
        .iter()
        .map(|r| table.region_id(r).expect("region"))
        .collect();
    for rule in table.rules() {
        assert_eq!(
            table.rule_index(rule).map(|i| &table.rules()[i].name),
            Some(&rule.name)
        );
        let topic = Subject::topic("t");
        let subjects = [
            topic,
            topic.without_headers(),
            topic.with_key(None),
            topic.with_key(Some(b"cust-1")),
            topic.with_key(Some(b"")),
            topic.with_key(Some(b"tenant-42|order-9")),
            topic.with_key(Some(b"\xfftenant-1|\x00")),
            topic.with_header(b"tenant", b"acme"),
            topic.with_header(b"tenant", b""),
        ];
        let mut claims: Vec<_> = subjects.iter().filter_map(|s| rule.claim(s)).collect();
        claims.extend(
            [-1, 0, 1, 7, i32::MAX]
                .iter()
                .filter_map(|&p| rule.claim(&topic.with_partition(p))),
        );
        for claim in claims {
            for &local in &locals {
                let _ = table.verdict(claim, local);
            }
        }
        for topic in rule.topics() {
            // A glob names itself too, so the first rule listing it (or an earlier one) wins.
            let first = table
                .rule_for_topic(topic)
                .and_then(|r| table.rule_index(r));
            assert!(
                first.is_some() && first <= table.rule_index(rule),
                "{topic:?}"
            );
            for query in [
                "key=cust-1",
                "null_key=true",
                "header=tenant=acme",
                "partition=3",
                "",
            ] {
                let params = query.split_once('=').into_iter();
                let query =
                    Query::parse(params.chain([("topic", topic.as_str())])).expect("a valid query");
                let _ = rule.claim(&query.subject());
                let _ = table.explain(&query.subject(), locals[0]);
            }
        }
    }
}
