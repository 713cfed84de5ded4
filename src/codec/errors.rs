//! The Kafka error codes keyward answers with or acts on, taken from the protocol crate's table
//! so each is written down once.

use kafka_protocol::ResponseError as E;

pub const UNKNOWN_SERVER_ERROR: i16 = E::UnknownServerError.code();
pub const CORRUPT_MESSAGE: i16 = E::CorruptMessage.code();
pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = E::UnknownTopicOrPartition.code();
pub const LEADER_NOT_AVAILABLE: i16 = E::LeaderNotAvailable.code();
pub const NOT_LEADER_OR_FOLLOWER: i16 = E::NotLeaderOrFollower.code();
pub const REQUEST_TIMED_OUT: i16 = E::RequestTimedOut.code();
/// Retriable and "not persisted" for every client: what a held (frozen) write is answered with.
pub const NOT_ENOUGH_REPLICAS: i16 = E::NotEnoughReplicas.code();
pub const NOT_ENOUGH_REPLICAS_AFTER_APPEND: i16 = E::NotEnoughReplicasAfterAppend.code();
pub const UNSUPPORTED_VERSION: i16 = E::UnsupportedVersion.code();
pub const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = E::OutOfOrderSequenceNumber.code();
pub const DUPLICATE_SEQUENCE_NUMBER: i16 = E::DuplicateSequenceNumber.code();
pub const INVALID_PRODUCER_EPOCH: i16 = E::InvalidProducerEpoch.code();
pub const UNKNOWN_PRODUCER_ID: i16 = E::UnknownProducerId.code();
/// Non-retriable, and carries per-record errors (KIP-467): what a refused write is answered with.
pub const INVALID_RECORD: i16 = E::InvalidRecord.code();
pub const TOPIC_ALREADY_EXISTS: i16 = E::TopicAlreadyExists.code();
pub const OFFSET_OUT_OF_RANGE: i16 = E::OffsetOutOfRange.code();
pub const COORDINATOR_LOAD_IN_PROGRESS: i16 = E::CoordinatorLoadInProgress.code();
pub const COORDINATOR_NOT_AVAILABLE: i16 = E::CoordinatorNotAvailable.code();
pub const NOT_COORDINATOR: i16 = E::NotCoordinator.code();
pub const UNKNOWN_MEMBER_ID: i16 = E::UnknownMemberId.code();
pub const GROUP_ID_NOT_FOUND: i16 = E::GroupIdNotFound.code();
pub const FENCED_MEMBER_EPOCH: i16 = E::FencedMemberEpoch.code();
pub const UNKNOWN_LEADER_EPOCH: i16 = E::UnknownLeaderEpoch.code();

#[cfg(test)]
mod tests {
    #[test]
    fn codes_are_the_protocols() {
        assert_eq!(super::INVALID_RECORD, 87);
        assert_eq!(super::NOT_ENOUGH_REPLICAS, 19);
        assert_eq!(super::UNKNOWN_SERVER_ERROR, -1);
    }
}
