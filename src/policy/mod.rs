//! Pure decisions over decoded requests and one ownership snapshot: no sockets, clocks or
//! globals, so most unit and property tests live here.
pub mod alignment;
pub mod offset_syncs;
pub mod produce;
pub mod producer_ids;
pub mod region_view;
pub mod replication;

#[cfg(test)]
#[allow(unsafe_code)] // a counting global allocator, for tests only
mod no_alloc;
