//! The table in canonical form: one JSON document that depends on what the table decides and
//! how its rules are laid out, not on how the file is spelled. Operators compare
//! [`Table::content_hash`] across the proxies of every region, and a reload logs
//! [`Table::diff_summary`].
//!
//! Normalised away: comments, whitespace, YAML style, key order, the order of regions, header
//! and key-part values, takeover and frozen entries, how slot and partition ranges are split
//! ("0-7" or 0..7 one by one), defaults written out or left implicit, and `on_foreign` on
//! `owner: any` rules (nothing is foreign there). Kept as written: rule order and the topic patterns of each
//! rule in their order. The file's path is not part of it: it differs between hosts.
//!
//! Runs on load and reload only, never per record; it allocates freely.

use super::RegionId;
use super::rule::{By, Fallback, KeyPart, PartOwners, PartState, Rule, ValueKey};
use super::table::Table;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

/// At most this many rules (or list and map entries) are named in one diff part; the rest are
/// counted, so a reload log line stays short whatever the table's size.
const MAX_NAMED: usize = 20;

/// A rule's fields in the order a diff names them (the order the file format documents them).
const FIELD_ORDER: [&str; 15] = [
    "topics",
    "by",
    "slots",
    "header",
    "delimiter",
    "index",
    "pattern",
    "group",
    "owners",
    "owner",
    "null_key",
    "unmatched",
    "on_foreign",
    "frozen",
    "takeover",
];

/// Fields compared when a rule's `by` changed, where both sides have them: the others follow
/// from `by` and would only repeat that it changed.
const FIELDS_OF_EVERY_KIND: [&str; 3] = ["topics", "by", "on_foreign"];

/// The top-level fields besides `rules`, in the order a diff names them.
const TABLE_FIELDS: [&str; 4] = ["regions", "takeover", "frozen", "default"];

impl Table {
    /// The table as canonical JSON: the same table gives the same document whatever the file's
    /// formatting (see the module docs for what is normalised and what is kept).
    ///
    /// ```text
    /// {"default": "allow", "frozen": [], "regions": ["eu", "us"],
    ///  "rules": [{"by": "key", "name": "orders", "null_key": "reject", "on_foreign": "reject",
    ///             "owners": {"eu": ["0-7"], "us": ["8-15"]}, "slots": 16,
    ///             "topics": ["orders", "orders.*"]}, ...],
    ///  "takeover": {}}
    /// ```
    ///
    /// Objects have sorted keys (serde_json's default map; its `preserve_order` feature would
    /// change every hash). Ranges are `"a-b"`, or `"n"` for one number, merged and sorted;
    /// a region owning nothing in a rule is left out of its `owners`. Header and key-part values
    /// are sorted by their bytes; a value that is not UTF-8 (the file cannot hold one) would be
    /// `{"hex": "..."}`. A `by: key_part` rule always has `delimiter` and `index`, or `pattern`
    /// and `group`, defaults written out; when it hashes its parts, `slots` and slot ranges as a
    /// `by: key` rule has them. Fallbacks are `"reject"`, `"local"` or a region name; regions cannot
    /// be named after those keywords.
    pub fn canonical_json(&self) -> Value {
        let mut regions: Vec<&str> = self.regions.iter().map(String::as_str).collect();
        regions.sort_unstable();
        let takeover: Map<String, Value> = (self.regions.iter().zip(self.takeover.iter()))
            .filter_map(|(from, to)| Some((from.clone(), self.region_name((*to)?).into())))
            .collect();
        let mut frozen: Vec<&str> = (self.regions.iter().zip(self.frozen.iter()))
            .filter_map(|(region, frozen)| frozen.then_some(region.as_str()))
            .collect();
        frozen.sort_unstable();

        let mut table = Map::new();
        table.insert("regions".into(), regions.into());
        table.insert(
            "rules".into(),
            self.rules.iter().map(|rule| self.rule_json(rule)).collect(),
        );
        table.insert("default".into(), self.default.as_str().into());
        table.insert("takeover".into(), takeover.into());
        table.insert("frozen".into(), frozen.into());
        Value::Object(table)
    }

    /// Lowercase hex SHA-256 of the compact serialization of [`Table::canonical_json`]. Two
    /// tables written the same way up to formatting hash the same, in every region.
    pub fn content_hash(&self) -> String {
        Self::hash_of(&self.canonical_json())
    }

    /// [`Table::content_hash`] of the table whose [`Table::canonical_json`] is `canonical`.
    pub fn hash_of(canonical: &Value) -> String {
        // `Display` on a `Value` is the compact serialization; it cannot fail.
        Self::hash_of_text(&canonical.to_string())
    }

    /// [`Table::hash_of`] the compact serialization of the canonical table.
    pub fn hash_of_text(compact: &str) -> String {
        hex(&Sha256::digest(compact.as_bytes()))
    }

    /// One bounded line saying what changed from `old` to `self`, for the reload log, e.g.
    /// `rules changed: orders (owners), tenants (on_foreign); rules added: x; rules removed: y;
    /// takeover: {} -> {us: eu}; frozen: [] -> [us]; default: allow -> reject`, or `no change`
    /// exactly when the two [`Table::content_hash`]es are equal.
    ///
    /// Rules are matched by name (a renamed rule is removed and added). A changed rule lists
    /// its changed fields; when its `by` changed, only `by`, `topics` and `on_foreign` (unless
    /// one side is `owner: any`, which has none) are compared. `rules moved` names the fewest
    /// rules whose moving explains the new order, with their new position (`now rules[1]`).
    pub fn diff_summary(&self, old: &Table) -> String {
        Self::diff_of(&old.canonical_json(), &self.canonical_json())
    }

    /// [`Table::diff_summary`] between two tables' [`Table::canonical_json`].
    pub fn diff_of(old: &Value, new: &Value) -> String {
        let mut parts = diff_rules(rules_of(old), rules_of(new));
        let mut fields: Vec<&str> = TABLE_FIELDS.to_vec();
        // Anything a later format adds is still reported, after the known fields.
        for key in old
            .as_object()
            .into_iter()
            .chain(new.as_object())
            .flat_map(Map::keys)
        {
            if key != "rules" && !fields.contains(&key.as_str()) {
                fields.push(key);
            }
        }
        for field in fields {
            let (before, after) = (old.get(field), new.get(field));
            if before != after {
                parts.push(format!("{field}: {} -> {}", show(before), show(after)));
            }
        }
        if parts.is_empty() {
            "no change".to_owned()
        } else {
            parts.join("; ")
        }
    }

    fn rule_json(&self, rule: &Rule) -> Value {
        let mut out = Map::new();
        out.insert("name".into(), rule.name.as_str().into());
        out.insert("topics".into(), rule.topics.to_vec().into());
        out.insert("by".into(), rule.by.kind().into());
        match &rule.by {
            By::Key {
                slots,
                owners,
                null_key,
            } => {
                out.insert("slots".into(), (*slots).into());
                let slots = (0i64..).zip(owners.iter()).map(|(s, &r)| (s, s, r));
                out.insert("owners".into(), self.ranges_by_region(slots));
                out.insert("null_key".into(), self.fallback_json(*null_key));
            }
            By::Header {
                header,
                owners,
                unmatched,
            } => {
                out.insert("header".into(), header.as_str().into());
                out.insert("owners".into(), self.values_by_region(owners));
                out.insert("unmatched".into(), self.fallback_json(*unmatched));
            }
            By::KeyPart {
                part,
                owners,
                unmatched,
            } => {
                match part {
                    KeyPart::Delimited { delimiter, index } => {
                        out.insert("delimiter".into(), bytes_json(delimiter));
                        out.insert("index".into(), (*index).into());
                    }
                    KeyPart::Pattern { pattern, group, .. } => {
                        out.insert("pattern".into(), pattern.as_str().into());
                        out.insert("group".into(), (*group).into());
                    }
                }
                match owners {
                    PartOwners::Values(values) => {
                        out.insert("owners".into(), self.values_by_region(values));
                    }
                    PartOwners::Slots(owners) => {
                        out.insert("slots".into(), owners.len().into());
                        let slots = (0i64..).zip(owners.iter()).map(|(s, &r)| (s, s, r));
                        out.insert("owners".into(), self.ranges_by_region(slots));
                    }
                }
                out.insert("unmatched".into(), self.fallback_json(*unmatched));
            }
            By::Partition { owners } => {
                let ranges = owners
                    .iter()
                    .map(|r| (i64::from(r.first), i64::from(r.last), r.owner));
                out.insert("owners".into(), self.ranges_by_region(ranges));
            }
            By::Topic { owner } => {
                out.insert("owner".into(), self.region_name(*owner).into());
            }
            By::Any => {}
        }
        // Nothing is foreign under `owner: any`, so its `on_foreign` decides nothing.
        if !matches!(rule.by, By::Any) {
            out.insert("on_foreign".into(), rule.on_foreign.as_str().into());
        }
        // Only when set, so a table without part states hashes as it always did.
        let (frozen, takeover) = self.states_json(rule);
        if let Some(frozen) = frozen {
            out.insert("frozen".into(), frozen);
        }
        if let Some(takeover) = takeover {
            out.insert("takeover".into(), takeover);
        }
        Value::Object(out)
    }

    /// A rule's `frozen` (`"all"`, or its frozen parts) and `takeover` (a region, or
    /// `{region: parts}`), each `None` when nothing has it. Parts are written as `owners`
    /// writes them: merged ranges of slots or partitions, or sorted values.
    pub(super) fn states_json(&self, rule: &Rule) -> (Option<Value>, Option<Value>) {
        let states = rule.states();
        // Every part with a state, as `(first, last)` runs or a value, with its state.
        let mut ranges: Vec<(i64, i64, PartState)> = (0i64..)
            .zip(states.slots.iter())
            .filter(|(_, s)| s.is_set())
            .map(|(i, &s)| (i, i, s))
            .collect();
        ranges.extend(
            states
                .partitions
                .iter()
                .map(|&(f, l, s)| (i64::from(f), i64::from(l), s)),
        );
        let mut values: Vec<(&[u8], PartState)> =
            states.values.iter().map(|(v, &s)| (&v[..], s)).collect();
        values.sort_unstable_by_key(|v| v.0);
        let parts = |keep: &dyn Fn(PartState) -> bool| -> Value {
            let runs = merged(ranges.iter().filter(|r| keep(r.2)).map(|&(f, l, _)| (f, l)));
            let mut out: Vec<Value> = runs;
            out.extend(values.iter().filter(|v| keep(v.1)).map(|v| bytes_json(v.0)));
            out.into()
        };
        let frozen = if states.whole.frozen {
            Some("all".into())
        } else if ranges.iter().any(|r| r.2.frozen) || values.iter().any(|v| v.1.frozen) {
            Some(parts(&|s| s.frozen))
        } else {
            None
        };
        let takeover = if let Some(region) = states.whole.takeover {
            Some(self.region_name(region).into())
        } else {
            let mut regions: Vec<RegionId> = ranges
                .iter()
                .map(|r| r.2)
                .chain(values.iter().map(|v| v.1))
                .filter_map(|s| s.takeover)
                .collect();
            regions.sort_unstable_by_key(|&r| self.region_name(r));
            regions.dedup();
            let by_region: Map<String, Value> = regions
                .into_iter()
                .map(|r| {
                    let name = self.region_name(r).to_owned();
                    (name, parts(&|s| s.takeover == Some(r)))
                })
                .collect();
            (!by_region.is_empty()).then(|| by_region.into())
        };
        (frozen, takeover)
    }

    /// `{"eu": ["acme", "globex"], "us": ["initech"]}`: the values each region owns, sorted by
    /// their bytes.
    fn values_by_region<S>(&self, owners: &HashMap<ValueKey, RegionId, S>) -> Value {
        let mut values: BTreeMap<&str, Vec<&[u8]>> = BTreeMap::new();
        for (value, &region) in owners {
            values
                .entry(self.region_name(region))
                .or_default()
                .push(value);
        }
        let values: Map<String, Value> = values
            .into_iter()
            .map(|(region, mut values)| {
                values.sort_unstable();
                let values: Vec<Value> = values.into_iter().map(bytes_json).collect();
                (region.to_owned(), values.into())
            })
            .collect();
        values.into()
    }

    /// `{"eu": ["0-5", "9"], "us": ["6-8"]}` from disjoint `(first, last, owner)` ranges in any
    /// order: sorted, and neighbours of the same owner merged, so that however the file split
    /// them the result is the same.
    fn ranges_by_region(&self, ranges: impl Iterator<Item = (i64, i64, RegionId)>) -> Value {
        let mut ranges: Vec<(i64, i64, RegionId)> = ranges.collect();
        ranges.sort_unstable_by_key(|&(first, ..)| first);
        let mut by_region: BTreeMap<&str, Vec<(i64, i64)>> = BTreeMap::new();
        for (first, last, owner) in ranges {
            let runs = by_region.entry(self.region_name(owner)).or_default();
            match runs.last_mut() {
                Some((_, end)) if *end + 1 == first => *end = last,
                _ => runs.push((first, last)),
            }
        }
        let by_region: Map<String, Value> = by_region
            .into_iter()
            .map(|(region, runs)| {
                let runs: Vec<Value> = runs
                    .into_iter()
                    .map(|(first, last)| {
                        if first == last {
                            first.to_string().into()
                        } else {
                            format!("{first}-{last}").into()
                        }
                    })
                    .collect();
                (region.to_owned(), runs.into())
            })
            .collect();
        by_region.into()
    }

    fn fallback_json(&self, fallback: Fallback) -> Value {
        match fallback {
            Fallback::Reject => "reject".into(),
            Fallback::Local => "local".into(),
            Fallback::Region(region) => self.region_name(region).into(),
        }
    }
}

/// `["0-5", "9"]`: sorted `(first, last)` runs, neighbours merged.
pub(super) fn merged(runs: impl Iterator<Item = (i64, i64)>) -> Vec<Value> {
    let mut out: Vec<(i64, i64)> = Vec::new();
    for (first, last) in runs {
        match out.last_mut() {
            Some((_, end)) if *end + 1 == first => *end = last,
            _ => out.push((first, last)),
        }
    }
    out.into_iter()
        .map(|(first, last)| {
            if first == last {
                first.to_string().into()
            } else {
                format!("{first}-{last}").into()
            }
        })
        .collect()
}

/// A header value: a string when it is UTF-8 (always, from a YAML file), else its hex, in an
/// object so that it can never equal a string value.
fn bytes_json(value: &[u8]) -> Value {
    match std::str::from_utf8(value) {
        Ok(text) => text.into(),
        Err(_) => {
            let mut object = Map::new();
            object.insert("hex".into(), hex(value).into());
            object.into()
        }
    }
}

/// Lowercase hex, two digits a byte.
fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut hex, byte| {
            // Writing to a String cannot fail.
            write!(hex, "{byte:02x}").ok();
            hex
        })
}

fn rules_of(table: &Value) -> &[Value] {
    table
        .get("rules")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn rule_name(rule: &Value) -> &str {
    rule.get("name").and_then(Value::as_str).unwrap_or("")
}

/// `rules changed`, `rules added`, `rules removed` and `rules moved`, each only if not empty.
fn diff_rules(old: &[Value], new: &[Value]) -> Vec<String> {
    // Rule names are unique within a table (validated).
    let old_index: HashMap<&str, usize> = (old.iter().enumerate())
        .map(|(i, rule)| (rule_name(rule), i))
        .collect();
    let new_names: HashSet<&str> = new.iter().map(rule_name).collect();

    let mut changed = Vec::new();
    let mut added = Vec::new();
    // (position in `new`, position in `old`) of the rules in both, in new order.
    let mut common: Vec<(usize, usize)> = Vec::new();
    for (i, rule) in new.iter().enumerate() {
        let name = rule_name(rule);
        match old_index.get(name) {
            None => added.push(shown(name).into_owned()),
            Some(&j) => {
                common.push((i, j));
                let fields = changed_fields(&old[j], rule);
                if !fields.is_empty() {
                    changed.push(format!("{} ({})", shown(name), fields.join(", ")));
                }
            }
        }
    }
    let removed: Vec<String> = (old.iter().map(rule_name))
        .filter(|name| !new_names.contains(name))
        .map(|name| shown(name).into_owned())
        .collect();
    let old_order: Vec<usize> = common.iter().map(|&(_, j)| j).collect();
    let moved: Vec<String> = (common.iter().zip(in_longest_increasing(&old_order)))
        .filter(|(_, stayed)| !stayed)
        .map(|(&(i, _), _)| format!("{} (now rules[{i}])", shown(rule_name(&new[i]))))
        .collect();

    [
        ("rules changed", changed),
        ("rules added", added),
        ("rules removed", removed),
        ("rules moved", moved),
    ]
    .into_iter()
    .filter(|(_, names)| !names.is_empty())
    .map(|(label, names)| format!("{label}: {}", bounded(names)))
    .collect()
}

/// The fields of a rule that differ, in [`FIELD_ORDER`].
fn changed_fields<'a>(old: &'a Value, new: &'a Value) -> Vec<&'a str> {
    let (Some(old), Some(new)) = (old.as_object(), new.as_object()) else {
        return vec!["rule"];
    };
    let by_changed = old.get("by") != new.get("by");
    let mut fields: Vec<&str> = (old.keys().chain(new.keys()))
        .map(String::as_str)
        .filter(|&field| field != "name")
        // `on_foreign` only exists off `owner: any`.
        .filter(|&field| {
            !by_changed
                || (FIELDS_OF_EVERY_KIND.contains(&field)
                    && old.contains_key(field)
                    && new.contains_key(field))
        })
        .filter(|&field| old.get(field) != new.get(field))
        .collect();
    // Known fields in the documented order, anything else after them by name.
    fields.sort_unstable_by_key(|&field| {
        let known = FIELD_ORDER.iter().position(|&f| f == field);
        (known.unwrap_or(FIELD_ORDER.len()), field)
    });
    fields.dedup();
    fields
}

/// For each position of `seq`, whether it belongs to one longest strictly increasing
/// subsequence: the rules that kept their relative order, so the others are the fewest that
/// moved. O(n log n).
fn in_longest_increasing(seq: &[usize]) -> Vec<bool> {
    // tails[k]: the position ending the smallest-ending increasing run of length k + 1.
    let mut tails: Vec<usize> = Vec::new();
    let mut previous: Vec<Option<usize>> = vec![None; seq.len()];
    for (i, &value) in seq.iter().enumerate() {
        let k = tails.partition_point(|&t| seq[t] < value);
        previous[i] = k.checked_sub(1).map(|k| tails[k]);
        if k == tails.len() {
            tails.push(i);
        } else {
            tails[k] = i;
        }
    }
    let mut keep = vec![false; seq.len()];
    let mut at = tails.last().copied();
    while let Some(i) = at {
        keep[i] = true;
        at = previous[i];
    }
    keep
}

/// `a, b, c`, or the first [`MAX_NAMED`] and `and N more`.
fn bounded(items: Vec<String>) -> String {
    let more = items.len().saturating_sub(MAX_NAMED);
    let mut named: Vec<String> = items.into_iter().take(MAX_NAMED).collect();
    if more > 0 {
        named.push(format!("and {more} more"));
    }
    named.join(", ")
}

/// A top-level value for the diff line: `allow`, `[eu, us]`, `{us: eu}`; bounded.
fn show(value: Option<&Value>) -> String {
    match value {
        None => "-".to_owned(),
        Some(Value::String(text)) => shown(text).into_owned(),
        Some(Value::Array(items)) => {
            let items = items.iter().map(|item| show(Some(item))).collect();
            format!("[{}]", bounded(items))
        }
        Some(Value::Object(map)) => {
            let items = (map.iter())
                .map(|(key, value)| format!("{}: {}", shown(key), show(Some(value))))
                .collect();
            format!("{{{}}}", bounded(items))
        }
        Some(other) => other.to_string(),
    }
}

/// A name as written, or quoted and escaped if it holds a control character (a newline in a
/// quoted YAML name must not split the log line).
fn shown(name: &str) -> Cow<'_, str> {
    if name.chars().any(char::is_control) {
        Cow::Owned(format!("{name:?}"))
    } else {
        Cow::Borrowed(name)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{EXAMPLE, example_with, parse};
    use super::*;
    use std::path::Path;

    /// Pasted from a run: a change here means every deployed proxy reports a new hash for an
    /// unchanged file. Only change it on purpose, together with the canonical form.
    const EXAMPLE_HASH: &str = "41d6d7369d143fb7ebee227b214c3c2f6db67e80f8a30b89886690cb8e87bb2a";

    /// The example, spelled as differently as the format allows.
    const EXAMPLE_RESPELLED: &str = r#"
# Same rules, other spelling: block style, other key order, split ranges, implicit defaults.
rules:
- by: key
  name: orders
  topics:
  - orders
  - 'orders.*'
  on_foreign: reject
  slots: 16
  owners:
    us: ["8-11", 12, "13-15"]
    eu: [0, 1, 2, "3", "4 - 7"]
- name: tenants
  topics: [tenant.*]
  by: header
  header: tenant
  owners:
    us: [initech]
    eu: [globex, acme]
- {name: inventory, topics: [inventory], by: partition,
   owners: {us: ["6-8", "9-11"], eu: ["0-5"]}, on_foreign: reject}
- name: audit-log
  topics: ["audit.*"]
  owner: eu
- name: telemetry
  topics: ["metrics.*"]
  by: topic
  owner: any
  on_foreign: audit     # decides nothing under owner: any
"#;

    fn parse_with(text: &str, regions: &[&str]) -> Table {
        let regions: Vec<String> = regions.iter().map(|r| (*r).to_owned()).collect();
        match Table::parse(text, Path::new("ownership.yaml"), &regions) {
            Ok(table) => table,
            Err(e) => panic!("{e}\n{text}"),
        }
    }

    /// `text` with the `n`th (from 0) occurrence of `from` replaced.
    fn replace_nth(text: &str, from: &str, to: &str, n: usize) -> String {
        let (at, _) = text.match_indices(from).nth(n).expect("occurrence");
        format!("{}{to}{}", &text[..at], &text[at + from.len()..])
    }

    /// The lines of the example's rule `name`, up to the next rule or `default:`.
    fn rule_block(name: &str) -> &'static str {
        let from = EXAMPLE.find(&format!("  - name: {name}\n")).expect(name);
        let rest = &EXAMPLE[from + 1..];
        let len = rest
            .find("  - name: ")
            .or_else(|| rest.find("default:"))
            .expect("end of rule");
        &EXAMPLE[from..from + 1 + len]
    }

    /// The example with rule `name` moved to just before rule `before`.
    fn example_moving(name: &str, before: &str) -> String {
        let block = rule_block(name);
        let rest = EXAMPLE.replace(block, "");
        let at = rest.find(&format!("  - name: {before}\n")).expect(before);
        format!("{}{block}{}", &rest[..at], &rest[at..])
    }

    #[test]
    fn the_example_has_this_canonical_form() {
        let expected = serde_json::json!({
            "regions": ["eu", "us"],
            "rules": [
                {
                    "name": "orders", "topics": ["orders", "orders.*"], "by": "key",
                    "slots": 16, "owners": {"eu": ["0-7"], "us": ["8-15"]},
                    "null_key": "reject", "on_foreign": "reject"
                },
                {
                    "name": "tenants", "topics": ["tenant.*"], "by": "header",
                    "header": "tenant", "owners": {"eu": ["acme", "globex"], "us": ["initech"]},
                    "unmatched": "reject", "on_foreign": "reject"
                },
                {
                    "name": "inventory", "topics": ["inventory"], "by": "partition",
                    "owners": {"eu": ["0-5"], "us": ["6-11"]}, "on_foreign": "reject"
                },
                {
                    "name": "audit-log", "topics": ["audit.*"], "by": "topic", "owner": "eu",
                    "on_foreign": "reject"
                },
                {"name": "telemetry", "topics": ["metrics.*"], "by": "any"}
            ],
            "default": "allow",
            "takeover": {},
            "frozen": []
        });
        assert_eq!(parse(EXAMPLE).canonical_json(), expected);
    }

    #[test]
    fn the_example_hash_is_stable() {
        let table = parse(EXAMPLE);
        let hash = table.content_hash();
        assert_eq!(hash, EXAMPLE_HASH, "{}", table.canonical_json());
        assert_eq!(hash.len(), 64);
        assert!(hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
        // The hash is of the compact serialization, keys sorted.
        let compact = table.canonical_json().to_string();
        assert!(compact.starts_with(r#"{"default":"allow","frozen":[],"regions":["eu","us"],"#));
        let digest = Sha256::digest(compact.as_bytes());
        assert_eq!(format!("{digest:x}"), hash);
    }

    #[test]
    fn the_same_table_spelled_differently_hashes_the_same() {
        let table = parse(EXAMPLE);
        let respelled = parse(EXAMPLE_RESPELLED);
        assert_eq!(respelled.canonical_json(), table.canonical_json());
        assert_eq!(respelled.content_hash(), table.content_hash());

        // Neighbouring partition ranges of one owner, listed one by one, are one range.
        let singly = EXAMPLE.replace(r#"eu: ["0-5"]"#, "eu: [5, 4, 3, 2, 1, 0]");
        assert_eq!(parse(&singly).content_hash(), table.content_hash());
        // Whether the clusters list eu or us first does not matter.
        assert_eq!(
            parse_with(EXAMPLE, &["us", "eu"]).content_hash(),
            table.content_hash()
        );

        // Takeover and frozen entries in another order, regions in another order.
        let three = |takeover: &str, frozen: &str, regions: &[&str]| {
            let text = EXAMPLE
                .replace("takeover: {}", &format!("takeover: {takeover}"))
                .replace("frozen: []", &format!("frozen: {frozen}"));
            parse_with(&text, regions)
        };
        let a = three("{ us: eu, ap: eu }", "[eu, ap]", &["eu", "us", "ap"]);
        let b = three(
            "\n  ap: eu   # block style\n  us: eu",
            "\n  - ap\n  - eu",
            &["ap", "us", "eu"],
        );
        assert_eq!(a.canonical_json(), b.canonical_json());
        assert_eq!(a.content_hash(), b.content_hash());
        assert_eq!(
            a.canonical_json()["takeover"],
            serde_json::json!({"ap": "eu", "us": "eu"})
        );
        assert_eq!(
            a.canonical_json()["frozen"],
            serde_json::json!(["ap", "eu"])
        );
        assert_eq!(
            a.canonical_json()["regions"],
            serde_json::json!(["ap", "eu", "us"])
        );
    }

    /// Each a change to what the example decides or to the order it decides in.
    fn semantic_changes() -> Vec<(&'static str, String)> {
        vec![
            (
                "a slot moves",
                EXAMPLE.replace(
                    r#"eu: ["0-7"], us: ["8-15"]"#,
                    r#"eu: ["0-8"], us: ["9-15"]"#,
                ),
            ),
            (
                "slots",
                EXAMPLE
                    .replace("slots: 16", "slots: 17")
                    .replace("8-15", "8-16"),
            ),
            (
                "null_key",
                EXAMPLE.replace("null_key: reject", "null_key: local"),
            ),
            (
                "a header value moves",
                EXAMPLE.replace(
                    "[acme, globex], us: [initech]",
                    "[acme], us: [globex, initech]",
                ),
            ),
            (
                "unmatched",
                EXAMPLE.replace("unmatched: reject", "unmatched: us"),
            ),
            (
                "tenants on_foreign",
                replace_nth(EXAMPLE, "on_foreign: reject", "on_foreign: audit", 1),
            ),
            (
                "a partition moves",
                EXAMPLE.replace(
                    r#"eu: ["0-5"], us: ["6-11"]"#,
                    r#"eu: ["0-6"], us: ["7-11"]"#,
                ),
            ),
            (
                "a partition is dropped",
                EXAMPLE.replace(r#"us: ["6-11"]"#, r#"us: ["6-10"]"#),
            ),
            ("topic owner", EXAMPLE.replace("owner: eu", "owner: us")),
            ("any to topic", EXAMPLE.replace("owner: any", "owner: us")),
            (
                "a topic is added",
                EXAMPLE.replace(r#"["audit.*"]"#, r#"["audit.*", "audit"]"#),
            ),
            (
                "topic order within a rule",
                EXAMPLE.replace(r#"["orders", "orders.*"]"#, r#"["orders.*", "orders"]"#),
            ),
            ("rule order", example_moving("tenants", "orders")),
            (
                "a rule is renamed",
                EXAMPLE.replace("name: telemetry", "name: metrics"),
            ),
            (
                "default",
                EXAMPLE.replace("default: allow", "default: reject"),
            ),
            (
                "takeover",
                EXAMPLE.replace("takeover: {}", "takeover: { us: eu }"),
            ),
            ("frozen", EXAMPLE.replace("frozen: []", "frozen: [us]")),
        ]
    }

    /// A table with a `by: key_part` rule of each form.
    const KEY_PARTS: &str = r#"
rules:
  - name: accounts
    topics: ["accounts.*"]
    by: key_part
    delimiter: "|"
    index: 0
    owners: { eu: [tenant-1, tenant-42], us: [tenant-7] }
    unmatched: reject
  - name: ledgers
    topics: ["ledger"]
    by: key_part
    pattern: '^(tenant-[0-9]+)/'
    owners: { eu: [tenant-1], us: [tenant-7] }
    unmatched: us
    on_foreign: audit
"#;

    /// [`KEY_PARTS`] spelled differently: defaults left out, other order, other quoting.
    const KEY_PARTS_RESPELLED: &str = r#"
rules:
- {name: accounts, by: key_part, topics: [accounts.*], delimiter: '|',
   owners: {us: [tenant-7], eu: [tenant-42, "tenant-1"]}}
- name: ledgers
  on_foreign: audit
  unmatched: us
  group: 1
  pattern: "^(tenant-[0-9]+)/"
  owners:
    us: [tenant-7]
    eu: [tenant-1]
  topics: [ledger]
  by: key_part
"#;

    #[test]
    fn key_part_rules_have_a_canonical_form_and_hash_deterministically() {
        let table = parse(KEY_PARTS);
        let rules = serde_json::json!([
            {
                "name": "accounts", "topics": ["accounts.*"], "by": "key_part",
                "delimiter": "|", "index": 0,
                "owners": {"eu": ["tenant-1", "tenant-42"], "us": ["tenant-7"]},
                "unmatched": "reject", "on_foreign": "reject"
            },
            {
                "name": "ledgers", "topics": ["ledger"], "by": "key_part",
                "pattern": "^(tenant-[0-9]+)/", "group": 1,
                "owners": {"eu": ["tenant-1"], "us": ["tenant-7"]},
                "unmatched": "us", "on_foreign": "audit"
            }
        ]);
        assert_eq!(table.canonical_json()["rules"], rules);
        // The same table parsed again, and spelled differently, hashes the same.
        assert_eq!(table.content_hash(), parse(KEY_PARTS).content_hash());
        let respelled = parse(KEY_PARTS_RESPELLED);
        assert_eq!(respelled.canonical_json(), table.canonical_json());
        assert_eq!(respelled.content_hash(), table.content_hash());
        assert_eq!(respelled.diff_summary(&table), "no change");
    }

    #[test]
    fn every_change_to_a_key_part_rule_changes_the_hash_and_is_named() {
        let old = parse(KEY_PARTS);
        let changes = [
            (
                KEY_PARTS.replace(r#"delimiter: "|""#, r#"delimiter: "/""#),
                "accounts (delimiter)",
            ),
            (
                KEY_PARTS.replace("index: 0", "index: 1"),
                "accounts (index)",
            ),
            (
                KEY_PARTS.replace("^(tenant-[0-9]+)/", "^(tenant-[0-9]+)\\|"),
                "ledgers (pattern)",
            ),
            (
                KEY_PARTS.replace("^(tenant-[0-9]+)/", "^((tenant)-[0-9]+)/'\n    group: 2 #"),
                "ledgers (pattern, group)",
            ),
            (
                KEY_PARTS.replace(
                    r#"delimiter: "|"
    index: 0"#,
                    "pattern: '^([^|]*)'",
                ),
                "accounts (delimiter, index, pattern, group)",
            ),
            (
                KEY_PARTS.replace(
                    "[tenant-1, tenant-42], us: [tenant-7]",
                    "[tenant-1], us: [tenant-7, tenant-42]",
                ),
                "accounts (owners)",
            ),
            (
                KEY_PARTS.replace("unmatched: reject", "unmatched: local"),
                "accounts (unmatched)",
            ),
            (
                KEY_PARTS.replace(
                    "[tenant-1, tenant-42], us: [tenant-7]",
                    "[\"0-7\"], us: [\"8-15\"] }\n    slots: 16 #",
                ),
                "accounts (slots, owners)",
            ),
        ];
        let mut seen = vec![old.content_hash()];
        for (text, named) in changes {
            let new = parse(&text);
            let hash = new.content_hash();
            assert!(
                !seen.contains(&hash),
                "{named}: same hash as an earlier table"
            );
            seen.push(hash);
            assert_eq!(new.diff_summary(&old), format!("rules changed: {named}"));
        }
        // Hashed parts: a slot that moves changes the hash; the canonical form is a key rule's.
        let hashed = KEY_PARTS.replace(
            "[tenant-1, tenant-42], us: [tenant-7]",
            "[\"0-7\"], us: [\"8-15\"] }\n    slots: 16 #",
        );
        let json = parse(&hashed).canonical_json();
        assert_eq!(json["rules"][0]["slots"], 16);
        assert_eq!(
            json["rules"][0]["owners"],
            serde_json::json!({"eu": ["0-7"], "us": ["8-15"]})
        );
        let moved =
            parse(&hashed.replace("[\"0-7\"], us: [\"8-15\"]", "[\"0-8\"], us: [\"9-15\"]"));
        assert_ne!(moved.content_hash(), parse(&hashed).content_hash());
        assert_eq!(
            moved.diff_summary(&parse(&hashed)),
            "rules changed: accounts (owners)"
        );
        // A key rule becoming a key_part rule: only `by` (and the shared fields) are named.
        let key = "rules:\n  - name: accounts\n    topics: [\"accounts.*\"]\n    by: key\n    slots: 1\n    owners: { eu: [0] }\n";
        let by_part = parse(&KEY_PARTS[..KEY_PARTS.find("  - name: ledgers").expect("ledgers")]);
        assert_eq!(
            by_part.diff_summary(&parse(key)),
            "rules changed: accounts (by)"
        );
    }

    #[test]
    fn every_semantic_change_changes_the_hash() {
        let example = parse(EXAMPLE).content_hash();
        let mut seen = vec![example];
        for (what, text) in semantic_changes() {
            let hash = parse(&text).content_hash();
            assert!(
                !seen.contains(&hash),
                "{what}: same hash as an earlier table"
            );
            seen.push(hash);
        }
    }

    #[test]
    fn no_change_exactly_when_the_hashes_are_equal() {
        let mut texts: Vec<String> = vec![EXAMPLE.to_owned(), EXAMPLE_RESPELLED.to_owned()];
        texts.extend(semantic_changes().into_iter().map(|(_, text)| text));
        let tables: Vec<Table> = texts.iter().map(|text| parse(text)).collect();
        for new in &tables {
            for old in &tables {
                let same = new.content_hash() == old.content_hash();
                let diff = new.diff_summary(old);
                assert_eq!(diff == "no change", same, "{diff}");
                assert!(!diff.contains('\n'), "{diff}");
            }
        }
    }

    #[test]
    fn diff_names_the_changed_fields_of_each_rule() {
        let old = parse(EXAMPLE);
        let diff = |text: &str| parse(text).diff_summary(&old);
        assert_eq!(old.diff_summary(&old), "no change");
        assert_eq!(diff(EXAMPLE_RESPELLED), "no change");
        assert_eq!(
            diff(&EXAMPLE.replace(
                r#"eu: ["0-7"], us: ["8-15"]"#,
                r#"eu: ["0-8"], us: ["9-15"]"#
            )),
            "rules changed: orders (owners)"
        );
        assert_eq!(
            diff(&replace_nth(
                EXAMPLE,
                "on_foreign: reject",
                "on_foreign: audit",
                1
            )),
            "rules changed: tenants (on_foreign)"
        );
        assert_eq!(
            diff(
                &EXAMPLE
                    .replace("slots: 16", "slots: 8")
                    .replace(
                        r#"eu: ["0-7"], us: ["8-15"]"#,
                        r#"eu: ["0-3"], us: ["4-7"]"#
                    )
                    .replace("null_key: reject", "null_key: eu")
                    .replace(r#"["orders", "orders.*"]"#, r#"["orders"]"#)
            ),
            "rules changed: orders (topics, slots, owners, null_key)"
        );
        // A new `by`: the kind's own fields are implied.
        assert_eq!(
            diff(&EXAMPLE.replace(
                "by: partition\n    owners: { eu: [\"0-5\"], us: [\"6-11\"] }",
                "by: topic\n    owner: eu\n    on_foreign: audit",
            )),
            "rules changed: inventory (by, on_foreign)"
        );
        assert_eq!(
            diff(&EXAMPLE.replace("owner: any", "owner: us")),
            "rules changed: telemetry (by)"
        );
    }

    #[test]
    fn diff_of_a_reload_that_changes_everything() {
        let old = parse(EXAMPLE);
        let text = EXAMPLE
            .replace(
                r#"eu: ["0-7"], us: ["8-15"]"#,
                r#"eu: ["0-6"], us: ["7-15"]"#,
            )
            .replacen(
                "on_foreign: reject",
                "on_foreign: reject\n  - name: x\n    topics: [x]\n    owner: us",
                1,
            );
        let text = replace_nth(&text, "on_foreign: reject", "on_foreign: audit", 1)
            .replace(rule_block("telemetry"), "")
            .replace("takeover: {}", "takeover: { us: eu }")
            .replace("frozen: []", "frozen: [us]")
            .replace("default: allow", "default: reject");
        assert_eq!(
            parse(&text).diff_summary(&old),
            "rules changed: orders (owners), tenants (on_foreign); rules added: x; \
             rules removed: telemetry; takeover: {} -> {us: eu}; frozen: [] -> [us]; \
             default: allow -> reject"
        );
        // And back.
        assert_eq!(
            old.diff_summary(&parse(&text)),
            "rules changed: orders (owners), tenants (on_foreign); rules added: telemetry; \
             rules removed: x; takeover: {us: eu} -> {}; frozen: [us] -> []; \
             default: reject -> allow"
        );
        assert_eq!(
            example_with("{ us: eu }", "[eu]").diff_summary(&example_with("{}", "[us, eu]")),
            "takeover: {} -> {us: eu}; frozen: [eu, us] -> [eu]"
        );
        let ap = parse_with(EXAMPLE, &["eu", "us", "ap"]);
        assert_eq!(ap.diff_summary(&old), "regions: [eu, us] -> [ap, eu, us]");
    }

    #[test]
    fn diff_names_the_fewest_rules_that_moved() {
        let old = parse(EXAMPLE);
        assert_eq!(
            parse(&example_moving("telemetry", "orders")).diff_summary(&old),
            "rules moved: telemetry (now rules[0])"
        );
        assert_eq!(
            parse(&example_moving("orders", "telemetry")).diff_summary(&old),
            "rules moved: orders (now rules[3])"
        );
        // A swap of neighbours: either one moved; the first in the new order is named.
        assert_eq!(
            parse(&example_moving("tenants", "orders")).diff_summary(&old),
            "rules moved: tenants (now rules[0])"
        );
        // Removing or adding a rule moves nothing.
        assert_eq!(
            parse(&EXAMPLE.replace(rule_block("tenants"), "")).diff_summary(&old),
            "rules removed: tenants"
        );
        assert_eq!(
            old.diff_summary(&parse(&EXAMPLE.replace(rule_block("tenants"), ""))),
            "rules added: tenants"
        );
    }

    /// `count` rules `r0`, `r1`, ... of topic `t<i>`, each owned by `owner`.
    fn many_rules(count: usize, owner: &str) -> String {
        let mut text = String::from("rules:\n");
        for i in 0..count {
            writeln!(text, "  - {{ name: r{i}, topics: [t{i}], owner: {owner} }}").ok();
        }
        text
    }

    #[test]
    fn diff_is_bounded_and_one_line() {
        let old = parse(&many_rules(25, "eu"));
        let new = parse(&many_rules(25, "us"));
        let names: Vec<String> = (0..20).map(|i| format!("r{i} (owner)")).collect();
        assert_eq!(
            new.diff_summary(&old),
            format!("rules changed: {}, and 5 more", names.join(", "))
        );
        let none = parse("rules: []");
        let names: Vec<String> = (0..20).map(|i| format!("r{i}")).collect();
        assert_eq!(
            none.diff_summary(&old),
            format!("rules removed: {}, and 5 more", names.join(", "))
        );

        let odd = parse("rules:\n  - { name: \"a\\nb; c\", topics: [t], owner: eu }\n");
        assert_eq!(odd.diff_summary(&none), r#"rules added: "a\nb; c""#);
    }

    #[test]
    fn header_values_that_are_not_utf8_are_hex() {
        let mut table = parse(EXAMPLE);
        match &mut table.rules[1].by {
            By::Header { owners, .. } => {
                owners.insert(b"\xff\x00".as_slice().into(), RegionId(1));
                owners.insert(b"ff00".as_slice().into(), RegionId(1));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            table.canonical_json()["rules"][1]["owners"]["us"],
            serde_json::json!(["ff00", "initech", {"hex": "ff00"}])
        );
        assert_ne!(table.content_hash(), parse(EXAMPLE).content_hash());
        assert_eq!(
            table.diff_summary(&parse(EXAMPLE)),
            "rules changed: tenants (owners)"
        );
    }
}
