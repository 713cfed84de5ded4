//! Producer ids across a read failover: which id each cluster sees, so that no two producers
//! ever share one in a cluster.
//!
//! Every cluster issues idempotent producer ids from the same small numbers up (blocks of 1000
//! from 0). A client that takes its id from region C's cluster while C serves region R's reads,
//! and keeps writing to R's cluster once reads move back (no client asks for a new id on
//! reconnecting; the Java client never asks for one while its epoch lasts), would write to R's
//! cluster under a number R's cluster may have issued to another producer. The broker keys its
//! duplicate detection by producer id and partition: the two producers would fence each other,
//! or one's batch would be taken for a duplicate of the other's and acknowledged without being
//! written. The same holds the other way, for a producer that took its id from R's cluster and
//! writes to C's during the failover.
//!
//! So on a connection served by another region's cluster, keyward shows the client every id
//! that cluster issues in a range of its own, [`base`]`(C) + id`, far above any id a broker
//! issues, and shows that cluster every id R's cluster issued in R's range. Each range belongs
//! to the cluster that issued the ids in it, so an id is unique in whichever cluster it reaches:
//! back on R's cluster, a client's `base(C) + id` is an id R's cluster never issues (a broker
//! takes an unknown producer id at any sequence). Ids in a third cluster's range pass as they
//! are, for the same reason.
//!
//! Pure: `proxy/view.rs` applies it to InitProducerId and to the batches of Produce requests.

/// Ids brokers issue stay below this (2^52: at 1000 ids a block, billions of years of blocks).
pub const ISSUED_BELOW: i64 = 1 << 52;

/// Where the ranges start: every id at or above is one keyward gave a client.
pub const RANGES_FROM: i64 = 1 << 62;

/// How many ranges there are: a cluster's is chosen by its name's hash.
pub const RANGES: i64 = 1024;

/// The first id of the range in which cluster `name`'s ids are shown in other regions'
/// clusters: the same in every keyward, whatever its config lists.
pub fn base(name: &str) -> i64 {
    // FNV-1a: stable across builds and platforms, unlike the std hasher.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    RANGES_FROM + (hash % RANGES as u64) as i64 * ISSUED_BELOW
}

/// The producer ids of connections served by one other region's cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerIds {
    /// The serving cluster's range.
    serving: i64,
    /// The local cluster's range.
    local: i64,
}

impl ProducerIds {
    /// For region `local`'s clients while `serving`'s cluster serves them.
    pub fn new(local: &str, serving: &str) -> Self {
        Self {
            serving: base(serving),
            local: base(local),
        }
    }

    /// An id the serving cluster issued, as the client is shown it.
    pub fn to_client(&self, id: i64) -> i64 {
        if (0..ISSUED_BELOW).contains(&id) {
            self.serving + id
        } else {
            id
        }
    }

    /// An id a client sends, as the serving cluster must see it: its own ids back in their
    /// place, the local cluster's in the local range; -1 (none) and other ranges as they are.
    pub fn to_serving(&self, id: i64) -> i64 {
        if (self.serving..self.serving + ISSUED_BELOW).contains(&id) {
            id - self.serving
        } else if (0..ISSUED_BELOW).contains(&id) {
            self.local + id
        } else {
            id
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn each_cluster_s_range_is_its_own_and_above_every_issued_id() {
        let names = ["eu", "us", "ap", "eu-west-1", "us-east-1", "ap-south-1"];
        let bases: Vec<i64> = names.iter().map(|n| base(n)).collect();
        for (i, b) in bases.iter().enumerate() {
            assert!(
                *b >= RANGES_FROM && b.checked_add(ISSUED_BELOW).is_some(),
                "{}",
                names[i]
            );
            for other in &bases[i + 1..] {
                assert_ne!(b, other, "{}", names[i]);
            }
        }
        // The same in every process: a keyward of another region shows the same range.
        assert_eq!(base("eu"), base("eu"));
    }

    #[test]
    fn ids_go_where_they_came_from() {
        let ids = ProducerIds::new("us", "eu");
        // eu issues 7: the client is shown eu's 7, which eu sees as 7 again.
        assert_eq!(ids.to_client(7), base("eu") + 7);
        assert_eq!(ids.to_serving(base("eu") + 7), 7);
        // us issued 7 to another producer: eu sees it in us's range.
        assert_eq!(ids.to_serving(7), base("us") + 7);
        // No id, and a third cluster's, pass.
        assert_eq!(ids.to_serving(-1), -1);
        assert_eq!(ids.to_client(-1), -1);
        assert_eq!(ids.to_serving(base("ap") + 7), base("ap") + 7);
    }

    proptest! {
        /// Ids of different issuers never meet in any cluster: whatever reaches the serving
        /// cluster from a client is either an id it issued, to that client, or one in another
        /// issuer's range.
        #[test]
        fn no_two_issuers_share_an_id_in_the_serving_cluster(a in 0..ISSUED_BELOW, b in 0..ISSUED_BELOW) {
            let ids = ProducerIds::new("us", "eu");
            // A client of eu's ids and one of us's ids reach eu differently, whatever the numbers.
            prop_assert_ne!(ids.to_serving(ids.to_client(a)), ids.to_serving(b));
            // And an eu id shown to a client comes back as itself.
            prop_assert_eq!(ids.to_serving(ids.to_client(a)), a);
            // Back on us's own cluster the client sends what it was shown: never one us issues.
            prop_assert!(ids.to_client(a) >= ISSUED_BELOW);
        }
    }
}
