//! `AMQP_URL` listing several nodes: a replica connects to one, moves to the next when
//! it is lost, shows which one it is on in `vote_aggregator_broker_node`, and loses
//! nothing on the way. Two fault proxies in front of the one test broker stand for two
//! nodes (what a cluster adds, a queue leader moving, is the chaos suite's).

use std::net::SocketAddr;

use vote_aggregator::metrics::Metrics;
use vote_testkit::proxy::FaultProxy;

use super::*;

/// `amqp_url` pointed at `addr` instead of its own host and port.
fn via(amqp_url: &str, addr: SocketAddr) -> anyhow::Result<String> {
    let mut url = url::Url::parse(amqp_url)?;
    url.set_ip_host(addr.ip())
        .map_err(|()| anyhow::anyhow!("cannot set the host"))?;
    url.set_port(Some(addr.port()))
        .map_err(|()| anyhow::anyhow!("cannot set the port"))?;
    Ok(url.to_string())
}

/// The `node` labels whose `vote_aggregator_broker_node` reads 1.
fn connected(metrics: &Metrics, nodes: &[String]) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| metrics.broker_node.with_label_values(&[n.as_str()]).get() == 1)
        .cloned()
        .collect()
}

#[tokio::test]
async fn a_replica_moves_to_the_next_node_when_its_node_is_lost() -> anyhow::Result<()> {
    let bed = bed().await?;
    let upstream: SocketAddr = {
        let u = url::Url::parse(&bed.amqp_url)?;
        format!(
            "{}:{}",
            u.host_str().unwrap_or("127.0.0.1"),
            u.port().unwrap_or(5672)
        )
        .parse()?
    };
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let proxies = [
        FaultProxy::start(any, upstream).await?,
        FaultProxy::start(any, upstream).await?,
    ];
    let urls = proxies
        .iter()
        .map(|p| via(&bed.amqp_url, p.local_addr()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let labels: Vec<String> = proxies.iter().map(|p| p.local_addr().to_string()).collect();
    let mut config = bed.config("r1");
    config.amqp_url = secrecy::SecretString::from(urls.join(","));
    config.batch_size = 20;
    config.prefetch_count = 40;
    let replica = Replica::start(config).await?;
    let m = replica.running.metrics().clone();
    eventually("connected to one node", WAIT, async || {
        Ok(connected(&m, &labels).len() == 1)
    })
    .await?;
    let first = connected(&m, &labels).remove(0);
    let publisher = eventually_publisher(&bed).await?;
    let votes = votes::spread(3_000, &["e"], &["a", "b", "c"]);
    publisher.publish_votes(&votes).await?;
    eventually("counting started", WAIT, async || Ok(replica.counted() > 0)).await?;

    // The node it is on goes away for good: the replica must move to the other one.
    let lost = labels.iter().position(|l| *l == first).unwrap_or(0);
    proxies[lost].break_all();
    let other = labels[1 - lost].clone();
    eventually("moved to the other node", WAIT, async || {
        Ok(connected(&m, &labels) == [other.clone()])
    })
    .await?;
    wait_stored(&bed, votes.len() as i64).await?;
    let mut db = bed.db().await?;
    assert_eq!(db.counted_per_candidate().await?, expected(&votes));
    assert_eq!(db.tallies().await?, expected(&votes));
    assert!(m.broker_connection_failures.get() >= 1);
    let scrape = m.render();
    assert!(
        scrape.contains(&format!(r#"{}{{node="{first}"}} 0"#, names::BROKER_NODE)),
        "{scrape}"
    );
    assert!(!scrape.contains(":votes@"), "no credentials in metrics");
    replica.stop().await
}
