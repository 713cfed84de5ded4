//! Moving part of a rule's ownership from one region to another, as the tables a move goes
//! through: the table in force, the same with the moving part frozen, and the table with the
//! part owned by its new region and nothing frozen for it. `keyward move` puts them in force
//! one after another in every instance (see `crate::moves`); here they are only computed.
//!
//! Tables are edited in their canonical form ([`Table::canonical_json`]), which every instance
//! running the same table shares whatever its file's formatting, and written back as a file
//! ([`Table::file_text`]) that validates to the same table.

use super::rule::{By, PartOwners, Rule};
use super::table::Table;
use super::{RegionId, TableError};
use serde_json::{Map, Value, json};
use std::collections::BTreeSet;
use std::path::Path;

/// The part of a rule that moves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parts {
    /// The whole rule.
    All,
    /// Slots of a `by: key` rule (or a `by: key_part` rule with slots), as `(first, last)`.
    Slots(Vec<(u32, u32)>),
    /// Values of a `by: header` or `by: key_part` rule.
    Values(Vec<String>),
    /// Partitions of a `by: partition` rule, as `(first, last)`.
    Partitions(Vec<(i32, i32)>),
}

/// One move: `parts` of rule `rule` go to region `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub rule: String,
    pub parts: Parts,
    pub to: String,
}

/// Why a move cannot be made on a table.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("the table has no rule named `{0}`")]
    NoRule(String),
    #[error("unknown region `{0}`")]
    NoRegion(String),
    #[error("rule `{rule}` is `by: {by}`: {problem}")]
    WrongParts {
        rule: String,
        by: &'static str,
        problem: String,
    },
    #[error("nothing moves: every part named is already owned by {0}")]
    Nothing(String),
    #[error("the resulting table is not valid: {0}")]
    Invalid(#[from] TableError),
}

/// The tables of one move.
pub struct Plan {
    /// The regions that own the moving parts now (by name, sorted).
    pub from: Vec<String>,
    /// The table in force with the moving parts frozen.
    pub frozen: Table,
    /// The table after the move: the parts owned by the new region, their freeze lifted.
    pub moved: Table,
}

impl Table {
    /// The table as a file keyward reads back into the same table (the same content hash): its
    /// canonical form in the file's own syntax. JSON, which is YAML.
    pub fn file_text(&self) -> String {
        let mut table = self.canonical_json();
        file_form(&mut table);
        let mut text = serde_json::to_string_pretty(&table).unwrap_or_default();
        text.push('\n');
        text
    }

    /// The table a canonical form describes (as `/ownership` shows it), for `regions`.
    pub fn from_canonical(canonical: &Value, regions: &[String]) -> Result<Table, TableError> {
        let mut file = canonical.clone();
        file_form(&mut file);
        Table::parse(&file.to_string(), Path::new("(canonical table)"), regions)
    }

    /// The tables that move `m`'s parts from their owners to `m.to`: the same table with them
    /// frozen, then with them owned by `m.to` and no longer frozen (nor taken over). Both are
    /// validated as any file is.
    pub fn plan_move(&self, m: &Move) -> Result<Plan, MoveError> {
        let rule = self
            .rules()
            .iter()
            .find(|r| r.name == m.rule)
            .ok_or_else(|| MoveError::NoRule(m.rule.clone()))?;
        if self.region_id(&m.to).is_none() {
            return Err(MoveError::NoRegion(m.to.clone()));
        }
        let moving = Moving::of(rule, &m.parts)?;
        let from: BTreeSet<&str> = moving.owners.iter().map(|&r| self.region_name(r)).collect();
        if from.iter().all(|&r| r == m.to) {
            return Err(MoveError::Nothing(m.to.clone()));
        }
        let index = self.rule_index(rule).unwrap_or_default();
        let current = self.canonical_json();

        let mut frozen = current.clone();
        let rule_json = rule_mut(&mut frozen, index);
        freeze(rule_json, &moving);

        let mut moved = current;
        let rule_json = rule_mut(&mut moved, index);
        own(rule_json, &moving, &m.to);
        thaw(rule_json, &moving);

        let parse = |json: &Value| {
            let mut file = json.clone();
            file_form(&mut file);
            Table::parse(&file.to_string(), self.source(), self.regions())
        };
        Ok(Plan {
            from: from.into_iter().map(str::to_owned).collect(),
            frozen: parse(&frozen)?,
            moved: parse(&moved)?,
        })
    }
}

/// The moving parts of one rule, resolved against it.
struct Moving {
    /// What the rule's `owners`, `frozen` and `takeover` lists hold for them: slot or partition
    /// numbers, or values.
    items: Items,
    /// The whole rule.
    all: bool,
    /// Their owners now, in the file.
    owners: BTreeSet<RegionId>,
}

enum Items {
    Numbers(BTreeSet<i64>),
    Values(BTreeSet<String>),
    Topic,
}

impl Moving {
    fn of(rule: &Rule, parts: &Parts) -> Result<Moving, MoveError> {
        let wrong = |problem: &str| MoveError::WrongParts {
            rule: rule.name.clone(),
            by: rule.by.kind(),
            problem: problem.to_owned(),
        };
        let all = *parts == Parts::All;
        match &rule.by {
            By::Key { owners, .. }
            | By::KeyPart {
                owners: PartOwners::Slots(owners),
                ..
            } => {
                let slots: BTreeSet<i64> = match parts {
                    Parts::All => (0..owners.len() as i64).collect(),
                    Parts::Slots(ranges) => ranges
                        .iter()
                        .flat_map(|&(a, b)| i64::from(a)..=i64::from(b))
                        .collect(),
                    _ => return Err(wrong("name slots (--slots) or the whole rule (--all)")),
                };
                if let Some(&bad) = slots.iter().find(|&&s| s >= owners.len() as i64) {
                    return Err(wrong(&format!(
                        "slot {bad} is out of range 0-{}",
                        owners.len() - 1
                    )));
                }
                let owners = slots.iter().map(|&s| owners[s as usize]).collect();
                Ok(Moving {
                    items: Items::Numbers(slots),
                    all,
                    owners,
                })
            }
            By::Header { owners, .. }
            | By::KeyPart {
                owners: PartOwners::Values(owners),
                ..
            } => {
                let values: BTreeSet<String> = match parts {
                    Parts::All => owners
                        .keys()
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .collect(),
                    Parts::Values(values) => values.iter().cloned().collect(),
                    _ => return Err(wrong("name values (--values) or the whole rule (--all)")),
                };
                let mut found = BTreeSet::new();
                for value in &values {
                    match owners.get(value.as_bytes()) {
                        Some(&owner) => found.insert(owner),
                        None => {
                            return Err(wrong(&format!("`{value}` is not in the rule's owners")));
                        }
                    };
                }
                Ok(Moving {
                    items: Items::Values(values),
                    all,
                    owners: found,
                })
            }
            By::Partition { owners } => {
                let partitions: BTreeSet<i64> = match parts {
                    Parts::All => owners
                        .iter()
                        .flat_map(|r| i64::from(r.first)..=i64::from(r.last))
                        .collect(),
                    Parts::Partitions(ranges) => ranges
                        .iter()
                        .flat_map(|&(a, b)| i64::from(a)..=i64::from(b))
                        .collect(),
                    _ => {
                        return Err(wrong(
                            "name partitions (--partitions) or the whole rule (--all)",
                        ));
                    }
                };
                let mut found = BTreeSet::new();
                for &p in &partitions {
                    match owners
                        .iter()
                        .find(|r| i64::from(r.first) <= p && p <= i64::from(r.last))
                    {
                        Some(r) => found.insert(r.owner),
                        None => {
                            return Err(wrong(&format!(
                                "partition {p} is not in the rule's owners"
                            )));
                        }
                    };
                }
                Ok(Moving {
                    items: Items::Numbers(partitions),
                    all,
                    owners: found,
                })
            }
            By::Topic { owner } => match parts {
                Parts::All => Ok(Moving {
                    items: Items::Topic,
                    all: true,
                    owners: BTreeSet::from([*owner]),
                }),
                _ => Err(wrong("it moves whole (--all)")),
            },
            By::Any => Err(wrong(
                "every region may write it; there is no owner to move",
            )),
        }
    }

    /// What remains of a list entry (`"0-3"`, `5`, a value) once the moving parts are taken
    /// out of it: itself, nothing, or the runs around them.
    fn remaining(&self, item: &Value) -> Vec<Value> {
        match (&self.items, item) {
            (Items::Numbers(moving), item) => {
                let Some((first, last)) = range_of(item) else {
                    return vec![item.clone()];
                };
                let kept: Vec<i64> = (first..=last).filter(|n| !moving.contains(n)).collect();
                runs(&kept)
            }
            (Items::Values(moving), Value::String(v)) if moving.contains(v) => Vec::new(),
            (_, item) => vec![item.clone()],
        }
    }

    /// The moving parts as list entries.
    fn entries(&self) -> Vec<Value> {
        match &self.items {
            Items::Numbers(numbers) => runs(&numbers.iter().copied().collect::<Vec<_>>()),
            Items::Values(values) => values.iter().map(|v| v.as_str().into()).collect(),
            Items::Topic => Vec::new(),
        }
    }
}

/// `(first, last)` of `"a-b"`, `"n"` or `n`.
fn range_of(item: &Value) -> Option<(i64, i64)> {
    match item {
        Value::Number(n) => n.as_i64().map(|n| (n, n)),
        Value::String(s) => match s.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => s.parse().ok().map(|n| (n, n)),
        },
        _ => None,
    }
}

/// Sorted numbers as `"a-b"` / `"n"` entries.
fn runs(sorted: &[i64]) -> Vec<Value> {
    super::canonical::merged(sorted.iter().map(|&n| (n, n)))
}

fn rule_mut(table: &mut Value, index: usize) -> &mut Map<String, Value> {
    table["rules"][index]
        .as_object_mut()
        .expect("a canonical table's rules are objects")
}

/// Adds the moving parts to the rule's `frozen`.
fn freeze(rule: &mut Map<String, Value>, moving: &Moving) {
    if moving.all {
        rule.insert("frozen".into(), "all".into());
        return;
    }
    match rule.get_mut("frozen") {
        Some(Value::String(_)) => {} // already `all`
        Some(Value::Array(list)) => list.extend(moving.entries()),
        _ => {
            rule.insert("frozen".into(), moving.entries().into());
        }
    }
}

/// Takes the moving parts out of the rule's `frozen` and `takeover`.
fn thaw(rule: &mut Map<String, Value>, moving: &Moving) {
    let frozen = match rule.remove("frozen") {
        Some(Value::String(all)) if !moving.all => Some(Value::String(all)),
        Some(Value::Array(list)) if !moving.all => {
            let kept: Vec<Value> = list.iter().flat_map(|i| moving.remaining(i)).collect();
            (!kept.is_empty()).then(|| kept.into())
        }
        _ => None,
    };
    if let Some(frozen) = frozen {
        rule.insert("frozen".into(), frozen);
    }
    let takeover = match rule.remove("takeover") {
        Some(Value::Object(by_region)) if !moving.all => {
            let kept: Map<String, Value> = by_region
                .into_iter()
                .filter_map(|(region, list)| {
                    let list = list.as_array()?;
                    let kept: Vec<Value> = list.iter().flat_map(|i| moving.remaining(i)).collect();
                    (!kept.is_empty()).then(|| (region, kept.into()))
                })
                .collect();
            (!kept.is_empty()).then(|| kept.into())
        }
        _ => None,
    };
    if let Some(takeover) = takeover {
        rule.insert("takeover".into(), takeover);
    }
}

/// Makes `to` the owner of the moving parts in the rule's `owners` (or `owner`).
fn own(rule: &mut Map<String, Value>, moving: &Moving, to: &str) {
    if let Items::Topic = moving.items {
        rule.insert("owner".into(), to.into());
        return;
    }
    let owners = rule
        .entry("owners")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("a canonical rule's owners are an object");
    for list in owners.values_mut() {
        if let Some(items) = list.as_array() {
            let kept: Vec<Value> = items.iter().flat_map(|i| moving.remaining(i)).collect();
            *list = kept.into();
        }
    }
    owners
        .entry(to)
        .or_insert_with(|| json!([]))
        .as_array_mut()
        .expect("a canonical rule's owner lists are arrays")
        .extend(moving.entries());
    owners.retain(|_, list| list.as_array().is_some_and(|l| !l.is_empty()));
}

/// A canonical table in the file's syntax: the regions (which come from the static config)
/// left out, and `by: any` rules written `owner: any`.
fn file_form(table: &mut Value) {
    if let Some(table) = table.as_object_mut() {
        table.remove("regions");
    }
    if let Some(rules) = table.get_mut("rules").and_then(Value::as_array_mut) {
        for rule in rules.iter_mut().filter_map(Value::as_object_mut) {
            if rule.get("by").and_then(Value::as_str) == Some("any") {
                rule.remove("by");
                rule.insert("owner".into(), "any".into());
            }
        }
    }
}

/// Reads `--slots 0-3,7`, `--partitions 0-2` style lists: comma-separated numbers or ranges.
pub fn parse_ranges<T: std::str::FromStr + Copy + PartialOrd>(
    text: &str,
) -> Result<Vec<(T, T)>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            let bad = || format!("`{item}` is not a number or a range like 0-3");
            let (a, b) = match item.split_once('-') {
                Some((a, b)) => (
                    a.trim().parse().map_err(|_| bad())?,
                    b.trim().parse().map_err(|_| bad())?,
                ),
                None => {
                    let n = item.parse().map_err(|_| bad())?;
                    (n, n)
                }
            };
            if a > b {
                return Err(format!("range `{item}` runs backwards"));
            }
            Ok((a, b))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::tests::{EXAMPLE, parse};
    use super::*;
    use serde_json::json;

    fn mv(rule: &str, parts: Parts, to: &str) -> Move {
        Move {
            rule: rule.into(),
            parts,
            to: to.into(),
        }
    }

    fn rule<'t>(table: &'t Value, name: &str) -> &'t Value {
        table["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap()
    }

    #[test]
    fn the_file_text_reads_back_into_the_same_table() {
        let with_states = EXAMPLE.replace(
            "null_key: reject ",
            "frozen: [\"0-1\"]\n    takeover: { us: [\"2\"] }\n    null_key: reject ",
        );
        for text in [EXAMPLE.to_owned(), with_states] {
            let table = parse(&text);
            let again = parse(&table.file_text());
            assert_eq!(
                again.content_hash(),
                table.content_hash(),
                "{}",
                table.file_text()
            );
        }
    }

    #[test]
    fn slots_move_through_a_freeze_to_their_new_owner() {
        let table = parse(EXAMPLE);
        let plan = table
            .plan_move(&mv("orders", Parts::Slots(vec![(0, 3)]), "us"))
            .unwrap();
        assert_eq!(plan.from, ["eu"]);
        let frozen = plan.frozen.canonical_json();
        assert_eq!(rule(&frozen, "orders")["frozen"], json!(["0-3"]));
        assert_eq!(
            rule(&frozen, "orders")["owners"],
            json!({"eu": ["0-7"], "us": ["8-15"]})
        );
        let moved = plan.moved.canonical_json();
        assert_eq!(
            rule(&moved, "orders")["owners"],
            json!({"eu": ["4-7"], "us": ["0-3", "8-15"]})
        );
        assert!(rule(&moved, "orders").get("frozen").is_none());
        // Nothing else changed.
        assert_eq!(
            plan.moved.diff_summary(&table),
            "rules changed: orders (owners)"
        );
        assert_eq!(
            plan.frozen.diff_summary(&table),
            "rules changed: orders (frozen)"
        );
    }

    #[test]
    fn values_partitions_and_whole_rules_move_too() {
        let table = parse(EXAMPLE);
        let plan = table
            .plan_move(&mv("tenants", Parts::Values(vec!["acme".into()]), "us"))
            .unwrap();
        assert_eq!(
            rule(&plan.frozen.canonical_json(), "tenants")["frozen"],
            json!(["acme"])
        );
        assert_eq!(
            rule(&plan.moved.canonical_json(), "tenants")["owners"],
            json!({"eu": ["globex"], "us": ["acme", "initech"]})
        );
        let plan = table
            .plan_move(&mv("inventory", Parts::Partitions(vec![(4, 7)]), "eu"))
            .unwrap();
        assert_eq!(plan.from, ["eu", "us"]);
        assert_eq!(
            rule(&plan.moved.canonical_json(), "inventory")["owners"],
            json!({"eu": ["0-7"], "us": ["8-11"]})
        );
        let plan = table.plan_move(&mv("audit-log", Parts::All, "us")).unwrap();
        assert_eq!(
            rule(&plan.frozen.canonical_json(), "audit-log")["frozen"],
            json!("all")
        );
        assert_eq!(
            rule(&plan.moved.canonical_json(), "audit-log")["owner"],
            json!("us")
        );
        let plan = table.plan_move(&mv("orders", Parts::All, "eu")).unwrap();
        assert_eq!(
            rule(&plan.moved.canonical_json(), "orders")["owners"],
            json!({"eu": ["0-15"]})
        );
    }

    #[test]
    fn other_frozen_parts_stay_and_a_takeover_of_the_moving_parts_goes() {
        let table = parse(&EXAMPLE.replace(
            "null_key: reject ",
            "frozen: [\"6-7\"]\n    takeover: { us: [\"2-5\"] }\n    null_key: reject ",
        ));
        let plan = table
            .plan_move(&mv("orders", Parts::Slots(vec![(0, 3)]), "us"))
            .unwrap();
        let frozen = plan.frozen.canonical_json();
        assert_eq!(rule(&frozen, "orders")["frozen"], json!(["0-3", "6-7"]));
        let moved = plan.moved.canonical_json();
        assert_eq!(rule(&moved, "orders")["frozen"], json!(["6-7"]));
        assert_eq!(rule(&moved, "orders")["takeover"], json!({"us": ["4-5"]}));
    }

    #[test]
    fn moves_that_cannot_be_made_say_why() {
        let table = parse(EXAMPLE);
        let error = |m: Move| table.plan_move(&m).err().unwrap().to_string();
        assert_eq!(
            error(mv("orders", Parts::Slots(vec![(8, 9)]), "us")),
            "nothing moves: every part named is already owned by us"
        );
        assert_eq!(
            error(mv("nope", Parts::All, "us")),
            "the table has no rule named `nope`"
        );
        assert_eq!(
            error(mv("orders", Parts::All, "mars")),
            "unknown region `mars`"
        );
        assert_eq!(
            error(mv("orders", Parts::Slots(vec![(15, 16)]), "us")),
            "rule `orders` is `by: key`: slot 16 is out of range 0-15"
        );
        assert_eq!(
            error(mv("tenants", Parts::Values(vec!["hooli".into()]), "us")),
            "rule `tenants` is `by: header`: `hooli` is not in the rule's owners"
        );
        assert_eq!(
            error(mv("telemetry", Parts::All, "us")),
            "rule `telemetry` is `by: any`: every region may write it; there is no owner to move"
        );
        assert_eq!(
            error(mv("orders", Parts::Values(vec!["x".into()]), "us")),
            "rule `orders` is `by: key`: name slots (--slots) or the whole rule (--all)"
        );
    }

    #[test]
    fn range_lists_are_read_as_the_command_line_writes_them() {
        assert_eq!(parse_ranges::<u32>("0-3, 7"), Ok(vec![(0, 3), (7, 7)]));
        assert!(parse_ranges::<u32>("3-1").is_err());
        assert!(parse_ranges::<u32>("a").is_err());
    }
}
