//! Produce decisions.
