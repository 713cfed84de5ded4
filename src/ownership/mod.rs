//! The ownership table (`ownership.yaml`): which region may write each key, tenant header value,
//! part of a key, partition or topic.
//!
//! This module owns reading and validating the file, Kafka's murmur2, and the pure lookup from a
//! topic and a record to a [`Claim`] and then a [`Verdict`]. It must not do I/O beyond reading
//! the file in [`Table::load`], hold global state, or know about connections: the proxy builds a
//! new [`Table`] on reload, swaps it in whole, and asks one snapshot per request.
//!
//! # Layout
//!
//! - [`murmur2`]: Kafka's `Utils.murmur2` and `toPositive`.
//! - `file`: the YAML as serde reads it (syntax and types only).
//! - `validate`: from that to a [`Table`], with an error naming the file, field path and problem.
//! - `glob`: topic patterns.
//! - `subject`: [`Subject`], one write as a rule sees it (built from a record, or from an
//!   operator's [`Query`]).
//! - `rule`: [`Rule`] and its one lookup, [`Rule::claim`] (the hot path, allocation-free).
//! - `table`: [`Table`]: rule lookup by topic, takeover and frozen, `explain` and `summary`.
//! - `canonical`: the table as canonical JSON, its content hash (the same in every region that
//!   runs the same table) and the one-line diff a reload logs.
//! - `map`: the canonical table with who writes each part after takeover and frozen, for the
//!   admin API's ownership map.
//!
//! # Lookup, step by step
//!
//! 1. [`Table::rule_for_topic`]: the first rule whose topic patterns match; with none, the
//!    [`Table::default_claim`] applies.
//! 2. [`Rule::claim`] on the write's [`Subject`] gives the raw owner ([`Claim`]). Whether the
//!    rule needs the records at all is [`Rule::reads_records`].
//! 3. [`Table::verdict`] applies takeover, then frozen, and compares with the local region.

mod canonical;
mod file;
mod glob;
mod map;
pub mod moves;
pub mod murmur2;
mod rule;
mod subject;
mod table;
mod validate;

#[cfg(test)]
mod states_tests;
#[cfg(test)]
mod tests;

pub use rule::{
    By, Fallback, KeyPart, OnForeign, PartOwners, PartState, PartStates, PartitionRange, Rule,
};
pub use subject::{About, Query, QueryError, Subject, quote};
pub use table::{DefaultPolicy, Table};

use std::fmt;
use std::path::PathBuf;

/// A region, as an index into [`Table::regions`]: cheap to copy and compare on the hot path.
/// Only meaningful together with the table (or one built from the same region list) it came
/// from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId(pub u16);

impl RegionId {
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// What a rule says about one write, before takeover and frozen are applied: those belong to
/// the table (they change without the rules changing), and `Local` needs the proxy's region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Owned by `region`. `slot` is set for `by: key` rules (the slot the key hashed to).
    Region {
        region: RegionId,
        slot: Option<u32>,
    },
    /// Owned by whichever region's proxy asks (`null_key: local`, `unmatched: local`).
    Local,
    /// Every region may write.
    Any,
    Reject(RejectReason),
}

/// Why a write has no owner. A closed set so it can be a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// A `by: key` rule and a record without a key, with `null_key: reject`.
    NullKey,
    /// A `by: header` rule and a record whose header is missing or has an unlisted value, with
    /// `unmatched: reject`.
    UnmatchedHeader,
    /// A `by: key_part` rule and a record whose key is null, has no such part, or has a part
    /// nobody lists, with `unmatched: reject`.
    UnmatchedKeyPart,
    /// A `by: partition` rule and a partition no region lists.
    UnownedPartition,
    /// No rule matches the topic and the file says `default: reject`.
    DefaultReject,
    /// The rule could not be applied: the policy asked about a record without what the rule
    /// needs. Only a bug produces it; it rejects rather than guess an owner.
    WrongLookup,
}

impl RejectReason {
    pub const ALL: [RejectReason; 6] = [
        RejectReason::NullKey,
        RejectReason::UnmatchedHeader,
        RejectReason::UnmatchedKeyPart,
        RejectReason::UnownedPartition,
        RejectReason::DefaultReject,
        RejectReason::WrongLookup,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::NullKey => "null_key",
            RejectReason::UnmatchedHeader => "unmatched_header",
            RejectReason::UnmatchedKeyPart => "unmatched_key_part",
            RejectReason::UnownedPartition => "unowned_partition",
            RejectReason::DefaultReject => "default_reject",
            RejectReason::WrongLookup => "wrong_lookup",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the proxy in region `local` does with a write, after takeover and frozen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The local region owns it: forward.
    Owned,
    /// Every region may write it: forward.
    Any,
    /// Another region owns it: apply the rule's `on_foreign`.
    Foreign {
        owner: RegionId,
    },
    /// The owner is frozen: hold the write with a retriable error, in every region, the owner's
    /// own included.
    Frozen {
        owner: RegionId,
    },
    Reject(RejectReason),
}

/// A rejected ownership file: which file, where in it (`rules[0].owners.us`, empty for the
/// file as a whole) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}{message}", .file.display(), PathPrefix(.path))]
pub struct TableError {
    pub file: PathBuf,
    pub path: String,
    pub message: String,
}

/// `path: `, or nothing for an error about the whole file.
struct PathPrefix<'a>(&'a str);

impl fmt::Display for PathPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, "{}: ", self.0)
        }
    }
}
