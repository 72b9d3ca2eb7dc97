//! The kit against the real servers: consumer retries and dead letters, Redis prefixes.

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
