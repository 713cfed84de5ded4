//! Whether a topic's partitions line up with the slots of its `by: key` rule, and what keyward
//! tells clients and operators when they do not.
//!
//! A `by: key` rule hashes a key as the Java client's default partitioner does
//! (`toPositive(murmur2(key)) % slots` against `% partitions`). When the partition count is a
//! multiple of `slots`, a key's slot is its partition modulo `slots`, so every partition, and so
//! every batch, holds keys of one owner. Otherwise even that partitioner puts keys of several
//! owners in one batch, and keyward refuses such a batch whole (it cannot tell a client that
//! half a batch landed). Any other partitioner (librdkafka's default CRC32, Sarama's FNV-1a,
//! round robin) mixes owners whatever the partition count.
//!
//! The proxy and `keyward check --clusters` feed this module partition counts they learned from
//! the clusters; it only compares them with the table. Pure: no sockets, clocks or globals.

use std::fmt;

use crate::ownership::{By, OnForeign, RegionId, Rule, Table};

/// The one sentence a refused mixed batch ends with, for a rule a partitioner can follow; `None`
/// for rules no partitioner knows about (headers, parts of keys).
pub fn remedy(rule: &Rule) -> Option<String> {
    match &rule.by {
        By::Key { slots, .. } => Some(format!(
            "To keep each batch to one region, produce with the murmur2 partitioner (the Java \
             client's default; librdkafka partitioner=murmur2_random) to a topic whose partition \
             count is a multiple of {slots} (the slots of rule {}).",
            rule.name
        )),
        _ => None,
    }
}

/// A topic whose partition count makes even the murmur2 partitioner mix owners in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misaligned {
    pub topic: String,
    pub partitions: u32,
    pub rule: String,
    pub slots: u32,
    pub on_foreign: OnForeign,
}

impl fmt::Display for Misaligned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let consequence = match self.on_foreign {
            OnForeign::Reject => "which keyward refuses whole (on_foreign: reject)",
            OnForeign::Redirect => {
                "which keyward splits between the regions' clusters (on_foreign: redirect), a \
                 batch at a time"
            }
            OnForeign::Audit => {
                "which keyward lets through now (on_foreign: audit) but refuses under reject"
            }
        };
        write!(
            f,
            "topic {:?} has {} partitions, not a multiple of the {} slots of rule {}: even the \
             murmur2 partitioner (the Java client's default) puts keys of several regions in one \
             batch, {consequence}; give the topic a multiple of {} partitions",
            self.topic, self.partitions, self.slots, self.rule, self.slots
        )
    }
}

/// The topic's alignment problem under the table, if it has one: `None` for a topic whose rule
/// is not `by: key`, whose partitions line up with the slots, or that has no partitions (a
/// topic a cluster does not know).
pub fn check(table: &Table, topic: &str, partitions: i32) -> Option<Misaligned> {
    let rule = table.rule_for_topic(topic)?;
    let By::Key { slots, owners, .. } = &rule.by else {
        return None;
    };
    let partitions = u32::try_from(partitions).ok().filter(|&p| p > 0)?;
    mixes(owners, partitions).then(|| Misaligned {
        topic: topic.to_owned(),
        partitions,
        rule: rule.name.clone(),
        slots: *slots,
        on_foreign: rule.on_foreign,
    })
}

/// Every topic of `topics` (name, partition count) with an alignment problem, sorted by name.
pub fn misaligned<'a>(
    table: &Table,
    topics: impl IntoIterator<Item = (&'a str, i32)>,
) -> Vec<Misaligned> {
    let mut out: Vec<Misaligned> = topics
        .into_iter()
        .filter_map(|(topic, partitions)| check(table, topic, partitions))
        .collect();
    out.sort_by(|a, b| a.topic.cmp(&b.topic));
    out
}

/// Whether some partition of a `partitions`-partition topic receives keys of two owners under
/// murmur2. A hash `h` goes to partition `h % partitions` and slot `h % slots`, so partition `p`
/// receives exactly the slots congruent to `p` modulo `gcd(partitions, slots)`: the topic is
/// aligned when every such class of slots has one owner. A multiple of `slots` always is;
/// some other counts are too, for tables whose owners follow the classes (even and odd slots).
fn mixes(owners: &[RegionId], partitions: u32) -> bool {
    let Ok(slots) = u32::try_from(owners.len()) else {
        return true;
    };
    let classes = gcd(partitions, slots) as usize;
    if classes == 0 {
        return false;
    }
    owners
        .iter()
        .enumerate()
        .any(|(slot, owner)| owners.get(slot % classes) != Some(owner))
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ownership::murmur2::{murmur2, to_positive};
    use proptest::prelude::*;
    use std::path::Path;

    const TABLE: &str = r#"
rules:
  - name: orders
    topics: ["orders.*"]
    by: key
    slots: 16
    owners: { eu: ["0-7"], us: ["8-15"] }
  - name: watched
    topics: ["watched.*"]
    by: key
    slots: 4
    owners: { eu: ["0-1"], us: ["2-3"] }
    on_foreign: audit
  - name: striped
    topics: ["striped.*"]
    by: key
    slots: 4
    owners: { eu: ["0", "2"], us: ["1", "3"] }
  - name: tenants
    topics: ["tenant.*"]
    by: header
    header: tenant
    owners: { eu: [acme], us: [initech] }
  - name: accounts
    topics: ["accounts.*"]
    by: key_part
    delimiter: "|"
    slots: 16
    owners: { eu: ["0-7"], us: ["8-15"] }
default: allow
"#;

    fn table() -> Table {
        let regions = ["eu".to_owned(), "us".to_owned()];
        Table::parse(TABLE, Path::new("ownership.yaml"), &regions).unwrap()
    }

    #[test]
    fn a_partition_count_that_is_a_multiple_of_slots_is_aligned_and_others_are_not() {
        let t = table();
        for partitions in [16, 32, 48] {
            assert_eq!(check(&t, "orders.x", partitions), None, "{partitions}");
        }
        for partitions in [1, 6, 8, 12, 24] {
            let m = check(&t, "orders.x", partitions).expect("misaligned");
            assert_eq!((m.rule.as_str(), m.slots), ("orders", 16));
        }
    }

    #[test]
    fn only_by_key_rules_and_known_topics_are_checked() {
        let t = table();
        assert_eq!(check(&t, "tenant.x", 6), None);
        // A key_part rule hashes a part of the key: no partitioner follows it.
        assert_eq!(check(&t, "accounts.x", 6), None);
        assert_eq!(check(&t, "unlisted", 6), None);
        // A topic the cluster does not know has no partitions.
        assert_eq!(check(&t, "orders.x", 0), None);
        assert_eq!(check(&t, "orders.x", -1), None);
    }

    #[test]
    fn owners_that_follow_the_partitions_need_no_multiple() {
        let t = table();
        // Even slots eu, odd slots us: any even partition count keeps each partition to one
        // owner (partition p only gets slots of p's parity).
        assert_eq!(check(&t, "striped.x", 2), None);
        assert_eq!(check(&t, "striped.x", 6), None);
        assert!(check(&t, "striped.x", 3).is_some());
    }

    /// What the check says is what murmur2 does: a topic is misaligned exactly when some
    /// partition receives keys of two owners.
    #[test]
    fn the_check_agrees_with_murmur2_on_real_keys() {
        let t = table();
        let Some(rule) = t.rule_for_topic("orders.x") else {
            panic!("no rule")
        };
        let By::Key { owners, .. } = &rule.by else {
            panic!("not a key rule")
        };
        for partitions in 1..=40u32 {
            let mut owner_of = vec![None; partitions as usize];
            let mut mixed = false;
            for n in 0..4000 {
                let h = to_positive(murmur2(format!("key-{n}").as_bytes()));
                let owner = owners[(h % 16) as usize];
                let seen = &mut owner_of[(h % partitions) as usize];
                mixed |= seen.is_some_and(|o| o != owner);
                *seen = Some(owner);
            }
            assert_eq!(
                check(&t, "orders.x", partitions as i32).is_some(),
                mixed,
                "{partitions} partitions"
            );
        }
    }

    #[test]
    fn the_warning_names_topic_counts_rule_and_remedy() {
        let t = table();
        let m = check(&t, "orders.eu", 6).unwrap();
        assert_eq!(
            m.to_string(),
            "topic \"orders.eu\" has 6 partitions, not a multiple of the 16 slots of rule \
             orders: even the murmur2 partitioner (the Java client's default) puts keys of \
             several regions in one batch, which keyward refuses whole (on_foreign: reject); \
             give the topic a multiple of 16 partitions"
        );
        let audited = check(&t, "watched.x", 6).unwrap().to_string();
        assert!(
            audited.contains("lets through now (on_foreign: audit) but refuses under reject"),
            "{audited}"
        );
    }

    #[test]
    fn the_remedy_names_the_partitioner_and_the_slots() {
        let t = table();
        let remedy_for = |topic: &str| t.rule_for_topic(topic).and_then(remedy);
        assert_eq!(
            remedy_for("orders.x").as_deref(),
            Some(
                "To keep each batch to one region, produce with the murmur2 partitioner (the \
                 Java client's default; librdkafka partitioner=murmur2_random) to a topic whose \
                 partition count is a multiple of 16 (the slots of rule orders)."
            )
        );
        assert_eq!(remedy_for("tenant.x"), None);
        assert_eq!(remedy_for("accounts.x"), None);
    }

    #[test]
    fn misaligned_lists_the_problem_topics_by_name() {
        let t = table();
        let found = misaligned(
            &t,
            [
                ("orders.b", 6),
                ("orders.ok", 16),
                ("tenant.x", 5),
                ("orders.a", 8),
            ],
        );
        let names: Vec<(&str, u32)> = found
            .iter()
            .map(|m| (m.topic.as_str(), m.partitions))
            .collect();
        assert_eq!(names, [("orders.a", 8), ("orders.b", 6)]);
    }

    proptest! {
        /// Whatever the owners, a multiple of the slots never mixes.
        #[test]
        fn a_multiple_of_slots_never_mixes(
            owners in proptest::collection::vec(0u16..3, 1..64),
            times in 1u32..8,
        ) {
            let owners: Vec<RegionId> = owners.into_iter().map(RegionId).collect();
            let slots = owners.len() as u32;
            prop_assert!(!mixes(&owners, slots * times));
        }
    }
}
