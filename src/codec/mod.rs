//! Kafka framing and record-batch inspection.
pub mod records;
