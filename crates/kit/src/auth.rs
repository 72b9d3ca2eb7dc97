//! API keys per workspace, with scopes, checked for every RPC by a tower layer.
//!
//! A key looks like `rlk_<40 random characters>`; only its SHA-256 is stored. The layer reads
//! it from `authorization: Bearer <key>` or `x-api-key: <key>`, finds its workspace and
//! scopes (cached for a short while), refuses the call when the method needs a scope the
//! key lacks, and hands the [`Caller`] to the handler through the request extensions.
//! Handlers take the workspace from the caller only, so a key can never reach another
//! workspace's data.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rand::Rng as _;
use rand::distr::Alphanumeric;
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;

use crate::error::{ApiError, ApiResult};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Send events and read recommendations: safe to embed in a shop's front end or app.
    Ingest,
    /// Everything else: profiles, segments, flows, reports. Implies `Ingest`.
    Admin,
}

impl Scope {
    /// The scope's name as stored and typed on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Admin => "admin",
        }
    }

    /// Parses `ingest` or `admin`.
    pub fn parse(name: &str) -> Option<Scope> {
        match name {
            "ingest" => Some(Scope::Ingest),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// Who is calling: the workspace and scopes of the key the request carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The workspace every read and write of this call is confined to.
    pub workspace_id: String,
    /// The key's scopes.
    pub scopes: Vec<Scope>,
}

impl Caller {
    /// Whether the key grants `scope` (admin grants everything).
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin)
    }
}

/// The caller of a request that went through [`AuthLayer`].
pub fn caller<T>(request: &tonic::Request<T>) -> ApiResult<Caller> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| ApiError::Unauthenticated("missing API key".into()))
}

/// The scope a gRPC method needs; `None` for the public health and reflection services.
pub fn required_scope(path: &str) -> Option<Scope> {
    const PUBLIC: &[&str] = &["/grpc.health.v1.Health/", "/grpc.reflection."];
    const INGEST: &[&str] = &[
        "/relance.v1.Events/Track",
        "/relance.v1.Events/TrackBatch",
        "/relance.v1.Events/Import",
        "/relance.v1.Recommendations/Recommend",
        "/relance.v1.Recommendations/SimilarItems",
        "/relance.v1.Recommendations/Ping",
        "/relance.v1.Delivery/ListInbox",
        "/relance.v1.Delivery/MarkRead",
        "/relance.v1.Delivery/WatchInbox",
    ];
    if PUBLIC.iter().any(|prefix| path.starts_with(prefix)) {
        return None;
    }
    if INGEST.contains(&path) {
        return Some(Scope::Ingest);
    }
    Some(Scope::Admin)
}

/// SHA-256 of a key, as stored.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The stored keys, with a short-lived cache in front so that the hot path does not wait
/// on Postgres for every call.
#[derive(Debug)]
pub struct KeyStore {
    pool: PgPool,
    cache: RwLock<HashMap<String, (Option<Caller>, Instant)>>,
    ttl: Duration,
    internal_key_hash: Option<[u8; 32]>,
}

/// Header carrying the deployment's internal key on calls between services.
pub const INTERNAL_KEY_HEADER: &str = "x-relance-internal-key";
/// Header naming the workspace an internal call acts for.
pub const INTERNAL_WORKSPACE_HEADER: &str = "x-relance-workspace";

/// How long a looked-up key is trusted before asking Postgres again (a revoked key stops
/// working within this time).
const KEY_CACHE_TTL: Duration = Duration::from_secs(30);

impl KeyStore {
    /// A store over the `auth` schema's pool.
    pub fn new(pool: PgPool) -> KeyStore {
        KeyStore {
            pool,
            cache: RwLock::new(HashMap::new()),
            ttl: KEY_CACHE_TTL,
            internal_key_hash: None,
        }
    }

    /// Also accepts calls between services that carry `internal_key` (in
    /// [`INTERNAL_KEY_HEADER`]) and name their workspace (in [`INTERNAL_WORKSPACE_HEADER`]):
    /// a service acting on a message of the bus has a workspace id but no workspace key.
    pub fn with_internal_key(mut self, internal_key: &str) -> KeyStore {
        self.internal_key_hash = Some(Sha256::digest(internal_key.as_bytes()).into());
        self
    }

    /// The caller of an internal call, when the headers carry the internal key.
    fn internal_caller(&self, headers: &http::HeaderMap) -> Option<ApiResult<Caller>> {
        let expected = self.internal_key_hash?;
        let key = headers.get(INTERNAL_KEY_HEADER)?.to_str().ok()?;
        // Comparing digests keeps the comparison's time independent of the key's content.
        let given: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        if given != expected {
            return Some(Err(ApiError::Unauthenticated(
                "invalid internal key".into(),
            )));
        }
        let workspace = headers
            .get(INTERNAL_WORKSPACE_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if let Err(error) = validate_workspace_id(workspace) {
            return Some(Err(error));
        }
        Some(Ok(Caller {
            workspace_id: workspace.to_owned(),
            scopes: vec![Scope::Admin],
        }))
    }

    /// Creates a key for `workspace_id` (creating the workspace if new) and returns it; it is
    /// shown once and cannot be read back.
    pub async fn create_key(
        &self,
        workspace_id: &str,
        scopes: &[Scope],
        name: &str,
    ) -> ApiResult<String> {
        validate_workspace_id(workspace_id)?;
        if scopes.is_empty() {
            return Err(ApiError::invalid(
                "scopes",
                "at least one scope is required",
            ));
        }
        let random: String = rand::rng()
            .sample_iter(&Alphanumeric)
            .take(40)
            .map(char::from)
            .collect();
        let key = format!("rlk_{random}");
        let scope_names: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO workspaces (id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(workspace_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO api_keys (key_hash, key_prefix, workspace_id, scopes, name) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(hash_key(&key))
        .bind(&key[..8])
        .bind(workspace_id)
        .bind(&scope_names)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(key)
    }

    /// Revokes every key of `workspace_id` whose prefix is `key_prefix`; returns how many.
    pub async fn revoke(&self, workspace_id: &str, key_prefix: &str) -> ApiResult<u64> {
        let done = sqlx::query(
            "UPDATE api_keys SET revoked_at = now() WHERE workspace_id = $1 AND key_prefix = $2 AND revoked_at IS NULL",
        )
        .bind(workspace_id)
        .bind(key_prefix)
        .execute(&self.pool)
        .await?;
        self.cache
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        Ok(done.rows_affected())
    }

    /// The caller a key stands for, or `None` for an unknown or revoked key.
    pub async fn resolve(&self, key: &str) -> ApiResult<Option<Caller>> {
        let hash = hash_key(key);
        if let Some((caller, at)) = self
            .cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&hash)
            && at.elapsed() < self.ttl
        {
            return Ok(caller.clone());
        }
        let row: Option<(String, Vec<String>)> = sqlx::query_as(
            "SELECT workspace_id, scopes FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        )
        .bind(&hash)
        .fetch_optional(&self.pool)
        .await?;
        let caller = row.map(|(workspace_id, scopes)| Caller {
            workspace_id,
            scopes: scopes.iter().filter_map(|s| Scope::parse(s)).collect(),
        });
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(hash, (caller.clone(), Instant::now()));
        Ok(caller)
    }
}

/// A workspace id is a slug: 1–64 of `a-z 0-9 - _`, starting with a letter or digit.
pub fn validate_workspace_id(id: &str) -> ApiResult<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "workspace",
            "must be 1-64 of a-z 0-9 - _",
        ))
    }
}

fn key_from_headers(headers: &http::HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(value.trim());
    }
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(str::trim)
}

/// The tower layer that authenticates every gRPC call.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    keys: Arc<KeyStore>,
}

impl AuthLayer {
    /// A layer checking keys against `keys`.
    pub fn new(keys: Arc<KeyStore>) -> AuthLayer {
        AuthLayer { keys }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            keys: self.keys.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    keys: Arc<KeyStore>,
}

impl<S, B> tower_service::Service<http::Request<B>> for Auth<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The ready inner service goes into the future; a fresh clone stays for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let keys = self.keys.clone();
        Box::pin(async move {
            let Some(scope) = required_scope(request.uri().path()) else {
                return inner.call(request).await;
            };
            match keys.internal_caller(request.headers()) {
                Some(Ok(caller)) => {
                    request.extensions_mut().insert(caller);
                    return inner.call(request).await;
                }
                Some(Err(error)) => return Ok(refuse(error)),
                None => {}
            }
            let Some(key) = key_from_headers(request.headers()).map(str::to_owned) else {
                return Ok(refuse(ApiError::Unauthenticated(
                    "missing API key: send `authorization: Bearer <key>`".into(),
                )));
            };
            let caller = match keys.resolve(&key).await {
                Ok(Some(caller)) => caller,
                Ok(None) => return Ok(refuse(ApiError::Unauthenticated("invalid API key".into()))),
                Err(error) => return Ok(refuse(error)),
            };
            if !caller.has(scope) {
                return Ok(refuse(ApiError::PermissionDenied(format!(
                    "this API key lacks the `{}` scope",
                    scope.as_str()
                ))));
            }
            request.extensions_mut().insert(caller);
            inner.call(request).await
        })
    }
}

/// The client side of a call between services: the deployment's internal key and the
/// workspace the call acts for (`ProfilesClient::with_interceptor(channel, key.clone())`, then
/// [`InternalKey::request`] per call).
#[derive(Clone)]
pub struct InternalKey(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl std::fmt::Debug for InternalKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InternalKey(..)")
    }
}

impl InternalKey {
    /// Fails when the key holds characters a header cannot carry.
    pub fn new(key: &str) -> ApiResult<InternalKey> {
        key.parse()
            .map(InternalKey)
            .map_err(|_| ApiError::invalid("internal_key", "not a valid header value"))
    }

    /// A request acting for `workspace`, carrying the internal key and the current span's
    /// trace context (so the callee's span joins the caller's trace).
    pub fn request<T>(&self, workspace: &str, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert(INTERNAL_KEY_HEADER, self.0.clone());
        if let Ok(value) = workspace.parse() {
            request
                .metadata_mut()
                .insert(INTERNAL_WORKSPACE_HEADER, value);
        }
        if let Some(value) = crate::trace::current().and_then(|t| t.parse().ok()) {
            request
                .metadata_mut()
                .insert(crate::trace::TRACEPARENT, value);
        }
        request
    }
}

/// The client side: adds `authorization: Bearer <key>` to every call of a tonic client
/// (`EventsClient::with_interceptor(channel, BearerKey::new(key)?)`).
#[derive(Debug, Clone)]
pub struct BearerKey(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl BearerKey {
    /// Fails when the key holds characters a header cannot carry.
    pub fn new(key: &str) -> ApiResult<BearerKey> {
        format!("Bearer {key}")
            .parse()
            .map(BearerKey)
            .map_err(|_| ApiError::invalid("api_key", "not a valid key"))
    }
}

impl tonic::service::Interceptor for BearerKey {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

fn refuse(error: ApiError) -> http::Response<tonic::body::Body> {
    tonic::Status::from(error).into_http()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_per_method() {
        assert_eq!(
            required_scope("/relance.v1.Events/Track"),
            Some(Scope::Ingest)
        );
        assert_eq!(
            required_scope("/relance.v1.Events/Query"),
            Some(Scope::Admin)
        );
        assert_eq!(
            required_scope("/relance.v1.Profiles/Get"),
            Some(Scope::Admin)
        );
        assert_eq!(required_scope("/grpc.health.v1.Health/Check"), None);
    }

    #[test]
    fn admin_implies_ingest() {
        let caller = Caller {
            workspace_id: "w".into(),
            scopes: vec![Scope::Admin],
        };
        assert!(caller.has(Scope::Ingest));
        let caller = Caller {
            workspace_id: "w".into(),
            scopes: vec![Scope::Ingest],
        };
        assert!(!caller.has(Scope::Admin));
    }

    #[test]
    fn keys_come_from_either_header() {
        let mut headers = http::HeaderMap::new();
        headers.insert("authorization", "Bearer rlk_abc".parse().expect("header"));
        assert_eq!(key_from_headers(&headers), Some("rlk_abc"));
        let mut headers = http::HeaderMap::new();
        headers.insert("x-api-key", "rlk_def".parse().expect("header"));
        assert_eq!(key_from_headers(&headers), Some("rlk_def"));
    }

    #[test]
    fn workspace_ids_are_slugs() {
        assert!(validate_workspace_id("acme-dz").is_ok());
        assert!(validate_workspace_id("").is_err());
        assert!(validate_workspace_id("Acme").is_err());
        assert!(validate_workspace_id("-x").is_err());
    }
}
