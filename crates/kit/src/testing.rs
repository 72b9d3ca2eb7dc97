//! Test harness for the services' integration tests (feature `testing`).
//!
//! Each test gets its own Postgres database, its own RabbitMQ name prefix (queues that
//! expire, exchanges that auto-delete) and its own Redis key prefix, so tests run in
//! parallel and leave nothing behind. [`TestApp`] runs services in-process on a random
//! port, with an admin key and an ingest key for a fresh workspace.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::BoxFuture;
use sqlx::Connection as _;
use tonic::transport::Channel;

use crate::auth::Scope;
use crate::clock::SharedClock;
use crate::config::Settings;
use crate::grpc::GrpcServer;
use crate::platform::Platform;

/// Postgres server the tests create their databases on.
fn server_url() -> String {
    std::env::var("RELANCE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// An isolated environment: database, broker prefix, Redis prefix. Dropping it removes them.
#[derive(Debug)]
pub struct TestEnv {
    /// Settings pointing at the isolated resources.
    pub settings: Settings,
    /// The unique id of this environment.
    pub id: String,
    database: String,
}

impl TestEnv {
    /// Creates the database and settings.
    pub async fn new() -> TestEnv {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let database = format!("relance_test_{id}");
        let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", server_url()))
            .await
            .expect("Postgres must be running for tests: run `infra/dev.sh` (or `make test`)");
        sqlx::query(&format!("CREATE DATABASE {database}"))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let url = format!("{}/{database}", server_url());
        let amqp_prefix = format!("t-{id}.");
        let redis_prefix = format!("t-{id}:");
        let settings = Settings::from_pairs(&[
            ("database_url", url.as_str()),
            ("database_max_connections", "8"),
            ("amqp_prefix", amqp_prefix.as_str()),
            ("amqp_ephemeral", "true"),
            ("redis_prefix", redis_prefix.as_str()),
            ("grpc_addr", "127.0.0.1:0"),
            ("admin_addr", "127.0.0.1:0"),
            ("log_format", "pretty"),
            ("shutdown_grace_secs", "5"),
        ])
        .expect("test settings");
        TestEnv {
            settings,
            id,
            database,
        }
    }

    /// The database URL (for assertions made directly in SQL).
    pub fn database_url(&self) -> String {
        format!("{}/{}", server_url(), self.database)
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let database = self.database.clone();
        let redis_prefix = format!("t-{}:", self.id);
        // Drop runs inside the test's runtime: clean up from a thread with its own.
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(mut admin) =
                    sqlx::PgConnection::connect(&format!("{}/postgres", server_url())).await
                {
                    let _ =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
                            .execute(&mut admin)
                            .await;
                }
                if let Ok(client) = redis::Client::open("redis://127.0.0.1:6379")
                    && let Ok(mut conn) = client.get_multiplexed_async_connection().await
                {
                    let keys: Vec<String> = redis::cmd("KEYS")
                        .arg(format!("{redis_prefix}*"))
                        .query_async(&mut conn)
                        .await
                        .unwrap_or_default();
                    if !keys.is_empty() {
                        let _: Result<(), _> =
                            redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
                    }
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Registers services on a server (e.g. `|p, s| Box::pin(relance_events::serve(p, s))`).
pub type Register = Box<
    dyn for<'a> FnOnce(&'a Platform, &'a mut GrpcServer) -> BoxFuture<'a, anyhow::Result<()>>
        + Send,
>;

/// Services running in-process on a random port.
#[derive(Debug)]
pub struct TestApp {
    /// The platform they run on (its clock, bus, keys).
    pub platform: Platform,
    /// The gRPC address.
    pub addr: SocketAddr,
    /// The workspace the keys below belong to.
    pub workspace: String,
    /// A key with the `admin` scope.
    pub admin_key: String,
    /// A key with the `ingest` scope only.
    pub ingest_key: String,
    server: tokio::task::JoinHandle<()>,
    /// Kept last: its drop removes the database.
    pub env: Arc<TestEnv>,
}

impl TestApp {
    /// Starts the services `register` adds, on `env`, with `clock`.
    pub async fn start(
        env: Arc<TestEnv>,
        settings: Settings,
        clock: SharedClock,
        register: Register,
    ) -> TestApp {
        // Bound first, so that the services know their own address (calls between services
        // in one process go to it).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let settings = settings
            .with(&[("grpc_addr", addr.to_string().as_str())])
            .expect("settings with the bound address");
        let platform = Platform::start(settings, clock)
            .await
            .expect("platform starts");
        let mut server = GrpcServer::new();
        register(&platform, &mut server)
            .await
            .expect("services start");
        let serving = platform.clone();
        let server = tokio::spawn(async move {
            if let Err(error) = server.serve(&serving, listener).await {
                eprintln!("test server failed: {error:#}");
            }
        });
        let workspace = format!("ws-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let admin_key = platform
            .keys
            .create_key(&workspace, &[Scope::Admin], "test admin")
            .await
            .expect("admin key");
        let ingest_key = platform
            .keys
            .create_key(&workspace, &[Scope::Ingest], "test ingest")
            .await
            .expect("ingest key");
        TestApp {
            platform,
            addr,
            workspace,
            admin_key,
            ingest_key,
            server,
            env,
        }
    }

    /// A channel to the server.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    /// An admin key of a second, unrelated workspace.
    pub async fn other_workspace_key(&self) -> String {
        let other = format!("ws-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        self.platform
            .keys
            .create_key(&other, &[Scope::Admin], "other")
            .await
            .expect("other key")
    }

    /// Stops the server and waits for background work to drain.
    pub async fn stop(self) {
        self.platform.shutdown.cancel();
        let _ = self.server.await;
        self.platform.drain().await;
    }
}

/// A request carrying `key`.
pub fn authed<T>(key: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {key}").parse().expect("ascii key");
    request.metadata_mut().insert("authorization", value);
    request
}

/// How much longer than a test states `eventually` waits. These waits check liveness, not
/// speed (speed is for the benchmarks): in CI every test binary shares the 2 cores and the
/// PostgreSQL server with the 100k-customer SIGKILL test, whose long transactions also hold
/// back the events relay of every test database, so a wait that takes 1 s alone can take 20.
const PATIENCE: u64 = 4;

/// How long a test waits for what it states should take `seconds` (see [`PATIENCE`]); for
/// tests' own polling loops, as [`eventually`] uses it.
pub fn patience(seconds: u64) -> std::time::Duration {
    std::time::Duration::from_secs(seconds * PATIENCE)
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after [`patience`]`(seconds)`.
pub async fn eventually<T, F, Fut>(seconds: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let waited = patience(seconds);
    let seconds = waited.as_secs();
    let deadline = tokio::time::Instant::now() + waited;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {seconds}s waiting for: {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A temporary queue bound to an exchange, to see what a service published.
pub struct Tap {
    consumer: lapin::Consumer,
    _channel: lapin::Channel,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap").finish()
    }
}

impl Tap {
    /// Binds a new exclusive queue to `exchange` (base name) for `pattern`.
    pub async fn bind(bus: &crate::bus::Bus, exchange: &str, pattern: &str) -> Tap {
        use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
        use lapin::types::FieldTable;
        let channel = bus.channel().await.expect("channel");
        bus.declare_exchange(&channel, exchange)
            .await
            .expect("exchange");
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        let queue = channel
            .queue_declare("", options, FieldTable::default())
            .await
            .expect("queue");
        channel
            .queue_bind(
                queue.name().as_str(),
                &bus.name(exchange),
                pattern,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        let consume = BasicConsumeOptions {
            no_ack: true,
            ..BasicConsumeOptions::default()
        };
        let consumer = channel
            .basic_consume(queue.name().as_str(), "tap", consume, FieldTable::default())
            .await
            .expect("consume");
        Tap {
            consumer,
            _channel: channel,
        }
    }

    /// The next message (routing key, body), or `None` after `seconds`.
    pub async fn next(&mut self, seconds: u64) -> Option<(String, Vec<u8>)> {
        use futures::StreamExt as _;
        let next = tokio::time::timeout(
            std::time::Duration::from_secs(seconds),
            self.consumer.next(),
        )
        .await;
        match next {
            Ok(Some(Ok(delivery))) => {
                Some((delivery.routing_key.as_str().to_owned(), delivery.data))
            }
            _ => None,
        }
    }
}
