//! What a rule is asked about: a [`Subject`], one write as far as it is known (topic, partition,
//! key, headers), and the owner question operators ask ([`Query`]), parsed once for both the
//! `keyward owner` command and the admin API's `GET /ownership/owner`.
//!
//! The policy builds a subject from every record it inspects, so building one and reading it
//! must not allocate: a subject borrows the record. A query holds what an operator typed and
//! lends it to a subject the same way.

use crate::codec::records::RecordView;
use std::fmt::Write as _;

/// Bytes of a key, key part or header value quoted in a message.
const MAX_QUOTED: usize = 64;

/// One write as a rule sees it. A subject built from a record knows everything a rule can ask
/// about; one built from an operator's query knows only what the query says, and a rule that
/// needs something unknown answers "undecided" instead of guessing.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    topic: &'a str,
    partition: Option<i32>,
    /// `None`: unknown; `Some(None)`: a null key.
    key: Option<Option<&'a [u8]>>,
    headers: Headers<'a>,
}

/// What is known of a subject's headers.
#[derive(Clone, Copy, Debug)]
enum Headers<'a> {
    Unknown,
    /// The write carries no headers.
    None,
    /// This header has this value; nothing is known of the others.
    One {
        name: &'a [u8],
        value: &'a [u8],
    },
    /// A record's own headers: all of them.
    Record(RecordView<'a>),
}

impl<'a> Subject<'a> {
    /// A write to `topic`, nothing else known.
    pub fn topic(topic: &'a str) -> Self {
        Subject {
            topic,
            partition: None,
            key: None,
            headers: Headers::Unknown,
        }
    }

    /// A record being written to `topic`-`partition`: everything is known.
    pub fn record(topic: &'a str, partition: i32, record: RecordView<'a>) -> Self {
        Subject {
            topic,
            partition: Some(partition),
            key: Some(record.key()),
            headers: Headers::Record(record),
        }
    }

    pub fn with_partition(self, partition: i32) -> Self {
        Subject {
            partition: Some(partition),
            ..self
        }
    }

    /// `None` is a null key.
    pub fn with_key(self, key: Option<&'a [u8]>) -> Self {
        Subject {
            key: Some(key),
            ..self
        }
    }

    /// One header known; nothing is known of any other.
    pub fn with_header(self, name: &'a [u8], value: &'a [u8]) -> Self {
        Subject {
            headers: Headers::One { name, value },
            ..self
        }
    }

    /// Known to carry no headers at all.
    pub fn without_headers(self) -> Self {
        Subject {
            headers: Headers::None,
            ..self
        }
    }

    pub fn topic_name(&self) -> &'a str {
        self.topic
    }

    /// `None` when unknown.
    pub fn partition(&self) -> Option<i32> {
        self.partition
    }

    /// `None` when unknown, `Some(None)` for a null key.
    pub fn key(&self) -> Option<Option<&'a [u8]>> {
        self.key
    }

    /// The value of the first header named `name`: `None` when unknown, `Some(None)` when the
    /// write does not carry it (a header with a null value counts as not carried).
    #[inline]
    pub fn header(&self, name: &[u8]) -> Option<Option<&'a [u8]>> {
        match self.headers {
            Headers::Unknown => None,
            Headers::None => Some(None),
            Headers::One { name: n, value } => (n == name).then_some(Some(value)),
            Headers::Record(record) => Some(record.header(name).flatten()),
        }
    }
}

/// A key, key part or header value for a message: quoted text when printable, hex otherwise,
/// truncated either way.
pub fn quote(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(MAX_QUOTED)];
    let more = if bytes.len() > MAX_QUOTED { "…" } else { "" };
    match std::str::from_utf8(shown) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => format!("{s:?}{more}"),
        _ => {
            let mut hex = String::with_capacity(2 + shown.len() * 2);
            hex.push_str("0x");
            for b in shown {
                // Writing to a String cannot fail.
                let _ = write!(hex, "{b:02x}");
            }
            hex.push_str(more);
            hex
        }
    }
}

/// "Who owns this?", as `keyward owner` and `GET /ownership/owner` ask it: a topic and at most
/// one thing about the write. Both read it with [`Query::parse`] from `name=value` parameters,
/// so they accept the same syntax:
///
/// | parameter | CLI flag | meaning |
/// |---|---|---|
/// | `topic=T` | `--topic T` | required |
/// | `key=K` | `--key K` | the record key (UTF-8) |
/// | `null_key=true` | `--null-key` | a record with a null key |
/// | `header=NAME=VALUE` | `--header NAME=VALUE` | one record header; split at the first `=`. `NAME:VALUE` (split at the first `:`) is accepted too when there is no `=` |
/// | `partition=N` | `--partition N` | the partition written to |
///
/// With nothing but the topic, the write is taken to carry no headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub topic: String,
    pub about: About,
}

/// The one thing a [`Query`] says about the write besides its topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum About {
    Key(String),
    NullKey,
    Header { name: String, value: String },
    Partition(i32),
    Nothing,
}

/// A query that cannot be asked; the message says which parameter and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QueryError(String);

/// The parameters [`Query::parse`] reads, for its messages.
const PARAMETERS: &str = "topic, key, null_key, header, partition";

impl Query {
    /// Reads `(name, value)` parameters: a URL's query string as pairs, or the CLI's flags.
    /// Unknown and repeated parameters are errors, as is more than one of key, null_key,
    /// header and partition.
    pub fn parse<'p>(
        params: impl IntoIterator<Item = (&'p str, &'p str)>,
    ) -> Result<Self, QueryError> {
        let mut topic = None;
        let mut about: Option<(&str, About)> = None;
        let mut seen: Vec<&str> = Vec::new();
        for (name, value) in params {
            if seen.contains(&name) {
                return Err(QueryError(format!("{name} is given twice")));
            }
            let this = match name {
                "topic" => {
                    topic = Some(value.to_owned());
                    seen.push("topic");
                    continue;
                }
                "key" => About::Key(value.to_owned()),
                "null_key" => match value {
                    "true" => About::NullKey,
                    _ => {
                        return Err(QueryError(format!("null_key takes true, got {value:?}")));
                    }
                },
                "header" => {
                    let (header, header_value) = value
                        .split_once('=')
                        .or_else(|| value.split_once(':'))
                        .ok_or_else(|| {
                            QueryError(format!("header takes NAME=VALUE, got {value:?}"))
                        })?;
                    if header.is_empty() {
                        return Err(QueryError(format!(
                            "header takes NAME=VALUE with a name, got {value:?}"
                        )));
                    }
                    About::Header {
                        name: header.to_owned(),
                        value: header_value.to_owned(),
                    }
                }
                "partition" => match value.trim().parse::<i32>() {
                    Ok(partition) => About::Partition(partition),
                    Err(_) => {
                        return Err(QueryError(format!(
                            "partition takes a number, got {value:?}"
                        )));
                    }
                },
                other => {
                    return Err(QueryError(format!(
                        "unknown parameter {other:?} (parameters: {PARAMETERS})"
                    )));
                }
            };
            if let Some((first, _)) = about {
                return Err(QueryError(format!(
                    "give at most one of key, null_key, header and partition (got {first} and {name})"
                )));
            }
            seen.push(name);
            about = Some((name, this));
        }
        Ok(Query {
            topic: topic.ok_or_else(|| QueryError("topic is required".to_owned()))?,
            about: about.map_or(About::Nothing, |(_, about)| about),
        })
    }

    /// The write the query describes.
    pub fn subject(&self) -> Subject<'_> {
        let topic = Subject::topic(&self.topic);
        match &self.about {
            About::Key(key) => topic.with_key(Some(key.as_bytes())),
            About::NullKey => topic.with_key(None),
            About::Header { name, value } => topic.with_header(name.as_bytes(), value.as_bytes()),
            About::Partition(partition) => topic.with_partition(*partition),
            About::Nothing => topic.without_headers(),
        }
    }
}
