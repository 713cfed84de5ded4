//! The map between the serving cluster's real brokers and the virtual brokers clients see.
//!
//! Broker node N is advertised to clients as `advertised_host:(broker_port_base + N)`; keyward
//! listens on that port and relays to N's real address, learned from every Metadata,
//! DescribeCluster and FindCoordinator response that passes through. Node ids are kept as they
//! are, so requests that name a broker by id (admin `describeConfigs` on a broker, say) keep
//! working. The port is a pure function of the node id, so it stays the same across restarts of
//! keyward and across metadata refreshes.

use std::collections::HashMap;
use std::sync::RwLock;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "broker node id {node_id} cannot be given a port: broker_port_base {base} + {node_id} is outside 1-65535"
)]
pub struct UnmappableNode {
    pub node_id: i32,
    pub base: u16,
}

/// A real broker address learned from the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RealBroker {
    pub host: String,
    pub port: i32,
}

impl RealBroker {
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug)]
pub struct BrokerMap {
    port_base: u16,
    real: RwLock<HashMap<i32, RealBroker>>,
}

impl BrokerMap {
    pub fn new(port_base: u16) -> Self {
        Self {
            port_base,
            real: RwLock::new(HashMap::new()),
        }
    }

    /// The port clients reach node `node_id` at.
    pub fn virtual_port(&self, node_id: i32) -> Result<u16, UnmappableNode> {
        let port = i64::from(self.port_base) + i64::from(node_id);
        match u16::try_from(port) {
            Ok(p) if p > 0 && node_id >= 0 => Ok(p),
            _ => Err(UnmappableNode {
                node_id,
                base: self.port_base,
            }),
        }
    }

    /// Records where node `node_id` really is. Returns true when this is news (a new node, or a
    /// node that moved), so the caller can make sure its listener exists.
    pub fn learn(&self, node_id: i32, host: &str, port: i32) -> bool {
        let broker = RealBroker {
            host: host.to_owned(),
            port,
        };
        {
            let known = self.real.read().unwrap_or_else(|e| e.into_inner());
            if known.get(&node_id) == Some(&broker) {
                return false;
            }
        }
        let mut known = self.real.write().unwrap_or_else(|e| e.into_inner());
        let news = known.get(&node_id) != Some(&broker);
        known.insert(node_id, broker);
        news
    }

    pub fn real(&self, node_id: i32) -> Option<RealBroker> {
        self.real
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&node_id)
            .cloned()
    }

    pub fn known_nodes(&self) -> Vec<i32> {
        let mut ids: Vec<i32> = self
            .real
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        ids.sort_unstable();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_follow_node_ids_and_refuse_overflow() {
        let map = BrokerMap::new(9193);
        assert_eq!(map.virtual_port(0), Ok(9193));
        assert_eq!(map.virtual_port(3), Ok(9196));
        assert!(map.virtual_port(-1).is_err());
        assert!(map.virtual_port(60_000).is_err());
    }

    #[test]
    fn learning_reports_only_news() {
        let map = BrokerMap::new(9193);
        assert!(map.learn(1, "10.0.0.1", 9092));
        assert!(!map.learn(1, "10.0.0.1", 9092));
        assert!(map.learn(1, "10.0.0.2", 9092));
        assert_eq!(map.real(1).unwrap().addr(), "10.0.0.2:9092");
        assert_eq!(map.known_nodes(), vec![1]);
    }
}
