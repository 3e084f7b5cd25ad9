//! Integration tests of the test infrastructure itself: real containers (or the servers
//! named by `VOTES_TEST_DATABASE_URL` / `VOTES_TEST_AMQP_URL`) and the fault proxy.
//!
//! The offline images are used when they exist locally (`make images`); no variables needed.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context as _;
use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _};
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use vote_testkit::infra::{self, InfraOptions};
use vote_testkit::proxy::FaultProxy;
use vote_testkit::testbed::TestBed;

const STEP: Duration = Duration::from_secs(10);

async fn execute(url: &str, sql: &str) -> anyhow::Result<usize> {
    let mut conn = AsyncPgConnection::establish(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(diesel::sql_query(sql).execute(&mut conn).await?)
}

#[tokio::test]
async fn shared_starts_both_servers_and_a_fresh_database_accepts_queries() -> anyhow::Result<()> {
    let infra = infra::shared().await?;
    let url = infra.fresh_database().await?;
    assert!(url.contains("/votes_test_"), "{url}");
    execute(&url, "CREATE TABLE t (id int PRIMARY KEY)").await?;
    assert_eq!(execute(&url, "INSERT INTO t VALUES (1), (2)").await?, 2);
    assert_eq!(
        infra.postgres_host_port().port(),
        url::Url::parse(&url)?.port().unwrap_or(5432)
    );
    assert!(infra.amqp_url().starts_with("amqp://"));
    infra.drop_database(&url).await?;
    assert!(
        execute(&url, "SELECT 1").await.is_err(),
        "a dropped database must be gone"
    );
    Ok(())
}

#[tokio::test]
async fn two_fresh_databases_are_distinct() -> anyhow::Result<()> {
    let infra = infra::shared().await?;
    let (a, b) = (infra.fresh_database().await?, infra.fresh_database().await?);
    assert_ne!(a, b);
    execute(&a, "CREATE TABLE only_in_a (id int)").await?;
    assert!(
        execute(&b, "SELECT * FROM only_in_a").await.is_err(),
        "a table created in one fresh database must not exist in another"
    );
    infra.drop_database(&a).await?;
    infra.drop_database(&b).await?;
    Ok(())
}

#[tokio::test]
async fn amqp_url_accepts_a_connection_and_a_quorum_queue() -> anyhow::Result<()> {
    let infra = infra::shared().await?;
    let conn =
        lapin::Connection::connect(&infra.amqp_url(), lapin::ConnectionProperties::default())
            .await?;
    let channel = conn.create_channel().await?;
    let name = infra::fresh_queue_name();
    let mut args = FieldTable::default();
    args.insert(
        vote_aggregator::broker::args::QUEUE_TYPE.into(),
        AMQPValue::LongString(vote_aggregator::config::QueueType::Quorum.as_str().into()),
    );
    let queue = channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await?;
    assert_eq!(queue.name().as_str(), name);
    assert_eq!(queue.message_count(), 0);
    conn.close(200, "done".into()).await?;
    Ok(())
}

/// `shared()` from a runtime created after the first user's runtime was dropped (what
/// `#[tokio::test]` does for every test) must still work.
#[test]
fn shared_infra_outlives_the_runtime_that_started_it() -> anyhow::Result<()> {
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    first.block_on(async { infra::shared().await?.fresh_database().await })?;
    drop(first);
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    second.block_on(async {
        let url = infra::shared().await?.fresh_database().await?;
        execute(&url, "SELECT 1").await
    })?;
    Ok(())
}

/// An echo server on a free loopback port.
async fn echo_server() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = socket.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    Ok(addr)
}

async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> anyhow::Result<()> {
    stream.write_all(message).await?;
    let mut buf = vec![0; message.len()];
    tokio::time::timeout(STEP, stream.read_exact(&mut buf)).await??;
    assert_eq!(buf, message);
    Ok(())
}

/// Waits until the peer closed `stream` (EOF or reset).
async fn assert_closed(stream: &mut TcpStream) -> anyhow::Result<()> {
    let mut buf = [0u8; 16];
    match tokio::time::timeout(STEP, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Ok(()),
        Ok(Ok(n)) => anyhow::bail!("expected a closed connection, read {n} bytes"),
        Err(_) => anyhow::bail!("connection still open after {STEP:?}"),
    }
}

async fn wait_for_count(proxy: &FaultProxy, expected: usize) -> anyhow::Result<()> {
    tokio::time::timeout(STEP, async {
        while proxy.connection_count() != expected {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .with_context(|| {
        format!(
            "connection_count stayed {} (expected {expected})",
            proxy.connection_count()
        )
    })
}

fn loopback_any_port() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

#[tokio::test]
async fn proxy_forwards_both_ways() -> anyhow::Result<()> {
    let upstream = echo_server().await?;
    let proxy = FaultProxy::start(loopback_any_port(), upstream).await?;
    assert_ne!(proxy.local_addr().port(), 0);
    let mut a = TcpStream::connect(proxy.local_addr()).await?;
    let mut b = TcpStream::connect(proxy.local_addr()).await?;
    round_trip(&mut a, b"hello").await?;
    round_trip(&mut b, &[7u8; 100_000]).await?;
    wait_for_count(&proxy, 2).await?;
    drop(a);
    wait_for_count(&proxy, 1).await?;
    Ok(())
}

#[tokio::test]
async fn proxy_break_all_cuts_live_connections_and_restore_lets_new_ones_through()
-> anyhow::Result<()> {
    let upstream = echo_server().await?;
    let proxy = FaultProxy::start(loopback_any_port(), upstream).await?;
    let mut live = TcpStream::connect(proxy.local_addr()).await?;
    round_trip(&mut live, b"before").await?;

    proxy.break_all();
    assert!(proxy.is_broken());
    assert_closed(&mut live).await?;
    wait_for_count(&proxy, 0).await?;
    // New connections are accepted and closed at once while broken.
    let mut refused = TcpStream::connect(proxy.local_addr()).await?;
    assert_closed(&mut refused).await?;
    assert_eq!(proxy.connection_count(), 0);

    proxy.restore();
    let mut fresh = TcpStream::connect(proxy.local_addr()).await?;
    round_trip(&mut fresh, b"after").await?;
    assert_eq!(proxy.connection_count(), 1);
    Ok(())
}

#[tokio::test]
async fn proxy_set_upstream_moves_new_connections_and_drop_stops_it() -> anyhow::Result<()> {
    let first = echo_server().await?;
    let proxy = FaultProxy::start(loopback_any_port(), first).await?;
    let addr = proxy.local_addr();
    // An upstream that refuses: the client side is closed.
    let closed = TcpListener::bind(loopback_any_port()).await?;
    let closed_addr = closed.local_addr()?;
    drop(closed);
    proxy.set_upstream(closed_addr);
    let mut refused = TcpStream::connect(addr).await?;
    assert_closed(&mut refused).await?;

    proxy.set_upstream(echo_server().await?);
    let mut ok = TcpStream::connect(addr).await?;
    round_trip(&mut ok, b"moved").await?;

    drop(proxy);
    assert_closed(&mut ok).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "a dropped proxy must stop listening"
    );
    Ok(())
}

#[tokio::test]
async fn private_pair_survives_restarts_and_pauses_with_the_same_urls() -> anyhow::Result<()> {
    let private = infra::start_private(InfraOptions::default()).await?;
    let admin = private.admin_database_url();
    let amqp = private.amqp_url();
    assert_eq!(
        private.postgres_host_port(),
        private.postgres_proxy().local_addr()
    );
    let db = private.fresh_database().await?;
    execute(&db, "CREATE TABLE kept (id int)").await?;
    execute(&db, "INSERT INTO kept VALUES (1)").await?;

    private.stop_postgres().await.context("stop_postgres")?;
    assert!(
        execute(&db, "SELECT 1").await.is_err(),
        "PostgreSQL should be down"
    );
    private.start_postgres().await.context("start_postgres")?;
    assert_eq!(private.admin_database_url(), admin);
    assert_eq!(
        execute(&db, "SELECT * FROM kept").await?,
        1,
        "data survives a restart"
    );

    private.pause_postgres().await.context("pause_postgres")?;
    let paused = tokio::time::timeout(Duration::from_secs(2), execute(&db, "SELECT 1")).await;
    assert!(paused.is_err(), "a paused PostgreSQL must not answer");
    private
        .unpause_postgres()
        .await
        .context("unpause_postgres")?;
    execute(&db, "SELECT 1").await?;

    private
        .restart_rabbitmq()
        .await
        .context("restart_rabbitmq")?;
    assert_eq!(private.amqp_url(), amqp);
    let conn = lapin::Connection::connect(&amqp, lapin::ConnectionProperties::default()).await?;
    conn.close(200, "done".into()).await?;
    Ok(())
}

/// testcontainers' own runner drives this Docker engine: start, pause, unpause, stop and
/// start again (Docker maps a new host port), and the server accepts TCP after each start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testcontainers_runs_against_this_engine() -> anyhow::Result<()> {
    use testcontainers::core::{IntoContainerPort as _, WaitFor};
    use testcontainers::runners::AsyncRunner as _;
    use testcontainers::{GenericImage, ImageExt as _};

    let image = infra::postgres_image().await?;
    let (name, tag) = image.rsplit_once(':').context("image without a tag")?;
    let container = GenericImage::new(name, tag)
        .with_exposed_port(5432.tcp())
        .with_wait_for(WaitFor::message_on_stderr(
            "database system is ready to accept connections",
        ))
        .with_env_var("POSTGRES_PASSWORD", "probe")
        // The kit's labels: if this test dies, the next test process removes it.
        .with_labels(infra::own_labels())
        .start()
        .await
        .context("testcontainers could not start the PostgreSQL image")?;
    let first = container.get_host_port_ipv4(5432.tcp()).await?;
    TcpStream::connect((Ipv4Addr::LOCALHOST, first)).await?;
    container.pause().await.context("pause")?;
    container.unpause().await.context("unpause")?;
    container.stop().await.context("stop")?;
    container.start().await.context("start again")?;
    let second = container.get_host_port_ipv4(5432.tcp()).await?;
    // The port is published before the server listens: retry briefly.
    tokio::time::timeout(Duration::from_secs(60), async {
        while TcpStream::connect((Ipv4Addr::LOCALHOST, second))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .context("no TCP connection after the restart")?;
    println!(
        "testcontainers probe ({image}): host port {first}, paused, unpaused, stopped, \
         started; host port {second}"
    );
    container.rm().await.context("rm")?;
    Ok(())
}

async fn database_exists(infra: &infra::Infra, name: &str) -> anyhow::Result<bool> {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = AsyncPgConnection::establish(&infra.admin_database_url()).await?;
    let rows: Vec<Count> =
        diesel::sql_query("SELECT count(*) AS n FROM pg_database WHERE datname = $1")
            .bind::<diesel::sql_types::Text, _>(name)
            .load(&mut conn)
            .await?;
    Ok(rows.into_iter().next().is_some_and(|row| row.n > 0))
}

/// A test bed's database goes away with the bed: at once with `finish`, in the background
/// on drop, even while a connection still uses it.
#[tokio::test]
async fn a_finished_or_dropped_test_bed_leaves_no_database_behind() -> anyhow::Result<()> {
    let infra = infra::shared().await?;

    let bed = TestBed::new(infra).await?;
    let name = bed.database_name();
    assert!(
        database_exists(infra, &name).await?,
        "{name} was not created"
    );
    let busy = AsyncPgConnection::establish(&bed.database_url).await?;
    bed.finish().await?;
    assert!(
        !database_exists(infra, &name).await?,
        "{name} survived finish"
    );
    drop(busy);

    let bed = TestBed::new(infra).await?;
    let name = bed.database_name();
    let _busy = AsyncPgConnection::establish(&bed.database_url).await?;
    drop(bed);
    tokio::time::timeout(Duration::from_secs(30), async {
        while database_exists(infra, &name).await? {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::Ok(())
    })
    .await
    .with_context(|| format!("{name} survived the drop of its bed"))??;
    Ok(())
}

/// Three nodes form one cluster from configuration, the votes queue the service declares
/// gets a member on every node, and a node cut from the cluster network is seen
/// unreachable by the others, pauses itself, and rejoins when reconnected.
#[tokio::test]
async fn a_broker_cluster_forms_and_the_votes_queue_lives_on_every_node() -> anyhow::Result<()> {
    let cluster = infra::start_broker_cluster().await?;
    assert_eq!(cluster.len(), infra::CLUSTER_NODES);
    for i in 0..cluster.len() {
        let mut running = cluster.running_nodes(i).await?;
        running.sort();
        let mut all: Vec<String> = (0..cluster.len()).map(|n| cluster.node_name(n)).collect();
        all.sort();
        assert_eq!(running, all, "as node {i} sees it");
    }
    let queue = infra::fresh_queue_name();
    let mut config =
        vote_aggregator::Config::new("postgres://unused@127.0.0.1/x", cluster.amqp_url_list());
    config.queue_name = queue.clone();
    vote_aggregator::broker::connect_first(&config).await?;
    cluster.wait_queue_members(&queue, STEP).await?;
    let q = cluster.queue_members(1, &queue).await?;
    assert_eq!(q.members.len(), infra::CLUSTER_NODES, "{q:?}");
    let leader = cluster.queue_leader(&queue).await?;
    assert_eq!(q.leader, Some(cluster.node_name(leader)));

    // Cut node 2 from its peers: the others stop seeing it; reconnect: it rejoins.
    assert!(
        cluster.broker_running(2).await?,
        "node 2 runs before the cut"
    );
    cluster.isolate_node(2).await?;
    let cut = tokio::time::Instant::now();
    loop {
        if cluster.running_nodes(0).await?.len() == 2 {
            break;
        }
        anyhow::ensure!(
            cut.elapsed() < Duration::from_secs(60),
            "node 2 still seen running"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("partition seen after {:?}", cut.elapsed());
    // The cut node pauses itself (pause_minority); heal only once it did, or the
    // partition may end before it saw it, and the cluster stay split.
    cluster.wait_paused(2, Duration::from_secs(60)).await?;
    println!("node 2 paused after {:?}", cut.elapsed());
    cluster.reconnect_node(2).await?;
    cluster.wait_formed(Duration::from_secs(120)).await?;
    cluster
        .wait_queue_members(&queue, Duration::from_secs(60))
        .await?;
    println!("healed after {:?}", cut.elapsed());
    Ok(())
}
