//! One module per API keyward handles, as mini-redis has one file per command: what keyward does
//! with a request of that API (decide, answer, forward) and with the broker's response to it
//! (rewrite the addresses it carries). The connection loop (`super::conn`) reads a request,
//! dispatches it here by API key, and carries out what the handler returns; every other API is
//! relayed as its original bytes.
//!
//! Handlers never touch sockets themselves: the connection writes what they return, in request
//! order.

pub mod api_versions;
pub mod describe_cluster;
pub mod fetch;
pub mod find_coordinator;
pub mod metadata;
pub mod produce;
