//! The kit against the real servers: consumer retries and dead letters, reconnection after
//! the broker drops the connection, Redis prefixes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use redis::AsyncCommands as _;
use relance_kit::bus::{
    self, Bus, ConsumerSpec, EVENTS_EXCHANGE, HandleError, Handler, Outgoing, Publisher, Received,
};
use relance_kit::cache::Cache;
use relance_kit::testing::{TestEnv, eventually};
use tokio_util::sync::CancellationToken;

/// Fails messages whose body says so: `retry-once` the first time, `reject` always.
#[derive(Default)]
struct Flaky {
    attempts: AtomicU32,
    done: AtomicU32,
}

impl Handler for Flaky {
    fn handle<'a>(&'a self, message: &'a Received<'a>) -> BoxFuture<'a, Result<(), HandleError>> {
        Box::pin(async move {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            match message.payload {
                b"retry-once" if message.attempt == 1 => {
                    Err(HandleError::Retry(anyhow::anyhow!("database down")))
                }
                b"reject" => Err(HandleError::Reject(anyhow::anyhow!("malformed"))),
                _ => {
                    self.done.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }
        })
    }
}

fn message(body: &str) -> Outgoing {
    Outgoing {
        exchange: EVENTS_EXCHANGE.into(),
        routing_key: "event.test".into(),
        message_id: body.into(),
        payload: body.as_bytes().to_vec(),
        headers: Default::default(),
    }
}

#[tokio::test]
async fn a_failed_message_is_retried_after_a_delay_and_a_hopeless_one_is_dead_lettered() {
    let metrics = relance_kit::metrics::recorder();
    let env = TestEnv::new().await;
    let bus = Bus::connect(&env.settings).await.expect("bus");
    let mut spec = ConsumerSpec::new("kit.flaky").bind(EVENTS_EXCHANGE, "event.test");
    spec.retry_delays = vec![Duration::from_millis(200)];
    bus::declare(&bus, &spec).await.expect("declare");

    let handler = Arc::new(Flaky::default());
    let shutdown = CancellationToken::new();
    let consumer = tokio::spawn(bus::run_consumer(
        bus.clone(),
        spec,
        handler.clone(),
        shutdown.clone(),
    ));
    let publisher = Publisher::new(bus.clone());
    publisher
        .publish_all(&[message("fine"), message("retry-once"), message("reject")])
        .await
        .expect("publish");

    eventually(10, "fine and retry-once handled", || {
        let done = handler.done.load(Ordering::SeqCst);
        async move { (done == 2).then_some(()) }
    })
    .await;
    // fine: 1 attempt, retry-once: 2, reject: 1.
    assert_eq!(handler.attempts.load(Ordering::SeqCst), 4);
    eventually(10, "the rejected message in the dead-letter queue", || {
        let bus = bus.clone();
        async move { (bus.queue_depth("kit.flaky.dlq").await.ok()? == 1).then_some(()) }
    })
    .await;
    // The consumer reads its queue's depths every 15 s; labelled with the base name, like
    // relance_messages_consumed_total, so the two join on `queue`.
    eventually(25, "the dead letter in relance_queue_dlq_depth", || {
        let text = metrics.render();
        async move {
            (text.contains(r#"relance_queue_dlq_depth{queue="kit.flaky"} 1"#)
                && text.contains(r#"relance_queue_depth{queue="kit.flaky"} 0"#)
                && text.contains(
                    r#"relance_messages_consumed_total{queue="kit.flaky",outcome="dead_lettered"} 1"#,
                ))
            .then_some(())
        }
    })
    .await;
    shutdown.cancel();
    consumer.await.expect("consumer stops on shutdown");
}

#[tokio::test]
async fn redis_keys_carry_the_deployment_prefix_and_the_workspace() {
    let env = TestEnv::new().await;
    let cache = Cache::connect(&env.settings).await.expect("redis");
    let key = cache.key("shop-a", "recent:c1");
    assert_eq!(key, format!("t-{}:shop-a:recent:c1", env.id));
    let mut conn = cache.connection();
    let _: () = conn.set(&key, "22423").await.expect("set");
    let value: String = conn.get(&key).await.expect("get");
    assert_eq!(value, "22423");
}

/// Closes, from the broker's side, every connection whose name contains `name`.
async fn close_connections_named(name: &str) -> usize {
    let listed = tokio::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .output()
        .await
        .expect("rabbitmqctl (runs where RabbitMQ runs)");
    let mut closed = 0;
    for line in String::from_utf8_lossy(&listed.stdout).lines() {
        if !line.contains(name) {
            continue;
        }
        let Some(pid) = line.split_whitespace().next() else {
            continue;
        };
        let output = tokio::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "closed by a test"])
            .output()
            .await
            .expect("rabbitmqctl close_connection");
        if output.status.success() {
            closed += 1;
        }
    }
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_and_consuming_resume_after_the_broker_drops_the_connection() {
    let env = TestEnv::new().await;
    let bus = Bus::connect(&env.settings).await.expect("bus");
    let spec = ConsumerSpec::new("kit.reconnect").bind(EVENTS_EXCHANGE, "event.test");
    bus::declare(&bus, &spec).await.expect("declare");
    let handler = Arc::new(Flaky::default());
    let shutdown = CancellationToken::new();
    let consumer = tokio::spawn(bus::run_consumer(
        bus.clone(),
        spec,
        handler.clone(),
        shutdown.clone(),
    ));
    let publisher = Publisher::new(bus.clone());
    publisher
        .publish_all(&[message("before")])
        .await
        .expect("publish");
    eventually(10, "the first message handled", || {
        let done = handler.done.load(Ordering::SeqCst);
        async move { (done == 1).then_some(()) }
    })
    .await;

    let name = format!("t-{}.relance", env.id);
    assert!(
        close_connections_named(&name).await >= 1,
        "the test's connection was found and closed"
    );
    // The publisher reconnects on its next call (a call in flight when the connection
    // drops fails, and the caller retries: the outbox and the relay do).
    let mut published = false;
    for _ in 0..20 {
        if publisher.publish_all(&[message("after")]).await.is_ok() {
            published = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(published, "publishing works again after reconnecting");
    eventually(
        20,
        "the consumer reconnected and handled the second message",
        || {
            let done = handler.done.load(Ordering::SeqCst);
            async move { (done >= 2).then_some(()) }
        },
    )
    .await;
    shutdown.cancel();
    consumer.await.expect("consumer stops");
}
