//! The two YAML parsers an operator feeds keyward: the ownership table (regions eu and us) and
//! the static config, on arbitrary UTF-8. A table that parses is then used: every rule asked
//! about keys, headers and partitions, verdicts for both regions, its canonical form, hash and
//! a diff against a fixed table.
#![no_main]

use std::path::Path;

use keyward::config::Config;
use keyward::ownership::{Query, Table};
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
        let mut claims = vec![
            rule.claim_key(None),
            rule.claim_key(Some(b"cust-1")),
            rule.claim_key(Some(b"")),
            rule.claim_header(None),
            rule.claim_header(Some(b"acme")),
            rule.claim_topic(),
        ];
        claims.extend([-1, 0, 1, 7, i32::MAX].map(|p| rule.claim_partition(p)));
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
                Query::Key(Some(b"cust-1")),
                Query::Key(None),
                Query::Header {
                    name: "tenant",
                    value: b"acme",
                },
                Query::Partition(3),
                Query::None,
            ] {
                let _ = rule.claim(&query);
                let _ = table.explain(topic, &query, locals[0]);
            }
        }
    }
}
