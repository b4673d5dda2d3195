//! A throwaway three-node JetStream cluster: three `nats-server -js`
//! processes routed to each other on loopback ports, each with its own store
//! and monitoring port, which a test kills, stops and starts one at a time.
//!
//! What the cluster thinks (who leads the meta group, who leads a stream,
//! which replicas are current) is read from each node's monitoring endpoint
//! (`/jsz`), so the kit needs no NATS client and every wait is bounded.

use super::nats::NatsServer;
use super::process::http_get;
use super::{free_port, HarnessError};
use std::time::{Duration, Instant};

/// The cluster's name (`--cluster_name`).
const CLUSTER: &str = "outbox";
const NODES: usize = 3;

/// Three routed nats-servers with JetStream; every node is killed on drop.
///
/// Start it from the test's own thread: the servers are also killed when the
/// thread that started them exits.
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
    /// Each node's monitoring port (`-m`), where `/jsz` answers.
    monitor: Vec<u16>,
}

impl NatsCluster {
    /// Starts three nodes and waits until the cluster has a meta leader
    /// (JetStream answers). Tries fresh ports (three times in all) when one
    /// was taken between choosing and binding it.
    pub fn start() -> Result<NatsCluster, HarnessError> {
        let mut last_error = None;
        for _ in 0..3 {
            match NatsCluster::try_start() {
                Ok(cluster) => return Ok(cluster),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("three attempts were made"))
    }

    fn try_start() -> Result<NatsCluster, HarnessError> {
        let ports = (0..3 * NODES)
            .map(|_| free_port())
            .collect::<Result<Vec<_>, _>>()?;
        let (client, rest) = ports.split_at(NODES);
        let (route, monitor) = rest.split_at(NODES);
        let mut nodes = Vec::with_capacity(NODES);
        for i in 0..NODES {
            let routes: Vec<String> = (0..NODES)
                .filter(|&j| j != i)
                .map(|j| format!("nats://127.0.0.1:{}", route[j]))
                .collect();
            let args = vec![
                "--server_name".to_owned(),
                node_name(i),
                "--cluster_name".to_owned(),
                CLUSTER.to_owned(),
                "--cluster".to_owned(),
                format!("nats://127.0.0.1:{}", route[i]),
                "--routes".to_owned(),
                routes.join(","),
                "-m".to_owned(),
                monitor[i].to_string(),
            ];
            nodes.push(NatsServer::unstarted(client[i], args)?);
        }
        let mut cluster = NatsCluster {
            nodes,
            monitor: monitor.to_vec(),
        };
        // A node waits for its routes only in the background: start all
        // three, then wait for them to elect a meta leader.
        for node in &mut cluster.nodes {
            node.start_again()?;
        }
        cluster.wait_meta_leader(START_TIMEOUT)?;
        Ok(cluster)
    }

    /// The seed list for a client: every node's URL, comma-separated.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `i`'s client URL.
    pub fn url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    /// Node `i`'s `--server_name`, as stream info names a leader or replica.
    pub fn name(&self, i: usize) -> String {
        node_name(i)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].is_running()
    }

    /// kill -9 of node `i`: a crash, no leadership handed over.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].stop(false);
    }

    /// Stops node `i` gracefully (SIGTERM), as a rolling restart does.
    pub fn stop(&mut self, i: usize) {
        self.nodes[i].stop(true);
    }

    /// Starts node `i` again on its ports and store; it rejoins the cluster.
    pub fn start_again(&mut self, i: usize) -> Result<(), HarnessError> {
        self.nodes[i].start_again()
    }

    /// Waits until every running node names the same meta leader, and
    /// returns its index.
    pub fn wait_meta_leader(&self, timeout: Duration) -> Result<usize, HarnessError> {
        self.wait("a JetStream meta leader", timeout, || {
            let mut agreed = None;
            for i in self.running() {
                let leader = self.jsz(i, "")?["meta_cluster"]["leader"]
                    .as_str()
                    .and_then(node_index)?;
                if agreed.is_some_and(|l| l != leader) {
                    return None;
                }
                agreed = Some(leader);
            }
            agreed.filter(|&l| self.is_running(l))
        })
    }

    /// The node leading `stream` now: a running node that reports itself as
    /// the stream's leader while no running node names another. `None`
    /// while there is none (an election) or the views disagree.
    pub fn leader_of(&self, stream: &str) -> Option<usize> {
        let views: Vec<(usize, Option<usize>)> = self
            .running()
            .map(|i| {
                let leader = self
                    .stream_cluster(i, stream)
                    .and_then(|c| c["leader"].as_str().and_then(node_index));
                (i, leader)
            })
            .collect();
        let (leader, _) = views.iter().find(|(i, leader)| *leader == Some(*i))?;
        views
            .iter()
            .all(|(_, other)| other.is_none_or(|o| o == *leader))
            .then_some(*leader)
    }

    /// Waits until `stream` has a leader, and returns it.
    pub fn wait_stream_leader(
        &self,
        stream: &str,
        timeout: Duration,
    ) -> Result<usize, HarnessError> {
        self.wait(&format!("a leader of stream {stream}"), timeout, || {
            self.leader_of(stream)
        })
    }

    /// Waits until `stream` has a leader and, in its leader's view, node `i`
    /// is a current replica (caught up and active) or the leader itself.
    pub fn wait_current(
        &self,
        stream: &str,
        i: usize,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        let what = format!("{} to be a current replica of {stream}", node_name(i));
        self.wait(&what, timeout, || {
            let leader = self.leader_of(stream)?;
            if leader == i {
                return Some(());
            }
            let cluster = self.stream_cluster(leader, stream)?;
            let replicas = cluster["replicas"].as_array()?;
            replicas
                .iter()
                .any(|r| {
                    r["name"].as_str() == Some(&node_name(i))
                        && r["current"].as_bool() == Some(true)
                        && r["offline"].as_bool() != Some(true)
                })
                .then_some(())
        })
    }

    fn running(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].is_running())
    }

    /// Node `i`'s `/jsz` with `query` (e.g. `accounts=true&streams=true`).
    fn jsz(&self, i: usize, query: &str) -> Option<serde_json::Value> {
        let (status, body) = http_get(self.monitor[i], &format!("/jsz?{query}"))?;
        if status != 200 {
            return None;
        }
        serde_json::from_str(&body).ok()
    }

    /// `stream`'s cluster section (leader, replicas) as node `i` sees it.
    fn stream_cluster(&self, i: usize, stream: &str) -> Option<serde_json::Value> {
        let jsz = self.jsz(i, "accounts=true&streams=true")?;
        jsz["account_details"]
            .as_array()?
            .iter()
            .filter_map(|account| account["stream_detail"].as_array())
            .flatten()
            .find(|s| s["name"].as_str() == Some(stream))
            .map(|s| s["cluster"].clone())
    }

    /// Polls `check` every 50 ms until it answers, up to `timeout`.
    fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Option<T>,
    ) -> Result<T, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = check() {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                let views = self
                    .running()
                    .map(|i| {
                        format!(
                            "{}: {}",
                            node_name(i),
                            self.jsz(i, "accounts=true&streams=true")
                                .map_or("no answer".to_owned(), |v| v.to_string())
                        )
                    })
                    .collect::<Vec<_>>();
                return Err(HarnessError::NotReady {
                    what: format!("nats cluster: {what}"),
                    timeout,
                    log: views.join("\n"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

const START_TIMEOUT: Duration = Duration::from_secs(30);

fn node_name(i: usize) -> String {
    format!("n{i}")
}

fn node_index(name: &str) -> Option<usize> {
    name.strip_prefix('n')?.parse().ok()
}
