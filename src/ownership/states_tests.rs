//! Freezing and taking over part of a rule: slots, values, partitions or the whole rule. How
//! they are written, validated, decided, explained, hashed and counted.

use super::murmur2::{murmur2, to_positive};
use super::tests::{EXAMPLE, parse};
use super::*;
use std::path::Path;

const EU: RegionId = RegionId(0);
const US: RegionId = RegionId(1);

/// The example with extra lines after the `on_foreign`/`owners` line of each rule named.
fn example_with_states(lines: &[(&str, &str)]) -> String {
    let mut text = EXAMPLE.to_owned();
    for (after, extra) in lines {
        let at = text
            .find(after)
            .unwrap_or_else(|| panic!("{after:?} not in the example"));
        let end = at + text[at..].find('\n').unwrap();
        text.insert_str(end + 1, &format!("    {extra}\n"));
    }
    text
}

/// The example, with the states every test here starts from.
const ORDERS: &str = "owners: { eu: [\"0-7\"], us: [\"8-15\"] }";
const TENANTS: &str = "owners: { eu: [acme, globex], us: [initech] }";
const INVENTORY: &str = "owners: { eu: [\"0-5\"], us: [\"6-11\"] }";
const AUDIT: &str = "    owner: eu";

fn moving() -> Table {
    parse(&example_with_states(&[
        (ORDERS, "frozen: [\"0-3\"]"),
        (ORDERS, "takeover: { us: [\"4-5\"] }"),
        (TENANTS, "frozen: [acme]"),
        (TENANTS, "takeover: { us: [globex] }"),
        (INVENTORY, "frozen: [\"0-1\"]"),
        (INVENTORY, "takeover: { eu: [6, \"7\"] }"),
        (AUDIT, "frozen: all"),
    ]))
}

fn rejected(text: &str) -> String {
    let regions = ["eu".to_owned(), "us".to_owned()];
    match Table::parse(text, Path::new("ownership.yaml"), &regions) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// A key whose slot of 16 is `slot`.
fn key_in(slot: u32) -> Vec<u8> {
    (0..)
        .map(|i| format!("k{i}").into_bytes())
        .find(|k| to_positive(murmur2(k)) % 16 == slot)
        .unwrap()
}

fn verdict(table: &Table, subject: &Subject<'_>, local: RegionId) -> Verdict {
    let rule = table.rule_for_topic(subject.topic_name()).unwrap();
    let (claim, part) = rule.decide(subject).unwrap();
    table.judge(claim, part, local)
}

#[test]
fn frozen_parts_are_held_everywhere_and_taken_over_parts_written_by_their_new_region() {
    let table = &moving();
    let key = |slot| {
        let key = key_in(slot);
        move |local| verdict(table, &Subject::topic("orders").with_key(Some(&key)), local)
    };
    // Slots 0-3 frozen, 4-5 taken over by us, 6-7 eu's as before, 8-15 us's.
    for local in [EU, US] {
        assert_eq!(key(2)(local), Verdict::Frozen { owner: EU });
    }
    assert_eq!(key(4)(US), Verdict::Owned);
    assert_eq!(key(5)(EU), Verdict::Foreign { owner: US });
    assert_eq!(key(6)(EU), Verdict::Owned);
    assert_eq!(key(9)(EU), Verdict::Foreign { owner: US });

    let tenant = |value: &[u8], local| {
        verdict(
            table,
            &Subject::topic("tenant.x").with_header(b"tenant", value),
            local,
        )
    };
    assert_eq!(tenant(b"acme", US), Verdict::Frozen { owner: EU });
    assert_eq!(tenant(b"globex", US), Verdict::Owned);
    assert_eq!(tenant(b"globex", EU), Verdict::Foreign { owner: US });
    assert_eq!(tenant(b"initech", US), Verdict::Owned);

    let partition =
        |p, local| verdict(table, &Subject::topic("inventory").with_partition(p), local);
    assert_eq!(partition(1, EU), Verdict::Frozen { owner: EU });
    assert_eq!(partition(2, EU), Verdict::Owned);
    assert_eq!(partition(7, EU), Verdict::Owned, "taken over from us");
    assert_eq!(partition(8, EU), Verdict::Foreign { owner: US });

    assert_eq!(
        verdict(table, &Subject::topic("audit.x"), US),
        Verdict::Frozen { owner: EU }
    );
    // A rule without states is untouched.
    assert_eq!(
        verdict(table, &Subject::topic("metrics.x"), US),
        Verdict::Any
    );
}

#[test]
fn a_whole_rule_taken_over_moves_its_fallbacks_too_and_region_takeover_applies_after() {
    let text = example_with_states(&[(ORDERS, "takeover: us")])
        .replace("null_key: reject  ", "null_key: local   ");
    let table = parse(&text);
    let orders =
        |key: Option<&[u8]>, local| verdict(&table, &Subject::topic("orders").with_key(key), local);
    assert_eq!(orders(Some(&key_in(0)), US), Verdict::Owned);
    assert_eq!(orders(Some(&key_in(0)), EU), Verdict::Foreign { owner: US });
    assert_eq!(
        orders(None, EU),
        Verdict::Foreign { owner: US },
        "null_key: local"
    );

    // us, itself taken over by eu, hands on what it took over.
    let table = parse(&text.replace("takeover: {}", "takeover: { us: eu }"));
    assert_eq!(
        verdict(
            &table,
            &Subject::topic("orders").with_key(Some(&key_in(0))),
            EU
        ),
        Verdict::Owned
    );
}

#[test]
fn explain_and_the_summary_show_part_states() {
    let table = moving();
    let explain = |query: &str, local| {
        let params = query
            .split('&')
            .map(|p| p.split_once('=').unwrap_or((p, "")));
        table.explain(&Query::parse(params).unwrap().subject(), local)
    };
    let slot2 = String::from_utf8(key_in(2)).unwrap();
    let slot4 = String::from_utf8(key_in(4)).unwrap();
    assert_eq!(
        explain(&format!("topic=orders&key={slot2}"), EU),
        "region=eu rule=orders slot=2 frozen=true"
    );
    assert_eq!(
        explain(&format!("topic=orders&key={slot4}"), EU),
        "region=us rule=orders slot=4 takeover_from=eu"
    );
    assert_eq!(
        explain("topic=tenant.x&header=tenant:globex", EU),
        "region=us rule=tenants slot=- takeover_from=eu"
    );
    assert_eq!(
        explain("topic=inventory&partition=0", US),
        "region=eu rule=inventory slot=- frozen=true"
    );

    let summary = table.summary();
    for line in [
        "    frozen: [\"0-3\"]\n    takeover: {\"us\":[\"4-5\"]}",
        "    frozen: [\"acme\"]\n    takeover: {\"us\":[\"globex\"]}",
        "    frozen: [\"0-1\"]\n    takeover: {\"eu\":[\"6-7\"]}",
        "    frozen: \"all\"",
    ] {
        assert!(summary.contains(line), "{line:?} not in:\n{summary}");
    }
}

#[test]
fn part_states_are_hashed_however_written_and_named_in_the_diff() {
    let plain = parse(EXAMPLE);
    let table = moving();
    assert_ne!(table.content_hash(), plain.content_hash());
    let orders = &table.canonical_json()["rules"][0];
    assert_eq!(orders["frozen"], serde_json::json!(["0-3"]));
    assert_eq!(orders["takeover"], serde_json::json!({"us": ["4-5"]}));
    assert!(
        plain.canonical_json()["rules"][0].get("frozen").is_none(),
        "a rule without states has no such field, so its hash is what it always was"
    );

    let spelled_otherwise = parse(&example_with_states(&[
        (ORDERS, "frozen: [3, \"0-1\", 2]"),
        (ORDERS, "takeover: { us: [4, 5] }"),
        (TENANTS, "frozen: [\"acme\"]"),
        (TENANTS, "takeover: { us: [\"globex\"] }"),
        (INVENTORY, "frozen: [0, 1]"),
        (INVENTORY, "takeover: { eu: [\"6-7\"] }"),
        (AUDIT, "frozen: all"),
    ]));
    assert_eq!(spelled_otherwise.content_hash(), table.content_hash());

    let one_more = parse(&example_with_states(&[
        (ORDERS, "frozen: [\"0-4\"]"),
        (ORDERS, "takeover: { us: [\"5\"] }"),
    ]));
    assert_eq!(
        one_more.diff_summary(&plain),
        "rules changed: orders (frozen, takeover)"
    );
}

#[test]
fn parts_in_state_count_parts_and_a_whole_rule_counts_all_of_them() {
    let table = moving();
    let counts: Vec<(&str, (u64, u64))> = table
        .rules()
        .iter()
        .map(|r| (r.name.as_str(), r.parts_in_state()))
        .collect();
    assert_eq!(
        counts,
        [
            ("orders", (4, 2)),
            ("tenants", (1, 1)),
            ("inventory", (2, 2)),
            ("audit-log", (1, 0)),
            ("telemetry", (0, 0)),
        ]
    );
}

#[test]
fn contradictions_are_refused_with_the_field_and_the_part() {
    let cases = [
        (
            (ORDERS, "frozen: [\"14-16\"]"),
            "rules[0].frozen[0]: slot 16 is out of range 0-15 (slots: 16)",
        ),
        (
            (ORDERS, "takeover: { us: [\"7-8\"] }"),
            "rules[0].takeover.us[0]: slot 8 is already owned by us",
        ),
        (
            (ORDERS, "takeover: { mars: [1] }"),
            "rules[0].takeover.mars: unknown region `mars` (regions: eu, us)",
        ),
        (
            (TENANTS, "frozen: [hooli]"),
            "rules[1].frozen[0]: header value `hooli` is not in this rule's owners",
        ),
        (
            (TENANTS, "takeover: { us: [initech] }"),
            "rules[1].takeover.us[0]: `initech` is already owned by us",
        ),
        (
            (INVENTORY, "frozen: [\"10-12\"]"),
            "rules[2].frozen[0]: partition 12 is not in this rule's owners",
        ),
        (
            (INVENTORY, "takeover: { us: [\"4-6\"] }"),
            "rules[2].takeover.us[0]: partition 6 is already owned by us",
        ),
        (
            (AUDIT, "frozen: [1]"),
            "rules[3].frozen[0]: a `by: topic` rule has no parts: freeze it whole (`frozen: all`) or take it over whole (`takeover: <region>`)",
        ),
        (
            (AUDIT, "takeover: eu"),
            "rules[3].takeover: eu already owns this rule",
        ),
        (
            ("owner: any", "frozen: all"),
            "rules[4].frozen: an `owner: any` rule has no owner: there is nothing to freeze or take over",
        ),
        (
            (ORDERS, "frozen: some"),
            "expected `all` or a list, found \"some\"",
        ),
    ];
    for ((after, line), expected) in cases {
        let message = rejected(&example_with_states(&[(after, line)]));
        assert!(message.contains(expected), "{line}: {message}");
    }
    // A part taken over twice.
    let message = rejected(&example_with_states(&[(
        INVENTORY,
        "takeover: { eu: [\"6-7\", \"7\"] }",
    )]));
    assert!(
        message.contains("rules[2].takeover.eu[1]: partition 7 is also taken over by eu"),
        "{message}"
    );
    let message = rejected(&example_with_states(&[(
        ORDERS,
        "takeover: { us: [\"0-3\", \"2\"] }",
    )]));
    assert!(
        message.contains("rules[0].takeover.us[1]: slot 2 is also taken over by us"),
        "{message}"
    );
}
