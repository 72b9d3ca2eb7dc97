//! The `Recommendations` gRPC service: validates and translates between the proto and the
//! domain; the store and the serving snapshots do the rest.

use std::cell::RefCell;
use std::sync::Arc;

use relance_kit::{ApiError, ApiResult, SharedClock, auth};
use relance_proto::convert::{
    chrono_to_timestamp, json_to_struct, struct_to_json, timestamp_to_chrono,
};
use relance_proto::v1::recommendations_server::Recommendations;
use relance_proto::v1::{self as pb, customer_ref};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::RecommendationsConfig;
use crate::domain::catalog::{self, Item};
use crate::domain::model::Snapshot;
use crate::domain::serve::{self, Filter, Pick, Placement, Reason, Scratch};
use crate::domain::train::ModelKind;
use crate::serving::Serving;
use crate::store::history::{History, PersonKey};
use crate::store::{Impression, ModelRecord, RecoStore, StoredItem};
use crate::training::{self, TrainJob};

/// Largest `n`.
pub const MAX_N: u32 = 50;
const DEFAULT_N: u32 = 5;
const MAX_CONTEXT: usize = 50;
const MAX_EXCLUDE: usize = 500;
const MAX_FILTER_VALUES: usize = 50;
const MAX_UPSERT: usize = 1_000;
const MAX_GET: usize = 500;

thread_local! {
    /// Per-thread scoring buffers: a request runs on one thread without awaiting while it
    /// scores, so they are never shared.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// The gRPC face of the recommendations service.
#[derive(Debug, Clone)]
pub struct RecommendationsApi {
    pub store: RecoStore,
    pub history: History,
    pub serving: Arc<Serving>,
    pub clock: SharedClock,
    pub config: Arc<RecommendationsConfig>,
    pub impressions: mpsc::Sender<Impression>,
}

fn placement_of(value: i32) -> ApiResult<Placement> {
    let placement = pb::Placement::try_from(value)
        .map_err(|_| ApiError::invalid("placement", format!("{value} is not a placement")))?;
    Ok(match placement {
        pb::Placement::Unspecified => {
            return Err(ApiError::invalid(
                "placement",
                "is required (home, product, cart, checkout, category, email, push, in_app, whatsapp)",
            ));
        }
        pb::Placement::Home => Placement::Home,
        pb::Placement::Product => Placement::Product,
        pb::Placement::Cart => Placement::Cart,
        pb::Placement::Checkout => Placement::Checkout,
        pb::Placement::Category => Placement::Category,
        pb::Placement::Email => Placement::Email,
        pb::Placement::Push => Placement::Push,
        pb::Placement::InApp => Placement::InApp,
        pb::Placement::Whatsapp => Placement::WhatsApp,
    })
}

fn reason_to_proto(reason: Reason) -> pb::RecommendationReason {
    match reason {
        Reason::BoughtTogether => pb::RecommendationReason::BoughtTogether,
        Reason::Personal => pb::RecommendationReason::Personal,
        Reason::Trending => pb::RecommendationReason::Trending,
        Reason::Explore => pb::RecommendationReason::Explore,
        Reason::Fallback => pb::RecommendationReason::Fallback,
        Reason::Similar => pb::RecommendationReason::Similar,
    }
}

fn n_of(n: u32) -> ApiResult<usize> {
    if n > MAX_N {
        return Err(ApiError::invalid(
            "n",
            format!("must be at most {MAX_N} (0 means {DEFAULT_N})"),
        ));
    }
    Ok(if n == 0 { DEFAULT_N } else { n } as usize)
}

fn person_of(customer: Option<pb::CustomerRef>) -> ApiResult<Option<PersonKey>> {
    let Some(id) = customer.and_then(|c| c.id) else {
        return Ok(None);
    };
    let (field, id, person) = match id {
        customer_ref::Id::CustomerId(id) => {
            ("customer.customer_id", id.clone(), PersonKey::Customer(id))
        }
        customer_ref::Id::AnonymousId(id) => {
            ("customer.anonymous_id", id.clone(), PersonKey::Visitor(id))
        }
    };
    catalog::check_id(field, &id)?;
    Ok(Some(person))
}

/// Checks every id of a list, naming the offending one by its index (`ids[3]`).
fn check_ids(field: &str, ids: &[String]) -> ApiResult<()> {
    for (index, id) in ids.iter().enumerate() {
        catalog::check_id(&format!("{field}[{index}]"), id)?;
    }
    Ok(())
}

fn filter_of(filter: Option<pb::RecommendationFilter>) -> ApiResult<Filter> {
    let Some(filter) = filter else {
        return Ok(Filter::default());
    };
    if filter.categories.len() > MAX_FILTER_VALUES {
        return Err(ApiError::invalid(
            "filter.categories",
            format!("at most {MAX_FILTER_VALUES}"),
        ));
    }
    if filter.brands.len() > MAX_FILTER_VALUES {
        return Err(ApiError::invalid(
            "filter.brands",
            format!("at most {MAX_FILTER_VALUES}"),
        ));
    }
    if filter.exclude_item_ids.len() > MAX_EXCLUDE {
        return Err(ApiError::invalid(
            "filter.exclude_item_ids",
            format!("at most {MAX_EXCLUDE} ids"),
        ));
    }
    let mut categories = Vec::with_capacity(filter.categories.len());
    for (index, category) in filter.categories.iter().enumerate() {
        let path: Vec<String> = category.split(" > ").map(|l| l.trim().to_owned()).collect();
        if path.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                format!("filter.categories[{index}]"),
                "must be a category path such as `Home > Kitchen`",
            ));
        }
        categories.push(path);
    }
    for (field, price) in [
        ("filter.min_price", filter.min_price),
        ("filter.max_price", filter.max_price),
    ] {
        if let Some(price) = price
            && (!price.is_finite() || price < 0.0)
        {
            return Err(ApiError::invalid(field, "must be a number ≥ 0"));
        }
    }
    if let (Some(min), Some(max)) = (filter.min_price, filter.max_price)
        && min > max
    {
        return Err(ApiError::invalid(
            "filter.min_price",
            "must not be above filter.max_price",
        ));
    }
    check_ids("filter.exclude_item_ids", &filter.exclude_item_ids)?;
    Ok(Filter {
        categories,
        brands: filter.brands,
        min_price: filter.min_price,
        max_price: filter.max_price,
        in_stock_only: filter.in_stock_only,
        exclude: filter.exclude_item_ids,
        max_per_category: filter.max_per_category as usize,
    })
}

fn item_to_proto(stored: StoredItem) -> pb::CatalogItem {
    let item = stored.item;
    pb::CatalogItem {
        id: item.id,
        title: item.title,
        category_path: item.category_path,
        brand: item.brand,
        price: item.price,
        currency: item.currency,
        in_stock: item.in_stock,
        stock: item.stock.map(|s| s as u64),
        tags: item.tags,
        created_at: Some(chrono_to_timestamp(stored.created_at)),
        url: item.url,
        image_url: item.image_url,
        replenishable: item.replenishable,
        attributes: Some(json_to_struct(&item.attributes)),
        updated_at: Some(chrono_to_timestamp(stored.updated_at)),
    }
}

fn item_from_proto(item: pb::CatalogItem, index: usize) -> ApiResult<Item> {
    let prefix = format!("items[{index}]");
    let created_at = match &item.created_at {
        Some(ts) => Some(timestamp_to_chrono(ts).ok_or_else(|| {
            ApiError::invalid(format!("{prefix}.created_at"), "is not a valid time")
        })?),
        None => None,
    };
    let stock = match item.stock {
        Some(stock) if stock > i64::MAX as u64 => {
            return Err(ApiError::invalid(format!("{prefix}.stock"), "is too large"));
        }
        other => other.map(|s| s as i64),
    };
    let item = Item {
        id: item.id,
        title: item.title,
        category_path: item.category_path,
        brand: item.brand,
        price: item.price,
        currency: item.currency,
        in_stock: item.in_stock,
        stock,
        tags: item.tags,
        created_at,
        url: item.url,
        image_url: item.image_url,
        replenishable: item.replenishable,
        attributes: item
            .attributes
            .as_ref()
            .map(struct_to_json)
            .unwrap_or_else(|| serde_json::json!({})),
    };
    item.validate(&prefix)?;
    Ok(item)
}

fn kind_to_proto(name: &str) -> i32 {
    match ModelKind::parse(name) {
        Some(ModelKind::Popularity) => pb::ModelKind::Popularity as i32,
        Some(ModelKind::Trending) => pb::ModelKind::Trending as i32,
        Some(ModelKind::BoughtTogether) => pb::ModelKind::BoughtTogether as i32,
        Some(ModelKind::Personal) => pb::ModelKind::Personal as i32,
        None => pb::ModelKind::Unspecified as i32,
    }
}

fn model_to_proto(record: &ModelRecord) -> pb::ModelVersion {
    let mut metrics = std::collections::HashMap::new();
    if let Some(object) = record.metrics.as_object() {
        for (name, value) in object {
            if let Some(value) = value.as_f64() {
                metrics.insert(name.clone(), value);
            }
        }
    }
    pb::ModelVersion {
        version: record.version as u64,
        kinds: record.kinds.iter().map(|k| kind_to_proto(k)).collect(),
        trained_at: Some(chrono_to_timestamp(record.trained_at)),
        training_time: Some(prost_types::Duration {
            seconds: record.training_ms / 1000,
            nanos: ((record.training_ms % 1000) * 1_000_000) as i32,
        }),
        data_until: Some(chrono_to_timestamp(record.data_until)),
        item_count: record.item_count as u64,
        customer_count: record.customer_count as u64,
        interaction_count: record.interaction_count as u64,
        algorithm: record.algorithm.clone(),
        memory_bytes: record.memory_bytes as u64,
        metrics,
    }
}

impl RecommendationsApi {
    /// Picks to proto items, with catalog details when asked.
    async fn answer(
        &self,
        workspace_id: &str,
        snapshot: &Snapshot,
        picks: &[Pick],
        include_details: bool,
    ) -> ApiResult<Vec<pb::RecommendedItem>> {
        let mut details: std::collections::HashMap<String, StoredItem> = Default::default();
        if include_details && !picks.is_empty() {
            let ids: Vec<String> = picks
                .iter()
                .map(|p| snapshot.ids[p.item as usize].clone())
                .collect();
            for stored in self.store.get_items(workspace_id, &ids).await? {
                details.insert(stored.item.id.clone(), stored);
            }
        }
        let mut items = Vec::with_capacity(picks.len());
        for pick in picks {
            let id = snapshot.ids[pick.item as usize].clone();
            let item = details.remove(&id).map(item_to_proto);
            items.push(pb::RecommendedItem {
                item_id: id,
                score: pick.score,
                reason: reason_to_proto(pick.reason) as i32,
                because_item_id: pick
                    .because
                    .map(|b| snapshot.ids[b as usize].clone())
                    .unwrap_or_default(),
                item,
            });
        }
        Ok(items)
    }

    /// Samples the answer into the impression log (never waits, never fails the request).
    fn log_impression(
        &self,
        workspace_id: &str,
        person: Option<&PersonKey>,
        placement: &str,
        model_version: u64,
        items: &[pb::RecommendedItem],
    ) -> (uuid::Uuid, bool) {
        let id = uuid::Uuid::new_v4();
        let rate = self.config.impression_sample_rate;
        // The id is random: its first bytes are a uniform draw.
        let draw = u32::from_be_bytes([
            id.as_bytes()[0],
            id.as_bytes()[1],
            id.as_bytes()[2],
            id.as_bytes()[3],
        ]) as f64
            / u32::MAX as f64;
        if rate <= 0.0 || draw >= rate {
            return (id, false);
        }
        let (customer_id, anonymous_id) = match person {
            Some(PersonKey::Customer(c)) => (Some(c.clone()), None),
            Some(PersonKey::Visitor(a)) => (None, Some(a.clone())),
            None => (None, None),
        };
        let impression = Impression {
            recommendation_id: id,
            workspace_id: workspace_id.to_owned(),
            customer_id,
            anonymous_id,
            placement: placement.to_owned(),
            model_version: model_version as i64,
            items: items.iter().map(|i| i.item_id.clone()).collect(),
            reasons: items
                .iter()
                .map(|i| {
                    pb::RecommendationReason::try_from(i.reason)
                        .map(|r| r.as_str_name().to_owned())
                        .unwrap_or_default()
                })
                .collect(),
            served_at: self.clock.now(),
        };
        match self.impressions.try_send(impression) {
            Ok(()) => (id, true),
            Err(_) => {
                metrics::counter!("relance_recommendations_impressions_dropped_total").increment(1);
                (id, false)
            }
        }
    }
}

#[tonic::async_trait]
impl Recommendations for RecommendationsApi {
    #[tracing::instrument(skip_all, fields(workspace))]
    async fn recommend(
        &self,
        request: Request<pb::RecommendRequest>,
    ) -> Result<Response<pb::RecommendResponse>, Status> {
        let caller = auth::caller(&request)?;
        tracing::Span::current().record("workspace", caller.workspace_id.as_str());
        let request = request.into_inner();
        let placement = placement_of(request.placement)?;
        let n = n_of(request.n)?;
        let person = person_of(request.customer)?;
        if request.context_item_ids.len() > MAX_CONTEXT {
            return Err(ApiError::invalid(
                "context_item_ids",
                format!("at most {MAX_CONTEXT} ids"),
            )
            .into());
        }
        check_ids("context_item_ids", &request.context_item_ids)?;
        let filter = filter_of(request.filter)?;
        let history = match &person {
            Some(person) => self.history.read(&caller.workspace_id, person).await,
            None => Vec::new(),
        };
        let served = self.serving.get(&caller.workspace_id);
        let empty = Snapshot::default();
        let snapshot = served.as_ref().map(|s| &s.snapshot).unwrap_or(&empty);
        let seed = request.seed.unwrap_or_else(rand::random);
        let domain_request = serve::Request {
            placement,
            history: &history,
            context: &request.context_item_ids,
            n,
            filter: &filter,
            seed,
            now: self.clock.now().timestamp(),
        };
        let blend = self.config.blend(placement);
        let picks = SCRATCH.with(|scratch| {
            serve::recommend(
                snapshot,
                &domain_request,
                &self.config.rules,
                &blend,
                &mut scratch.borrow_mut(),
            )
        });
        let items = self
            .answer(
                &caller.workspace_id,
                snapshot,
                &picks,
                request.include_details,
            )
            .await?;
        let (id, logged) = self.log_impression(
            &caller.workspace_id,
            person.as_ref(),
            placement.name(),
            snapshot.version,
            &items,
        );
        Ok(Response::new(pb::RecommendResponse {
            items,
            model_version: snapshot.version,
            recommendation_id: id.to_string(),
            logged,
        }))
    }

    #[tracing::instrument(skip_all, fields(workspace))]
    async fn similar_items(
        &self,
        request: Request<pb::SimilarItemsRequest>,
    ) -> Result<Response<pb::SimilarItemsResponse>, Status> {
        let caller = auth::caller(&request)?;
        tracing::Span::current().record("workspace", caller.workspace_id.as_str());
        let request = request.into_inner();
        catalog::check_id("item_id", &request.item_id)?;
        let n = n_of(request.n)?;
        let (together, alike) = match pb::SimilarityKind::try_from(request.kind) {
            Ok(pb::SimilarityKind::Unspecified) => (true, true),
            Ok(pb::SimilarityKind::BoughtTogether) => (true, false),
            Ok(pb::SimilarityKind::Similar) => (false, true),
            Err(_) => {
                return Err(ApiError::invalid(
                    "kind",
                    format!("{} is not a similarity kind", request.kind),
                )
                .into());
            }
        };
        let filter = filter_of(request.filter)?;
        let served = self.serving.get(&caller.workspace_id);
        let empty = Snapshot::default();
        let snapshot = served.as_ref().map(|s| &s.snapshot).unwrap_or(&empty);
        let picks = serve::similar(
            snapshot,
            &request.item_id,
            together,
            alike,
            n,
            &filter,
            &self.config.rules,
        );
        let items = self
            .answer(
                &caller.workspace_id,
                snapshot,
                &picks,
                request.include_details,
            )
            .await?;
        let (id, _) = self.log_impression(
            &caller.workspace_id,
            None,
            "similar",
            snapshot.version,
            &items,
        );
        Ok(Response::new(pb::SimilarItemsResponse {
            items,
            model_version: snapshot.version,
            recommendation_id: id.to_string(),
        }))
    }

    #[tracing::instrument(skip_all, fields(workspace, items))]
    async fn upsert_items(
        &self,
        request: Request<pb::UpsertItemsRequest>,
    ) -> Result<Response<pb::UpsertItemsResponse>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        tracing::Span::current()
            .record("workspace", caller.workspace_id.as_str())
            .record("items", request.items.len());
        if request.items.is_empty() || request.items.len() > MAX_UPSERT {
            return Err(ApiError::invalid("items", format!("1 to {MAX_UPSERT} items")).into());
        }
        let mut valid = Vec::with_capacity(request.items.len());
        let mut rejected = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (index, item) in request.items.into_iter().enumerate() {
            match item_from_proto(item, index) {
                Ok(item) if !seen.insert(item.id.clone()) => rejected.push(pb::ItemError {
                    index: index as u32,
                    field: format!("items[{index}].id"),
                    reason: "appears twice in the request".into(),
                }),
                Ok(item) => valid.push(item),
                Err(ApiError::InvalidArgument { field, reason }) => rejected.push(pb::ItemError {
                    index: index as u32,
                    field,
                    reason,
                }),
                Err(other) => return Err(other.into()),
            }
        }
        let (accepted, created) = self
            .store
            .upsert_items(&caller.workspace_id, &valid, self.clock.now())
            .await?;
        self.serving.refresh(&self.store, self.clock.now()).await?;
        Ok(Response::new(pb::UpsertItemsResponse {
            accepted,
            created,
            rejected,
        }))
    }

    async fn get_items(
        &self,
        request: Request<pb::GetItemsRequest>,
    ) -> Result<Response<pb::GetItemsResponse>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        if request.ids.is_empty() || request.ids.len() > MAX_GET {
            return Err(ApiError::invalid("ids", format!("1 to {MAX_GET} ids")).into());
        }
        check_ids("ids", &request.ids)?;
        let mut found: std::collections::HashMap<String, StoredItem> = self
            .store
            .get_items(&caller.workspace_id, &request.ids)
            .await?
            .into_iter()
            .map(|s| (s.item.id.clone(), s))
            .collect();
        let mut items = Vec::new();
        let mut not_found = Vec::new();
        for id in request.ids {
            match found.remove(&id) {
                Some(stored) => items.push(item_to_proto(stored)),
                None => not_found.push(id),
            }
        }
        Ok(Response::new(pb::GetItemsResponse { items, not_found }))
    }

    async fn delete_items(
        &self,
        request: Request<pb::DeleteItemsRequest>,
    ) -> Result<Response<pb::DeleteItemsResponse>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        if request.ids.is_empty() || request.ids.len() > MAX_UPSERT {
            return Err(ApiError::invalid("ids", format!("1 to {MAX_UPSERT} ids")).into());
        }
        check_ids("ids", &request.ids)?;
        let deleted = self
            .store
            .delete_items(&caller.workspace_id, &request.ids, self.clock.now())
            .await?;
        self.serving.refresh(&self.store, self.clock.now()).await?;
        let not_found = request
            .ids
            .into_iter()
            .filter(|id| !deleted.contains(id))
            .collect();
        Ok(Response::new(pb::DeleteItemsResponse {
            deleted: deleted.len() as u32,
            not_found,
        }))
    }

    #[tracing::instrument(skip_all, fields(workspace))]
    async fn train(
        &self,
        request: Request<pb::TrainRequest>,
    ) -> Result<Response<pb::TrainResponse>, Status> {
        let caller = auth::caller(&request)?;
        tracing::Span::current().record("workspace", caller.workspace_id.as_str());
        let request = request.into_inner();
        let mut kinds = Vec::new();
        for (index, kind) in request.kinds.iter().enumerate() {
            let kind = match pb::ModelKind::try_from(*kind) {
                Ok(pb::ModelKind::Popularity) => ModelKind::Popularity,
                Ok(pb::ModelKind::Trending) => ModelKind::Trending,
                Ok(pb::ModelKind::BoughtTogether) => ModelKind::BoughtTogether,
                Ok(pb::ModelKind::Personal) => ModelKind::Personal,
                _ => {
                    return Err(ApiError::invalid(
                        format!("kinds[{index}]"),
                        "must be popularity, trending, bought_together or personal",
                    )
                    .into());
                }
            };
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        let lookback_days = match &request.lookback {
            Some(duration) if duration.seconds <= 0 => {
                return Err(ApiError::invalid("lookback", "must be positive").into());
            }
            Some(duration) => duration.seconds as f64 / 86_400.0,
            None => 365.0,
        };
        let cutoff = match &request.cutoff {
            Some(ts) => Some(
                timestamp_to_chrono(ts)
                    .ok_or_else(|| ApiError::invalid("cutoff", "is not a valid time"))?,
            ),
            None => None,
        };
        let options = match &request.options {
            Some(options) => training::parse_options(&struct_to_json(options), &self.config.train)?,
            None => self.config.train.clone(),
        };
        let job = TrainJob {
            workspace_id: caller.workspace_id.clone(),
            kinds,
            lookback_days,
            cutoff,
            options,
            keep_current: request.keep_current,
            seed_history: false,
        };
        // Training goes on when the caller gives up waiting (its deadline passes).
        let (store, history, serving, now) = (
            self.store.clone(),
            self.history.clone(),
            self.serving.clone(),
            self.clock.now(),
        );
        let outcome =
            tokio::spawn(async move { training::run(&store, &history, &serving, job, now).await })
                .await
                .map_err(|e| ApiError::Internal(e.into()))??;
        if outcome.activated {
            self.serving.refresh(&self.store, self.clock.now()).await?;
        }
        Ok(Response::new(pb::TrainResponse {
            model: Some(model_to_proto(&outcome.record)),
            activated: outcome.activated,
        }))
    }

    async fn model_info(
        &self,
        request: Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        if request.history > 20 {
            return Err(ApiError::invalid("history", "must be at most 20").into());
        }
        let workspace = &caller.workspace_id;
        let mut response = pb::ModelInfoResponse {
            training: self.store.training_running(workspace).await?,
            ..Default::default()
        };
        if let Some(current) = self.store.current(workspace).await? {
            if let Some(record) = self.store.model_record(workspace, current.version).await? {
                response.current = Some(model_to_proto(&record));
            }
            let mut below = current.version;
            if let Some(previous) = current.previous
                && let Some(record) = self.store.model_record(workspace, previous).await?
            {
                response.previous = Some(model_to_proto(&record));
                below = below.min(previous);
            }
            if request.history > 0 {
                for record in self
                    .store
                    .older_models(workspace, below, request.history as i64)
                    .await?
                {
                    if Some(record.version) != current.previous {
                        response.history.push(model_to_proto(&record));
                    }
                }
            }
        }
        if let Some(served) = self.serving.get(workspace) {
            response.loaded_at = Some(chrono_to_timestamp(served.loaded_at));
        }
        Ok(Response::new(response))
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackModelRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let caller = auth::caller(&request)?;
        let version = request.get_ref().version;
        if version > i64::MAX as u64 {
            return Err(ApiError::invalid("version", "is too large").into());
        }
        self.store
            .rollback(&caller.workspace_id, version as i64, self.clock.now())
            .await?;
        self.serving.refresh(&self.store, self.clock.now()).await?;
        let mut info = Request::new(pb::ModelInfoRequest { history: 0 });
        info.extensions_mut().insert(caller);
        self.model_info(info).await
    }

    async fn ping(
        &self,
        request: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        let caller = auth::caller(&request)?;
        let model_version = self
            .serving
            .get(&caller.workspace_id)
            .map(|s| s.snapshot.version)
            .unwrap_or(0);
        Ok(Response::new(pb::PingResponse { model_version }))
    }
}
