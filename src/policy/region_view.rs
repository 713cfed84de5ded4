//! The region view: the topic names a client of region R sees while R's reads are served by
//! another region's cluster C, under MirrorMaker 2's `DefaultReplicationPolicy`.
//!
//! MM2 copies topic `T` of region `X` into every other region as `X<separator>T`, and never
//! copies a copy again. So while C serves R's clients:
//! - R's own topic `T` is C's mirror `R.T`;
//! - C's own topic `T`, which R holds as the mirror `C.T`, is `T` in C;
//! - a third region X's topic, `X.T` in R, is `X.T` in C too (MM2 copies X into C directly).
//!
//! Anything else has no counterpart: internal topics (`__consumer_offsets`, MM2's `.internal`
//! ones), and names that MM2 would never make on that side. [`RegionView::to_serving`] and
//! [`RegionView::to_client`] are inverse to each other on every name either maps, so a name a
//! client learned in a response always leads back to the topic it came from.
//!
//! Pure: `proxy/view.rs` applies it to the requests and responses that carry topic names.

use super::replication::{Naming, is_internal};

/// How R's topic names map onto C's while C serves R's reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionView {
    /// R: the region whose clients this keyward serves.
    local: String,
    /// C: the region whose cluster serves them now.
    serving: String,
    /// Every region of the deployment: a topic starting with one of these and the separator is
    /// a mirror.
    regions: Vec<String>,
    naming: Naming,
}

impl RegionView {
    /// The view of `local`'s topics in `serving`'s cluster. `regions` lists every region
    /// (both of these included).
    pub fn new(local: &str, serving: &str, regions: &[String], naming: Naming) -> Self {
        Self {
            local: local.to_owned(),
            serving: serving.to_owned(),
            regions: regions.to_vec(),
            naming,
        }
    }

    /// The region whose cluster serves.
    pub fn serving(&self) -> &str {
        &self.serving
    }

    /// The region whose clients see this view.
    pub fn local(&self) -> &str {
        &self.local
    }

    /// The serving cluster's copy of `topic` when it is one of the local region's own topics
    /// (not a mirror, not internal): `orders` is `eu.orders` for eu's clients.
    pub fn own_copy(&self, topic: &str) -> Option<String> {
        (!topic.is_empty() && !is_internal(topic) && self.mirror_of(topic).is_none())
            .then(|| self.naming.mirror(&self.local, topic))
    }

    /// The serving cluster's own topic that the local cluster's `topic` copies (`eu.orders` is
    /// eu's `orders` when eu serves), or `None` for any other name.
    pub fn serving_origin(&self, topic: &str) -> Option<String> {
        match self.mirror_of(topic) {
            Some((region, rest)) if region == self.serving && !is_internal(rest) => {
                Some(rest.to_owned())
            }
            _ => None,
        }
    }

    /// One line for logs and `/ownership`: how names map now.
    pub fn describe(&self) -> String {
        let s = &self.naming.separator;
        format!(
            "{local}'s topics as {serving} holds them: {local}'s T is {local}{s}T in {serving}, {serving}{s}T is {serving}'s own T",
            local = self.local,
            serving = self.serving,
        )
    }

    /// The name in the serving cluster of `topic` as the client names it, or `None` when the
    /// serving cluster has no counterpart (an internal topic, a name MM2 never makes).
    pub fn to_serving(&self, topic: &str) -> Option<String> {
        let name = self.serving_name(topic)?;
        // Only names that lead back: `eu.us.orders` (a copy of a copy) is not one.
        (self.client_name(&name).as_deref() == Some(topic)).then_some(name)
    }

    /// The name a client sees for the serving cluster's `topic`, or `None` when it is not part
    /// of the view (internal topics, and names no client name leads to).
    pub fn to_client(&self, topic: &str) -> Option<String> {
        let name = self.client_name(topic)?;
        (self.serving_name(&name).as_deref() == Some(topic)).then_some(name)
    }

    fn serving_name(&self, topic: &str) -> Option<String> {
        if topic.is_empty() || is_internal(topic) {
            return None;
        }
        match self.mirror_of(topic) {
            // The serving region's own topic, mirrored into ours.
            Some((region, rest)) if region == self.serving => Some(rest.to_owned()),
            // Our own region's name as a prefix: MM2 never makes that in our own cluster.
            Some((region, _)) if region == self.local => None,
            // A third region's topic: mirrored into the serving cluster under the same name.
            Some(_) => Some(topic.to_owned()),
            // Our own topic: the serving cluster's mirror of it.
            None => Some(self.naming.mirror(&self.local, topic)),
        }
    }

    fn client_name(&self, topic: &str) -> Option<String> {
        if topic.is_empty() || is_internal(topic) {
            return None;
        }
        match self.mirror_of(topic) {
            Some((region, rest)) if region == self.local => Some(rest.to_owned()),
            Some((region, _)) if region == self.serving => None,
            Some(_) => Some(topic.to_owned()),
            None => Some(self.naming.mirror(&self.serving, topic)),
        }
    }

    /// The region and the rest of `topic` when it is a mirror's name (`<region><separator>rest`,
    /// rest not empty).
    fn mirror_of<'t>(&self, topic: &'t str) -> Option<(&str, &'t str)> {
        self.regions.iter().find_map(|region| {
            let rest = topic
                .strip_prefix(region.as_str())?
                .strip_prefix(self.naming.separator.as_str())?;
            (!rest.is_empty()).then_some((region.as_str(), rest))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn view(local: &str, serving: &str) -> RegionView {
        let regions = ["eu", "us", "ap"].map(String::from);
        RegionView::new(
            local,
            serving,
            &regions,
            Naming {
                separator: ".".into(),
            },
        )
    }

    #[test]
    fn each_region_s_topics_are_found_where_mirror_maker_put_them() {
        let v = view("us", "eu");
        // us's own orders: eu's copy of it.
        assert_eq!(v.to_serving("orders").as_deref(), Some("us.orders"));
        assert_eq!(v.to_client("us.orders").as_deref(), Some("orders"));
        // eu's orders, which us holds as `eu.orders`: eu's own topic.
        assert_eq!(v.to_serving("eu.orders").as_deref(), Some("orders"));
        assert_eq!(v.to_client("orders").as_deref(), Some("eu.orders"));
        // ap's orders: copied into both under the same name.
        assert_eq!(v.to_serving("ap.orders").as_deref(), Some("ap.orders"));
        assert_eq!(v.to_client("ap.orders").as_deref(), Some("ap.orders"));
        // A topic whose name has dots but no region prefix is an ordinary topic.
        assert_eq!(v.to_serving("orders.v2").as_deref(), Some("us.orders.v2"));
        assert_eq!(v.to_client("orders.v2").as_deref(), Some("eu.orders.v2"));
    }

    #[test]
    fn only_the_local_region_s_own_topics_have_a_copy_of_their_own() {
        let v = view("us", "eu");
        assert_eq!(v.own_copy("orders").as_deref(), Some("us.orders"));
        assert_eq!(v.own_copy("orders.v2").as_deref(), Some("us.orders.v2"));
        // Mirrors held here, internal topics: not us's own.
        for other in [
            "eu.orders",
            "ap.orders",
            "__consumer_offsets",
            "",
            "us.orders",
        ] {
            assert_eq!(v.own_copy(other), None, "{other}");
        }
    }

    #[test]
    fn only_copies_of_the_serving_region_s_topics_have_an_origin_there() {
        let v = view("us", "eu");
        assert_eq!(v.serving_origin("eu.orders").as_deref(), Some("orders"));
        for other in [
            "orders",
            "ap.orders",
            "us.orders",
            "eu.",
            "__consumer_offsets",
        ] {
            assert_eq!(v.serving_origin(other), None, "{other}");
        }
    }

    #[test]
    fn what_has_no_counterpart_is_left_out() {
        let v = view("us", "eu");
        for internal in [
            "__consumer_offsets",
            "__transaction_state",
            "mm2-offset-syncs.us.internal",
            "us.checkpoints.internal",
            "mm2-configs.us.internal",
        ] {
            assert_eq!(v.to_serving(internal), None, "{internal}");
            assert_eq!(v.to_client(internal), None, "{internal}");
        }
        // us names no topic `us.T` of its own, and eu has no `eu.T` that MM2 made.
        assert_eq!(v.to_serving("us.orders"), None);
        assert_eq!(v.to_client("eu.orders"), None);
        // A copy of a copy (MM2 refuses the cycle) leads nowhere, either way.
        assert_eq!(v.to_client("us.eu.orders"), None);
        assert_eq!(v.to_serving("eu.us.orders"), None);
        assert_eq!(v.to_serving(""), None);
    }

    #[test]
    fn the_separator_is_the_one_mirror_maker_uses() {
        let v = RegionView::new(
            "us",
            "eu",
            &["eu".into(), "us".into()],
            Naming {
                separator: "__".into(),
            },
        );
        assert_eq!(v.to_serving("orders").as_deref(), Some("us__orders"));
        assert_eq!(v.to_client("us__orders").as_deref(), Some("orders"));
        // `us.orders` is an ordinary name under this separator.
        assert_eq!(v.to_serving("us.orders").as_deref(), Some("us__us.orders"));
    }

    proptest! {
        /// Every name mapped one way maps back to where it came from.
        #[test]
        fn the_two_directions_are_inverse(
            topic in "(eu\\.|us\\.|ap\\.|_|\\.)?[a-z._-]{0,12}",
            local in 0..3usize,
            serving in 0..3usize,
        ) {
            let regions = ["eu", "us", "ap"];
            prop_assume!(local != serving);
            let v = view(regions[local], regions[serving]);
            if let Some(s) = v.to_serving(&topic) {
                prop_assert_eq!(v.to_client(&s), Some(topic.clone()));
            }
            if let Some(c) = v.to_client(&topic) {
                prop_assert_eq!(v.to_serving(&c), Some(topic.clone()));
            }
        }
    }
}
