//! A borrowed view of a Produce request body (v3-v12), read without copying record data.
//!
//! Produce is the one request keyward decodes from clients, so this parser trusts no count or
//! length it reads: arrays are checked against the bytes left before anything is allocated. The
//! record batches stay slices of the original frame.

use super::wire::{Reader, WireError};

/// Produce versions keyward can read. v13 names topics by id; ownership is decided by name,
/// so keyward does not offer it (see `proxy::versions`).
pub const MIN_VERSION: i16 = 3;
pub const MAX_VERSION: i16 = 12;
/// First flexible (compact encodings, tagged fields) version.
const FIRST_FLEXIBLE: i16 = 9;

#[derive(Debug)]
pub struct ProduceView<'a> {
    pub transactional_id: Option<&'a [u8]>,
    pub acks: i16,
    pub timeout_ms: i32,
    pub topics: Vec<TopicView<'a>>,
}

#[derive(Debug)]
pub struct TopicView<'a> {
    pub name: &'a str,
    pub partitions: Vec<PartitionView<'a>>,
}

#[derive(Debug)]
pub struct PartitionView<'a> {
    pub index: i32,
    pub records: Option<&'a [u8]>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProduceParseError {
    #[error("produce version {0} is not supported (keyward reads {MIN_VERSION}-{MAX_VERSION})")]
    UnsupportedVersion(i16),
    #[error("malformed produce request: {0}")]
    Wire(#[from] WireError),
}

impl ProduceView<'_> {
    pub fn partition_count(&self) -> usize {
        self.topics.iter().map(|t| t.partitions.len()).sum()
    }
}

/// Parses the body of a Produce request (the bytes after the request header).
pub fn parse(body: &[u8], version: i16) -> Result<ProduceView<'_>, ProduceParseError> {
    if !(MIN_VERSION..=MAX_VERSION).contains(&version) {
        return Err(ProduceParseError::UnsupportedVersion(version));
    }
    let flexible = version >= FIRST_FLEXIBLE;
    let mut r = Reader::new(body);
    let transactional_id = if flexible {
        r.compact_nullable_bytes()?
    } else {
        r.nullable_string()?
    };
    let acks = r.i16()?;
    let timeout_ms = r.i32()?;
    // Smallest topic: a one-byte name length and a one-byte partition count (compact form).
    let topic_count = r.array_len(flexible, 2)?;
    let mut topics = Vec::with_capacity(topic_count);
    for _ in 0..topic_count {
        let name = r.string(flexible)?;
        // Smallest partition: index (4) + records length (1).
        let partition_count = r.array_len(flexible, 5)?;
        let mut partitions = Vec::with_capacity(partition_count);
        for _ in 0..partition_count {
            let index = r.i32()?;
            let records = if flexible {
                r.compact_nullable_bytes()?
            } else {
                r.nullable_bytes()?
            };
            if flexible {
                r.skip_tagged_fields()?;
            }
            partitions.push(PartitionView { index, records });
        }
        if flexible {
            r.skip_tagged_fields()?;
        }
        topics.push(TopicView { name, partitions });
    }
    if flexible {
        r.skip_tagged_fields()?;
    }
    Ok(ProduceView {
        transactional_id,
        acks,
        timeout_ms,
        topics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::{ProduceRequest, TopicName};
    use kafka_protocol::protocol::{Encodable, StrBytes};

    fn request() -> ProduceRequest {
        ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(30_000)
            .with_transactional_id(Some(StrBytes::from_static_str("tx-1").into()))
            .with_topic_data(vec![
                TopicProduceData::default()
                    .with_name(TopicName(StrBytes::from_static_str("orders")))
                    .with_partition_data(vec![
                        PartitionProduceData::default()
                            .with_index(3)
                            .with_records(Some(Bytes::from_static(b"batch-bytes"))),
                        PartitionProduceData::default()
                            .with_index(4)
                            .with_records(None),
                    ]),
                TopicProduceData::default()
                    .with_name(TopicName(StrBytes::from_static_str("audit.x")))
                    .with_partition_data(vec![]),
            ])
    }

    #[test]
    fn reads_every_supported_version_as_encoded_by_kafka_protocol() {
        for version in MIN_VERSION..=MAX_VERSION {
            let mut buf = Vec::new();
            request().encode(&mut buf, version).unwrap();
            let view = parse(&buf, version).unwrap();
            assert_eq!(view.acks, -1, "v{version}");
            assert_eq!(view.timeout_ms, 30_000);
            assert_eq!(view.transactional_id, Some(&b"tx-1"[..]));
            assert_eq!(view.topics.len(), 2);
            assert_eq!(view.topics[0].name, "orders");
            assert_eq!(view.topics[0].partitions[0].index, 3);
            assert_eq!(
                view.topics[0].partitions[0].records,
                Some(&b"batch-bytes"[..])
            );
            assert_eq!(view.topics[0].partitions[1].records, None);
            assert_eq!(view.topics[1].name, "audit.x");
            assert_eq!(view.partition_count(), 2);
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for version in [3, 9, 12] {
            let mut buf = Vec::new();
            request().encode(&mut buf, version).unwrap();
            for cut in 0..buf.len() {
                assert!(parse(&buf[..cut], version).is_err(), "v{version} cut {cut}");
            }
        }
    }

    #[test]
    fn a_lying_array_count_allocates_nothing() {
        // acks, timeout, then a topic count of two billion
        let mut body = vec![0xff, 0xff, 0, 1, 0, 0, 0x75, 0x30];
        body.extend_from_slice(&0x7fff_ffffi32.to_be_bytes());
        assert!(matches!(
            parse(&body, 3),
            Err(ProduceParseError::Wire(WireError::BadLength { .. }))
        ));
        assert_eq!(
            parse(&body, 13).unwrap_err(),
            ProduceParseError::UnsupportedVersion(13)
        );
    }
}
