//! Ownership table (placeholder, being written).
