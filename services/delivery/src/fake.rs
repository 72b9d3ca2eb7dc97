//! Fake providers for tests, benchmarks and the demo (feature `testing`).
//!
//! [`FakeProviders`] is one local HTTP server that answers like FCM (and Google's OAuth token
//! endpoint), APNs (over h2c as well as HTTP/1.1), Twilio, Meta's WhatsApp Cloud API and a
//! webhook receiver, records every request, and can be scripted to fail. [`start_smtp_server`]
//! starts a real SMTP server (Python's aiosmtpd) that stores every message it receives.
//!
//! Paths served (any base URL prefix is the server's own):
//! - `POST /token`: OAuth2 token exchange (`{"access_token", "expires_in", "token_type"}`);
//! - `POST /v1/projects/{project}/messages:send`: FCM (`{"name": "projects/…/messages/…"}`);
//! - `POST /3/device/{token}`: APNs (200, the `apns-id` header echoed or made up);
//! - `POST /2010-04-01/Accounts/{sid}/Messages.json`: Twilio (201, `{"sid": "SM…", …}`);
//! - `POST /{version}/{phone_number_id}/messages`: Meta (`{"messages": [{"id": "wamid.…"}]}`);
//! - `POST /webhook…`: a webhook receiver (200 `{"ok":true}`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Version};
use axum::response::Response;
use serde_json::{Value, json};

/// One request a fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The method, upper case.
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query string, if any.
    pub query: Option<String>,
    /// The HTTP version the client spoke (APNs must be HTTP/2).
    pub version: Version,
    /// Headers by lowercase name (the last value when repeated).
    pub headers: BTreeMap<String, String>,
    /// The body; empty when bodies are not recorded.
    pub body: Vec<u8>,
    /// When it arrived.
    pub received: Instant,
}

impl Recorded {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// The body as JSON (`Null` when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The body as a form (`application/x-www-form-urlencoded`), in order.
    pub fn form(&self) -> Vec<(String, String)> {
        form_pairs(&self.body)
    }
}

struct Script {
    prefix: String,
    status: StatusCode,
    body: String,
    headers: Vec<(String, String)>,
    remaining: u32,
}

#[derive(Default)]
struct Inner {
    records: Mutex<Vec<Recorded>>,
    count: AtomicU64,
    sequence: AtomicU64,
    scripts: Mutex<Vec<Script>>,
    down: Mutex<Vec<String>>,
    latency_us: AtomicU64,
    skip_bodies: AtomicBool,
    skip_records: AtomicBool,
}

fn guard<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The fake HTTP providers; the server stops when this is dropped.
pub struct FakeProviders {
    inner: Arc<Inner>,
    address: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl std::fmt::Debug for FakeProviders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeProviders")
            .field("address", &self.address)
            .finish()
    }
}

impl FakeProviders {
    /// Starts the server on 127.0.0.1 and a free port.
    pub async fn start() -> anyhow::Result<FakeProviders> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fake providers")?;
        let address = listener.local_addr()?;
        let inner = Arc::new(Inner::default());
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let server = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(err) = server.await {
                tracing::warn!(error = %err, "fake providers stopped");
            }
        });
        Ok(FakeProviders {
            inner,
            address,
            shutdown: Some(shutdown),
        })
    }

    /// `http://127.0.0.1:{port}`: the base URL to configure every provider with (the webhook's
    /// URL is this plus `/webhook`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The server's address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The next `times` requests whose path starts with `path_prefix` get this answer instead
    /// of the provider's usual one. Scripts queue: the first that matches is used.
    pub fn fail_next(&self, path_prefix: &str, status: u16, body: impl Into<String>, times: u32) {
        self.fail_next_with_headers(path_prefix, status, body, &[], times);
    }

    /// Like [`FakeProviders::fail_next`], with response headers (e.g. `retry-after`).
    pub fn fail_next_with_headers(
        &self,
        path_prefix: &str,
        status: u16,
        body: impl Into<String>,
        headers: &[(&str, &str)],
        times: u32,
    ) {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = headers
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        guard(&self.inner.scripts).push(Script {
            prefix: path_prefix.to_owned(),
            status,
            body: body.into(),
            headers,
            remaining: times,
        });
    }

    /// While down, requests whose path starts with `path_prefix` get a 503.
    pub fn set_down(&self, path_prefix: &str, down: bool) {
        let mut list = guard(&self.inner.down);
        list.retain(|prefix| prefix != path_prefix);
        if down {
            list.push(path_prefix.to_owned());
        }
    }

    /// Waits this long before every answer (a provider's round trip).
    pub fn set_latency(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.inner.latency_us.store(micros, Ordering::Relaxed);
    }

    /// Whether request bodies are kept (on by default; off for benchmarks).
    pub fn record_bodies(&self, record: bool) {
        self.inner.skip_bodies.store(!record, Ordering::Relaxed);
    }

    /// Whether requests are recorded at all (on by default); [`FakeProviders::count`] counts
    /// them either way.
    pub fn record_requests(&self, record: bool) {
        self.inner.skip_records.store(!record, Ordering::Relaxed);
    }

    /// Every request recorded, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        guard(&self.inner.records).clone()
    }

    /// The requests recorded whose path starts with `path_prefix`.
    pub fn requests_for(&self, path_prefix: &str) -> Vec<Recorded> {
        let records = guard(&self.inner.records);
        let mut matching = Vec::new();
        for record in records.iter() {
            if record.path.starts_with(path_prefix) {
                matching.push(record.clone());
            }
        }
        matching
    }

    /// Requests received so far (recorded or not).
    pub fn count(&self) -> u64 {
        self.inner.count.load(Ordering::Relaxed)
    }

    /// Forgets the recorded requests and resets the count (scripts stay).
    pub fn clear(&self) {
        guard(&self.inner.records).clear();
        self.inner.count.store(0, Ordering::Relaxed);
    }
}

impl Drop for FakeProviders {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

async fn handle(State(inner): State<Arc<Inner>>, request: Request) -> Response {
    let received = Instant::now();
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, 16 * 1024 * 1024).await {
        Ok(body) => body,
        Err(err) => {
            return answer(
                StatusCode::BAD_REQUEST,
                format!("unreadable body: {err}"),
                &[],
            );
        }
    };
    inner.count.fetch_add(1, Ordering::Relaxed);
    let path = parts.uri.path().to_owned();
    let mut headers = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers.insert(
            name.as_str().to_owned(),
            String::from_utf8_lossy(value.as_bytes()).into_owned(),
        );
    }
    let latency = inner.latency_us.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_micros(latency)).await;
    }
    let response = respond(&inner, &parts.method, &path, &headers, &body);
    if !inner.skip_records.load(Ordering::Relaxed) {
        let body = if inner.skip_bodies.load(Ordering::Relaxed) {
            Vec::new()
        } else {
            body.to_vec()
        };
        let record = Recorded {
            method: parts.method.as_str().to_owned(),
            path,
            query: parts.uri.query().map(str::to_owned),
            version: parts.version,
            headers,
            body,
            received,
        };
        guard(&inner.records).push(record);
    }
    response
}

fn respond(
    inner: &Inner,
    method: &Method,
    path: &str,
    headers: &BTreeMap<String, String>,
    body: &[u8],
) -> Response {
    {
        let mut scripts = guard(&inner.scripts);
        if let Some(position) = scripts
            .iter()
            .position(|script| path.starts_with(&script.prefix))
        {
            let script = &mut scripts[position];
            let response = answer(script.status, script.body.clone(), &script.headers);
            script.remaining = script.remaining.saturating_sub(1);
            if script.remaining == 0 {
                scripts.remove(position);
            }
            return response;
        }
    }
    if guard(&inner.down)
        .iter()
        .any(|prefix| path.starts_with(prefix))
    {
        return answer(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"error":"service unavailable"}"#.to_owned(),
            &[],
        );
    }
    if method != Method::POST {
        return answer(StatusCode::METHOD_NOT_ALLOWED, String::new(), &[]);
    }
    let n = inner.sequence.fetch_add(1, Ordering::Relaxed) + 1;
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let authorized = headers.contains_key("authorization");
    match segments.as_slice() {
        ["token"] => json_answer(
            StatusCode::OK,
            json!({ "access_token": format!("fake-access-token-{n}"), "expires_in": 3599, "token_type": "Bearer" }),
        ),
        ["v1", "projects", project, last] if *last == "messages:send" => {
            if !authorized {
                return json_answer(
                    StatusCode::UNAUTHORIZED,
                    json!({ "error": { "code": 401, "message": "Request is missing required authentication credential.", "status": "UNAUTHENTICATED" } }),
                );
            }
            json_answer(
                StatusCode::OK,
                json!({ "name": format!("projects/{project}/messages/0:{n}%fake") }),
            )
        }
        ["3", "device", _token] => {
            if !authorized {
                return json_answer(
                    StatusCode::FORBIDDEN,
                    json!({ "reason": "MissingProviderToken" }),
                );
            }
            let id = headers
                .get("apns-id")
                .cloned()
                .unwrap_or_else(|| uuid::Uuid::new_v4().hyphenated().to_string().to_uppercase());
            let mut response = answer(StatusCode::OK, String::new(), &[]);
            if let Ok(value) = HeaderValue::from_str(&id) {
                response.headers_mut().insert("apns-id", value);
            }
            if let Ok(value) = HeaderValue::from_str(&uuid::Uuid::new_v4().hyphenated().to_string())
            {
                response.headers_mut().insert("apns-unique-id", value);
            }
            response
        }
        ["2010-04-01", "Accounts", sid, "Messages.json"] => {
            if !authorized {
                return json_answer(
                    StatusCode::UNAUTHORIZED,
                    json!({ "code": 20003, "message": "Authenticate", "more_info": "https://www.twilio.com/docs/errors/20003", "status": 401 }),
                );
            }
            let form = form_pairs(body);
            let field = |name: &str| {
                form.iter()
                    .find(|(key, _)| key == name)
                    .map(|(_, value)| value.clone())
            };
            json_answer(
                StatusCode::CREATED,
                json!({
                    "account_sid": sid,
                    "api_version": "2010-04-01",
                    "body": field("Body"),
                    "direction": "outbound-api",
                    "from": field("From"),
                    "messaging_service_sid": field("MessagingServiceSid"),
                    "num_segments": "1",
                    "sid": format!("SM{n:032x}"),
                    "status": "queued",
                    "to": field("To"),
                    "uri": format!("/2010-04-01/Accounts/{sid}/Messages/SM{n:032x}.json"),
                }),
            )
        }
        [_version, _phone, "messages"] => {
            if !authorized {
                return json_answer(
                    StatusCode::UNAUTHORIZED,
                    json!({ "error": { "message": "Invalid OAuth access token.", "type": "OAuthException", "code": 190, "fbtrace_id": "fake" } }),
                );
            }
            let to = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|value| value.get("to").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_default();
            json_answer(
                StatusCode::OK,
                json!({
                    "messaging_product": "whatsapp",
                    "contacts": [{ "input": to, "wa_id": to }],
                    "messages": [{ "id": format!("wamid.FAKE{n:020}"), "message_status": "accepted" }],
                }),
            )
        }
        [first, ..] if first.starts_with("webhook") => {
            json_answer(StatusCode::OK, json!({ "ok": true }))
        }
        _ => answer(
            StatusCode::NOT_FOUND,
            format!("no fake provider at {path}"),
            &[],
        ),
    }
}

fn answer(status: StatusCode, body: String, headers: &[(String, String)]) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

fn json_answer(status: StatusCode, body: Value) -> Response {
    let mut response = answer(status, body.to_string(), &[]);
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    response
}

/// Decodes an `application/x-www-form-urlencoded` body.
fn form_pairs(body: &[u8]) -> Vec<(String, String)> {
    let Ok(mut url) = reqwest::Url::parse("http://fake/") else {
        return Vec::new();
    };
    url.set_query(Some(&String::from_utf8_lossy(body)));
    url.query_pairs()
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect()
}

// --- SMTP -------------------------------------------------------------------------------

/// The aiosmtpd handler: stores every message as `NNNNNN.eml` in the directory given, and
/// refuses some recipients so tests can check how refusals are classified.
const HANDLER: &str = r#"
import os


class Handler:
    def __init__(self, directory):
        self.directory = directory
        self.count = 0

    @classmethod
    def from_cli(cls, parser, *args):
        return cls(args[0])

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split('@')[0].lower()
        if local.startswith('bounce'):
            return '550 5.1.1 <%s>: Recipient address rejected: User unknown' % address
        if local.startswith('busy'):
            return '451 4.3.0 Temporary failure, try again later'
        if local.startswith('policy'):
            return '554 5.7.1 Message rejected by policy'
        envelope.rcpt_tos.append(address)
        return '250 OK'

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        path = os.path.join(self.directory, '%06d.eml' % self.count)
        content = envelope.original_content or envelope.content
        if isinstance(content, str):
            content = content.encode('utf-8')
        with open(path + '.tmp', 'wb') as out:
            out.write(content)
        os.rename(path + '.tmp', path)
        return '250 2.0.0 Ok: queued as FAKE%06d' % self.count
"#;

/// A real SMTP server (aiosmtpd) for tests, stopped on drop. Recipients whose local part
/// starts with `bounce` are refused with 550, `busy` with 451, `policy` with 554.
pub struct SmtpSink {
    port: u16,
    /// The handler script, the log and `mail/`.
    root: PathBuf,
    /// One `.eml` file per message received.
    directory: PathBuf,
    child: Option<tokio::process::Child>,
}

impl std::fmt::Debug for SmtpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSink")
            .field("port", &self.port)
            .finish()
    }
}

impl SmtpSink {
    /// The port it listens on, at 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every message received, as raw RFC 5322 text, in arrival order.
    pub fn messages(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.directory) else {
            return Vec::new();
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "eml"))
            .collect();
        paths.sort();
        let mut messages = Vec::new();
        for path in paths {
            if let Ok(bytes) = std::fs::read(&path) {
                messages.push(String::from_utf8_lossy(&bytes).into_owned());
            }
        }
        messages
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Starts aiosmtpd on 127.0.0.1 and a free port, installing it with pip when it is missing,
/// and waits until it accepts connections.
pub async fn start_smtp_server() -> anyhow::Result<SmtpSink> {
    let present = tokio::process::Command::new("python3")
        .args(["-c", "import aiosmtpd"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .context("running python3")?;
    if !present.success() {
        tracing::info!("installing aiosmtpd with pip");
        let mut installed = tokio::process::Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "aiosmtpd"])
            .status()
            .await
            .context("running pip")?;
        if !installed.success() {
            // Debian's own python3 refuses system-wide installs unless told.
            installed = tokio::process::Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--break-system-packages",
                    "aiosmtpd",
                ])
                .status()
                .await
                .context("running pip")?;
        }
        if !installed.success() {
            anyhow::bail!("python3 -m pip install aiosmtpd failed ({installed})");
        }
    }
    let directory =
        std::env::temp_dir().join(format!("relance-smtp-{}", uuid::Uuid::new_v4().simple()));
    let mail = directory.join("mail");
    std::fs::create_dir_all(&mail).context("creating the smtp sink's directory")?;
    std::fs::write(directory.join("relance_sink.py"), HANDLER)
        .context("writing the smtp handler")?;
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
        probe.local_addr()?.port()
    };
    let log =
        std::fs::File::create(directory.join("aiosmtpd.log")).context("creating the smtp log")?;
    let mut child = tokio::process::Command::new("python3")
        .args([
            "-m",
            "aiosmtpd",
            "-n",
            "-l",
            &format!("127.0.0.1:{port}"),
            "-c",
            "relance_sink.Handler",
        ])
        .arg(&mail)
        .env("PYTHONPATH", &directory)
        .stdout(std::process::Stdio::null())
        // A file, not a pipe: nobody reads a pipe while the server runs, and a full one
        // would block it.
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting aiosmtpd")?;
    let started = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        if let Some(status) = child.try_wait()? {
            let stderr =
                std::fs::read_to_string(directory.join("aiosmtpd.log")).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&directory);
            anyhow::bail!("aiosmtpd exited ({status}): {stderr}");
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.start_kill();
            let _ = std::fs::remove_dir_all(&directory);
            anyhow::bail!("aiosmtpd did not listen on port {port} within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(SmtpSink {
        port,
        root: directory,
        directory: mail,
        child: Some(child),
    })
}
