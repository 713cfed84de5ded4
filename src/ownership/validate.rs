//! From the YAML to a [`Table`]: every check beyond serde's types, each failing with the file,
//! the field path and a precise problem. Runs on load and reload only, never per record, so it
//! favours clear messages over speed.

use super::file::{
    File, Item, Pairs, RawBy, RawDefault, RawOnForeign, RawParts, RawRule, RawRuleTakeover,
};
use super::glob;
use super::rule::{
    By, Fallback, KeyPart, OnForeign, PartOwners, PartState, PartStates, PartitionRange, Rule,
    ValueKey,
};
use super::table::{DefaultPolicy, Table};
use super::{RegionId, TableError};
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::Path;

/// Upper bound on `slots`. A key rule keeps one owner per slot; slots are meant to match a
/// topic's partition count (so slots line up with partitions), which stays far below this.
const MAX_SLOTS: u32 = 65_536;

/// Upper bound on a `by: key_part` rule's `index`: a key is split into a handful of parts, and
/// a bound keeps a typo (`index: 10000`) from passing as a rule that owns nothing.
const MAX_INDEX: i64 = 255;

/// Values a `by: header` or `by: key_part` rule looks up, by their bytes.
type Values = HashMap<ValueKey, RegionId, foldhash::fast::RandomState>;

/// Words that mean something else where the file expects a region name.
const KEYWORDS: [&str; 3] = ["any", "local", "reject"];

/// At most this many missing-slot ranges are named in one error; the rest are counted.
const MAX_RANGES_NAMED: usize = 10;

pub(super) fn parse(text: &str, source: &Path, regions: &[String]) -> Result<Table, TableError> {
    let cx = Cx {
        file: source,
        regions,
    };
    cx.check_regions()?;
    let raw = cx.read(text)?;
    cx.build(raw)
}

/// Exact topic name -> first rule listing it, and `(rule, glob)` in rule order.
type TopicIndex = (HashMap<Box<str>, usize>, Vec<(usize, Box<str>)>);

/// What every check needs: where errors point, and the known regions.
struct Cx<'a> {
    file: &'a Path,
    regions: &'a [String],
}

/// Which other names a region field accepts, for the "unknown region" message.
#[derive(Clone, Copy)]
enum Also {
    Nothing,
    Any,
    Fallbacks,
}

impl Cx<'_> {
    fn error(&self, path: impl Into<String>, message: impl Into<String>) -> TableError {
        TableError {
            file: self.file.to_owned(),
            path: path.into(),
            message: message.into(),
        }
    }

    /// The regions come from the static config, but they must also be usable in this file.
    fn check_regions(&self) -> Result<(), TableError> {
        if self.regions.len() > usize::from(u16::MAX) + 1 {
            return Err(self.error(
                "",
                format!(
                    "{} regions are more than a table can number",
                    self.regions.len()
                ),
            ));
        }
        for (i, region) in self.regions.iter().enumerate() {
            if region.is_empty() {
                return Err(self.error("", "a region has an empty name"));
            }
            if KEYWORDS.contains(&region.as_str()) {
                return Err(self.error(
                    "",
                    format!(
                        "region name `{region}` cannot be used: any, local and reject are \
                         keywords of the ownership file"
                    ),
                ));
            }
            if self.regions[..i].contains(region) {
                return Err(self.error("", format!("region `{region}` is given twice")));
            }
        }
        Ok(())
    }

    /// Syntax, types and unknown fields, with serde's path and, where YAML gives one, the line
    /// and column.
    fn read(&self, text: &str) -> Result<File, TableError> {
        let deserializer = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = match e.path().to_string() {
                root if root == "." => String::new(),
                path => path,
            };
            let message = e.inner().to_string();
            // serde_yaml_ng puts its own copy of the path (or of its parent, for an unknown
            // field) in front of some messages; ours is kept separately.
            let message = ancestors(&path)
                .find_map(|prefix| message.strip_prefix(&format!("{prefix}: ")))
                .map_or_else(|| message.clone(), str::to_owned);
            self.error(path, message)
        })
    }

    fn build(&self, raw: File) -> Result<Table, TableError> {
        let mut rules: Vec<Rule> = Vec::with_capacity(raw.rules.len());
        for (i, raw_rule) in raw.rules.into_iter().enumerate() {
            let at = format!("rules[{i}]");
            if let Some(first) = rules.iter().position(|r| r.name == raw_rule.name) {
                return Err(self.error(
                    format!("{at}.name"),
                    format!(
                        "duplicate rule name `{}` (also rules[{first}])",
                        raw_rule.name
                    ),
                ));
            }
            rules.push(self.rule(&at, raw_rule)?);
        }
        let (exact, globs) = self.topic_index(&rules)?;

        let default = match raw.default {
            None | Some(RawDefault::Allow) => DefaultPolicy::Allow,
            Some(RawDefault::Reject) => DefaultPolicy::Reject,
        };
        let takeover = self.takeover(raw.takeover.unwrap_or(Pairs(Vec::new())))?;
        let mut frozen = vec![false; self.regions.len()];
        for (k, name) in raw.frozen.unwrap_or_default().iter().enumerate() {
            let region = self.region(&format!("frozen[{k}]"), name, Also::Nothing)?;
            frozen[region.index()] = true;
        }

        Ok(Table {
            source: self.file.to_owned(),
            regions: self.regions.into(),
            rules: rules.into(),
            exact,
            globs: globs.into(),
            default,
            takeover: takeover.into(),
            frozen: frozen.into(),
        })
    }

    /// Exact names into a hash map, globs into a list in rule order. A pattern written twice
    /// can only ever match for the first rule, so it is an error rather than dead config.
    fn topic_index(&self, rules: &[Rule]) -> Result<TopicIndex, TableError> {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut exact = HashMap::new();
        let mut globs = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            for (j, pattern) in rule.topics.iter().enumerate() {
                match seen.entry(pattern) {
                    Entry::Occupied(first) => {
                        let first = *first.get();
                        let message = if first == i {
                            format!("topic `{pattern}` is listed twice")
                        } else {
                            format!(
                                "topic `{pattern}` is already matched by rules[{first}] ({}), \
                                 which comes first and wins",
                                rules[first].name
                            )
                        };
                        return Err(self.error(format!("rules[{i}].topics[{j}]"), message));
                    }
                    Entry::Vacant(slot) => {
                        slot.insert(i);
                    }
                }
                if glob::is_glob(pattern) {
                    globs.push((i, pattern.as_str().into()));
                } else {
                    exact.insert(pattern.as_str().into(), i);
                }
            }
        }
        Ok((exact, globs))
    }

    fn rule(&self, at: &str, raw: RawRule) -> Result<Rule, TableError> {
        let RawRule {
            name,
            topics,
            by,
            slots,
            header,
            delimiter,
            index,
            pattern,
            group,
            owners,
            owner,
            null_key,
            unmatched,
            on_foreign,
            frozen,
            takeover,
        } = raw;
        if name.trim().is_empty() {
            return Err(self.error(format!("{at}.name"), "a rule needs a name"));
        }
        let topics = topics.unwrap_or_default();
        if topics.is_empty() {
            return Err(self.error(
                format!("{at}.topics"),
                format!("rule `{name}` has no topics"),
            ));
        }
        for (j, pattern) in topics.iter().enumerate() {
            let path = format!("{at}.topics[{j}]");
            if pattern.is_empty() {
                return Err(self.error(path, "empty topic pattern"));
            }
            if let Some(c) = glob::invalid_char(pattern) {
                return Err(self.error(
                    path,
                    format!(
                        "`{pattern}` contains {c:?}, which is not in a topic name \
                         (a-z, A-Z, 0-9, '.', '_', '-' and the wildcards '*', '?')"
                    ),
                ));
            }
        }

        // A rule without `by` decides by topic: `owner: any` or `owner: <region>`.
        let by_kind = by.unwrap_or(RawBy::Topic);
        let fields = [
            ("slots", slots.is_some(), &[RawBy::Key, RawBy::KeyPart][..]),
            ("header", header.is_some(), &[RawBy::Header]),
            ("delimiter", delimiter.is_some(), &[RawBy::KeyPart]),
            ("index", index.is_some(), &[RawBy::KeyPart]),
            ("pattern", pattern.is_some(), &[RawBy::KeyPart]),
            ("group", group.is_some(), &[RawBy::KeyPart]),
            (
                "owners",
                owners.is_some(),
                &[RawBy::Key, RawBy::Header, RawBy::KeyPart, RawBy::Partition],
            ),
            ("owner", owner.is_some(), &[RawBy::Topic]),
            ("null_key", null_key.is_some(), &[RawBy::Key]),
            (
                "unmatched",
                unmatched.is_some(),
                &[RawBy::Header, RawBy::KeyPart],
            ),
        ];
        for (field, present, belongs) in fields {
            if present && !belongs.contains(&by_kind) {
                let implied = if by.is_none() {
                    " (a rule without `by` is `by: topic`)"
                } else {
                    ""
                };
                return Err(self.error(
                    format!("{at}.{field}"),
                    format!(
                        "`{field}` does not belong to a `by: {}` rule{implied}",
                        by_kind.as_str()
                    ),
                ));
            }
        }

        let on_foreign = match on_foreign {
            None | Some(RawOnForeign::Reject) => OnForeign::Reject,
            Some(RawOnForeign::Audit) => OnForeign::Audit,
            Some(RawOnForeign::Redirect) => OnForeign::Redirect,
        };

        let owners_of = |owners: Option<Pairs<Vec<Item>>>| match owners {
            Some(Pairs(pairs)) if !pairs.is_empty() => Ok(pairs),
            _ => Err(self.error(
                format!("{at}.owners"),
                format!("rule `{name}` has no owners"),
            )),
        };
        let by = match by_kind {
            RawBy::Key => {
                let Some(slots) = slots else {
                    return Err(self.error(format!("{at}.slots"), "a `by: key` rule needs `slots`"));
                };
                let owners = owners_of(owners)?;
                let null_key = self.fallback(&format!("{at}.null_key"), null_key)?;
                self.by_key(at, slots, owners, null_key)?
            }
            RawBy::Header => {
                let header = match header {
                    Some(header) if !header.is_empty() => header,
                    Some(_) => return Err(self.error(format!("{at}.header"), "empty header name")),
                    None => {
                        return Err(self.error(
                            format!("{at}.header"),
                            "a `by: header` rule needs `header` (the record header to read)",
                        ));
                    }
                };
                let owners = owners_of(owners)?;
                let unmatched = self.fallback(&format!("{at}.unmatched"), unmatched)?;
                self.by_header(at, header, owners, unmatched)?
            }
            RawBy::KeyPart => {
                let part = self.key_part(at, delimiter, index, pattern, group)?;
                let owners = owners_of(owners)?;
                let unmatched = self.fallback(&format!("{at}.unmatched"), unmatched)?;
                let owners = match slots {
                    None => PartOwners::Values(self.values(at, &owners, "key part")?),
                    Some(slots) => PartOwners::Slots(self.slot_owners(at, slots, &owners)?),
                };
                By::KeyPart {
                    part,
                    owners,
                    unmatched,
                }
            }
            RawBy::Partition => self.by_partition(at, owners_of(owners)?)?,
            RawBy::Topic => match owner.as_deref() {
                None => {
                    return Err(self.error(
                        format!("{at}.owner"),
                        format!("rule `{name}` has no owner (a region, or any)"),
                    ));
                }
                Some("any") => By::Any,
                Some(region) => By::Topic {
                    owner: self.region(&format!("{at}.owner"), region, Also::Any)?,
                },
            },
        };

        let states = self.states(at, &by, frozen, takeover)?;
        Ok(Rule {
            name,
            by,
            on_foreign,
            topics: topics.into(),
            states,
        })
    }

    /// A rule's `frozen` and `takeover`: the whole rule, or parts of it named as its `owners`
    /// names them. Refused: parts the rule does not have or nobody owns, a part taken over by
    /// two regions or by the region that owns it, and both on an `owner: any` rule, which has no
    /// owner.
    fn states(
        &self,
        at: &str,
        by: &By,
        frozen: Option<RawParts>,
        takeover: Option<RawRuleTakeover>,
    ) -> Result<PartStates, TableError> {
        let mut states = PartStates::default();
        if frozen.is_none() && takeover.is_none() {
            return Ok(states);
        }
        if matches!(by, By::Any) {
            let field = if frozen.is_some() {
                "frozen"
            } else {
                "takeover"
            };
            return Err(self.error(
                format!("{at}.{field}"),
                "an `owner: any` rule has no owner: there is nothing to freeze or take over",
            ));
        }
        // Each part's state, keyed the way the rule's owners are.
        let mut slots: Vec<PartState> = match by {
            By::Key { slots, .. } => vec![PartState::default(); *slots as usize],
            By::KeyPart {
                owners: PartOwners::Slots(owners),
                ..
            } => vec![PartState::default(); owners.len()],
            _ => Vec::new(),
        };
        let mut values: HashMap<Box<[u8]>, PartState, foldhash::fast::RandomState> =
            HashMap::default();
        let mut frozen_partitions: Vec<(i32, i32)> = Vec::new();
        let mut taken_partitions: Vec<(i32, i32, RegionId)> = Vec::new();

        match frozen {
            None => {}
            Some(RawParts::All) => states.whole.frozen = true,
            Some(RawParts::List(items)) => {
                let path = format!("{at}.frozen");
                for (k, item) in items.iter().enumerate() {
                    match self.part(&format!("{path}[{k}]"), by, item)? {
                        Part::Slots(first, last) => {
                            for state in &mut slots[first..=last] {
                                state.frozen = true;
                            }
                        }
                        Part::Value(value, _) => values.entry(value).or_default().frozen = true,
                        Part::Partitions(first, last) => frozen_partitions.push((first, last)),
                    }
                }
            }
        }

        match takeover {
            None => {}
            Some(RawRuleTakeover::Whole(name)) => {
                let path = format!("{at}.takeover");
                let region = self.region(&path, &name, Also::Nothing)?;
                if let By::Topic { owner } = by
                    && *owner == region
                {
                    return Err(self.error(path, format!("{name} already owns this rule")));
                }
                states.whole.takeover = Some(region);
            }
            Some(RawRuleTakeover::Parts(Pairs(pairs))) => {
                for (name, items) in pairs {
                    let path = format!("{at}.takeover.{name}");
                    let region = self.region(&path, &name, Also::Nothing)?;
                    for (k, item) in items.iter().enumerate() {
                        let item_path = format!("{path}[{k}]");
                        match self.part(&item_path, by, item)? {
                            Part::Slots(first, last) => {
                                let owners = slot_owners_of(by);
                                for (slot, state) in
                                    slots.iter_mut().enumerate().take(last + 1).skip(first)
                                {
                                    if owners.get(slot) == Some(&region) {
                                        return Err(self.error(
                                            item_path,
                                            format!("slot {slot} is already owned by {name}"),
                                        ));
                                    }
                                    if let Some(other) = state.takeover {
                                        return Err(self.error(
                                            item_path,
                                            format!(
                                                "slot {slot} is also taken over by {}",
                                                self.name(other)
                                            ),
                                        ));
                                    }
                                    state.takeover = Some(region);
                                }
                            }
                            Part::Value(value, owner) => {
                                let shown = String::from_utf8_lossy(&value).into_owned();
                                if owner == region {
                                    return Err(self.error(
                                        item_path,
                                        format!("`{shown}` is already owned by {name}"),
                                    ));
                                }
                                let state = values.entry(value).or_default();
                                if let Some(other) = state.takeover {
                                    return Err(self.error(
                                        item_path,
                                        format!(
                                            "`{shown}` is also taken over by {}",
                                            self.name(other)
                                        ),
                                    ));
                                }
                                state.takeover = Some(region);
                            }
                            Part::Partitions(first, last) => {
                                if let By::Partition { owners } = by
                                    && let Some(r) = owners.iter().find(|r| {
                                        r.owner == region && r.first <= last && first <= r.last
                                    })
                                {
                                    return Err(self.error(
                                        item_path,
                                        format!(
                                            "partition {} is already owned by {name}",
                                            r.first.max(first)
                                        ),
                                    ));
                                }
                                if let Some(&(f, _, other)) = taken_partitions
                                    .iter()
                                    .find(|(f, l, _)| *f <= last && first <= *l)
                                {
                                    return Err(self.error(
                                        item_path,
                                        format!(
                                            "partition {} is also taken over by {}",
                                            f.max(first),
                                            self.name(other)
                                        ),
                                    ));
                                }
                                taken_partitions.push((first, last, region));
                            }
                        }
                    }
                }
            }
        }

        if slots.iter().any(|s| s.is_set()) {
            states.slots = slots.into();
        }
        values.retain(|_, state| state.is_set());
        states.values = values;
        states.partitions = partition_runs(&frozen_partitions, &taken_partitions).into();
        Ok(states)
    }

    /// One entry of a rule's `frozen` or `takeover` list, resolved against its owners: a slot
    /// range, a listed value (with its owner), or a partition range every partition of which
    /// is owned.
    fn part(&self, path: &str, by: &By, item: &Item) -> Result<Part, TableError> {
        let slot_count = match by {
            By::Key { slots, .. } => Some(*slots as usize),
            By::KeyPart {
                owners: PartOwners::Slots(owners),
                ..
            } => Some(owners.len()),
            _ => None,
        };
        if let Some(count) = slot_count {
            let (first, last) = self.range(path, item, "slot")?;
            if last >= count as i64 {
                return Err(self.error(
                    path,
                    format!(
                        "slot {} is out of range 0-{} (slots: {count})",
                        first.max(count as i64),
                        count - 1
                    ),
                ));
            }
            return Ok(Part::Slots(first as usize, last as usize));
        }
        let (values, noun) = match by {
            By::Header { owners, .. } => (Some(owners), "header value"),
            By::KeyPart {
                owners: PartOwners::Values(owners),
                ..
            } => (Some(owners), "key part"),
            _ => (None, ""),
        };
        if let Some(values) = values {
            let value = match item {
                Item::Str(value) => value,
                Item::Int(n) => {
                    return Err(self.error(
                        path,
                        format!("{noun} {n} is a number: quote it, e.g. \"{n}\""),
                    ));
                }
            };
            return match values.get(value.as_bytes()) {
                Some(&owner) => Ok(Part::Value(value.as_bytes().into(), owner)),
                None => Err(self.error(
                    path,
                    format!("{noun} `{value}` is not in this rule's owners"),
                )),
            };
        }
        match by {
            By::Partition { owners } => {
                let (first, last) = self.range(path, item, "partition")?;
                let (Ok(first), Ok(last)) = (i32::try_from(first), i32::try_from(last)) else {
                    return Err(self.error(path, "partition is out of range"));
                };
                // Every partition of the range must be owned: walk the sorted owner ranges.
                let mut next = i64::from(first);
                for r in owners.iter().filter(|r| r.last >= first && r.first <= last) {
                    if i64::from(r.first) > next {
                        break;
                    }
                    next = i64::from(r.last) + 1;
                }
                if next <= i64::from(last) {
                    return Err(self.error(
                        path,
                        format!("partition {next} is not in this rule's owners"),
                    ));
                }
                Ok(Part::Partitions(first, last))
            }
            _ => Err(self.error(
                path,
                format!(
                    "a `by: {}` rule has no parts: freeze it whole (`frozen: all`) or take it \
                     over whole (`takeover: <region>`)",
                    by.kind()
                ),
            )),
        }
    }

    fn by_key(
        &self,
        at: &str,
        slots: u32,
        owners: Vec<(String, Vec<Item>)>,
        null_key: Fallback,
    ) -> Result<By, TableError> {
        Ok(By::Key {
            slots,
            owners: self.slot_owners(at, slots, &owners)?,
            null_key,
        })
    }

    /// The owner of each of `slots` slots (exactly `slots` entries): every slot owned once.
    fn slot_owners(
        &self,
        at: &str,
        slots: u32,
        owners: &[(String, Vec<Item>)],
    ) -> Result<Box<[RegionId]>, TableError> {
        if slots == 0 {
            return Err(self.error(format!("{at}.slots"), "slots must be at least 1"));
        }
        if slots > MAX_SLOTS {
            return Err(self.error(
                format!("{at}.slots"),
                format!("slots must be at most {MAX_SLOTS}"),
            ));
        }
        let mut table: Vec<Option<RegionId>> = vec![None; slots as usize];
        for (name, items) in owners {
            let path = format!("{at}.owners.{name}");
            let region = self.region(&path, name, Also::Nothing)?;
            for (k, item) in items.iter().enumerate() {
                let item_path = format!("{path}[{k}]");
                let (first, last) = self.range(&item_path, item, "slot")?;
                if last >= i64::from(slots) {
                    return Err(self.error(
                        item_path,
                        format!(
                            "slot {} is out of range 0-{} (slots: {slots})",
                            first.max(i64::from(slots)),
                            slots - 1
                        ),
                    ));
                }
                // In range: 0 <= first <= last < slots <= MAX_SLOTS.
                let (first, last) = (first as usize, last as usize);
                for (slot, owner) in table[first..=last].iter_mut().enumerate() {
                    let slot = first + slot;
                    match *owner {
                        None => *owner = Some(region),
                        Some(other) if other == region => {
                            return Err(self.error(path, format!("slot {slot} is listed twice")));
                        }
                        Some(other) => {
                            return Err(self.error(
                                path,
                                format!("slot {slot} is also owned by {}", self.name(other)),
                            ));
                        }
                    }
                }
            }
        }
        let missing: Vec<usize> = (table.iter().enumerate())
            .filter_map(|(slot, owner)| owner.is_none().then_some(slot))
            .collect();
        if !missing.is_empty() {
            let (noun, verb) = if missing.len() == 1 {
                ("slot", "has")
            } else {
                ("slots", "have")
            };
            return Err(self.error(
                format!("{at}.owners"),
                format!("{noun} {} {verb} no owner", compact(&missing)),
            ));
        }
        Ok(table.into_iter().flatten().collect())
    }

    fn by_header(
        &self,
        at: &str,
        header: String,
        owners: Vec<(String, Vec<Item>)>,
        unmatched: Fallback,
    ) -> Result<By, TableError> {
        Ok(By::Header {
            owners: self.values(at, &owners, "header value")?,
            header,
            unmatched,
        })
    }

    /// The owners of a rule that looks values up (`header value`, `key part`: the `noun` of
    /// its messages): each value owned once.
    fn values(
        &self,
        at: &str,
        owners: &[(String, Vec<Item>)],
        noun: &str,
    ) -> Result<Values, TableError> {
        let mut values = Values::default();
        for (name, items) in owners {
            let path = format!("{at}.owners.{name}");
            let region = self.region(&path, name, Also::Nothing)?;
            for (k, item) in items.iter().enumerate() {
                let value = match item {
                    Item::Str(value) => value,
                    Item::Int(n) => {
                        return Err(self.error(
                            format!("{path}[{k}]"),
                            format!("{noun} {n} is a number: quote it, e.g. \"{n}\""),
                        ));
                    }
                };
                match values.entry(ValueKey::from_slice(value.as_bytes())) {
                    Entry::Vacant(slot) => {
                        slot.insert(region);
                    }
                    Entry::Occupied(other) if *other.get() == region => {
                        return Err(self.error(path, format!("{noun} `{value}` is listed twice")));
                    }
                    Entry::Occupied(other) => {
                        return Err(self.error(
                            path,
                            format!(
                                "{noun} `{value}` is also owned by {}",
                                self.name(*other.get())
                            ),
                        ));
                    }
                }
            }
        }
        Ok(values)
    }

    /// Where a `by: key_part` rule finds its part: `delimiter` (with `index`, default 0) or
    /// `pattern` (with `group`, default 1), never both.
    fn key_part(
        &self,
        at: &str,
        delimiter: Option<String>,
        index: Option<i64>,
        pattern: Option<String>,
        group: Option<i64>,
    ) -> Result<KeyPart, TableError> {
        match (delimiter, pattern) {
            (Some(_), Some(_)) => Err(self.error(
                format!("{at}.pattern"),
                "give either `delimiter` (with `index`) or `pattern` (with `group`), not both",
            )),
            (None, None) => Err(self.error(
                format!("{at}.delimiter"),
                "a `by: key_part` rule needs `delimiter` (with `index`) or `pattern` (a regex \
                 whose capture `group` is the part)",
            )),
            (Some(delimiter), None) => {
                if group.is_some() {
                    return Err(self.error(
                        format!("{at}.group"),
                        "`group` goes with `pattern`; with `delimiter` the part is picked by `index`",
                    ));
                }
                if delimiter.is_empty() {
                    return Err(self.error(format!("{at}.delimiter"), "empty delimiter"));
                }
                let index = index.unwrap_or(0);
                if index < 0 {
                    return Err(self.error(
                        format!("{at}.index"),
                        format!("index {index} is negative (parts count from 0)"),
                    ));
                }
                let index = u32::try_from(index)
                    .ok()
                    .filter(|&i| i64::from(i) <= MAX_INDEX)
                    .ok_or_else(|| {
                        self.error(
                            format!("{at}.index"),
                            format!("index {index} is out of range 0-{MAX_INDEX}"),
                        )
                    })?;
                Ok(KeyPart::Delimited {
                    delimiter: delimiter.into_bytes().into(),
                    index,
                })
            }
            (None, Some(pattern)) => {
                if index.is_some() {
                    return Err(self.error(
                        format!("{at}.index"),
                        "`index` goes with `delimiter`; with `pattern` the part is picked by `group`",
                    ));
                }
                if pattern.is_empty() {
                    return Err(self.error(format!("{at}.pattern"), "empty pattern"));
                }
                // As `regex::bytes::Regex` builds it: keys are bytes and need not be UTF-8.
                let regex = regex_automata::meta::Regex::builder()
                    .configure(regex_automata::meta::Config::new().utf8_empty(false))
                    .syntax(regex_automata::util::syntax::Config::new().utf8(false))
                    .build(&pattern)
                    .map_err(|e| {
                        self.error(
                            format!("{at}.pattern"),
                            format!("invalid pattern: {}", regex_problem(&e)),
                        )
                    })?;
                // Capture groups besides the implicit group 0 (the whole match).
                let groups = regex.captures_len().saturating_sub(1);
                let group = group.unwrap_or(1);
                if group < 0 || group > groups as i64 {
                    let has = match groups {
                        0 => "no capture group (put the part in parentheses, or use group 0 \
                              for the whole match)"
                            .to_owned(),
                        1 => "1 capture group".to_owned(),
                        n => format!("{n} capture groups"),
                    };
                    return Err(self.error(
                        format!("{at}.group"),
                        format!("group {group} is out of range: the pattern has {has}"),
                    ));
                }
                let group = u32::try_from(group)
                    .ok()
                    .filter(|&g| g <= KeyPart::MAX_GROUP)
                    .ok_or_else(|| {
                        self.error(
                            format!("{at}.group"),
                            format!("group {group} is out of range 0-{}", KeyPart::MAX_GROUP),
                        )
                    })?;
                Ok(KeyPart::Pattern {
                    pattern,
                    regex,
                    group,
                })
            }
        }
    }

    fn by_partition(&self, at: &str, owners: Vec<(String, Vec<Item>)>) -> Result<By, TableError> {
        let mut ranges: Vec<PartitionRange> = Vec::new();
        for (name, items) in &owners {
            let path = format!("{at}.owners.{name}");
            let region = self.region(&path, name, Also::Nothing)?;
            for (k, item) in items.iter().enumerate() {
                let item_path = format!("{path}[{k}]");
                let (first, last) = self.range(&item_path, item, "partition")?;
                let (Ok(first), Ok(last)) = (i32::try_from(first), i32::try_from(last)) else {
                    return Err(self.error(
                        item_path,
                        format!(
                            "partition {} is out of range (partitions go up to {})",
                            first.max(i64::from(i32::MAX) + 1),
                            i32::MAX
                        ),
                    ));
                };
                // The lowest partition this range shares with one listed before.
                let clash = ranges
                    .iter()
                    .filter(|r| r.first <= last && first <= r.last)
                    .map(|r| (r.first.max(first), r.owner))
                    .min();
                match clash {
                    None => ranges.push(PartitionRange {
                        first,
                        last,
                        owner: region,
                    }),
                    Some((partition, other)) if other == region => {
                        return Err(
                            self.error(path, format!("partition {partition} is listed twice"))
                        );
                    }
                    Some((partition, other)) => {
                        return Err(self.error(
                            path,
                            format!(
                                "partition {partition} is also owned by {}",
                                self.name(other)
                            ),
                        ));
                    }
                }
            }
        }
        ranges.sort_by_key(|r| r.first);
        // Merge neighbours of the same owner: fewer ranges to search per batch.
        let mut merged: Vec<PartitionRange> = Vec::with_capacity(ranges.len());
        for range in ranges {
            match merged.last_mut() {
                Some(prev)
                    if prev.owner == range.owner
                        && prev.last.checked_add(1) == Some(range.first) =>
                {
                    prev.last = range.last;
                }
                _ => merged.push(range),
            }
        }
        Ok(By::Partition {
            owners: merged.into(),
        })
    }

    /// A slot or partition entry: `n`, `"n"` or `"a-b"`, as `(first, last)` with
    /// `0 <= first <= last`.
    fn range(&self, path: &str, item: &Item, noun: &str) -> Result<(i64, i64), TableError> {
        let bad = || {
            self.error(
                path,
                format!("expected a {noun} number or a range like \"0-7\", found {item}"),
            )
        };
        let (first, last) = match item {
            Item::Int(n) => (*n, *n),
            Item::Str(text) => match text.split_once('-') {
                Some((a, b)) => (number(a).ok_or_else(bad)?, number(b).ok_or_else(bad)?),
                None => {
                    let n = number(text).ok_or_else(bad)?;
                    (n, n)
                }
            },
        };
        if first < 0 {
            return Err(self.error(path, format!("{noun} {first} is negative")));
        }
        if first > last {
            return Err(self.error(
                path,
                format!("range {first}-{last} runs backwards (write \"{last}-{first}\")"),
            ));
        }
        Ok((first, last))
    }

    fn fallback(&self, path: &str, value: Option<String>) -> Result<Fallback, TableError> {
        Ok(match value.as_deref() {
            None | Some("reject") => Fallback::Reject,
            Some("local") => Fallback::Local,
            Some(region) => Fallback::Region(self.region(path, region, Also::Fallbacks)?),
        })
    }

    fn takeover(&self, pairs: Pairs<String>) -> Result<Vec<Option<RegionId>>, TableError> {
        let mut takeover: Vec<Option<RegionId>> = vec![None; self.regions.len()];
        let mut order = Vec::with_capacity(pairs.0.len());
        for (from, to) in &pairs.0 {
            let path = format!("takeover.{from}");
            let from = self.region(&path, from, Also::Nothing)?;
            let to = self.region(&path, to, Also::Nothing)?;
            takeover[from.index()] = Some(to);
            order.push((path, from));
        }
        // Each region that is taken over must point straight at a region that is not:
        // a chain would make the owner depend on how many hops are followed.
        for (path, from) in order {
            let mut seen = vec![from];
            let mut at = from;
            while let Some(next) = takeover[at.index()] {
                let repeats = seen.contains(&next);
                seen.push(next);
                if repeats {
                    let names = self.names(&seen);
                    let message = if seen.len() == 2 {
                        format!("takeover cycle: {names} (a region cannot take over itself)")
                    } else {
                        format!("takeover cycle: {names}")
                    };
                    return Err(self.error(path, message));
                }
                at = next;
            }
            if seen.len() > 2 {
                return Err(self.error(
                    path,
                    format!(
                        "takeover chain: {}: a region that takes over cannot itself be taken \
                         over (write `{}: {}` instead)",
                        self.names(&seen),
                        self.name(from),
                        self.name(at)
                    ),
                ));
            }
        }
        Ok(takeover)
    }

    fn region(&self, path: &str, name: &str, also: Also) -> Result<RegionId, TableError> {
        match self.regions.iter().position(|r| r == name) {
            // `check_regions` keeps the count within u16.
            Some(i) => Ok(RegionId(i as u16)),
            None => {
                let known = self.regions.join(", ");
                let also = match also {
                    Also::Nothing => "",
                    Also::Any => "; or any",
                    Also::Fallbacks => "; or reject, local",
                };
                Err(self.error(
                    path,
                    format!("unknown region `{name}` (regions: {known}{also})"),
                ))
            }
        }
    }

    fn name(&self, region: RegionId) -> &str {
        self.regions.get(region.index()).map_or("?", String::as_str)
    }

    /// `us -> eu -> us`
    fn names(&self, regions: &[RegionId]) -> String {
        regions
            .iter()
            .map(|&r| self.name(r))
            .collect::<Vec<_>>()
            .join(" -> ")
    }
}

impl std::fmt::Display for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Item::Int(n) => write!(f, "{n}"),
            Item::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// One entry of a rule's `frozen` or `takeover`, resolved.
enum Part {
    /// Slots `first..=last`, within the rule's slots.
    Slots(usize, usize),
    /// A listed value and its owner.
    Value(Box<[u8]>, RegionId),
    /// Partitions `first..=last`, all owned.
    Partitions(i32, i32),
}

/// A slot rule's owners by slot; empty for other rules.
fn slot_owners_of(by: &By) -> &[RegionId] {
    match by {
        By::Key { owners, .. }
        | By::KeyPart {
            owners: PartOwners::Slots(owners),
            ..
        } => owners,
        _ => &[],
    }
}

/// The partitions with a state as sorted, disjoint runs of one state each, from the frozen
/// ranges and the (disjoint) taken-over ranges.
fn partition_runs(
    frozen: &[(i32, i32)],
    taken: &[(i32, i32, RegionId)],
) -> Vec<(i32, i32, PartState)> {
    let mut bounds: Vec<i64> = frozen
        .iter()
        .map(|&(f, l)| (f, l))
        .chain(taken.iter().map(|&(f, l, _)| (f, l)))
        .flat_map(|(f, l)| [i64::from(f), i64::from(l) + 1])
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    let mut runs: Vec<(i32, i32, PartState)> = Vec::new();
    for pair in bounds.windows(2) {
        // Both bounds come from i32 partitions; the run ends before the next bound.
        let (first, last) = (pair[0] as i32, (pair[1] - 1) as i32);
        let state = PartState {
            frozen: frozen.iter().any(|&(f, l)| f <= first && first <= l),
            takeover: taken
                .iter()
                .find(|&&(f, l, _)| f <= first && first <= l)
                .map(|&(_, _, r)| r),
        };
        if !state.is_set() {
            continue;
        }
        match runs.last_mut() {
            Some(prev) if prev.2 == state && i64::from(prev.1) + 1 == i64::from(first) => {
                prev.1 = last;
            }
            _ => runs.push((first, last, state)),
        }
    }
    runs
}

/// Why a pattern does not compile, on one line: the regex parser's own explanation spans
/// several lines (the pattern, a caret, then `error: <problem>`).
fn regex_problem(e: &regex_automata::meta::BuildError) -> String {
    if let Some(limit) = e.size_limit() {
        return format!("it compiles to more than the limit of {limit} bytes");
    }
    let Some(syntax) = e.syntax_error() else {
        return e.to_string();
    };
    let text = syntax.to_string();
    text.lines()
        .find_map(|line| line.strip_prefix("error: "))
        .map_or_else(|| text.replace('\n', " "), str::to_owned)
}

/// `a.b[0].c`, `a.b[0]`, `a.b`, `a`: the path and each of its parents.
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    let mut next = Some(path).filter(|p| !p.is_empty());
    std::iter::from_fn(move || {
        let current = next?;
        next = current
            .rfind(['.', '['])
            .map(|cut| &current[..cut])
            .filter(|p| !p.is_empty());
        Some(current)
    })
}

/// A non-negative decimal number, allowing spaces around it (`"0 - 7"`).
fn number(text: &str) -> Option<i64> {
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// `3-5, 9` for sorted `[3, 4, 5, 9]`, naming at most [`MAX_RANGES_NAMED`] ranges.
fn compact(sorted: &[usize]) -> String {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &n in sorted {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == n => *last = n,
            _ => runs.push((n, n)),
        }
    }
    let mut parts: Vec<String> = runs
        .iter()
        .take(MAX_RANGES_NAMED)
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    if runs.len() > MAX_RANGES_NAMED {
        parts.push(format!("and {} more ranges", runs.len() - MAX_RANGES_NAMED));
    }
    parts.join(", ")
}
