//! Record batch inspection (placeholder, being written).
