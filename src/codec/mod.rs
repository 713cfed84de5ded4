//! Kafka framing, the Produce request view and record-batch inspection. Pure parsing: nothing
//! here touches a socket, a clock or the ownership table.
pub mod compression;
pub mod errors;
pub mod frame;
pub mod produce;
pub mod records;
pub mod split;
pub mod wire;
