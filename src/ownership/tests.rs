//! Tests across the module: the example file, the messages of rejected files, and properties of
//! lookups over generated tables. murmur2 and glob have their own tests next to them.

use super::murmur2::{murmur2, to_positive};
use super::*;
use proptest::prelude::*;
use std::path::Path;

/// The example of the ownership file format, with regions eu and us.
pub(super) const EXAMPLE: &str = r#"
rules:                            # first rule whose topics match wins
  - name: orders
    topics: ["orders", "orders.*"]   # exact names or globs (`*` any run of chars, `?` one char)
    by: key
    slots: 16                     # slot = toPositive(murmur2(key)) % slots
    owners: { eu: ["0-7"], us: ["8-15"] }   # ranges "a-b" or single "n" (strings), ints also accepted
    null_key: reject              # reject | local | <region>     (default reject)
    on_foreign: reject            # reject | redirect | audit     (default reject)
  - name: tenants
    topics: ["tenant.*"]
    by: header
    header: tenant
    owners: { eu: [acme, globex], us: [initech] }
    unmatched: reject             # header missing or value unlisted: reject | local | <region> (default reject)
    on_foreign: reject
  - name: inventory
    topics: ["inventory"]
    by: partition
    owners: { eu: ["0-5"], us: ["6-11"] }   # a partition nobody lists is rejected (reason unowned_partition)
  - name: audit-log
    topics: ["audit.*"]
    by: topic
    owner: eu
  - name: telemetry
    topics: ["metrics.*"]
    owner: any                    # every region may write (append-only data); `by` may be omitted or `topic`
default: allow                    # topics no rule matches: allow | reject   (default allow)
takeover: {}                      # e.g. { us: eu }: region eu takes over everything us owns
frozen: []                        # e.g. [us]: writes owned by us are held (retriable error) in every region
"#;

const EU: RegionId = RegionId(0);
const US: RegionId = RegionId(1);

fn regions() -> Vec<String> {
    vec!["eu".to_owned(), "us".to_owned()]
}

pub(super) fn parse(text: &str) -> Table {
    match Table::parse(text, Path::new("ownership.yaml"), &regions()) {
        Ok(table) => table,
        Err(e) => panic!("{e}\n{text}"),
    }
}

/// The full error message for a file that must be rejected.
fn rejected(text: &str) -> String {
    match Table::parse(text, Path::new("ownership.yaml"), &regions()) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// The example with its `takeover:` and `frozen:` lines replaced.
pub(super) fn example_with(takeover: &str, frozen: &str) -> Table {
    let text = EXAMPLE
        .replace("takeover: {}", &format!("takeover: {takeover}"))
        .replace("frozen: []", &format!("frozen: {frozen}"));
    parse(&text)
}

fn key_rule(table: &Table) -> &Rule {
    table.rule_for_topic("orders").expect("orders rule")
}

/// [`Rule::claim`] for a write known only as far as each method says, for rules that need no
/// more (a key for a key rule, the `tenant` header for a header rule, ...).
trait Ask {
    fn claim_key(&self, key: Option<&[u8]>) -> Claim;
    /// The `tenant` header's value, or a write without headers.
    fn claim_header(&self, value: Option<&[u8]>) -> Claim;
    fn claim_partition(&self, partition: i32) -> Claim;
    fn claim_topic(&self) -> Claim;
}

impl Ask for Rule {
    fn claim_key(&self, key: Option<&[u8]>) -> Claim {
        self.claim(&Subject::topic("t").with_key(key))
            .expect("a key answers the rule")
    }

    fn claim_header(&self, value: Option<&[u8]>) -> Claim {
        let subject = match value {
            Some(value) => Subject::topic("t").with_header(b"tenant", value),
            None => Subject::topic("t").without_headers(),
        };
        self.claim(&subject).expect("the header answers the rule")
    }

    fn claim_partition(&self, partition: i32) -> Claim {
        self.claim(&Subject::topic("t").with_partition(partition))
            .expect("a partition answers the rule")
    }

    fn claim_topic(&self) -> Claim {
        self.claim(&Subject::topic("t"))
            .expect("the topic answers the rule")
    }
}

/// [`Table::explain`] for a query written as URL parameters (`topic=orders&key=21`), read by
/// the parser the CLI and the admin API share.
fn explain(table: &Table, query: &str, local: RegionId) -> String {
    let params = query
        .split('&')
        .map(|p| p.split_once('=').unwrap_or((p, "")));
    let query = Query::parse(params).unwrap_or_else(|e| panic!("{query}: {e}"));
    table.explain(&query.subject(), local)
}

// ---------------------------------------------------------------------------------------------
// The example file
// ---------------------------------------------------------------------------------------------

#[test]
fn the_example_file_parses_into_five_rules() {
    let table = parse(EXAMPLE);
    assert_eq!(table.regions(), ["eu", "us"]);
    assert_eq!(table.region_id("us"), Some(US));
    assert_eq!(table.region_id("ap"), None);
    assert_eq!(table.region_name(EU), "eu");
    assert_eq!(table.region_name(RegionId(9)), "?");
    assert_eq!(table.source(), Path::new("ownership.yaml"));
    assert_eq!(table.default_policy(), DefaultPolicy::Allow);
    let kinds: Vec<(&str, &str)> = table
        .rules()
        .iter()
        .map(|r| (r.name.as_str(), r.by.kind()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("orders", "key"),
            ("tenants", "header"),
            ("inventory", "partition"),
            ("audit-log", "topic"),
            ("telemetry", "any"),
        ]
    );
    let orders = key_rule(&table);
    assert_eq!(orders.topics(), ["orders", "orders.*"]);
    assert_eq!(orders.on_foreign, OnForeign::Reject);
    match &orders.by {
        By::Key {
            slots,
            owners,
            null_key,
        } => {
            assert_eq!(*slots, 16);
            assert_eq!(owners[..8], [EU; 8]);
            assert_eq!(owners[8..], [US; 8]);
            assert_eq!(*null_key, Fallback::Reject);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_example_answers_each_kind_of_rule() {
    let table = parse(EXAMPLE);
    let orders = key_rule(&table);
    // "21" hashes to -973932308; toPositive gives 1173551340, and 1173551340 % 16 == 12.
    assert_eq!(
        orders.claim_key(Some(b"21")),
        Claim::Region {
            region: US,
            slot: Some(12)
        }
    );
    assert_eq!(orders.claim_key(None), Claim::Reject(RejectReason::NullKey));

    let tenants = table.rule_for_topic("tenant.billing").expect("tenants");
    assert_eq!(
        tenants.claim_header(Some(b"globex")),
        Claim::Region {
            region: EU,
            slot: None
        }
    );
    assert_eq!(
        tenants.claim_header(Some(b"initech")),
        Claim::Region {
            region: US,
            slot: None
        }
    );
    assert_eq!(
        tenants.claim_header(Some(b"ACME")),
        Claim::Reject(RejectReason::UnmatchedHeader)
    );
    assert_eq!(
        tenants.claim_header(None),
        Claim::Reject(RejectReason::UnmatchedHeader)
    );

    let inventory = table.rule_for_topic("inventory").expect("inventory");
    for (partition, expected) in [
        (
            0,
            Claim::Region {
                region: EU,
                slot: None,
            },
        ),
        (
            5,
            Claim::Region {
                region: EU,
                slot: None,
            },
        ),
        (
            6,
            Claim::Region {
                region: US,
                slot: None,
            },
        ),
        (
            11,
            Claim::Region {
                region: US,
                slot: None,
            },
        ),
        (12, Claim::Reject(RejectReason::UnownedPartition)),
        (-1, Claim::Reject(RejectReason::UnownedPartition)),
        (i32::MAX, Claim::Reject(RejectReason::UnownedPartition)),
    ] {
        assert_eq!(
            inventory.claim_partition(partition),
            expected,
            "{partition}"
        );
    }

    let audit = table.rule_for_topic("audit.logins").expect("audit");
    assert_eq!(
        audit.claim_topic(),
        Claim::Region {
            region: EU,
            slot: None
        }
    );
    let telemetry = table.rule_for_topic("metrics.cpu").expect("telemetry");
    assert_eq!(telemetry.claim_topic(), Claim::Any);
    // On a topic-wide rule the record does not matter.
    assert_eq!(telemetry.claim_key(Some(b"x")), Claim::Any);
    assert_eq!(audit.claim_partition(3), audit.claim_topic());

    assert_eq!(table.rule_index(telemetry), Some(4));
    assert_eq!(table.rule_index(orders), Some(0));
    let other = parse(EXAMPLE);
    assert_eq!(table.rule_index(key_rule(&other)), None);
    assert!(table.rule_for_topic("payments").is_none());
    assert!(table.rule_for_topic("order").is_none());
    assert_eq!(table.default_claim(), Claim::Any);
}

#[test]
fn a_subject_that_does_not_say_what_the_rule_needs_is_undecided_not_guessed() {
    let table = parse(EXAMPLE);
    let orders = Subject::topic("orders");
    assert_eq!(key_rule(&table).claim(&orders.with_partition(1)), None);
    assert_eq!(
        key_rule(&table).claim(&orders.with_header(b"k", b"1")),
        None
    );
    assert_eq!(key_rule(&table).claim(&orders.without_headers()), None);
    let tenants = table.rule_for_topic("tenant.x").expect("tenants");
    let tenant = Subject::topic("tenant.x");
    assert_eq!(tenants.claim(&tenant.with_key(Some(b"acme"))), None);
    // Another header than the rule's says nothing about the rule's.
    assert_eq!(tenants.claim(&tenant.with_header(b"Tenant", b"acme")), None);
    let inventory = table.rule_for_topic("inventory").expect("inventory");
    assert_eq!(
        inventory.claim(&Subject::topic("inventory").with_key(Some(b"1"))),
        None
    );
    // Which rules need the records decoded at all.
    let reads: Vec<bool> = table.rules().iter().map(Rule::reads_records).collect();
    assert_eq!(reads, [true, true, false, false, false]);
}

#[test]
fn explain_gives_one_line_per_question() {
    let table = parse(EXAMPLE);
    let cases = [
        ("topic=orders&key=21", "region=us rule=orders slot=12"),
        ("topic=orders.eu&key=21", "region=us rule=orders slot=12"),
        (
            "topic=orders&null_key=true",
            "decision=reject reason=null_key rule=orders",
        ),
        (
            "topic=orders&partition=3",
            "decision=undecided need=key rule=orders",
        ),
        (
            "topic=tenant.x&header=tenant=acme",
            "region=eu rule=tenants slot=-",
        ),
        // The admin API's earlier NAME:VALUE form.
        (
            "topic=tenant.x&header=tenant:acme",
            "region=eu rule=tenants slot=-",
        ),
        (
            "topic=tenant.x&header=tenant=umbrella",
            "decision=reject reason=unmatched_header rule=tenants",
        ),
        (
            "topic=tenant.x",
            "decision=reject reason=unmatched_header rule=tenants",
        ),
        (
            "topic=tenant.x&header=Tenant=acme",
            "decision=undecided need=header:tenant rule=tenants",
        ),
        (
            "topic=inventory&partition=7",
            "region=us rule=inventory slot=-",
        ),
        (
            "topic=inventory&partition=12",
            "decision=reject reason=unowned_partition rule=inventory",
        ),
        ("topic=audit.x", "region=eu rule=audit-log slot=-"),
        ("topic=audit.x&key=k", "region=eu rule=audit-log slot=-"),
        ("topic=metrics.cpu", "region=any rule=telemetry slot=-"),
        ("topic=payments", "region=any rule=- slot=- default=allow"),
    ];
    for (query, expected) in cases {
        assert_eq!(explain(&table, query, EU), expected, "{query}");
    }
}

#[test]
fn owner_queries_are_read_one_way_for_the_cli_and_the_admin_api() {
    let parse = |query: &str| {
        Query::parse(
            query
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| p.split_once('=').unwrap_or((p, ""))),
        )
    };
    let query = |topic: &str, about| Query {
        topic: topic.to_owned(),
        about,
    };
    assert_eq!(parse("topic=t"), Ok(query("t", About::Nothing)));
    assert_eq!(
        parse("key=a=b&topic=t"),
        Ok(query("t", About::Key("a=b".to_owned())))
    );
    let header = |name: &str, value: &str| About::Header {
        name: name.to_owned(),
        value: value.to_owned(),
    };
    // Split at the first `=`; `:` only when there is no `=`.
    assert_eq!(
        parse("topic=t&header=a=b=c"),
        Ok(query("t", header("a", "b=c")))
    );
    assert_eq!(
        parse("topic=t&header=a:b"),
        Ok(query("t", header("a", "b")))
    );
    assert_eq!(
        parse("topic=t&header=a:b=c"),
        Ok(query("t", header("a:b", "c")))
    );
    assert_eq!(parse("topic=t&header=a="), Ok(query("t", header("a", ""))));
    assert_eq!(
        parse("topic=t&partition=7"),
        Ok(query("t", About::Partition(7)))
    );
    assert_eq!(
        parse("topic=t&null_key=true"),
        Ok(query("t", About::NullKey))
    );
    let error = |q: &str| parse(q).expect_err(q).to_string();
    assert_eq!(error("key=x"), "topic is required");
    assert_eq!(error(""), "topic is required");
    assert_eq!(
        error("topic=t&key=x&partition=1"),
        "give at most one of key, null_key, header and partition (got key and partition)"
    );
    assert_eq!(error("topic=t&key=x&key=y"), "key is given twice");
    assert_eq!(error("topic=t&topic=u"), "topic is given twice");
    assert_eq!(
        error("topic=t&header=tenant"),
        "header takes NAME=VALUE, got \"tenant\""
    );
    assert_eq!(
        error("topic=t&header==acme"),
        "header takes NAME=VALUE with a name, got \"=acme\""
    );
    assert_eq!(
        error("topic=t&partition=x"),
        "partition takes a number, got \"x\""
    );
    assert_eq!(
        error("topic=t&null_key=1"),
        "null_key takes true, got \"1\""
    );
    assert_eq!(
        error("topic=t&slot=1"),
        "unknown parameter \"slot\" (parameters: topic, key, null_key, header, partition)"
    );
}

#[test]
fn values_in_messages_are_quoted_text_or_hex() {
    assert_eq!(quote(b"cust-42"), "\"cust-42\"");
    assert_eq!(quote(&[0, 1, 0xff]), "0x0001ff");
    assert_eq!(quote(&[b'a'; 70]).chars().count(), 64 + 3);
}

#[test]
fn explain_shows_takeover_frozen_and_default_reject() {
    let table = example_with("{ us: eu }", "[eu]");
    assert_eq!(
        explain(&table, "topic=orders&key=21", US),
        "region=eu rule=orders slot=12 takeover_from=us frozen=true"
    );
    assert_eq!(
        explain(&table, "topic=audit.x", US),
        "region=eu rule=audit-log slot=- frozen=true"
    );

    let table = parse(&EXAMPLE.replace("default: allow", "default: reject"));
    assert_eq!(
        explain(&table, "topic=payments", EU),
        "decision=reject reason=default_reject rule=-"
    );
    assert_eq!(
        table.default_claim(),
        Claim::Reject(RejectReason::DefaultReject)
    );
}

#[test]
fn explain_resolves_local_fallbacks_for_the_asking_region() {
    let text = EXAMPLE.replace("null_key: reject", "null_key: local");
    let table = parse(&text);
    assert_eq!(key_rule(&table).claim_key(None), Claim::Local);
    assert_eq!(
        explain(&table, "topic=orders&null_key=true", US),
        "region=us rule=orders slot=-"
    );
    let text = EXAMPLE.replace("unmatched: reject", "unmatched: us");
    let table = parse(&text);
    assert_eq!(
        explain(&table, "topic=tenant.x", EU),
        "region=us rule=tenants slot=-"
    );
}

#[test]
fn summary_lists_regions_rules_slot_counts_and_state() {
    let table = example_with("{ us: eu }", "[us]");
    let expected = "\
regions: eu, us
rules (the first whose topics match wins): 5
  orders: by key, topics orders, orders.*
    slots 16: eu 8, us 8
    null_key: reject
    on_foreign: reject
  tenants: by header, topics tenant.*
    header tenant: values eu 2, us 1
    unmatched: reject
    on_foreign: reject
  inventory: by partition, topics inventory
    partitions: eu 0-5, us 6-11
    on_foreign: reject
  audit-log: by topic, topics audit.*
    owner: eu
    on_foreign: reject
  telemetry: by any, topics metrics.*
    owner: any
default: allow
takeover: us -> eu
frozen: us (no effect: taken over by eu)
";
    assert_eq!(table.summary(), expected);
}

// ---------------------------------------------------------------------------------------------
// Verdicts
// ---------------------------------------------------------------------------------------------

#[test]
fn verdicts_without_takeover_or_frozen() {
    let table = parse(EXAMPLE);
    let eu = Claim::Region {
        region: EU,
        slot: Some(1),
    };
    assert_eq!(table.verdict(eu, EU), Verdict::Owned);
    assert_eq!(table.verdict(eu, US), Verdict::Foreign { owner: EU });
    assert_eq!(table.verdict(Claim::Any, US), Verdict::Any);
    assert_eq!(table.verdict(Claim::Local, US), Verdict::Owned);
    assert_eq!(
        table.verdict(Claim::Reject(RejectReason::NullKey), EU),
        Verdict::Reject(RejectReason::NullKey)
    );
}

#[test]
fn takeover_applies_to_local_fallbacks_too() {
    let table = example_with("{ us: eu }", "[]");
    assert_eq!(table.effective_owner(US), EU);
    assert_eq!(table.effective_owner(EU), EU);
    // The us proxy writing a null key under `null_key: local`: us is taken over, eu owns it.
    assert_eq!(
        table.verdict(Claim::Local, US),
        Verdict::Foreign { owner: EU }
    );
    assert_eq!(table.verdict(Claim::Local, EU), Verdict::Owned);
}

#[test]
fn frozen_holds_writes_in_every_region_and_applies_after_takeover() {
    let table = example_with("{}", "[eu]");
    let eu = Claim::Region {
        region: EU,
        slot: None,
    };
    assert_eq!(table.verdict(eu, EU), Verdict::Frozen { owner: EU });
    assert_eq!(table.verdict(eu, US), Verdict::Frozen { owner: EU });
    assert_eq!(
        table.verdict(Claim::Local, EU),
        Verdict::Frozen { owner: EU }
    );
    assert_eq!(table.verdict(Claim::Local, US), Verdict::Owned);
    assert_eq!(table.verdict(Claim::Any, EU), Verdict::Any);

    // us is taken over by eu, and eu is frozen: what us owned is now frozen too.
    let table = example_with("{ us: eu }", "[eu]");
    let us = Claim::Region {
        region: US,
        slot: None,
    };
    assert_eq!(table.verdict(us, US), Verdict::Frozen { owner: EU });
    // Freezing a region that was taken over holds nothing: it owns nothing any more.
    let table = example_with("{ us: eu }", "[us]");
    assert_eq!(table.verdict(us, US), Verdict::Foreign { owner: EU });
    assert_eq!(table.verdict(us, EU), Verdict::Owned);
}

// ---------------------------------------------------------------------------------------------
// Topic matching
// ---------------------------------------------------------------------------------------------

#[test]
fn the_first_matching_rule_wins_whether_exact_or_glob() {
    let table = parse(
        r#"
rules:
  - { name: broad, topics: ["a.*"], owner: eu }
  - { name: exact, topics: ["a.b", "c"], owner: us }
  - { name: later-glob, topics: ["c*", "?"], owner: any }
"#,
    );
    let rule = |topic| table.rule_for_topic(topic).map(|r| r.name.as_str());
    assert_eq!(rule("a.b"), Some("broad"));
    assert_eq!(rule("c"), Some("exact"));
    assert_eq!(rule("cc"), Some("later-glob"));
    assert_eq!(rule("x"), Some("later-glob"));
    assert_eq!(rule("a"), Some("later-glob"));
    assert_eq!(rule("ab"), None);
    assert_eq!(rule(""), None);
}

// ---------------------------------------------------------------------------------------------
// Rejected files: the whole message, so that it stays precise
// ---------------------------------------------------------------------------------------------

/// A one-rule `by: key` file with these owners.
fn key_file(slots: u32, owners: &str) -> String {
    format!(
        "rules:\n  - name: orders\n    topics: [orders]\n    by: key\n    slots: {slots}\n    owners: {owners}\n"
    )
}

#[test]
fn a_slot_owned_twice_names_both_regions() {
    assert_eq!(
        rejected(&key_file(16, r#"{ eu: ["0-9"], us: ["9-15"] }"#)),
        "ownership.yaml: rules[0].owners.us: slot 9 is also owned by eu"
    );
    assert_eq!(
        rejected(&key_file(16, r#"{ eu: ["0-9", 3], us: ["10-15"] }"#)),
        "ownership.yaml: rules[0].owners.eu: slot 3 is listed twice"
    );
}

#[test]
fn slots_without_an_owner_are_named_compactly() {
    assert_eq!(
        rejected(&key_file(10, r#"{ eu: ["0-2"], us: ["6-8"] }"#)),
        "ownership.yaml: rules[0].owners: slots 3-5, 9 have no owner"
    );
    assert_eq!(
        rejected(&key_file(4, r#"{ eu: [0, 1], us: [3] }"#)),
        "ownership.yaml: rules[0].owners: slot 2 has no owner"
    );
    let every_other: Vec<String> = (0..30).step_by(2).map(|n| n.to_string()).collect();
    assert_eq!(
        rejected(&key_file(
            30,
            &format!("{{ eu: [{}] }}", every_other.join(", "))
        )),
        "ownership.yaml: rules[0].owners: slots 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, \
         and 5 more ranges have no owner"
    );
}

#[test]
fn slot_numbers_and_ranges_are_checked() {
    assert_eq!(
        rejected(&key_file(16, r#"{ eu: ["0-7"], us: ["8-16"] }"#)),
        "ownership.yaml: rules[0].owners.us[0]: slot 16 is out of range 0-15 (slots: 16)"
    );
    assert_eq!(
        rejected(&key_file(16, r#"{ eu: ["0-7"], us: ["15-8"] }"#)),
        "ownership.yaml: rules[0].owners.us[0]: range 15-8 runs backwards (write \"8-15\")"
    );
    assert_eq!(
        rejected(&key_file(16, r#"{ eu: ["0-7"], us: ["8..15"] }"#)),
        "ownership.yaml: rules[0].owners.us[0]: expected a slot number or a range like \"0-7\", \
         found \"8..15\""
    );
    assert_eq!(
        rejected(&key_file(16, r#"{ eu: [-1] }"#)),
        "ownership.yaml: rules[0].owners.eu[0]: slot -1 is negative"
    );
    assert_eq!(
        rejected(&key_file(0, r#"{ eu: [0] }"#)),
        "ownership.yaml: rules[0].slots: slots must be at least 1"
    );
    assert_eq!(
        rejected(&key_file(100_000, r#"{ eu: ["0-99999"] }"#)),
        "ownership.yaml: rules[0].slots: slots must be at most 65536"
    );
    // Ints, single strings, ranges with spaces: all the same thing.
    let table = parse(&key_file(4, r#"{ eu: [0, "1"], us: [" 2 - 3 "] }"#));
    assert_eq!(
        key_rule(&table).claim_key(Some(b"21")),
        Claim::Region {
            region: EU,
            slot: Some(0) // 1173551340 % 4
        }
    );
}

#[test]
fn unknown_regions_are_named_with_the_known_ones() {
    assert_eq!(
        rejected(&key_file(2, r#"{ eu: [0], ap: [1] }"#)),
        "ownership.yaml: rules[0].owners.ap: unknown region `ap` (regions: eu, us)"
    );
    assert_eq!(
        rejected(&EXAMPLE.replace("takeover: {}", "takeover: { us: ap }")),
        "ownership.yaml: takeover.us: unknown region `ap` (regions: eu, us)"
    );
    assert_eq!(
        rejected(&EXAMPLE.replace("frozen: []", "frozen: [eu, ap]")),
        "ownership.yaml: frozen[1]: unknown region `ap` (regions: eu, us)"
    );
    assert_eq!(
        rejected(&EXAMPLE.replace("null_key: reject", "null_key: ap")),
        "ownership.yaml: rules[0].null_key: unknown region `ap` (regions: eu, us; or reject, local)"
    );
    assert_eq!(
        rejected(&EXAMPLE.replace("unmatched: reject", "unmatched: nobody")),
        "ownership.yaml: rules[1].unmatched: unknown region `nobody` (regions: eu, us; or reject, \
         local)"
    );
    assert_eq!(
        rejected(&EXAMPLE.replace("owner: eu", "owner: EU")),
        "ownership.yaml: rules[3].owner: unknown region `EU` (regions: eu, us; or any)"
    );
}

#[test]
fn takeover_chains_and_cycles_are_rejected() {
    let three = ["eu".to_owned(), "us".to_owned(), "ap".to_owned()];
    let with = |takeover: &str| {
        let text = format!("rules: []\ntakeover: {takeover}\n");
        Table::parse(&text, Path::new("ownership.yaml"), &three)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        with("{ us: eu, eu: ap }"),
        "ownership.yaml: takeover.us: takeover chain: us -> eu -> ap: a region that takes over \
         cannot itself be taken over (write `us: ap` instead)"
    );
    assert_eq!(
        with("{ eu: us, us: eu }"),
        "ownership.yaml: takeover.eu: takeover cycle: eu -> us -> eu"
    );
    assert_eq!(
        with("{ ap: ap }"),
        "ownership.yaml: takeover.ap: takeover cycle: ap -> ap (a region cannot take over itself)"
    );
    assert_eq!(
        with("{ us: eu, us: ap }"),
        "ownership.yaml: takeover: `us` is listed twice at line 2 column 11"
    );
    // Two regions taken over by the same third one is fine.
    let text = "rules: []\ntakeover: { us: eu, ap: eu }\n";
    let table = Table::parse(text, Path::new("ownership.yaml"), &three).expect("valid");
    assert_eq!(table.effective_owner(RegionId(2)), EU);
}

#[test]
fn empty_rules_are_rejected() {
    assert_eq!(
        rejected("rules:\n  - name: orders\n    owner: eu\n"),
        "ownership.yaml: rules[0].topics: rule `orders` has no topics"
    );
    assert_eq!(
        rejected("rules:\n  - name: orders\n    topics: []\n    owner: eu\n"),
        "ownership.yaml: rules[0].topics: rule `orders` has no topics"
    );
    assert_eq!(
        rejected("rules:\n  - name: orders\n    topics: [orders, '']\n    owner: eu\n"),
        "ownership.yaml: rules[0].topics[1]: empty topic pattern"
    );
    assert_eq!(
        rejected("rules:\n  - name: orders\n    topics: [orders]\n"),
        "ownership.yaml: rules[0].owner: rule `orders` has no owner (a region, or any)"
    );
    assert_eq!(
        rejected("rules:\n  - name: orders\n    topics: [orders]\n    by: partition\n"),
        "ownership.yaml: rules[0].owners: rule `orders` has no owners"
    );
    assert_eq!(
        rejected(&key_file(4, "{}")),
        "ownership.yaml: rules[0].owners: rule `orders` has no owners"
    );
    assert_eq!(
        rejected("rules:\n  - name: ''\n    topics: [orders]\n    owner: eu\n"),
        "ownership.yaml: rules[0].name: a rule needs a name"
    );
    assert_eq!(
        rejected("rules:\n  - name: orders\n    topics: ['orders eu']\n    owner: eu\n"),
        "ownership.yaml: rules[0].topics[0]: `orders eu` contains ' ', which is not in a topic \
         name (a-z, A-Z, 0-9, '.', '_', '-' and the wildcards '*', '?')"
    );
}

#[test]
fn unknown_fields_and_bad_yaml_are_named_with_path_and_position() {
    assert_eq!(
        rejected("rules:\n  - name: orders\n    topics: [orders]\n    slotz: 3\n"),
        "ownership.yaml: rules[0].slotz: unknown field `slotz`, expected one of `name`, \
         `topics`, `by`, `slots`, `header`, `delimiter`, `index`, `pattern`, `group`, `owners`, \
         `owner`, `null_key`, `unmatched`, `on_foreign`, `frozen`, `takeover` at line 4 column 5"
    );
    assert_eq!(
        rejected("rules: []\nfrozn: [us]\n"),
        "ownership.yaml: frozn: unknown field `frozn`, expected one of `rules`, `default`, \
         `takeover`, `frozen` at line 2 column 1"
    );
    assert_eq!(
        rejected("rules:\n  - name: orders\n    topics: [orders]\n    by: keys\n"),
        "ownership.yaml: rules[0].by: unknown variant `keys`, expected one of `key`, `header`, \
         `key_part`, `partition`, `topic` at line 4 column 9"
    );
    assert_eq!(
        rejected(&key_file(4, "{ eu: [0.5] }")),
        "ownership.yaml: rules[0].owners.eu[0]: invalid type: floating point `0.5`, expected a \
         number, a range like \"0-7\", or a header value at line 6 column 20"
    );
    assert_eq!(
        rejected("rules: [\n"),
        "ownership.yaml: rules: did not find expected node content at line 2 column 1, while \
         parsing a flow node"
    );
    assert_eq!(rejected(""), "ownership.yaml: missing field `rules`");
}

#[test]
fn on_foreign_takes_each_of_its_values() {
    let table = parse(&EXAMPLE.replacen("on_foreign: reject", "on_foreign: redirect", 1));
    assert_eq!(key_rule(&table).on_foreign, OnForeign::Redirect);
    let table = parse(&EXAMPLE.replacen("on_foreign: reject", "on_foreign: audit", 1));
    assert_eq!(key_rule(&table).on_foreign, OnForeign::Audit);
}

#[test]
fn fields_must_belong_to_the_rules_by() {
    assert_eq!(
        rejected(&EXAMPLE.replace("header: tenant", "header: tenant\n    slots: 4")),
        "ownership.yaml: rules[1].slots: `slots` does not belong to a `by: header` rule"
    );
    assert_eq!(
        rejected(&EXAMPLE.replace("null_key: reject", "unmatched: reject")),
        "ownership.yaml: rules[0].unmatched: `unmatched` does not belong to a `by: key` rule"
    );
    assert_eq!(
        rejected("rules:\n  - name: t\n    topics: [t]\n    owners: { eu: [0] }\n"),
        "ownership.yaml: rules[0].owners: `owners` does not belong to a `by: topic` rule \
         (a rule without `by` is `by: topic`)"
    );
    assert_eq!(
        rejected("rules:\n  - name: t\n    topics: [t]\n    by: key\n    owner: eu\n"),
        "ownership.yaml: rules[0].owner: `owner` does not belong to a `by: key` rule"
    );
    assert_eq!(
        rejected("rules:\n  - name: t\n    topics: [t]\n    by: key\n    owners: { eu: [0] }\n"),
        "ownership.yaml: rules[0].slots: a `by: key` rule needs `slots`"
    );
    assert_eq!(
        rejected("rules:\n  - name: t\n    topics: [t]\n    by: header\n    owners: { eu: [a] }\n"),
        "ownership.yaml: rules[0].header: a `by: header` rule needs `header` (the record header \
         to read)"
    );
}

#[test]
fn duplicate_names_and_topics_are_rejected() {
    assert_eq!(
        rejected(&EXAMPLE.replace("name: inventory", "name: orders")),
        "ownership.yaml: rules[2].name: duplicate rule name `orders` (also rules[0])"
    );
    assert_eq!(
        rejected(&EXAMPLE.replace(r#"topics: ["inventory"]"#, r#"topics: ["orders.*"]"#)),
        "ownership.yaml: rules[2].topics[0]: topic `orders.*` is already matched by rules[0] \
         (orders), which comes first and wins"
    );
    assert_eq!(
        rejected(&EXAMPLE.replace(
            r#"topics: ["inventory"]"#,
            r#"topics: [inventory, inventory]"#
        )),
        "ownership.yaml: rules[2].topics[1]: topic `inventory` is listed twice"
    );
}

#[test]
fn header_values_and_partitions_are_owned_once() {
    assert_eq!(
        rejected(&EXAMPLE.replace("us: [initech]", "us: [initech, acme]")),
        "ownership.yaml: rules[1].owners.us: header value `acme` is also owned by eu"
    );
    assert_eq!(
        rejected(&EXAMPLE.replace("us: [initech]", "us: [initech, 42]")),
        "ownership.yaml: rules[1].owners.us[1]: header value 42 is a number: quote it, e.g. \"42\""
    );
    assert_eq!(
        rejected(&EXAMPLE.replace(r#"us: ["6-11"]"#, r#"us: ["6-11", 2]"#)),
        "ownership.yaml: rules[2].owners.us: partition 2 is also owned by eu"
    );
    assert_eq!(
        rejected(&EXAMPLE.replace(r#"us: ["6-11"]"#, r#"us: ["3-11"]"#)),
        "ownership.yaml: rules[2].owners.us: partition 3 is also owned by eu"
    );
    assert_eq!(
        rejected(&EXAMPLE.replace(r#"us: ["6-11"]"#, r#"us: ["6-2147483648"]"#)),
        "ownership.yaml: rules[2].owners.us[0]: partition 2147483648 is out of range \
         (partitions go up to 2147483647)"
    );
}

#[test]
fn region_names_must_be_usable_in_the_file() {
    let err = |regions: &[&str]| {
        let regions: Vec<String> = regions.iter().map(|r| r.to_string()).collect();
        Table::parse("rules: []\n", Path::new("ownership.yaml"), &regions)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err(&["eu", "local"]),
        "ownership.yaml: region name `local` cannot be used: any, local and reject are keywords \
         of the ownership file"
    );
    assert_eq!(
        err(&["eu", "eu"]),
        "ownership.yaml: region `eu` is given twice"
    );
}

#[test]
fn load_reads_the_file_and_names_it_in_errors() {
    let missing = Path::new("/nonexistent/keyward/ownership.yaml");
    let err = Table::load(missing, &regions()).unwrap_err();
    assert_eq!(err.file, missing);
    assert_eq!(err.path, "");
    assert!(
        err.to_string()
            .starts_with("/nonexistent/keyward/ownership.yaml: cannot read the file: "),
        "{err}"
    );

    let dir = std::env::temp_dir().join(format!("keyward-ownership-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("ownership.yaml");
    std::fs::write(&file, EXAMPLE).expect("write");
    let table = Table::load(&file, &regions()).expect("loads");
    assert_eq!(table.source(), file);
    std::fs::write(&file, "rules: [{ name: x }]\n").expect("write");
    let err = Table::load(&file, &regions()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: rules[0].topics: rule `x` has no topics",
            file.display()
        )
    );
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------------------------------------
// Properties over generated tables
// ---------------------------------------------------------------------------------------------

/// Region names `r0`, `r1`, ...
fn region_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("r{i}")).collect()
}

/// A `by: key` file for `owner_of_slot` (region index per slot), written the way a person
/// would: each region's runs of slots as `"a-b"` ranges, single slots alternately as ints and
/// strings. Returns the text and, per region, the `(first, last)` ranges it lists.
fn key_table_yaml(
    owner_of_slot: &[usize],
    regions: usize,
    extra: &str,
) -> (String, Vec<Vec<(usize, usize)>>) {
    let mut listed: Vec<Vec<(usize, usize)>> = vec![Vec::new(); regions];
    let mut start = 0;
    for slot in 1..=owner_of_slot.len() {
        if slot == owner_of_slot.len() || owner_of_slot[slot] != owner_of_slot[start] {
            listed[owner_of_slot[start]].push((start, slot - 1));
            start = slot;
        }
    }
    let owners: Vec<String> = listed
        .iter()
        .enumerate()
        .filter(|(_, ranges)| !ranges.is_empty())
        .map(|(r, ranges)| {
            let items: Vec<String> = ranges
                .iter()
                .map(|&(a, b)| match (a == b, a % 2 == 0) {
                    (true, true) => a.to_string(),
                    (true, false) => format!("\"{a}\""),
                    (false, _) => format!("\"{a}-{b}\""),
                })
                .collect();
            format!("r{r}: [{}]", items.join(", "))
        })
        .collect();
    let text = format!(
        "rules:\n  - name: k\n    topics: [t]\n    by: key\n    slots: {}\n    owners: {{ {} }}\n    null_key: local\n{extra}",
        owner_of_slot.len(),
        owners.join(", ")
    );
    (text, listed)
}

fn key_table(owner_of_slot: &[usize], regions: usize, extra: &str) -> Table {
    let (text, _) = key_table_yaml(owner_of_slot, regions, extra);
    match Table::parse(&text, Path::new("gen.yaml"), &region_names(regions)) {
        Ok(table) => table,
        Err(e) => panic!("{e}\n{text}"),
    }
}

/// Regions, a slot table over them, and keys to look up.
fn key_setup() -> impl Strategy<Value = (usize, Vec<usize>, Vec<Vec<u8>>)> {
    (2usize..=4).prop_flat_map(|regions| {
        (
            Just(regions),
            prop::collection::vec(0..regions, 1..=48),
            prop::collection::vec(prop::collection::vec(any::<u8>(), 0..24), 1..24),
        )
    })
}

/// Every claim the key rule can make for `keys` and a null key.
fn claims(table: &Table, keys: &[Vec<u8>]) -> Vec<Claim> {
    let rule = table.rule_for_topic("t").expect("rule");
    keys.iter()
        .map(|k| rule.claim_key(Some(k)))
        .chain([rule.claim_key(None)])
        .collect()
}

fn region_ids(n: usize) -> impl Iterator<Item = RegionId> {
    (0..n as u16).map(RegionId)
}

proptest! {
    #[test]
    fn every_key_has_exactly_one_owner_the_one_listing_its_slot(
        (regions, owner_of_slot, keys) in key_setup()
    ) {
        let (text, listed) = key_table_yaml(&owner_of_slot, regions, "");
        let table = Table::parse(&text, Path::new("gen.yaml"), &region_names(regions))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let rule = table.rule_for_topic("t").expect("rule");
        let slots = owner_of_slot.len() as u32;
        for key in &keys {
            let slot = to_positive(murmur2(key)) % slots;
            let listing: Vec<usize> = (0..regions)
                .filter(|&r| listed[r].iter().any(|&(a, b)| (a..=b).contains(&(slot as usize))))
                .collect();
            prop_assert_eq!(listing.len(), 1, "slot {} listed by {:?}", slot, listing);
            prop_assert_eq!(
                rule.claim_key(Some(key)),
                Claim::Region { region: RegionId(listing[0] as u16), slot: Some(slot) }
            );
        }
    }

    #[test]
    fn takeover_moves_everything_of_x_to_y_and_nothing_else(
        (regions, owner_of_slot, keys) in key_setup(),
        x in 0usize..4,
        y in 0usize..4,
    ) {
        let (x, y) = (x % regions, y % regions);
        prop_assume!(x != y);
        let plain = key_table(&owner_of_slot, regions, "");
        let taken = key_table(&owner_of_slot, regions, &format!("takeover: {{ r{x}: r{y} }}\n"));
        let (x, y) = (RegionId(x as u16), RegionId(y as u16));
        // The rule's claims do not change; only the verdicts do.
        prop_assert_eq!(claims(&taken, &keys), claims(&plain, &keys));
        for claim in claims(&plain, &keys) {
            for local in region_ids(regions) {
                // The same claim with x's writes given to y.
                let moved = match claim {
                    Claim::Region { region, slot } if region == x => Claim::Region { region: y, slot },
                    Claim::Local if local == x => Claim::Region { region: y, slot: None },
                    other => other,
                };
                prop_assert_eq!(taken.verdict(claim, local), plain.verdict(moved, local));
            }
        }
        prop_assert_eq!(taken.effective_owner(x), y);
        for other in region_ids(regions).filter(|&r| r != x) {
            prop_assert_eq!(taken.effective_owner(other), other);
        }
    }

    #[test]
    fn frozen_holds_exactly_the_frozen_owners_writes(
        (regions, owner_of_slot, keys) in key_setup(),
        frozen_mask in 0u8..16,
    ) {
        let frozen: Vec<usize> = (0..regions).filter(|r| frozen_mask & (1 << r) != 0).collect();
        let list: Vec<String> = frozen.iter().map(|r| format!("r{r}")).collect();
        let plain = key_table(&owner_of_slot, regions, "");
        let held = key_table(&owner_of_slot, regions, &format!("frozen: [{}]\n", list.join(", ")));
        for claim in claims(&plain, &keys) {
            for local in region_ids(regions) {
                let owner = match claim {
                    Claim::Region { region, .. } => Some(region),
                    Claim::Local => Some(local),
                    _ => None,
                };
                let verdict = held.verdict(claim, local);
                match owner {
                    Some(owner) if frozen.contains(&owner.index()) => {
                        prop_assert_eq!(verdict, Verdict::Frozen { owner });
                    }
                    _ => {
                        let held = matches!(verdict, Verdict::Frozen { .. });
                        prop_assert!(!held, "{:?} held for {:?}", claim, local);
                        prop_assert_eq!(verdict, plain.verdict(claim, local));
                    }
                }
            }
        }
    }

    #[test]
    fn the_first_rule_with_a_matching_pattern_wins(
        patterns in prop::collection::vec(prop::collection::vec("[ab.]{1,3}|[ab.*?]{1,4}", 1..4), 1..6),
        topics in prop::collection::vec("[ab.]{0,5}", 1..16),
    ) {
        // A pattern may appear only once in a file: keep its first occurrence.
        let mut seen = std::collections::HashSet::new();
        let rules: Vec<Vec<String>> = patterns
            .into_iter()
            .map(|ps| ps.into_iter().filter(|p| seen.insert(p.clone())).collect::<Vec<_>>())
            .filter(|ps| !ps.is_empty())
            .collect();
        let text: String = std::iter::once("rules:\n".to_owned())
            .chain(rules.iter().enumerate().map(|(i, ps)| {
                let quoted: Vec<String> = ps.iter().map(|p| format!("'{p}'")).collect();
                format!("  - {{ name: r{i}, topics: [{}], owner: any }}\n", quoted.join(", "))
            }))
            .collect();
        let table = Table::parse(&text, Path::new("gen.yaml"), &regions())
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        for topic in &topics {
            let expected = rules
                .iter()
                .position(|ps| ps.iter().any(|p| super::glob::matches(p, topic)))
                .map(|i| format!("r{i}"));
            let found = table.rule_for_topic(topic).map(|r| r.name.clone());
            prop_assert_eq!(found, expected, "topic {:?}", topic);
        }
    }

    #[test]
    fn a_partition_belongs_to_the_range_that_lists_it(
        cuts in prop::collection::btree_set(0i32..200, 1..12),
        owners in prop::collection::vec(0u16..3, 12),
        probes in prop::collection::vec(-5i32..220, 1..32),
    ) {
        // Consecutive cuts make disjoint ranges; every other one is left unowned.
        let cuts: Vec<i32> = cuts.into_iter().collect();
        let ranges: Vec<(i32, i32, RegionId)> = cuts
            .windows(2)
            .enumerate()
            .filter(|(i, _)| i % 2 == 0)
            .map(|(i, w)| (w[0], w[1] - 1, RegionId(owners[i % owners.len()] % 2)))
            .collect();
        prop_assume!(!ranges.is_empty());
        let mut per_region = [Vec::new(), Vec::new()];
        for &(a, b, r) in &ranges {
            per_region[r.index()].push(format!("\"{a}-{b}\""));
        }
        let owners_yaml: Vec<String> = ["eu", "us"]
            .iter()
            .zip(&per_region)
            .filter(|(_, items)| !items.is_empty())
            .map(|(name, items)| format!("{name}: [{}]", items.join(", ")))
            .collect();
        let text = format!(
            "rules:\n  - {{ name: p, topics: [p], by: partition, owners: {{ {} }} }}\n",
            owners_yaml.join(", ")
        );
        let table = parse(&text);
        let rule = table.rule_for_topic("p").expect("rule");
        for p in probes {
            let expected = ranges
                .iter()
                .find(|&&(a, b, _)| (a..=b).contains(&p))
                .map_or(Claim::Reject(RejectReason::UnownedPartition), |&(_, _, region)| {
                    Claim::Region { region, slot: None }
                });
            prop_assert_eq!(rule.claim_partition(p), expected, "partition {}", p);
        }
    }

    #[test]
    fn a_header_value_belongs_to_the_region_that_lists_it(
        values in prop::collection::btree_map("[a-z0-9]{1,6}", 0u16..2, 1..10),
        probes in prop::collection::vec("[a-z0-9]{1,6}", 1..10),
    ) {
        let mut per_region = [Vec::new(), Vec::new()];
        for (value, &r) in &values {
            per_region[usize::from(r)].push(format!("'{value}'"));
        }
        let owners_yaml: Vec<String> = ["eu", "us"]
            .iter()
            .zip(&per_region)
            .filter(|(_, items)| !items.is_empty())
            .map(|(name, items)| format!("{name}: [{}]", items.join(", ")))
            .collect();
        let text = format!(
            "rules:\n  - {{ name: h, topics: [h], by: header, header: tenant, unmatched: us, owners: {{ {} }} }}\n",
            owners_yaml.join(", ")
        );
        let table = parse(&text);
        let rule = table.rule_for_topic("h").expect("rule");
        for probe in values.keys().chain(&probes) {
            let region = values.get(probe).map_or(US, |&r| RegionId(r));
            prop_assert_eq!(
                rule.claim_header(Some(probe.as_bytes())),
                Claim::Region { region, slot: None }
            );
        }
        prop_assert_eq!(rule.claim_header(None), Claim::Region { region: US, slot: None });
    }
}

// ---------------------------------------------------------------------------------------------
// by: key_part
// ---------------------------------------------------------------------------------------------

/// A table with one `by: key_part` rule on topic `t`, with `part` (its delimiter/index or
/// pattern/group lines) and `extra` lines.
fn key_part_file(part: &str, extra: &str) -> String {
    format!(
        "rules:\n  - name: accounts\n    topics: [t]\n    by: key_part\n{part}\n    owners: {{ eu: [tenant-1, tenant-42], us: [tenant-7] }}\n{extra}"
    )
}

const BY_DELIMITER: &str = "    delimiter: \"|\"\n    index: 0";
const BY_PATTERN: &str = "    pattern: '^(tenant-[0-9]+)\\|'";

fn key_part_rule(table: &Table) -> &Rule {
    table.rule_for_topic("t").expect("the key_part rule")
}

fn eu() -> Claim {
    Claim::Region {
        region: EU,
        slot: None,
    }
}

fn us() -> Claim {
    Claim::Region {
        region: US,
        slot: None,
    }
}

const UNMATCHED: Claim = Claim::Reject(RejectReason::UnmatchedKeyPart);

#[test]
fn a_key_part_by_delimiter_is_looked_up_like_a_header_value() {
    let table = parse(&key_part_file(BY_DELIMITER, ""));
    let rule = key_part_rule(&table);
    assert_eq!(rule.by.kind(), "key_part");
    assert!(rule.reads_records());
    for (key, expected) in [
        (&b"tenant-42|order-9"[..], eu()),
        (b"tenant-1|", eu()),
        (b"tenant-7|order-1|line-3", us()),
        // No delimiter: the whole key is part 0.
        (b"tenant-7", us()),
        // The bytes after the part do not matter, UTF-8 or not.
        (b"tenant-1|\xff\xfe", eu()),
        (b"tenant-9|order-1", UNMATCHED),
        (b"TENANT-1|order-1", UNMATCHED),
        (b"|tenant-1", UNMATCHED),
        (b"", UNMATCHED),
    ] {
        assert_eq!(rule.claim_key(Some(key)), expected, "{key:?}");
    }
    assert_eq!(rule.claim_key(None), UNMATCHED);

    let table = parse(&key_part_file(
        "    delimiter: \"::\"\n    index: 2",
        "    unmatched: us\n",
    ));
    let rule = key_part_rule(&table);
    assert_eq!(rule.claim_key(Some(b"eu::x::tenant-1::y")), eu());
    assert_eq!(rule.claim_key(Some(b"a::b::tenant-42")), eu());
    // `unmatched` decides a key with too few parts, an unlisted part and a null key.
    assert_eq!(rule.claim_key(Some(b"a::b")), us());
    assert_eq!(rule.claim_key(Some(b"a:b:tenant-1")), us());
    assert_eq!(rule.claim_key(Some(b"a::b::tenant-2")), us());
    assert_eq!(rule.claim_key(None), us());
    let table = parse(&key_part_file(BY_DELIMITER, "    unmatched: local\n"));
    assert_eq!(key_part_rule(&table).claim_key(None), Claim::Local);
}

#[test]
fn a_key_part_by_pattern_is_its_capture_group() {
    let table = parse(&key_part_file(BY_PATTERN, ""));
    let rule = key_part_rule(&table);
    for (key, expected) in [
        (&b"tenant-42|order-9"[..], eu()),
        (b"tenant-7|", us()),
        (b"tenant-1|\xff", eu()),
        // The pattern is anchored and wants the delimiter.
        (b"x-tenant-1|order", UNMATCHED),
        (b"tenant-1", UNMATCHED),
        (b"tenant-9|x", UNMATCHED),
    ] {
        assert_eq!(rule.claim_key(Some(key)), expected, "{key:?}");
    }
    assert_eq!(rule.claim_key(None), UNMATCHED);

    // Unanchored, the first match counts; group 0 is the whole match; a group that took no
    // part in the match is no part.
    let table = parse(&key_part_file(
        "    pattern: 'tenant-[0-9]+'\n    group: 0",
        "",
    ));
    assert_eq!(
        key_part_rule(&table).claim_key(Some(b"x/tenant-7/tenant-1")),
        us()
    );
    let table = parse(&key_part_file(
        "    pattern: '^(?:(a)|b)-(tenant-[0-9]+)$'\n    group: 1",
        "",
    ));
    assert_eq!(
        key_part_rule(&table).claim_key(Some(b"b-tenant-1")),
        UNMATCHED
    );
    let table = parse(&key_part_file(
        "    pattern: '^(?:(a)|b)-(tenant-[0-9]+)$'\n    group: 2",
        "",
    ));
    assert_eq!(key_part_rule(&table).claim_key(Some(b"b-tenant-1")), eu());
    // Bytes that are not UTF-8 can be matched (as with regex::bytes).
    let table = parse(&key_part_file("    pattern: '^(?-u:\\xff)(.+)$'", ""));
    assert_eq!(key_part_rule(&table).claim_key(Some(b"\xfftenant-7")), us());
}

#[test]
fn key_part_extraction_borrows_from_the_key() {
    let table = parse(&key_part_file("    delimiter: \"|\"\n    index: 1", ""));
    let By::KeyPart { part, .. } = &key_part_rule(&table).by else {
        panic!("a key_part rule");
    };
    let key = b"a|tenant-42|c";
    let extracted = part.extract(key).expect("a part");
    assert_eq!(extracted, b"tenant-42");
    // The same bytes, not a copy.
    assert_eq!(extracted.as_ptr(), key[2..].as_ptr());
    assert_eq!(part.extract(b"a"), None);
    assert_eq!(part.extract(b"a|"), Some(&b""[..]));
}

#[test]
fn key_part_rules_answer_owner_queries_about_keys() {
    let table = parse(&key_part_file(BY_DELIMITER, ""));
    for (query, expected) in [
        (
            "topic=t&key=tenant-42|order-9",
            "region=eu rule=accounts slot=-",
        ),
        ("topic=t&key=tenant-7", "region=us rule=accounts slot=-"),
        (
            "topic=t&key=tenant-9|x",
            "decision=reject reason=unmatched_key_part rule=accounts",
        ),
        (
            "topic=t&null_key=true",
            "decision=reject reason=unmatched_key_part rule=accounts",
        ),
        (
            "topic=t&partition=1",
            "decision=undecided need=key rule=accounts",
        ),
        ("topic=t", "decision=undecided need=key rule=accounts"),
    ] {
        assert_eq!(explain(&table, query, EU), expected, "{query}");
    }
    let table = parse(&key_part_file(BY_PATTERN, "takeover: { us: eu }\n"));
    assert_eq!(
        explain(&table, "topic=t&key=tenant-7|x", EU),
        "region=eu rule=accounts slot=- takeover_from=us"
    );
}

#[test]
fn key_part_rules_are_summarised() {
    let table = parse(&key_part_file(BY_DELIMITER, ""));
    let summary = table.summary();
    assert!(
        summary.contains(
            "  accounts: by key_part, topics t\n    key part 0 split by \"|\": values eu 2, us 1\n    unmatched: reject\n    on_foreign: reject\n"
        ),
        "{summary}"
    );
    let table = parse(&key_part_file(BY_PATTERN, "    unmatched: us\n"));
    let summary = table.summary();
    assert!(
        summary.contains(
            "    key group 1 of pattern \"^(tenant-[0-9]+)\\\\|\": values eu 2, us 1\n    unmatched: us\n"
        ),
        "{summary}"
    );
}

#[test]
fn key_part_rules_are_validated_with_the_field_and_the_problem() {
    let error = |part: &str, extra: &str| rejected(&key_part_file(part, extra));
    assert_eq!(
        error(&format!("{BY_DELIMITER}\n{BY_PATTERN}"), ""),
        "ownership.yaml: rules[0].pattern: give either `delimiter` (with `index`) or `pattern` \
         (with `group`), not both"
    );
    assert_eq!(
        error("    unmatched: reject", ""),
        "ownership.yaml: rules[0].delimiter: a `by: key_part` rule needs `delimiter` (with \
         `index`) or `pattern` (a regex whose capture `group` is the part)"
    );
    assert_eq!(
        error("    delimiter: ''", ""),
        "ownership.yaml: rules[0].delimiter: empty delimiter"
    );
    assert_eq!(
        error("    delimiter: '|'\n    index: -1", ""),
        "ownership.yaml: rules[0].index: index -1 is negative (parts count from 0)"
    );
    assert_eq!(
        error("    delimiter: '|'\n    index: 256", ""),
        "ownership.yaml: rules[0].index: index 256 is out of range 0-255"
    );
    assert_eq!(
        error("    delimiter: '|'\n    index: 99999999999", ""),
        "ownership.yaml: rules[0].index: index 99999999999 is out of range 0-255"
    );
    assert_eq!(
        error("    delimiter: '|'\n    group: 1", ""),
        "ownership.yaml: rules[0].group: `group` goes with `pattern`; with `delimiter` the part \
         is picked by `index`"
    );
    assert_eq!(
        error(&format!("{BY_PATTERN}\n    index: 0"), ""),
        "ownership.yaml: rules[0].index: `index` goes with `delimiter`; with `pattern` the part \
         is picked by `group`"
    );
    assert_eq!(
        error("    pattern: ''", ""),
        "ownership.yaml: rules[0].pattern: empty pattern"
    );
    assert_eq!(
        error("    pattern: '^(tenant-[0-9+'", ""),
        "ownership.yaml: rules[0].pattern: invalid pattern: unclosed character class"
    );
    assert_eq!(
        error("    pattern: '^(tenant-[0-9]+'", ""),
        "ownership.yaml: rules[0].pattern: invalid pattern: unclosed group"
    );
    let huge = error("    pattern: '(\\w{1000}){1000}'", "");
    assert!(
        huge.starts_with(
            "ownership.yaml: rules[0].pattern: invalid pattern: it compiles to more than the limit of"
        ),
        "{huge}"
    );
    assert_eq!(
        error("    pattern: '^tenant-[0-9]+'", ""),
        "ownership.yaml: rules[0].group: group 1 is out of range: the pattern has no capture \
         group (put the part in parentheses, or use group 0 for the whole match)"
    );
    assert_eq!(
        error(&format!("{BY_PATTERN}\n    group: 2"), ""),
        "ownership.yaml: rules[0].group: group 2 is out of range: the pattern has 1 capture group"
    );
    assert_eq!(
        error(&format!("{BY_PATTERN}\n    group: -1"), ""),
        "ownership.yaml: rules[0].group: group -1 is out of range: the pattern has 1 capture group"
    );
    let many = format!("    pattern: '{}'\n    group: 16", "(a)".repeat(17));
    assert_eq!(
        error(&many, ""),
        "ownership.yaml: rules[0].group: group 16 is out of range 0-15"
    );
    // Values are owned once, and are text.
    let owned_twice = "rules:\n  - name: accounts\n    topics: [t]\n    by: key_part\n    delimiter: '|'\n    owners: { eu: [tenant-1], us: [tenant-7, tenant-1] }\n";
    assert_eq!(
        rejected(owned_twice),
        "ownership.yaml: rules[0].owners.us: key part `tenant-1` is also owned by eu"
    );
    let listed_twice = "rules:\n  - name: accounts\n    topics: [t]\n    by: key_part\n    delimiter: '|'\n    owners: { eu: [tenant-1, tenant-1] }\n";
    assert_eq!(
        rejected(listed_twice),
        "ownership.yaml: rules[0].owners.eu: key part `tenant-1` is listed twice"
    );
    let number = "rules:\n  - name: accounts\n    topics: [t]\n    by: key_part\n    delimiter: '|'\n    owners: { eu: [42] }\n";
    assert_eq!(
        rejected(number),
        "ownership.yaml: rules[0].owners.eu[0]: key part 42 is a number: quote it, e.g. \"42\""
    );
    let no_owners =
        "rules:\n  - name: accounts\n    topics: [t]\n    by: key_part\n    delimiter: '|'\n";
    assert_eq!(
        rejected(no_owners),
        "ownership.yaml: rules[0].owners: rule `accounts` has no owners"
    );
    assert_eq!(
        error(BY_DELIMITER, "    unmatched: ap\n"),
        "ownership.yaml: rules[0].unmatched: unknown region `ap` (regions: eu, us; or reject, local)"
    );
    // Fields of other kinds do not belong, and key_part's own belong to no other kind.
    assert_eq!(
        error(BY_DELIMITER, "    null_key: local\n"),
        "ownership.yaml: rules[0].null_key: `null_key` does not belong to a `by: key_part` rule"
    );
    assert_eq!(
        rejected(
            &key_file(4, r#"{ eu: ["0-3"] }"#).replace("slots: 4", "slots: 4\n    delimiter: '|'")
        ),
        "ownership.yaml: rules[0].delimiter: `delimiter` does not belong to a `by: key` rule"
    );
    assert_eq!(
        rejected("rules:\n  - name: a\n    topics: [a]\n    owner: eu\n    pattern: x\n"),
        "ownership.yaml: rules[0].pattern: `pattern` does not belong to a `by: topic` rule (a \
         rule without `by` is `by: topic`)"
    );
}

/// A `by: key_part` rule on topic `t` that hashes part 0 (split at `|`) into 16 slots.
const HASHED_PARTS: &str = "rules:\n  - name: accounts\n    topics: [t]\n    by: key_part\n    delimiter: '|'\n    slots: 16\n    owners: { eu: [\"0-7\"], us: [\"8-15\"] }\n";

#[test]
fn a_hashed_key_part_keeps_every_key_of_an_entity_in_one_slot() {
    let table = parse(HASHED_PARTS);
    let rule = key_part_rule(&table);
    // "21" hashes to slot 12 of 16 (Kafka's murmur2 test vector), so every key whose part is
    // "21" does, whatever follows it; under `by: key` these keys would spread over the slots.
    for key in [&b"21"[..], b"21|order-1", b"21|order-2|line-9", b"21|\xff"] {
        assert_eq!(
            rule.claim_key(Some(key)),
            Claim::Region {
                region: US,
                slot: Some(12)
            },
            "{key:?}"
        );
    }
    for part in ["tenant-1", "tenant-42", "x"] {
        let slot = to_positive(murmur2(part.as_bytes())) % 16;
        let region = if slot < 8 { EU } else { US };
        let key = format!("{part}|order-1");
        assert_eq!(
            rule.claim_key(Some(key.as_bytes())),
            Claim::Region {
                region,
                slot: Some(slot)
            }
        );
    }
    // A key without the part (here: only a null key) follows `unmatched`.
    assert_eq!(rule.claim_key(None), UNMATCHED);
    let table = parse(
        &HASHED_PARTS
            .replace("index", "")
            .replace("delimiter: '|'", "pattern: '^t=([^|]+)'"),
    );
    let rule = key_part_rule(&table);
    assert_eq!(
        rule.claim_key(Some(b"t=21|x")),
        Claim::Region {
            region: US,
            slot: Some(12)
        }
    );
    assert_eq!(rule.claim_key(Some(b"21|x")), UNMATCHED);
    assert_eq!(
        explain(&table, "topic=t&key=t=21|order-1", EU),
        "region=us rule=accounts slot=12"
    );
    assert_eq!(
        explain(&table, "topic=t&key=21", EU),
        "decision=reject reason=unmatched_key_part rule=accounts"
    );
    let summary = table.summary();
    assert!(
        summary.contains("    key group 1 of pattern \"^t=([^|]+)\": slots 16: eu 8, us 8\n"),
        "{summary}"
    );
}

#[test]
fn hashed_key_part_slots_are_validated_like_a_key_rules() {
    assert_eq!(
        rejected(&HASHED_PARTS.replace(r#"us: ["8-15"]"#, r#"us: ["7-15"]"#)),
        "ownership.yaml: rules[0].owners.us: slot 7 is also owned by eu"
    );
    assert_eq!(
        rejected(&HASHED_PARTS.replace(r#"us: ["8-15"]"#, r#"us: ["8-13"]"#)),
        "ownership.yaml: rules[0].owners: slots 14-15 have no owner"
    );
    assert_eq!(
        rejected(&HASHED_PARTS.replace("slots: 16", "slots: 0")),
        "ownership.yaml: rules[0].slots: slots must be at least 1"
    );
    assert_eq!(
        rejected(&HASHED_PARTS.replace(r#"["0-7"]"#, "[tenant-1]")),
        "ownership.yaml: rules[0].owners.eu[0]: expected a slot number or a range like \"0-7\", \
         found \"tenant-1\""
    );
}

proptest! {
    #[test]
    fn a_key_part_belongs_to_the_region_that_lists_it_whatever_the_rest_of_the_key(
        values in prop::collection::btree_map("[a-z0-9-]{1,8}", 0u16..2, 1..10),
        probes in prop::collection::vec("[a-z0-9-]{1,8}", 1..10),
        prefix in "[a-z0-9|]{0,12}",
        suffix in prop::collection::vec(any::<u8>(), 0..16),
        index in 0usize..3,
    ) {
        let mut per_region = [Vec::new(), Vec::new()];
        for (value, &r) in &values {
            per_region[usize::from(r)].push(format!("'{value}'"));
        }
        let owners_yaml: Vec<String> = ["eu", "us"]
            .iter()
            .zip(&per_region)
            .filter(|(_, items)| !items.is_empty())
            .map(|(name, items)| format!("{name}: [{}]", items.join(", ")))
            .collect();
        let text = format!(
            "rules:\n  - {{ name: k, topics: [k], by: key_part, delimiter: '|', index: {index}, unmatched: reject, owners: {{ {} }} }}\n",
            owners_yaml.join(", ")
        );
        let table = parse(&text);
        let rule = table.rule_for_topic("k").expect("rule");
        for probe in values.keys().chain(&probes) {
            // `index` parts before the probe, then the probe, then anything after a delimiter.
            let before: Vec<&str> = prefix.split('|').chain(["x"; 3]).take(index).collect();
            let mut key: Vec<u8> = before.iter().flat_map(|p| [p.as_bytes(), b"|"].concat()).collect();
            key.extend_from_slice(probe.as_bytes());
            key.push(b'|');
            key.extend_from_slice(&suffix);
            let expected = values
                .get(probe)
                .map_or(UNMATCHED, |&r| Claim::Region { region: RegionId(r), slot: None });
            prop_assert_eq!(rule.claim_key(Some(&key)), expected, "{:?}", key);
        }
    }
}
