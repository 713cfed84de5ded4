//! Static config.
