//! Cluster membership on NATS (issue 14, first step): each node joins by
//! creating its entry in the JetStream key-value bucket
//! `<cluster.name>_nodes` — refused while a live node holds the name — and
//! keeps it alive with heartbeats; the bucket's `max_age` is the lease, so
//! a node killed with `kill -9` disappears `cluster.lease_secs` later. A
//! node that leaves cleanly deletes its entry. `natter admin cluster` and
//! `/ready` read it. The session registry and routing between nodes
//! build on it: [`routing`].

pub mod routing;

use crate::config::Config;
use anyhow::Context;
use async_nats::jetstream::kv;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// What a node says about itself in the registry.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    /// Unix seconds.
    pub started: u64,
    pub version: String,
    /// Listeners clients reach ("what on address").
    pub listeners: String,
    /// Bound sessions at the last heartbeat.
    pub sessions: usize,
    /// Random per start: registry entries of an earlier run of a node
    /// with the same name are told apart by it.
    #[serde(default)]
    pub incarnation: u64,
}

/// A node's membership: its NATS connection and registry entry.
pub struct Cluster {
    pub node: String,
    pub incarnation: u64,
    /// The cluster's name: the prefix of its subjects and buckets.
    pub name: String,
    pub(crate) client: async_nats::Client,
    pub(crate) nodes: kv::Store,
    pub(crate) lease: Duration,
    /// Stanzas for sessions on other nodes, on their way to NATS.
    pub outbox: Arc<routing::Outbox>,
    /// How many times the NATS connection was made (reconnects included).
    pub(crate) connects: Arc<tokio::sync::watch::Sender<u64>>,
}

/// The registry bucket of cluster `name`.
fn bucket(name: &str) -> String {
    format!("{name}_nodes")
}

/// Connect to `cluster.nats_url`, counting connections in `connects`;
/// the error names the URL.
async fn connect(
    config: &Config,
    client_name: &str,
    connects: Arc<tokio::sync::watch::Sender<u64>>,
) -> anyhow::Result<async_nats::Client> {
    let url = &config.cluster.nats_url;
    async_nats::ConnectOptions::new()
        .name(client_name)
        .event_callback(move |event| {
            if matches!(event, async_nats::Event::Connected) {
                connects.send_modify(|n| *n += 1);
            }
            std::future::ready(())
        })
        .connection_timeout(Duration::from_secs(5))
        .connect(url.as_str())
        .await
        .with_context(|| format!("cannot reach NATS at cluster.nats_url = {url:?}"))
}

/// The registry bucket, created on first use (JetStream must be on).
async fn registry(config: &Config, client: &async_nats::Client) -> anyhow::Result<kv::Store> {
    let js = async_nats::jetstream::new(client.clone());
    let name = bucket(&config.cluster.name);
    let lease = Duration::from_secs(config.cluster.lease_secs);
    match js.get_key_value(&name).await {
        Ok(s) => Ok(s),
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: name.clone(),
                history: 1,
                max_age: lease,
                ..Default::default()
            })
            .await
            .with_context(|| {
                format!(
                    "cannot create the NATS key-value bucket {name} (is JetStream on? nats-server -js)"
                )
            }),
    }
}

impl Cluster {
    /// Join: fails naming the cause when NATS is unreachable, JetStream is
    /// off, or a live node already has this node's name.
    pub async fn join(config: &Config, info: &NodeInfo) -> anyhow::Result<Cluster> {
        let node = info.name.clone();
        let connects = Arc::new(tokio::sync::watch::Sender::new(0));
        let client = connect(config, &format!("natter {node}"), connects.clone()).await?;
        let nodes = registry(config, &client).await?;
        match nodes.create(&node, encode(info)?).await {
            Ok(_) => {}
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => anyhow::bail!(
                "cluster.node_name {node:?} is already live in cluster {:?} (or stopped less \
                 than cluster.lease_secs = {} s ago without leaving)",
                config.cluster.name,
                config.cluster.lease_secs
            ),
            Err(e) => return Err(e).context("cannot register this node in NATS"),
        }
        Ok(Cluster {
            node,
            incarnation: info.incarnation,
            name: config.cluster.name.clone(),
            client,
            nodes,
            lease: Duration::from_secs(config.cluster.lease_secs),
            outbox: Default::default(),
            connects,
        })
    }

    /// Renew the lease with fresh figures.
    pub async fn heartbeat(&self, info: &NodeInfo) -> anyhow::Result<()> {
        self.nodes.put(&self.node, encode(info)?).await?;
        Ok(())
    }

    pub fn heartbeat_every(&self) -> Duration {
        self.lease / 3
    }

    /// Leave: the entry goes at once (not a lease later).
    pub async fn leave(&self) {
        if let Err(e) = self.nodes.purge(&self.node).await {
            tracing::warn!(error = %e, "cluster: could not remove this node's entry");
        }
        let _ = self.client.flush().await;
    }

    /// Whether the NATS connection is up.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    pub async fn nodes(&self) -> anyhow::Result<Vec<NodeInfo>> {
        list(&self.nodes).await
    }
}

/// The live nodes of the configured cluster, read without joining it
/// (`natter admin cluster`).
pub async fn live_nodes(config: &Config) -> anyhow::Result<Vec<NodeInfo>> {
    let client = connect(config, "natter admin", Default::default()).await?;
    let nodes = registry(config, &client).await?;
    list(&nodes).await
}

/// Lists the entries from the bucket stream's subjects and reads each one,
/// not with `kv::Store::keys`: that consumer waits for as many entries as
/// the stream held when it began, so an entry whose lease ends in between
/// never comes and the listing never ends (async-nats 0.38). Here every
/// step is a request with a timeout, and an entry gone meanwhile is skipped.
async fn list(nodes: &kv::Store) -> anyhow::Result<Vec<NodeInfo>> {
    let mut subjects = nodes
        .stream
        .info_with_subjects(format!("{}>", nodes.prefix))
        .await
        .context("cannot list the cluster's nodes in NATS")?;
    let mut out = Vec::new();
    while let Some(next) = subjects.next().await {
        let (subject, _) = next.context("cannot list the cluster's nodes in NATS")?;
        let Some(k) = subject.strip_prefix(nodes.prefix.as_str()) else {
            continue;
        };
        if let Some(v) = nodes.get(k).await? {
            match serde_json::from_slice::<NodeInfo>(&v) {
                Ok(info) => out.push(info),
                Err(e) => tracing::warn!(node = %k, error = %e, "cluster: unreadable node entry"),
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn encode(info: &NodeInfo) -> anyhow::Result<bytes::Bytes> {
    Ok(serde_json::to_vec(info)?.into())
}
