//! The table as the ownership map draws it (`GET /ownership/map` and the page at `GET /` of the
//! admin API): the canonical table ([`Table::canonical_json`]) with, in each rule, its `parts`:
//! who writes each slot range, value list, partition range or topic once takeover and frozen
//! are applied, as [`Table::verdict`] applies them. The page only draws what this says, so what
//! takeover and frozen mean stays here.
//!
//! Runs per admin request, never per record; it allocates freely.

use super::RegionId;
use super::rule::{By, PartOwners, Rule};
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
        match &rule.by {
            By::Key { owners, .. }
            | By::KeyPart {
                owners: PartOwners::Slots(owners),
                ..
            } => {
                let slots = (0i64..).zip(owners.iter()).map(|(s, &r)| (s, s, r));
                self.range_parts(slots)
            }
            By::Partition { owners } => self.range_parts(
                owners
                    .iter()
                    .map(|r| (i64::from(r.first), i64::from(r.last), r.owner)),
            ),
            By::Header { owners, .. }
            | By::KeyPart {
                owners: PartOwners::Values(owners),
                ..
            } => self.value_parts(owners),
            By::Topic { owner } => vec![self.part(*owner, Map::new())],
            By::Any => Vec::new(),
        }
    }

    /// Sorted, disjoint `(first, last, owner)` ranges, neighbours of one owner merged.
    fn range_parts(&self, ranges: impl Iterator<Item = (i64, i64, RegionId)>) -> Vec<Value> {
        let mut runs: Vec<(i64, i64, RegionId)> = Vec::new();
        for (first, last, owner) in ranges {
            match runs.last_mut() {
                Some((_, end, o)) if *o == owner && *end + 1 == first => {
                    *end = last;
                }
                _ => runs.push((first, last, owner)),
            }
        }
        runs.into_iter()
            .map(|(first, last, owner)| {
                let mut what = Map::new();
                what.insert("first".into(), first.into());
                what.insert("last".into(), last.into());
                self.part(owner, what)
            })
            .collect()
    }

    fn value_parts<S>(&self, owners: &HashMap<Box<[u8]>, RegionId, S>) -> Vec<Value> {
        let mut by_region: BTreeMap<&str, (RegionId, Vec<&[u8]>)> = BTreeMap::new();
        for (value, &owner) in owners {
            by_region
                .entry(self.region_name(owner))
                .or_insert_with(|| (owner, Vec::new()))
                .1
                .push(value);
        }
        by_region
            .into_values()
            .map(|(owner, mut values)| {
                values.sort_unstable();
                let values: Vec<Value> = values
                    .into_iter()
                    .map(|v| String::from_utf8_lossy(v).into_owned().into())
                    .collect();
                let mut what = Map::new();
                what.insert("values".into(), values.into());
                self.part(owner, what)
            })
            .collect()
    }

    /// `what` with who writes it: `region`, `takeover_from` and `frozen`.
    fn part(&self, owner: RegionId, mut what: Map<String, Value>) -> Value {
        let region = self.effective_owner(owner);
        what.insert("region".into(), self.region_name(region).into());
        let from = (region != owner).then(|| self.region_name(owner));
        what.insert("takeover_from".into(), from.into());
        what.insert("frozen".into(), self.is_frozen(region).into());
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
}
