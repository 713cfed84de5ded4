//! The shape of `ownership.yaml` as serde reads it. Only syntax and types are checked here:
//! every field any rule may have is accepted on every rule, so that `validate` can say which
//! field does not belong to which `by`, and name it by its path.
//!
//! Maps are read as ordered lists of pairs ([`Pairs`]) so that errors follow the file's order
//! and a key written twice is an error instead of the last one silently winning.

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use std::fmt;
use std::marker::PhantomData;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct File {
    /// Required, even if empty: a file that lost its content must not load as "allow all".
    pub rules: Vec<RawRule>,
    pub default: Option<RawDefault>,
    pub takeover: Option<Pairs<String>>,
    pub frozen: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    pub name: String,
    pub topics: Option<Vec<String>>,
    pub by: Option<RawBy>,
    pub slots: Option<u32>,
    pub header: Option<String>,
    pub delimiter: Option<String>,
    pub index: Option<i64>,
    pub pattern: Option<String>,
    pub group: Option<i64>,
    pub owners: Option<Pairs<Vec<Item>>>,
    pub owner: Option<String>,
    pub null_key: Option<String>,
    pub unmatched: Option<String>,
    pub on_foreign: Option<RawOnForeign>,
    pub frozen: Option<RawParts>,
    pub takeover: Option<RawRuleTakeover>,
}

/// A rule's `frozen`: `all`, or the parts held (slots, values or partitions, as its `owners`
/// lists them).
#[derive(Debug)]
pub(crate) enum RawParts {
    All,
    List(Vec<Item>),
}

/// A rule's `takeover`: a region that writes the whole rule, or `{region: [parts]}`.
#[derive(Debug)]
pub(crate) enum RawRuleTakeover {
    Whole(String),
    Parts(Pairs<Vec<Item>>),
}

impl<'de> Deserialize<'de> for RawParts {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PartsVisitor;
        impl<'de> Visitor<'de> for PartsVisitor {
            type Value = RawParts;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`all`, or a list of slots, values or partitions")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawParts, E> {
                match v {
                    "all" => Ok(RawParts::All),
                    other => Err(E::custom(format!(
                        "expected `all` or a list, found {other:?} (a list of one is [{other}])"
                    ))),
                }
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<RawParts, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(RawParts::List(items))
            }
        }
        deserializer.deserialize_any(PartsVisitor)
    }
}

impl<'de> Deserialize<'de> for RawRuleTakeover {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TakeoverVisitor;
        impl<'de> Visitor<'de> for TakeoverVisitor {
            type Value = RawRuleTakeover;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a region (the whole rule), or a mapping of regions to parts")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawRuleTakeover, E> {
                Ok(RawRuleTakeover::Whole(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawRuleTakeover, A::Error> {
                Pairs::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawRuleTakeover::Parts)
            }
        }
        deserializer.deserialize_any(TakeoverVisitor)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawBy {
    Key,
    Header,
    #[serde(rename = "key_part")]
    KeyPart,
    Partition,
    Topic,
}

impl RawBy {
    pub fn as_str(self) -> &'static str {
        match self {
            RawBy::Key => "key",
            RawBy::Header => "header",
            RawBy::KeyPart => "key_part",
            RawBy::Partition => "partition",
            RawBy::Topic => "topic",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawOnForeign {
    Reject,
    Redirect,
    Audit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawDefault {
    Allow,
    Reject,
}

/// One entry of an `owners` list: a slot or partition number, a range `"a-b"`, or a header
/// value. YAML decides whether an unquoted `7` is a number or a string; `validate` accepts
/// both for slots and partitions and asks for quotes on numeric header values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Item {
    Int(i64),
    Str(String),
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ItemVisitor;
        impl Visitor<'_> for ItemVisitor {
            type Value = Item;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number, a range like \"0-7\", or a header value")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Item, E> {
                Ok(Item::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Item, E> {
                i64::try_from(v)
                    .map(Item::Int)
                    .map_err(|_| E::custom(format!("{v} is too large")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Item, E> {
                Ok(Item::Str(v.to_owned()))
            }
        }
        deserializer.deserialize_any(ItemVisitor)
    }
}

/// A YAML mapping kept in file order, with each key at most once. An empty value (`takeover:`)
/// reads as no pairs.
#[derive(Debug)]
pub(crate) struct Pairs<V>(pub Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Pairs<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PairsVisitor<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for PairsVisitor<V> {
            type Value = Pairs<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Pairs<V>, E> {
                Ok(Pairs(Vec::new()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Pairs<V>, A::Error> {
                let mut pairs: Vec<(String, V)> = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if pairs.iter().any(|(k, _)| *k == key) {
                        return Err(de::Error::custom(format!("`{key}` is listed twice")));
                    }
                    let value = map.next_value()?;
                    pairs.push((key, value));
                }
                Ok(Pairs(pairs))
            }
        }
        deserializer.deserialize_map(PairsVisitor(PhantomData))
    }
}
