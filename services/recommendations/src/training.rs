//! A training run: read the workspace's interactions from the event log, train (on a
//! blocking thread), store the version, make it current, and optionally refill the
//! customers' histories in Redis. One run per workspace at a time, across replicas (an
//! advisory lock).

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use relance_kit::{ApiError, ApiResult};

use crate::domain::dataset::Dataset;
use crate::domain::model;
use crate::domain::train::{self, ModelKind, TrainOptions, Trained};
use crate::serving::Serving;
use crate::store::history::{History, PersonKey, Recorded};
use crate::store::{ModelRecord, NewModel, RecoStore};

/// What to train.
#[derive(Debug, Clone)]
pub struct TrainJob {
    pub workspace_id: String,
    /// Empty: all.
    pub kinds: Vec<ModelKind>,
    pub lookback_days: f64,
    /// `None`: now.
    pub cutoff: Option<DateTime<Utc>>,
    pub options: TrainOptions,
    pub keep_current: bool,
    /// Write each person's newest interactions to Redis (a fresh deployment, a flushed
    /// Redis, or data imported without the consumer running).
    pub seed_history: bool,
}

/// The outcome.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub record: ModelRecord,
    pub activated: bool,
    pub seeded_people: usize,
}

/// Hyper-parameters from a request's `options` object, over `base`; unknown keys refused.
pub fn parse_options(json: &serde_json::Value, base: &TrainOptions) -> ApiResult<TrainOptions> {
    let mut options = base.clone();
    let Some(object) = json.as_object() else {
        return Err(ApiError::invalid("options", "must be an object"));
    };
    for (model_name, settings) in object {
        let Some(settings) = settings.as_object() else {
            return Err(ApiError::invalid(
                format!("options.{model_name}"),
                "must be an object",
            ));
        };
        for (key, value) in settings {
            let field = format!("options.{model_name}.{key}");
            let number = || {
                value
                    .as_f64()
                    .filter(|v| v.is_finite() && *v > 0.0)
                    .ok_or_else(|| ApiError::invalid(&field, "must be a number above 0"))
            };
            match (model_name.as_str(), key.as_str()) {
                ("personal", "lambda") => options.personal.lambda = number()?,
                ("personal", "neighbours") => {
                    let value = number()?;
                    if value.fract() != 0.0 || value > 2_000.0 {
                        return Err(ApiError::invalid(
                            &field,
                            "must be a whole number up to 2000",
                        ));
                    }
                    options.personal.neighbours = value as usize;
                }
                ("personal", "max_out") => {
                    let value = number()?;
                    if value.fract() != 0.0 {
                        return Err(ApiError::invalid(&field, "must be a whole number"));
                    }
                    options.personal.max_out = value as usize;
                }
                ("trending", "half_life_days") => options.trending_half_life_days = number()?,
                ("trending", "window_days") => options.trending_window_days = number()?,
                ("bought_together", "min_baskets") => {
                    options.together_min_baskets = number()?.round() as u32
                }
                ("bought_together", "per_item") => {
                    options.together_per_item = number()?.round() as usize
                }
                _ => {
                    return Err(ApiError::invalid(
                        field,
                        "unknown option (known: personal.lambda, personal.neighbours, personal.max_out, trending.half_life_days, trending.window_days, bought_together.min_baskets, bought_together.per_item)",
                    ));
                }
            }
        }
    }
    Ok(options)
}

/// The process's peak resident memory (Linux `VmHWM`), when known.
pub fn peak_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("VmHWM:") {
            let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            return Some(kib * 1024);
        }
    }
    None
}

/// Runs one training. The caller refreshes its snapshots afterwards (other replicas pick the
/// new version up by themselves).
pub async fn run(
    store: &RecoStore,
    history: &History,
    serving: &Serving,
    job: TrainJob,
    now: DateTime<Utc>,
) -> ApiResult<TrainOutcome> {
    let Some(lock) = store.try_training_lock(&job.workspace_id).await? else {
        return Err(ApiError::Aborted(
            "a training of this workspace is already running".into(),
        ));
    };
    let outcome = train_locked(store, history, serving, &job, now).await;
    store.release_training_lock(lock, &job.workspace_id).await;
    outcome
}

async fn train_locked(
    store: &RecoStore,
    history: &History,
    serving: &Serving,
    job: &TrainJob,
    now: DateTime<Utc>,
) -> ApiResult<TrainOutcome> {
    let started = Instant::now();
    let until = job.cutoff.unwrap_or(now);
    let from = until - Duration::seconds((job.lookback_days * 86_400.0) as i64);
    let data = store.load_dataset(&job.workspace_id, from, until).await?;
    if data.interactions.is_empty() {
        return Err(ApiError::FailedPrecondition(format!(
            "no purchases, cart updates or product views between {from} and {until}: nothing to train on"
        )));
    }
    let read_ms = started.elapsed().as_millis() as f64;
    let options = TrainOptions {
        cutoff: until.timestamp(),
        lookback_days: job.lookback_days,
        ..job.options.clone()
    };
    let kinds: Vec<ModelKind> = if job.kinds.is_empty() {
        ModelKind::ALL.to_vec()
    } else {
        job.kinds.clone()
    };
    let previous: Option<Arc<Trained>> = if kinds.len() < ModelKind::ALL.len() {
        match serving
            .get(&job.workspace_id)
            .and_then(|s| s.trained.clone())
        {
            Some(trained) => Some(trained),
            None => crate::serving::load_current(store, &job.workspace_id).await?,
        }
    } else {
        None
    };
    let data = Arc::new(data);
    let training_data = data.clone();
    let training_kinds = kinds.clone();
    let fit_started = Instant::now();
    let (trained, body) = tokio::task::spawn_blocking(move || {
        let mut trained = train::train(&training_data, &options);
        if let Some(previous) = &previous {
            train::carry_over(&mut trained, previous, &training_kinds);
        }
        let body = model::encode(&trained);
        (trained, body)
    })
    .await
    .map_err(|e| ApiError::Internal(e.into()))?;
    let fit_ms = fit_started.elapsed().as_millis() as f64;
    let memory =
        model::Snapshot::new(0, Some(Arc::new(trained.clone())), Vec::new()).memory_bytes();
    let mut metrics = serde_json::Map::new();
    metrics.insert("training.read_ms".into(), read_ms.into());
    metrics.insert("training.fit_ms".into(), fit_ms.into());
    metrics.insert(
        "bought_together.pairs".into(),
        (trained.together.nnz() as f64).into(),
    );
    metrics.insert(
        "personal.weights".into(),
        (trained.personal.nnz() as f64).into(),
    );
    if let Some(peak) = peak_memory_bytes() {
        metrics.insert("training.peak_memory_bytes".into(), (peak as f64).into());
    }
    let record = ModelRecord {
        version: 0,
        kinds: kinds.iter().map(|k| k.name().to_owned()).collect(),
        trained_at: now,
        training_ms: started.elapsed().as_millis() as i64,
        data_until: DateTime::from_timestamp(trained.data_until, 0).unwrap_or(until),
        item_count: trained.items.len() as i64,
        customer_count: trained.people as i64,
        interaction_count: trained.interactions as i64,
        algorithm: format!(
            "sparse-ease(lambda={}, neighbours={})",
            job.options.personal.lambda, job.options.personal.neighbours
        ),
        memory_bytes: memory as i64,
        metrics: serde_json::Value::Object(metrics),
    };
    let record = store
        .store_model(
            &job.workspace_id,
            NewModel { record, body },
            !job.keep_current,
            now,
        )
        .await?;
    tracing::info!(
        workspace = %job.workspace_id,
        version = record.version,
        items = record.item_count,
        customers = record.customer_count,
        interactions = record.interaction_count,
        training_ms = record.training_ms,
        "model trained"
    );
    let seeded_people = if job.seed_history {
        seed_history(history, &job.workspace_id, &data).await?
    } else {
        0
    };
    Ok(TrainOutcome {
        record,
        activated: !job.keep_current,
        seeded_people,
    })
}

/// Writes every person's newest interactions to Redis, in pipelines of a few thousand.
async fn seed_history(history: &History, workspace_id: &str, data: &Dataset) -> ApiResult<usize> {
    let mut by_person: Vec<Vec<usize>> = vec![Vec::new(); data.people.len()];
    for (index, interaction) in data.interactions.iter().enumerate() {
        by_person[interaction.person as usize].push(index);
    }
    let mut batch: Vec<Recorded> = Vec::new();
    let mut seeded = 0;
    for (person, indices) in by_person.iter().enumerate() {
        let Some(key) = PersonKey::from_tagged(&data.people.names[person]) else {
            continue;
        };
        seeded += 1;
        for &index in indices {
            let interaction = &data.interactions[index];
            batch.push(Recorded {
                person: key.clone(),
                item: data.items.names[interaction.item as usize].clone(),
                kind: interaction.kind,
                at: interaction.at,
                // The time, not the basket number (which changes between runs): seeding
                // twice adds nothing.
                event_id: format!("t{}", interaction.at),
            });
        }
        if batch.len() >= 20_000 {
            history
                .record(workspace_id, &batch)
                .await
                .map_err(|e| ApiError::Unavailable(format!("redis: {e}")))?;
            batch.clear();
        }
    }
    history
        .record(workspace_id, &batch)
        .await
        .map_err(|e| ApiError::Unavailable(format!("redis: {e}")))?;
    Ok(seeded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_by_name() {
        let base = TrainOptions::default();
        let options = parse_options(
            &serde_json::json!({"personal": {"lambda": 50, "neighbours": 20}, "trending": {"half_life_days": 3}}),
            &base,
        )
        .expect("valid");
        assert_eq!(options.personal.lambda, 50.0);
        assert_eq!(options.personal.neighbours, 20);
        assert_eq!(options.trending_half_life_days, 3.0);
        let error = parse_options(&serde_json::json!({"personal": {"alpha": 1}}), &base)
            .expect_err("unknown");
        assert!(
            error
                .to_string()
                .starts_with("options.personal.alpha: unknown option")
        );
        let error = parse_options(&serde_json::json!({"personal": {"lambda": -1}}), &base)
            .expect_err("negative");
        assert_eq!(
            error.to_string(),
            "options.personal.lambda: must be a number above 0"
        );
    }
}
