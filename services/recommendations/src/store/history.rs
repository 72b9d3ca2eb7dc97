//! Each person's recent interactions in Redis: one sorted set per person,
//! `<prefix><ws>:reco:h:<c|a>:<id>`, members `<kind><item>\x1f<occurrence>` (the event's
//! second, `t1700000000`) scored by the event's time. Re-adding a member changes nothing,
//! so a redelivered event, or seeding from the log what the stream already brought, is a
//! no-op;
//! only the newest `limit` entries are kept. Serving reads one set in one round trip.
//! Losing Redis loses personalisation until events or a `--seed-history` training refill
//! it, never an answer.

use redis::AsyncCommands as _;
use relance_kit::cache::Cache;

use crate::domain::dataset::Kind;
use crate::domain::serve::HistoryEntry;

/// A person as history keys them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PersonKey {
    Customer(String),
    Visitor(String),
}

impl PersonKey {
    fn suffix(&self) -> String {
        match self {
            PersonKey::Customer(id) => format!("reco:h:c:{id}"),
            PersonKey::Visitor(id) => format!("reco:h:a:{id}"),
        }
    }

    /// From the `c:`/`a:` form used in training data.
    pub fn from_tagged(tagged: &str) -> Option<PersonKey> {
        if let Some(id) = tagged.strip_prefix("c:") {
            return Some(PersonKey::Customer(id.to_owned()));
        }
        tagged
            .strip_prefix("a:")
            .map(|id| PersonKey::Visitor(id.to_owned()))
    }
}

/// One interaction to record.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub person: PersonKey,
    pub item: String,
    pub kind: Kind,
    /// Unix seconds.
    pub at: i64,
    /// What makes two interactions with the same item distinct (their second).
    pub event_id: String,
}

const SEPARATOR: char = '\u{1f}';

/// Days a history lives without a new interaction.
const TTL_SECS: i64 = 400 * 86_400;

#[derive(Debug, Clone)]
pub struct History {
    cache: Option<Cache>,
    limit: usize,
}

impl History {
    pub fn new(cache: Option<Cache>, limit: usize) -> History {
        History {
            cache,
            limit: limit.max(1),
        }
    }

    fn key(cache: &Cache, workspace_id: &str, person: &PersonKey) -> String {
        cache.key(workspace_id, &person.suffix())
    }

    /// The newest entries, newest first; empty when Redis is unavailable.
    pub async fn read(&self, workspace_id: &str, person: &PersonKey) -> Vec<HistoryEntry> {
        let Some(cache) = &self.cache else {
            return Vec::new();
        };
        let key = Self::key(cache, workspace_id, person);
        let mut connection = cache.connection();
        let members: Result<Vec<(String, f64)>, _> = connection
            .zrevrange_withscores(&key, 0, self.limit as isize - 1)
            .await;
        let members = match members {
            Ok(members) => members,
            Err(error) => {
                metrics::counter!("relance_recommendations_history_errors_total").increment(1);
                tracing::warn!(%error, "history read failed, answering without it");
                return Vec::new();
            }
        };
        let mut entries = Vec::with_capacity(members.len());
        for (member, score) in members {
            if let Some(entry) = parse_member(&member, score) {
                entries.push(entry);
            }
        }
        entries
    }

    /// Adds interactions (any number of people) in one pipeline.
    pub async fn record(&self, workspace_id: &str, entries: &[Recorded]) -> redis::RedisResult<()> {
        let Some(cache) = &self.cache else {
            return Ok(());
        };
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        let mut keys: Vec<String> = Vec::new();
        for entry in entries {
            let key = Self::key(cache, workspace_id, &entry.person);
            let member = format!(
                "{}{}{SEPARATOR}{}",
                entry.kind.code(),
                entry.item,
                entry.event_id
            );
            pipe.zadd(&key, member, entry.at as f64).ignore();
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        for key in &keys {
            pipe.zremrangebyrank(key, 0, -(self.limit as isize) - 1)
                .ignore()
                .expire(key, TTL_SECS)
                .ignore();
        }
        let mut connection = cache.connection();
        pipe.query_async::<()>(&mut connection).await
    }

    /// Moves a visitor's history into the customer's (after a sign-in merge).
    pub async fn merge(
        &self,
        workspace_id: &str,
        anonymous_id: &str,
        customer_id: &str,
    ) -> redis::RedisResult<()> {
        let Some(cache) = &self.cache else {
            return Ok(());
        };
        let visitor = Self::key(
            cache,
            workspace_id,
            &PersonKey::Visitor(anonymous_id.into()),
        );
        let customer = Self::key(
            cache,
            workspace_id,
            &PersonKey::Customer(customer_id.into()),
        );
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("ZUNIONSTORE")
            .arg(&customer)
            .arg(2)
            .arg(&customer)
            .arg(&visitor)
            .arg("AGGREGATE")
            .arg("MAX")
            .ignore()
            .zremrangebyrank(&customer, 0, -(self.limit as isize) - 1)
            .ignore()
            .expire(&customer, TTL_SECS)
            .ignore()
            .del(&visitor)
            .ignore();
        let mut connection = cache.connection();
        pipe.query_async::<()>(&mut connection).await
    }

    /// Erases people's histories.
    pub async fn erase(&self, workspace_id: &str, people: &[PersonKey]) -> redis::RedisResult<()> {
        let Some(cache) = &self.cache else {
            return Ok(());
        };
        if people.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = people
            .iter()
            .map(|p| Self::key(cache, workspace_id, p))
            .collect();
        let mut connection = cache.connection();
        connection.del::<_, ()>(keys).await
    }
}

fn parse_member(member: &str, score: f64) -> Option<HistoryEntry> {
    let mut chars = member.chars();
    let kind = Kind::from_code(chars.next()?)?;
    let rest = chars.as_str();
    let item = rest.split(SEPARATOR).next()?;
    if item.is_empty() {
        return None;
    }
    Some(HistoryEntry {
        item: item.to_owned(),
        kind,
        at: score as i64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_round_trip() {
        let entry =
            parse_member("p85123A\u{1f}online-retail:536365", 1_291_191_960.0).expect("member");
        assert_eq!(entry.item, "85123A");
        assert_eq!(entry.kind, Kind::Purchase);
        assert_eq!(entry.at, 1_291_191_960);
        assert!(parse_member("x1\u{1f}e", 1.0).is_none());
        assert_eq!(
            PersonKey::from_tagged("a:visitor-1"),
            Some(PersonKey::Visitor("visitor-1".into()))
        );
    }
}
