//! The table as the ownership map draws it (`GET /ownership/map` and the page at `GET /` of the
//! admin API): the canonical table ([`Table::canonical_json`]) with, in each rule, its `parts`:
//! who writes each slot range, value list, partition range or topic once takeover and frozen
//! are applied, as [`Table::verdict`] applies them. The page only draws what this says, so what
//! takeover and frozen mean stays here.
//!
//! Runs per admin request, never per record; it allocates freely.

use super::RegionId;
use super::rule::{By, PartOwners, PartState, Rule, ValueKey};
use super::table::Table;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};

impl Table {
    /// [`Table::canonical_json`] with a `parts` list added to every rule:
    ///
    /// * slots of `by: key` (and `by: key_part` with `slots`), and partitions of `by:
    ///   partition`: `{"first": 0, "last": 7, ...}` in slot order, neighbours with the same
    ///   owner in the file merged (a partition nobody lists is in no part);
    /// * listed values of `by: header` and `by: key_part`: `{"values": ["acme", "globex"], ...}`,
    ///   one part per region of the file, by region name;
    /// * `by: topic`: one part; `owner: any`: none.
    ///
    /// Each part also has `region`, the region whose writes it is after takeover,
    /// `takeover_from`, the region the file names when a takeover moved it (else null), and
    /// `frozen`, whether writes to it are held: the same words `keyward owner` answers with.
    pub fn map_json(&self) -> Value {
        let mut map = self.canonical_json();
        if let Some(rules) = map.get_mut("rules").and_then(Value::as_array_mut) {
            for (json, rule) in rules.iter_mut().zip(self.rules.iter()) {
                if let Some(json) = json.as_object_mut() {
                    json.insert("parts".into(), self.parts(rule).into());
                }
            }
        }
        map
    }

    fn parts(&self, rule: &Rule) -> Vec<Value> {
        let states = rule.states();
        match &rule.by {
            By::Key { owners, .. }
            | By::KeyPart {
                owners: PartOwners::Slots(owners),
                ..
            } => {
                let slots = (0u32..)
                    .zip(owners.iter())
                    .map(|(s, &r)| (i64::from(s), i64::from(s), r, states.slot(s)));
                self.range_parts(slots)
            }
            By::Partition { owners } => {
                // Each owner range, cut where the state of its partitions changes.
                let mut ranges = Vec::new();
                for r in owners.iter() {
                    let mut at = i64::from(r.first);
                    let last = i64::from(r.last);
                    for &(first, end, _) in states.partitions.iter() {
                        let (first, end) = (i64::from(first), i64::from(end));
                        if end < at || first > last {
                            continue;
                        }
                        if first > at {
                            ranges.push((at, first - 1, r.owner, states.whole));
                        }
                        let to = end.min(last);
                        // Both ends lie in an i32 partition range.
                        let state = states.partition(at.max(first) as i32);
                        ranges.push((at.max(first), to, r.owner, state));
                        at = to + 1;
                    }
                    if at <= last {
                        ranges.push((at, last, r.owner, states.whole));
                    }
                }
                self.range_parts(ranges.into_iter())
            }
            By::Header { owners, .. }
            | By::KeyPart {
                owners: PartOwners::Values(owners),
                ..
            } => self.value_parts(owners, |v| states.value(v)),
            By::Topic { owner } => vec![self.part(*owner, states.whole, Map::new())],
            By::Any => Vec::new(),
        }
    }

    /// Sorted, disjoint `(first, last, owner, state)` ranges, neighbours of one owner and
    /// state merged.
    fn range_parts(
        &self,
        ranges: impl Iterator<Item = (i64, i64, RegionId, PartState)>,
    ) -> Vec<Value> {
        let mut runs: Vec<(i64, i64, RegionId, PartState)> = Vec::new();
        for (first, last, owner, state) in ranges {
            match runs.last_mut() {
                Some((_, end, o, s)) if *o == owner && *s == state && *end + 1 == first => {
                    *end = last;
                }
                _ => runs.push((first, last, owner, state)),
            }
        }
        runs.into_iter()
            .map(|(first, last, owner, state)| {
                let mut what = Map::new();
                what.insert("first".into(), first.into());
                what.insert("last".into(), last.into());
                self.part(owner, state, what)
            })
            .collect()
    }

    /// One part per region of the file and state, its values sorted.
    fn value_parts<S>(
        &self,
        owners: &HashMap<ValueKey, RegionId, S>,
        state_of: impl Fn(&[u8]) -> PartState,
    ) -> Vec<Value> {
        // By file owner, then the parts it keeps before those taken over.
        type Group<'v> = (RegionId, PartState, Vec<&'v [u8]>);
        let mut groups: BTreeMap<(&str, Option<&str>, bool), Group> = BTreeMap::new();
        for (value, &owner) in owners {
            let state = state_of(value);
            let key = (
                self.region_name(owner),
                state.takeover.map(|r| self.region_name(r)),
                state.frozen,
            );
            groups
                .entry(key)
                .or_insert_with(|| (owner, state, Vec::new()))
                .2
                .push(value);
        }
        groups
            .into_values()
            .map(|(owner, state, mut values)| {
                values.sort_unstable();
                let values: Vec<Value> = values
                    .into_iter()
                    .map(|v| String::from_utf8_lossy(v).into_owned().into())
                    .collect();
                let mut what = Map::new();
                what.insert("values".into(), values.into());
                self.part(owner, state, what)
            })
            .collect()
    }

    /// `what` with who writes it, as [`Table::judge`] decides: `region`, `takeover_from` and
    /// `frozen`.
    fn part(&self, owner: RegionId, state: PartState, mut what: Map<String, Value>) -> Value {
        let region = self.effective_owner(state.takeover.unwrap_or(owner));
        what.insert("region".into(), self.region_name(region).into());
        let from = (region != owner).then(|| self.region_name(owner));
        what.insert("takeover_from".into(), from.into());
        what.insert(
            "frozen".into(),
            (state.frozen || self.is_frozen(region)).into(),
        );
        what.into()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{example_with, parse};
    use serde_json::{Value, json};

    fn parts(map: &Value, rule: &str) -> Value {
        let rules = map["rules"].as_array().expect("rules");
        let rule = rules.iter().find(|r| r["name"] == rule).expect(rule);
        rule["parts"].clone()
    }

    #[test]
    fn every_rule_gets_its_parts_in_slot_order_with_who_writes_them() {
        let map = example_with("{}", "[]").map_json();
        let owned =
            |region: &str| json!({"region": region, "takeover_from": null, "frozen": false});
        let with = |mut what: Value, region: &str| {
            what.as_object_mut()
                .unwrap()
                .extend(owned(region).as_object().unwrap().clone());
            what
        };
        assert_eq!(
            parts(&map, "orders"),
            json!([
                with(json!({"first": 0, "last": 7}), "eu"),
                with(json!({"first": 8, "last": 15}), "us"),
            ])
        );
        assert_eq!(
            parts(&map, "tenants"),
            json!([
                with(json!({"values": ["acme", "globex"]}), "eu"),
                with(json!({"values": ["initech"]}), "us"),
            ])
        );
        assert_eq!(
            parts(&map, "inventory"),
            json!([
                with(json!({"first": 0, "last": 5}), "eu"),
                with(json!({"first": 6, "last": 11}), "us"),
            ])
        );
        assert_eq!(parts(&map, "audit-log"), json!([owned("eu")]));
        assert_eq!(parts(&map, "telemetry"), json!([]));
        // The rest is the canonical table, field for field.
        let mut canonical = map.clone();
        for rule in canonical["rules"].as_array_mut().unwrap() {
            rule.as_object_mut().unwrap().remove("parts");
        }
        assert_eq!(canonical, example_with("{}", "[]").canonical_json());
    }

    #[test]
    fn takeover_and_frozen_mark_the_parts_they_change() {
        let map = example_with("{ us: eu }", "[eu]").map_json();
        assert_eq!(
            parts(&map, "orders"),
            json!([
                {"first": 0, "last": 7, "region": "eu", "takeover_from": null, "frozen": true},
                {"first": 8, "last": 15, "region": "eu", "takeover_from": "us", "frozen": true},
            ])
        );
        assert_eq!(map["takeover"], json!({"us": "eu"}));
        let map = example_with("{}", "[us]").map_json();
        assert_eq!(
            parts(&map, "tenants"),
            json!([
                {"values": ["acme", "globex"], "region": "eu", "takeover_from": null, "frozen": false},
                {"values": ["initech"], "region": "us", "takeover_from": null, "frozen": true},
            ])
        );
    }

    #[test]
    fn interleaved_slots_are_separate_parts_and_neighbours_merge() {
        let table = parse(
            "rules:\n  - name: k\n    topics: [k]\n    by: key\n    slots: 8\n    \
             owners: { eu: [\"0-1\", \"2\", \"6-7\"], us: [\"3-5\"] }\n  \
             - name: p\n    topics: [p]\n    by: key_part\n    delimiter: \"|\"\n    slots: 4\n    \
             owners: { us: [\"0-3\"] }\n  \
             - name: q\n    topics: [q]\n    by: partition\n    owners: { eu: [\"0-1\", \"5\"], us: [\"2\"] }\n",
        );
        let map = table.map_json();
        let ranges = |rule: &str| -> Vec<(u64, u64, String)> {
            parts(&map, rule)
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    (
                        p["first"].as_u64().unwrap(),
                        p["last"].as_u64().unwrap(),
                        p["region"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        };
        let r = |a, b, region: &str| (a, b, region.to_owned());
        assert_eq!(ranges("k"), [r(0, 2, "eu"), r(3, 5, "us"), r(6, 7, "eu")]);
        assert_eq!(ranges("p"), [r(0, 3, "us")]);
        // Partition 3-4 is nobody's: no part covers it.
        assert_eq!(ranges("q"), [r(0, 1, "eu"), r(2, 2, "us"), r(5, 5, "eu")]);
    }

    #[test]
    fn frozen_and_taken_over_parts_of_a_rule_are_parts_of_their_own() {
        let text = super::super::tests::EXAMPLE
            .replace(
                "owners: { eu: [\"0-7\"], us: [\"8-15\"] }   #",
                "frozen: [\"0-3\"]\n    takeover: { us: [\"4-5\"] }\n    owners: { eu: [\"0-7\"], us: [\"8-15\"] }   #",
            )
            .replace(
                "owners: { eu: [acme, globex], us: [initech] }",
                "owners: { eu: [acme, globex], us: [initech] }\n    frozen: [acme]\n    takeover: { us: [globex] }",
            )
            .replace(
                "owners: { eu: [\"0-5\"], us: [\"6-11\"] }",
                "owners: { eu: [\"0-5\"], us: [\"6-11\"] }\n    frozen: [\"0-1\"]\n    takeover: { eu: [\"6-7\"] }",
            );
        let map = parse(&text).map_json();
        let part = |first: u64, last: u64, region: &str, from: Option<&str>, frozen: bool| json!({"first": first, "last": last, "region": region, "takeover_from": from, "frozen": frozen});
        assert_eq!(
            parts(&map, "orders"),
            json!([
                part(0, 3, "eu", None, true),
                part(4, 5, "us", Some("eu"), false),
                part(6, 7, "eu", None, false),
                part(8, 15, "us", None, false),
            ])
        );
        assert_eq!(
            parts(&map, "inventory"),
            json!([
                part(0, 1, "eu", None, true),
                part(2, 5, "eu", None, false),
                part(6, 7, "eu", Some("us"), false),
                part(8, 11, "us", None, false),
            ])
        );
        assert_eq!(
            parts(&map, "tenants"),
            json!([
                {"values": ["acme"], "region": "eu", "takeover_from": null, "frozen": true},
                {"values": ["globex"], "region": "us", "takeover_from": "eu", "frozen": false},
                {"values": ["initech"], "region": "us", "takeover_from": null, "frozen": false},
            ])
        );
    }
}
