//! Metadata: every broker a response lists is advertised at keyward (its virtual node id, host
//! and port), and while reads are failed over to another cluster every node id it names is
//! renumbered.
//!
//! The brokers come before the topics in a Metadata response, and only they change in size. So
//! keyward decodes the brokers and re-encodes them, copies everything after them as the broker
//! sent it, and walks that copy's fields without decoding them into messages: for the topics'
//! names and partition counts, and, while reads are failed over, for every node id, which it
//! renumbers in place (a node id is a fixed 4 bytes). A response of thousands of partitions
//! costs about one copy of itself in memory, not a decoded tree of every partition, and no
//! count in it reserves memory before the bytes it counts are there.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::ApiKey;
use kafka_protocol::messages::metadata_response::MetadataResponseBroker;
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use uuid::Uuid;

use crate::codec::frame::{self, LENGTH_PREFIX};
use crate::proxy::rewrite::{Advertise, RewriteError};

/// A topic a Metadata response lists without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listed<'a> {
    pub name: &'a str,
    pub partitions: i32,
    /// Nil before v10.
    pub id: Uuid,
    /// (partition, leader epoch) of each partition, errors or not (a partition whose leader is
    /// being elected has its new epoch already); empty before v7.
    pub leader_epochs: &'a [(i32, i32)],
}

/// Who hears of the topics a Metadata response lists.
pub type TopicsSeen<'a> = dyn Fn(&[Listed<'_>]) + 'a;

/// `seen` hears of every topic the response lists without an error: its partition count
/// (keyward checks them against the table's `by: key` rules, `crate::proxy::alignment`) and
/// its id (`crate::proxy::topic_ids`).
pub fn response(
    frame: &Bytes,
    version: i16,
    to: &dyn Advertise,
    seen: &TopicsSeen<'_>,
) -> Result<Bytes, RewriteError> {
    let decode = |source: anyhow::Error| RewriteError::Decode {
        api: ApiKey::Metadata,
        version,
        source,
    };
    let header_len =
        frame::response_header_len(frame, ApiKey::Metadata.response_header_version(version))?;
    let body_at = LENGTH_PREFIX + header_len;
    let flexible = version >= 9;
    let mut body = frame.slice(body_at..);
    let throttle_time_ms = if version >= 3 {
        Some(take_i32(&mut body).map_err(decode)?)
    } else {
        None
    };
    let count = take_array_len(&mut body, flexible).map_err(decode)?;
    // Each broker takes at least 10 bytes: a bound the count can be checked against.
    if count > body.remaining() / 10 {
        return Err(decode(anyhow::anyhow!(
            "{count} brokers in {} bytes",
            body.remaining()
        )));
    }
    let mut brokers = Vec::with_capacity(count);
    for _ in 0..count {
        let broker = MetadataResponseBroker::decode(&mut body, version).map_err(decode)?;
        // kafka-protocol keeps a tag as an i32 and would write one of 2^31 or more back
        // wrongly: no broker sends such a tag.
        if let Some(tag) = broker.unknown_tagged_fields.keys().find(|&&tag| tag < 0) {
            return Err(decode(anyhow::anyhow!(
                "a broker's tagged field numbered {}",
                *tag as u32
            )));
        }
        brokers.push(broker);
    }
    let rest = body;

    for b in &mut brokers {
        (b.node_id.0, b.host, b.port) = to.advertise(b.node_id.0, &b.host, b.port)?;
    }
    let mut out = BytesMut::with_capacity(frame.len() + 64 * brokers.len());
    out.put_i32(0); // the length, set below
    out.extend_from_slice(&frame[LENGTH_PREFIX..body_at]);
    if let Some(ms) = throttle_time_ms {
        out.put_i32(ms);
    }
    if flexible {
        put_uvarint(&mut out, count as u32 + 1);
    } else {
        out.put_i32(count as i32);
    }
    let mut encoded = Vec::with_capacity(64 * brokers.len());
    for b in &brokers {
        b.encode(&mut encoded, version)
            .map_err(|source| RewriteError::Encode {
                api: ApiKey::Metadata,
                version,
                source,
            })?;
    }
    out.extend_from_slice(&encoded);
    let rest_at = out.len();
    out.extend_from_slice(&rest);
    let renumbers = to.renumbers();
    let mut unmappable = None;
    let mut node = |at: usize, id: i32| {
        if renumbers && unmappable.is_none() {
            match to.node_id(id) {
                Ok(new) => out[rest_at + at..rest_at + at + 4].copy_from_slice(&new.to_be_bytes()),
                Err(e) => unmappable = Some(e),
            }
        }
    };
    walk(rest, version, seen, &mut node).map_err(decode)?;
    if let Some(e) = unmappable {
        return Err(e.into());
    }
    let len = (out.len() - LENGTH_PREFIX) as i32;
    out[..LENGTH_PREFIX].copy_from_slice(&len.to_be_bytes());
    Ok(out.freeze())
}

/// Walks the fields after the brokers (`rest`): it tells `seen` the name, partition count and
/// id of every topic without an error, and `node` the offset in `rest` and the value of every node
/// id (the controller, and each partition's leader, replicas, in-sync and offline replicas).
fn walk(
    rest: Bytes,
    version: i16,
    seen: &TopicsSeen<'_>,
    node: &mut dyn FnMut(usize, i32),
) -> anyhow::Result<()> {
    let total = rest.len();
    let mut body = rest;
    let body = &mut body;
    let at = |body: &Bytes| total - body.remaining();
    let flexible = version >= 9;
    if version >= 2 {
        take_string(body, flexible, true)?; // cluster_id
    }
    if version >= 1 {
        let pos = at(body);
        node(pos, take_i32(body)?); // controller_id
    }
    let count = take_array_len(body, flexible)?;
    let mut topics: Vec<(StrBytes, i32, Uuid, std::ops::Range<usize>)> = Vec::new();
    let mut epochs: Vec<(i32, i32)> = Vec::new();
    for _ in 0..count {
        let error_code = take_i16(body)?;
        let name = take_string(body, flexible, version >= 12)?;
        let id = if version >= 10 {
            let id = take_bytes(body, 16)?;
            Uuid::from_bytes(id[..].try_into().expect("16 bytes"))
        } else {
            Uuid::nil()
        };
        if version >= 1 {
            take_bytes(body, 1)?; // is_internal
        }
        let partitions = take_array_len(body, flexible)?;
        let first_epoch = epochs.len();
        for _ in 0..partitions {
            take_i16(body)?; // error_code
            let index = take_i32(body)?;
            let pos = at(body);
            node(pos, take_i32(body)?); // leader_id
            if version >= 7 {
                let epoch = take_i32(body)?;
                if error_code == 0 {
                    epochs.push((index, epoch));
                }
            }
            let arrays = if version >= 5 { 3 } else { 2 }; // replicas, isr, offline replicas
            for _ in 0..arrays {
                let ids = take_array_len(body, flexible)?;
                let pos = at(body);
                let ids = take_bytes(body, ids.saturating_mul(4))?;
                for (i, id) in ids.chunks_exact(4).enumerate() {
                    node(
                        pos + 4 * i,
                        i32::from_be_bytes(id.try_into().expect("4 bytes")),
                    );
                }
            }
            skip_tagged_fields(body, flexible)?;
        }
        if version >= 8 {
            take_i32(body)?; // topic_authorized_operations
        }
        skip_tagged_fields(body, flexible)?;
        if error_code == 0
            && let Some(name) = name
            && let Ok(partitions) = i32::try_from(partitions)
        {
            topics.push((name, partitions, id, first_epoch..epochs.len()));
        }
    }
    // What follows the topics, checked as a full decode would check it.
    if (8..=10).contains(&version) {
        take_i32(body)?; // cluster_authorized_operations
    }
    if version >= 13 {
        take_i16(body)?; // error_code
    }
    skip_tagged_fields(body, flexible)?;
    anyhow::ensure!(
        !body.has_remaining(),
        "{} bytes after the response",
        body.remaining()
    );
    if !topics.is_empty() {
        let named: Vec<Listed<'_>> = topics
            .iter()
            .map(|(name, partitions, id, at)| Listed {
                name,
                partitions: *partitions,
                id: *id,
                leader_epochs: &epochs[at.clone()],
            })
            .collect();
        seen(&named);
    }
    Ok(())
}

fn skip_tagged_fields(buf: &mut Bytes, flexible: bool) -> anyhow::Result<()> {
    if flexible {
        for _ in 0..take_uvarint(buf)? {
            take_uvarint(buf)?; // tag
            let size = take_uvarint(buf)?;
            take_bytes(buf, size as usize)?;
        }
    }
    Ok(())
}

/// A string (compact in flexible versions), `None` if null where it may be; it must be UTF-8,
/// as a decoder requires.
fn take_string(
    buf: &mut Bytes,
    flexible: bool,
    nullable: bool,
) -> anyhow::Result<Option<StrBytes>> {
    let len = if flexible {
        i64::from(take_uvarint(buf)?) - 1
    } else {
        i64::from(take_i16(buf)?)
    };
    if len == -1 && nullable {
        return Ok(None);
    }
    let len = usize::try_from(len).map_err(|_| anyhow::anyhow!("string length {len}"))?;
    let bytes = take_bytes(buf, len)?;
    Ok(Some(StrBytes::from_utf8(bytes)?))
}

fn take_bytes(buf: &mut Bytes, n: usize) -> anyhow::Result<Bytes> {
    anyhow::ensure!(
        buf.remaining() >= n,
        "{n} bytes wanted, {} left",
        buf.remaining()
    );
    Ok(buf.split_to(n))
}

fn take_i16(buf: &mut Bytes) -> anyhow::Result<i16> {
    anyhow::ensure!(buf.remaining() >= 2, "truncated");
    Ok(buf.get_i16())
}

fn take_i32(buf: &mut Bytes) -> anyhow::Result<i32> {
    anyhow::ensure!(buf.remaining() >= 4, "truncated");
    Ok(buf.get_i32())
}

fn take_uvarint(buf: &mut Bytes) -> anyhow::Result<u32> {
    let mut value = 0u32;
    for shift in (0..35).step_by(7) {
        anyhow::ensure!(buf.has_remaining(), "truncated varint");
        let byte = buf.get_u8();
        value |= u32::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    anyhow::bail!("varint longer than 5 bytes")
}

/// An array's element count: a compact (flexible versions) or classic length. Neither array of
/// a Metadata response may be null.
fn take_array_len(buf: &mut Bytes, flexible: bool) -> anyhow::Result<usize> {
    let len = if flexible {
        i64::from(take_uvarint(buf)?) - 1
    } else {
        i64::from(take_i32(buf)?)
    };
    usize::try_from(len).map_err(|_| anyhow::anyhow!("a null array where one is required"))
}

fn put_uvarint(out: &mut BytesMut, mut value: u32) {
    while value >= 0x80 {
        out.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    out.put_u8(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::frame;
    use crate::proxy::brokers::UnmappableNode;
    use crate::proxy::rewrite::recode;
    use crate::proxy::rewrite::testing::{Renumbered, To, decode_body, response_frame};
    use kafka_protocol::messages::metadata_response::MetadataResponseBroker;
    use kafka_protocol::messages::{BrokerId, MetadataResponse};
    use kafka_protocol::protocol::{Decodable, StrBytes};

    fn map_ids(ids: &mut [BrokerId], to: &dyn Advertise) -> Result<(), UnmappableNode> {
        for id in ids {
            id.0 = to.node_id(id.0)?;
        }
        Ok(())
    }

    /// What [`response`] does, by decoding the whole response into a message and encoding it
    /// again: the reference its tests compare it with.
    fn decoded_and_encoded(
        frame: &Bytes,
        version: i16,
        to: &dyn Advertise,
        seen: &TopicsSeen<'_>,
    ) -> Result<Bytes, RewriteError> {
        recode(
            frame,
            ApiKey::Metadata,
            version,
            |r: &mut MetadataResponse| {
                let epochs: Vec<Vec<(i32, i32)>> = r
                    .topics
                    .iter()
                    .map(|t| {
                        t.partitions
                            .iter()
                            .filter(|_| version >= 7)
                            .map(|p| (p.partition_index, p.leader_epoch))
                            .collect()
                    })
                    .collect();
                let topics: Vec<Listed<'_>> = r
                    .topics
                    .iter()
                    .zip(&epochs)
                    .filter(|(t, _)| t.error_code == 0)
                    .filter_map(|(t, epochs)| {
                        Some(Listed {
                            name: t.name.as_ref()?,
                            partitions: i32::try_from(t.partitions.len()).ok()?,
                            id: if version >= 10 {
                                t.topic_id
                            } else {
                                Uuid::nil()
                            },
                            leader_epochs: epochs,
                        })
                    })
                    .collect();
                if !topics.is_empty() {
                    seen(&topics);
                }
                for b in &mut r.brokers {
                    (b.node_id.0, b.host, b.port) = to.advertise(b.node_id.0, &b.host, b.port)?;
                }
                if to.renumbers() {
                    r.controller_id.0 = to.node_id(r.controller_id.0)?;
                    for p in r.topics.iter_mut().flat_map(|t| t.partitions.iter_mut()) {
                        p.leader_id.0 = to.node_id(p.leader_id.0)?;
                        map_ids(&mut p.replica_nodes, to)?;
                        map_ids(&mut p.isr_nodes, to)?;
                        map_ids(&mut p.offline_replicas, to)?;
                    }
                }
                Ok(())
            },
        )
    }

    #[test]
    fn a_failed_over_cluster_is_renumbered_everywhere_it_names_a_node() {
        use kafka_protocol::messages::metadata_response::{
            MetadataResponsePartition, MetadataResponseTopic,
        };
        let m = MetadataResponse::default()
            .with_controller_id(BrokerId(2))
            .with_brokers(vec![
                MetadataResponseBroker::default()
                    .with_node_id(BrokerId(1))
                    .with_host(StrBytes::from_static_str("10.1.2.3"))
                    .with_port(9092),
            ])
            .with_topics(vec![MetadataResponseTopic::default().with_partitions(
                vec![
                MetadataResponsePartition::default()
                    .with_leader_id(BrokerId(1))
                    .with_replica_nodes(vec![BrokerId(1), BrokerId(2)])
                    .with_isr_nodes(vec![BrokerId(2)]),
                MetadataResponsePartition::default().with_leader_id(BrokerId(-1)),
            ],
            )]);
        let out = response(
            &response_frame(ApiKey::Metadata, 12, &m),
            12,
            &Renumbered,
            &|_| {},
        )
        .unwrap();
        let back: MetadataResponse = decode_body(&out, ApiKey::Metadata, 12);
        assert_eq!(back.brokers[0].node_id.0, 101);
        assert_eq!(back.controller_id.0, 102);
        let p = &back.topics[0].partitions;
        assert_eq!(p[0].leader_id.0, 101);
        assert_eq!(p[0].replica_nodes, vec![BrokerId(101), BrokerId(102)]);
        assert_eq!(p[0].isr_nodes, vec![BrokerId(102)]);
        assert_eq!(p[1].leader_id.0, -1);
    }

    /// A response with every field a version has: brokers with racks, an errored topic, topic
    /// ids, partitions with offline replicas, authorized operations and unknown tagged fields.
    fn full_response(version: i16) -> MetadataResponse {
        use kafka_protocol::messages::TopicName;
        use kafka_protocol::messages::metadata_response::{
            MetadataResponsePartition, MetadataResponseTopic,
        };
        let tagged = |n: u8| {
            if version >= 9 {
                [(1000 + i32::from(n), Bytes::from(vec![n; 3]))].into()
            } else {
                Default::default()
            }
        };
        let brokers = (0..3)
            .map(|id| {
                MetadataResponseBroker::default()
                    .with_node_id(BrokerId(id))
                    .with_host(StrBytes::from_string(format!("kafka-{id}.example")))
                    .with_port(9092)
                    .with_rack((version >= 1).then(|| StrBytes::from_static_str("rack-a")))
                    .with_unknown_tagged_fields(tagged(id as u8))
            })
            .collect();
        let topic = |name: &str, error_code: i16, partitions: i32| {
            MetadataResponseTopic::default()
                .with_error_code(error_code)
                .with_name(Some(TopicName(StrBytes::from_string(name.to_owned()))))
                .with_topic_id(if version >= 10 {
                    Uuid::from_u128(u128::from(name.len() as u64))
                } else {
                    Uuid::nil()
                })
                .with_is_internal(false)
                .with_topic_authorized_operations(if version >= 8 { 248 } else { -2147483648 })
                .with_partitions(
                    (0..partitions)
                        .map(|p| {
                            MetadataResponsePartition::default()
                                .with_partition_index(p)
                                .with_leader_id(BrokerId(p % 3))
                                .with_leader_epoch(if version >= 7 { 5 } else { -1 })
                                .with_replica_nodes(vec![BrokerId(p % 3), BrokerId((p + 1) % 3)])
                                .with_isr_nodes(vec![BrokerId(p % 3)])
                                .with_offline_replicas(if version >= 5 {
                                    vec![BrokerId((p + 1) % 3)]
                                } else {
                                    Vec::new()
                                })
                                .with_unknown_tagged_fields(tagged(7))
                        })
                        .collect(),
                )
                .with_unknown_tagged_fields(tagged(8))
        };
        MetadataResponse::default()
            .with_throttle_time_ms(if version >= 3 { 25 } else { 0 })
            .with_brokers(brokers)
            .with_cluster_id((version >= 2).then(|| StrBytes::from_static_str("cluster-x")))
            .with_controller_id(BrokerId(if version >= 1 { 1 } else { -1 }))
            .with_topics(vec![
                topic("orders", 0, 4),
                topic("forbidden", 29, 0),
                topic("payments", 0, 2),
            ])
            .with_cluster_authorized_operations(if (8..=10).contains(&version) {
                4
            } else {
                -2147483648
            })
            .with_unknown_tagged_fields(tagged(9))
    }

    /// The rewrite that walks the response gives, byte for byte, what decoding the whole
    /// response and encoding it again gives, in every version, with node ids kept and with
    /// them renumbered (reads failed over), and hears of the same topics; a response cut short
    /// anywhere is refused, not passed on.
    #[test]
    fn the_walking_rewrite_equals_a_full_decode_and_encode_in_every_version() {
        use std::cell::RefCell;
        type Heard = (String, i32, Uuid, Vec<(i32, i32)>);
        fn record(into: &RefCell<Vec<Heard>>, topics: &[Listed<'_>]) {
            into.borrow_mut().extend(topics.iter().map(|t| {
                (
                    t.name.to_owned(),
                    t.partitions,
                    t.id,
                    t.leader_epochs.to_vec(),
                )
            }));
        }
        let advertisers: [&dyn Advertise; 2] = [&To, &Renumbered];
        for version in 0..=13 {
            let frame = response_frame(ApiKey::Metadata, version, &full_response(version));
            for to in advertisers {
                let (walked_seen, full_seen) = (RefCell::new(Vec::new()), RefCell::new(Vec::new()));
                let walked = response(&frame, version, to, &|t| record(&walked_seen, t)).unwrap();
                let full =
                    decoded_and_encoded(&frame, version, to, &|t| record(&full_seen, t)).unwrap();
                let what = format!("v{version}, renumbered: {}", to.renumbers());
                assert_eq!(walked, full, "{what}");
                assert_eq!(walked_seen, full_seen, "{what}");
                assert_eq!(
                    walked_seen.into_inner(),
                    [("orders", 4), ("payments", 2)].map(|(name, partitions)| (
                        name.to_owned(),
                        partitions,
                        if version >= 10 {
                            Uuid::from_u128(name.len() as u128)
                        } else {
                            Uuid::nil()
                        },
                        if version >= 7 {
                            (0..partitions).map(|p| (p, 5)).collect()
                        } else {
                            Vec::new()
                        }
                    )),
                    "{what}"
                );
            }
            let hl = frame::response_header_len(
                &frame,
                ApiKey::Metadata.response_header_version(version),
            )
            .unwrap();
            for cut in 4 + hl..frame.len() {
                let mut short = frame[..cut].to_vec();
                short[..4].copy_from_slice(&((cut - 4) as i32).to_be_bytes());
                let short = Bytes::from(short);
                assert!(
                    response(&short, version, &Renumbered, &|_| {}).is_err(),
                    "v{version} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn metadata_brokers_are_advertised_at_the_proxy_in_every_version() {
        for version in 4..=13 {
            let m = MetadataResponse::default().with_brokers(vec![
                MetadataResponseBroker::default()
                    .with_node_id(BrokerId(2))
                    .with_host(StrBytes::from_static_str("10.1.2.3"))
                    .with_port(9092),
            ]);
            let out = response(
                &response_frame(ApiKey::Metadata, version, &m),
                version,
                &To,
                &|_| {},
            )
            .unwrap();
            assert_eq!(frame::response_correlation_id(&out).unwrap(), 7);
            let hl =
                frame::response_header_len(&out, ApiKey::Metadata.response_header_version(version))
                    .unwrap();
            let mut body = out.slice(4 + hl..);
            let back = MetadataResponse::decode(&mut body, version).unwrap();
            assert_eq!(back.brokers[0].host.as_str(), "proxy");
            assert_eq!(back.brokers[0].port, 9002);
        }
    }
}
