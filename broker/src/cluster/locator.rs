//! Where a new queue's master goes: `x-queue-master-locator` (argument) or
//! `queue-master-locator` (policy), as RabbitMQ's classic queues. `client-local` (the default):
//! the node the declare arrived on; `min-masters`: the running node that masters the fewest
//! queues (ties to the lower name); `random`: any running node. Witnesses hold no queues.

use super::keys::{self, QueueValue};
use super::link::ClusterLink;
use rand::seq::SliceRandom;
use std::collections::BTreeMap;

/// The node that masters a queue declared on `here` with locator `strategy`.
pub fn master_for(link: &ClusterLink, here: &str, strategy: Option<&str>) -> String {
    let candidates: Vec<String> = link
        .members()
        .into_iter()
        .filter(|m| !m.witness && m.voter && (m.running || m.name == here))
        .map(|m| m.name)
        .collect();
    pick(link, here, strategy, &candidates)
}

fn pick(link: &ClusterLink, here: &str, strategy: Option<&str>, candidates: &[String]) -> String {
    match strategy {
        Some("min-masters") => {
            let st = link.state();
            let mut load: BTreeMap<&str, usize> =
                candidates.iter().map(|n| (n.as_str(), 0)).collect();
            for (_, v) in st.prefix("queue/") {
                if let Some(qv) = keys::from_value::<QueueValue>(&v.value) {
                    if let Some(n) = load.get_mut(qv.placement.master.as_str()) {
                        *n += 1;
                    }
                }
            }
            least(&load).unwrap_or(here).to_owned()
        }
        Some("random") => candidates
            .choose(&mut rand::thread_rng())
            .cloned()
            .unwrap_or_else(|| here.to_owned()),
        _ => here.to_owned(),
    }
}

/// The name with the lowest count (the lower name on a tie).
fn least<'a>(load: &BTreeMap<&'a str, usize>) -> Option<&'a str> {
    load.iter().min_by_key(|(n, c)| (**c, **n)).map(|(n, _)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_masters_takes_the_least_loaded_node_and_the_lower_name_on_a_tie() {
        let load: BTreeMap<&str, usize> = [("a", 2), ("b", 1), ("c", 1)].into_iter().collect();
        assert_eq!(least(&load), Some("b"));
        let empty: BTreeMap<&str, usize> = BTreeMap::new();
        assert_eq!(least(&empty), None);
    }
}
