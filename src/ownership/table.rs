//! The validated table: rules in file order, the topic index, takeover and frozen. Immutable
//! once built; a reload builds a new one.

use super::rule::{By, Fallback, PartOwners, PartState, Rule};
use super::{Claim, RegionId, RejectReason, Subject, TableError, Verdict, glob, validate};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// What happens to topics no rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultPolicy {
    Allow,
    Reject,
}

impl DefaultPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DefaultPolicy::Allow => "allow",
            DefaultPolicy::Reject => "reject",
        }
    }
}

/// The ownership table. Build it with [`Table::load`] or [`Table::parse`]; both validate the
/// whole file, so a table that exists is a table that can serve.
#[derive(Debug)]
pub struct Table {
    pub(super) source: PathBuf,
    pub(super) regions: Box<[String]>,
    pub(super) rules: Box<[Rule]>,
    /// Exact topic name -> index of the first rule listing it: a hash lookup, not a scan.
    pub(super) exact: HashMap<Box<str>, usize>,
    /// `(rule index, pattern)` for every glob, in rule order.
    pub(super) globs: Box<[(usize, Box<str>)]>,
    pub(super) default: DefaultPolicy,
    /// By region index: the region that took over, if any. Never chained (validated).
    pub(super) takeover: Box<[Option<RegionId>]>,
    /// By region index, after takeover.
    pub(super) frozen: Box<[bool]>,
}

impl Table {
    /// Reads and validates the file. Errors carry the file path.
    pub fn load(path: &Path, regions: &[String]) -> Result<Table, TableError> {
        Table::parse(&Table::read(path)?, path, regions)
    }

    /// The file's text, unvalidated.
    pub fn read(path: &Path) -> Result<String, TableError> {
        std::fs::read_to_string(path).map_err(|e| TableError {
            file: path.to_owned(),
            path: String::new(),
            message: format!("cannot read the file: {e}"),
        })
    }

    /// Validates `text`. `source` is only used in error messages and kept for display.
    /// `regions` are the known regions (the clusters of the static config); their order gives
    /// the [`RegionId`]s.
    pub fn parse(text: &str, source: &Path, regions: &[String]) -> Result<Table, TableError> {
        validate::parse(text, source, regions)
    }

    pub fn regions(&self) -> &[String] {
        &self.regions
    }

    pub fn region_id(&self, name: &str) -> Option<RegionId> {
        let index = self.regions.iter().position(|r| r == name)?;
        // `validate` refuses more regions than a u16 can number.
        u16::try_from(index).ok().map(RegionId)
    }

    /// The region's name; `"?"` for an id that is not from this table.
    pub fn region_name(&self, id: RegionId) -> &str {
        self.regions.get(id.index()).map_or("?", String::as_str)
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    /// All rules, in file order (e.g. to create per-rule metric handles once per table).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// First rule whose topic patterns match, or None (then `default_policy()` applies).
    pub fn rule_for_topic(&self, topic: &str) -> Option<&Rule> {
        let exact = self.exact.get(topic).copied();
        // A glob wins over an exact name only if its rule comes first.
        let before = exact.unwrap_or(usize::MAX);
        self.globs
            .iter()
            .take_while(|(rule, _)| *rule < before)
            .find(|(_, pattern)| glob::matches(pattern, topic))
            .map(|(rule, _)| *rule)
            .or(exact)
            .and_then(|rule| self.rules.get(rule))
    }

    /// The position of `rule` in [`Table::rules`] (by identity: the rule must come from this
    /// table), e.g. to index per-rule metric handles.
    pub fn rule_index(&self, rule: &Rule) -> Option<usize> {
        // O(1) by address: rules live in one boxed slice.
        let size = std::mem::size_of::<Rule>();
        let offset = (rule as *const Rule as usize).checked_sub(self.rules.as_ptr() as usize)?;
        let index = offset / size;
        (offset % size == 0 && index < self.rules.len()).then_some(index)
    }

    pub fn default_policy(&self) -> DefaultPolicy {
        self.default
    }

    /// The claim for a topic no rule matches: `Any` under `default: allow`.
    pub fn default_claim(&self) -> Claim {
        match self.default {
            DefaultPolicy::Allow => Claim::Any,
            DefaultPolicy::Reject => Claim::Reject(RejectReason::DefaultReject),
        }
    }

    /// The region that owns what `region` owns in the file: itself, or the one that took it
    /// over.
    pub fn effective_owner(&self, region: RegionId) -> RegionId {
        self.takeover
            .get(region.index())
            .copied()
            .flatten()
            .unwrap_or(region)
    }

    /// Whether writes owned by `region` (after takeover) are held.
    pub fn is_frozen(&self, region: RegionId) -> bool {
        self.frozen.get(region.index()).copied().unwrap_or(false)
    }

    /// Turn a claim into the verdict for a proxy writing for `local`: applies takeover, then
    /// frozen.
    pub fn verdict(&self, claim: Claim, local: RegionId) -> Verdict {
        self.judge(claim, PartState::default(), local)
    }

    /// [`Table::verdict`] for a claim in a part of a rule with a state ([`Rule::decide`]): the
    /// part's takeover first, then the regions' takeover, then frozen (the part's, or the
    /// owner region's).
    pub fn judge(&self, claim: Claim, part: PartState, local: RegionId) -> Verdict {
        let owner = match claim {
            Claim::Any => return Verdict::Any,
            Claim::Reject(reason) => return Verdict::Reject(reason),
            Claim::Local => local,
            Claim::Region { region, .. } => region,
        };
        let owner = self.effective_owner(part.takeover.unwrap_or(owner));
        if part.frozen || self.is_frozen(owner) {
            Verdict::Frozen { owner }
        } else if owner == local {
            Verdict::Owned
        } else {
            Verdict::Foreign { owner }
        }
    }

    /// One line answering "who owns this?" for `keyward owner` and the admin API:
    /// `region=<name> rule=<name> slot=<n or ->`, or `region=any rule=<name> slot=-`, or
    /// `decision=reject reason=<reason> rule=<name or ->`; ` takeover_from=<x>` is appended when
    /// a takeover changed the owner and ` frozen=true` when the owner is frozen. With no rule
    /// matching: `region=any rule=- slot=- default=allow` or
    /// `decision=reject reason=default_reject rule=-`. When the query cannot answer the rule
    /// (a partition for a key rule): `decision=undecided need=<key|header:NAME|partition>
    /// rule=<name>`.
    pub fn explain(&self, subject: &Subject<'_>, local: RegionId) -> String {
        let Some(rule) = self.rule_for_topic(subject.topic_name()) else {
            return match self.default {
                DefaultPolicy::Allow => "region=any rule=- slot=- default=allow".to_owned(),
                DefaultPolicy::Reject => "decision=reject reason=default_reject rule=-".to_owned(),
            };
        };
        let Some((claim, part)) = rule.decide(subject) else {
            return format!(
                "decision=undecided need={} rule={}",
                rule.needs(),
                rule.name
            );
        };
        let (owner, slot) = match claim {
            Claim::Any => return format!("region=any rule={} slot=-", rule.name),
            Claim::Reject(reason) => {
                return format!("decision=reject reason={reason} rule={}", rule.name);
            }
            Claim::Local => (local, None),
            Claim::Region { region, slot } => (region, slot),
        };
        let effective = self.effective_owner(part.takeover.unwrap_or(owner));
        let slot = slot.map_or_else(|| "-".to_owned(), |slot| slot.to_string());
        let mut line = format!(
            "region={} rule={} slot={slot}",
            self.region_name(effective),
            rule.name
        );
        if effective != owner {
            write!(line, " takeover_from={}", self.region_name(owner)).ok();
        }
        if part.frozen || self.is_frozen(effective) {
            line.push_str(" frozen=true");
        }
        line
    }

    /// Multi-line human summary for `keyward check`: regions, rules (name, by, topics), and for
    /// each `by: key` rule how many slots each region owns; takeover/frozen/default.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; `.ok()` keeps the formatting readable.
        writeln!(out, "regions: {}", self.regions.join(", ")).ok();
        writeln!(
            out,
            "rules (the first whose topics match wins): {}",
            self.rules.len()
        )
        .ok();
        for rule in self.rules.iter() {
            writeln!(
                out,
                "  {}: by {}, topics {}",
                rule.name,
                rule.by.kind(),
                rule.topics.join(", ")
            )
            .ok();
            match &rule.by {
                By::Key {
                    slots,
                    owners,
                    null_key,
                } => {
                    let counts = self.count_per_region(owners.iter().copied());
                    writeln!(out, "    slots {slots}: {counts}").ok();
                    writeln!(out, "    null_key: {}", self.fallback_name(*null_key)).ok();
                }
                By::Header {
                    header,
                    owners,
                    unmatched,
                } => {
                    let counts = self.count_per_region(owners.values().copied());
                    writeln!(out, "    header {header}: values {counts}").ok();
                    writeln!(out, "    unmatched: {}", self.fallback_name(*unmatched)).ok();
                }
                By::KeyPart {
                    part,
                    owners,
                    unmatched,
                } => {
                    let owned = match owners {
                        PartOwners::Values(values) => {
                            format!("values {}", self.count_per_region(values.values().copied()))
                        }
                        PartOwners::Slots(slots) => format!(
                            "slots {}: {}",
                            slots.len(),
                            self.count_per_region(slots.iter().copied())
                        ),
                    };
                    writeln!(out, "    key {}: {owned}", part.describe()).ok();
                    writeln!(out, "    unmatched: {}", self.fallback_name(*unmatched)).ok();
                }
                By::Partition { owners } => {
                    let ranges: Vec<String> = owners
                        .iter()
                        .map(|r| {
                            let name = self.region_name(r.owner);
                            if r.first == r.last {
                                format!("{name} {}", r.first)
                            } else {
                                format!("{name} {}-{}", r.first, r.last)
                            }
                        })
                        .collect();
                    writeln!(out, "    partitions: {}", ranges.join(", ")).ok();
                }
                By::Topic { owner } => {
                    writeln!(out, "    owner: {}", self.region_name(*owner)).ok();
                }
                By::Any => {
                    writeln!(out, "    owner: any").ok();
                }
            }
            if !matches!(rule.by, By::Any) {
                writeln!(out, "    on_foreign: {}", rule.on_foreign.as_str()).ok();
            }
            let (frozen, takeover) = self.states_json(rule);
            if let Some(frozen) = frozen {
                writeln!(out, "    frozen: {frozen}").ok();
            }
            if let Some(takeover) = takeover {
                writeln!(out, "    takeover: {takeover}").ok();
            }
        }
        writeln!(out, "default: {}", self.default.as_str()).ok();
        let takeovers: Vec<String> = self
            .region_ids()
            .filter_map(|from| {
                let to = self.takeover.get(from.index()).copied().flatten()?;
                Some(format!(
                    "{} -> {}",
                    self.region_name(from),
                    self.region_name(to)
                ))
            })
            .collect();
        writeln!(out, "takeover: {}", none_if_empty(&takeovers)).ok();
        let frozen: Vec<String> = self
            .region_ids()
            .filter(|&r| self.is_frozen(r))
            .map(|r| match self.takeover.get(r.index()).copied().flatten() {
                // Frozen applies after takeover: nothing is owned by a region taken over.
                Some(to) => format!(
                    "{} (no effect: taken over by {})",
                    self.region_name(r),
                    self.region_name(to)
                ),
                None => self.region_name(r).to_owned(),
            })
            .collect();
        writeln!(out, "frozen: {}", none_if_empty(&frozen)).ok();
        out
    }

    fn region_ids(&self) -> impl Iterator<Item = RegionId> + '_ {
        (0..self.regions.len()).filter_map(|i| u16::try_from(i).ok().map(RegionId))
    }

    /// `eu 8, us 8`: how many of `owners` each region has, every region listed.
    fn count_per_region(&self, owners: impl Iterator<Item = RegionId>) -> String {
        let mut counts = vec![0usize; self.regions.len()];
        for owner in owners {
            if let Some(count) = counts.get_mut(owner.index()) {
                *count += 1;
            }
        }
        self.regions
            .iter()
            .zip(counts)
            .map(|(name, count)| format!("{name} {count}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn fallback_name(&self, fallback: Fallback) -> &str {
        match fallback {
            Fallback::Reject => "reject",
            Fallback::Local => "local",
            Fallback::Region(region) => self.region_name(region),
        }
    }
}

fn none_if_empty(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}
