//! The topic ids of one cluster, as keyward has seen them: in the Metadata responses its
//! clients receive, and in the Metadata keyward asks for itself (the local cluster's at start,
//! a serving cluster's when reads move to it).
//!
//! Every cluster gives its topics ids of its own: `orders` in eu and its copy `eu.orders` in us
//! have different ids. While another region's cluster serves this region's reads, the region
//! view (`super::view`) shows clients the ids they knew before the switch (the local cluster's)
//! and maps them to the serving cluster's and back, by name, through two of these.
//!
//! A topic deleted and created again under its name gets a new id: the newest seen wins, and
//! the old id is forgotten.

use std::collections::HashMap;
use std::sync::RwLock;

use uuid::Uuid;

/// Partition indexes at or above this are not kept (Kafka's own limits are far below).
const MAX_PARTITIONS: usize = 1 << 20;

#[derive(Debug, Default)]
pub struct TopicIds {
    known: RwLock<Known>,
    /// Each topic's partitions' leader epochs, by partition (-1: not seen), as last seen: for
    /// the local cluster only (see [`TopicIds::learn_leader_epochs`]).
    leader_epochs: RwLock<HashMap<String, Vec<i32>>>,
}

#[derive(Debug, Default)]
struct Known {
    by_name: HashMap<String, Uuid>,
    by_id: HashMap<Uuid, String>,
}

impl TopicIds {
    /// Records topics' ids: `(name, id)`. The nil id (Metadata before v10, or a broker that
    /// does not know) tells nothing and is skipped. Cheap when nothing is new: a read lock and
    /// one lookup per topic, no allocation.
    pub fn learn<'a>(&self, topics: impl IntoIterator<Item = (&'a str, Uuid)> + Clone) {
        let new = |known: &Known, (name, id): &(&str, Uuid)| {
            !id.is_nil() && known.by_name.get(*name) != Some(id)
        };
        {
            let known = self.read();
            if !topics.clone().into_iter().any(|t| new(&known, &t)) {
                return;
            }
        }
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        for t in topics {
            if !new(&known, &t) {
                continue;
            }
            let (name, id) = t;
            if let Some(old) = known.by_name.insert(name.to_owned(), id) {
                known.by_id.remove(&old);
            }
            known.by_id.insert(id, name.to_owned());
        }
    }

    /// Records a topic's partitions' leader epochs: `(partition, epoch)`. A region view shows
    /// clients these, the local cluster's, in place of the serving cluster's (`super::view`),
    /// so that no client sees a partition's epoch go down at a switch, in either direction:
    /// epochs only grow in the local cluster. Cheap when nothing changed.
    pub fn learn_leader_epochs(&self, topic: &str, epochs: &[(i32, i32)]) {
        // Nothing new: every epoch at or below the one kept (an older answer), or for a
        // partition index no topic has.
        let fits = |known: &[i32]| {
            epochs.iter().all(|&(p, e)| match usize::try_from(p) {
                Ok(p) if p < MAX_PARTITIONS => known.get(p).is_some_and(|k| *k >= e),
                _ => true,
            })
        };
        if epochs.is_empty() || self.epochs().get(topic).is_some_and(|k| fits(k)) {
            return;
        }
        let mut all = self
            .leader_epochs
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let known = all.entry(topic.to_owned()).or_default();
        for &(p, e) in epochs {
            // The index is the broker's word: one past any real topic's is not kept, so that
            // no answer makes this store grow without bound.
            let Ok(p) = usize::try_from(p) else { continue };
            if p >= MAX_PARTITIONS {
                continue;
            }
            if p >= known.len() {
                known.resize(p + 1, -1);
            }
            known[p] = known[p].max(e);
        }
    }

    /// The leader epoch last seen of `topic`'s `partition`.
    pub fn leader_epoch(&self, topic: &str, partition: i32) -> Option<i32> {
        let p = usize::try_from(partition).ok()?;
        let e = *self.epochs().get(topic)?.get(p)?;
        (e >= 0).then_some(e)
    }

    fn epochs(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Vec<i32>>> {
        self.leader_epochs.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn id(&self, name: &str) -> Option<Uuid> {
        self.read().by_name.get(name).copied()
    }

    pub fn name(&self, id: Uuid) -> Option<String> {
        self.read().by_id.get(&id).cloned()
    }

    pub fn len(&self) -> usize {
        self.read().by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Known> {
        self.known.read().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_epochs_are_kept_per_partition_and_never_go_down() {
        let ids = TopicIds::default();
        ids.learn_leader_epochs("orders", &[(0, 3), (2, 5)]);
        assert_eq!(ids.leader_epoch("orders", 0), Some(3));
        assert_eq!(ids.leader_epoch("orders", 1), None);
        assert_eq!(ids.leader_epoch("orders", 2), Some(5));
        ids.learn_leader_epochs("orders", &[(0, 2), (1, 4)]);
        assert_eq!(ids.leader_epoch("orders", 0), Some(3), "an older answer");
        assert_eq!(ids.leader_epoch("orders", 1), Some(4));
        assert_eq!(ids.leader_epoch("payments", 0), None);
        assert_eq!(ids.leader_epoch("orders", -1), None);
        // A broker's index far past any topic's makes nothing grow.
        ids.learn_leader_epochs("orders", &[(i32::MAX, 9)]);
        assert_eq!(ids.leader_epoch("orders", i32::MAX), None);
        assert_eq!(ids.epochs()["orders"].len(), 3);
    }

    #[test]
    fn a_topic_created_again_keeps_only_its_new_id() {
        let ids = TopicIds::default();
        let (old, new) = (Uuid::from_u128(1), Uuid::from_u128(2));
        ids.learn([("orders", old), ("nil", Uuid::nil())]);
        assert_eq!(ids.id("orders"), Some(old));
        assert_eq!(ids.id("nil"), None, "the nil id tells nothing");
        ids.learn([("orders", new)]);
        assert_eq!(ids.id("orders"), Some(new));
        assert_eq!(ids.name(new).as_deref(), Some("orders"));
        assert_eq!(ids.name(old), None, "the old id is forgotten");
        assert_eq!(ids.len(), 1);
    }
}
