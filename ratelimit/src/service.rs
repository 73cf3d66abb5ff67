//! Envoy's Rate Limit Service API (`ShouldRateLimit`) answered by limitador.
//!
//! Each descriptor that carries an `identity` entry (the value of keygate's
//! identity header) and, for a key with a consumer, a `key_id` entry is
//! looked up in the [`FleetTable`] and checked with limitador's
//! check-and-update against Redis. An over-limit answer carries keygate's
//! 429 body and headers (`raw_body`, `response_headers_to_add`). A storage
//! error is a gRPC `UNAVAILABLE`: Envoy then applies its
//! `failure_mode_deny`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use limitador::limit::{Context, Expression, Limit, Predicate};
use limitador::AsyncRateLimiter;
use tonic::{Request, Response, Status};

use crate::table::{refusal, FleetTable};

/// Descriptor entry carrying keygate's identity header.
pub const IDENTITY: &str = "identity";
/// Descriptor entry carrying keygate's key id header (keys with a consumer).
pub const KEY_ID: &str = "key_id";
/// The limitador variable the counters are kept per.
const SUBJECT: &str = "subject";

/// The limitador limits of a table: one namespace per limit set, counted
/// per subject. Two limits of a set may share a window length, which
/// limitador alone would take for one limit (it tells limits apart by
/// namespace, window, conditions and variables), so each carries the
/// condition `limit.name == "<name>"`, true for it alone.
pub fn limitador_limits(table: &FleetTable) -> Result<Vec<Limit>, String> {
    let subject = Expression::parse(SUBJECT).map_err(|e| format!("{e}"))?;
    let mut out = Vec::new();
    for set in table.sets() {
        for l in &set.limits {
            let name = l.name.as_str();
            let own = Predicate::parse(format!("limit.name == \"{name}\""))
                .map_err(|e| format!("{e}"))?;
            let mut limit = Limit::new(
                set.namespace.as_str(),
                l.max,
                l.seconds,
                [own],
                [subject.clone()],
            );
            limit.set_name(name.to_string());
            out.push(limit);
        }
    }
    Ok(out)
}

/// The service: the current table and the limiter.
pub struct Service {
    pub table: Arc<RwLock<Arc<FleetTable>>>,
    pub limiter: Arc<AsyncRateLimiter>,
}

impl Service {
    fn table(&self) -> Arc<FleetTable> {
        match self.table.read() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

#[tonic::async_trait]
impl RateLimitService for Service {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let request = request.into_inner();
        let table = self.table();
        let hits = u64::from(request.hits_addend.max(1));
        for descriptor in &request.descriptors {
            let entry = |key: &str| {
                descriptor
                    .entries
                    .iter()
                    .find(|e| e.key == key)
                    .map(|e| e.value.as_str())
            };
            let Some(identity) = entry(IDENTITY) else {
                continue;
            };
            let Some(counted) = table.lookup(identity, entry(KEY_ID)) else {
                continue;
            };
            let ctx = Context::from(HashMap::from([(SUBJECT.to_string(), counted.subject)]));
            let namespace = counted.set.namespace.as_str().into();
            let result = self
                .limiter
                .check_rate_limited_and_update(&namespace, &ctx, hits)
                .await
                .map_err(|e| {
                    eprintln!("keygate-ratelimit: storage error (answering UNAVAILABLE): {e}");
                    Status::unavailable("rate-limit storage unavailable")
                })?;
            if !result.limited {
                continue;
            }
            // The refusing limit, else the one whose window ends last.
            let refusing = result
                .limit_name
                .as_deref()
                .and_then(|n| result.counters.iter().find(|c| c.limit().name() == Some(n)))
                .or_else(|| result.counters.iter().max_by_key(|c| c.expires_in()));
            let Some(counter) = refusing else {
                continue;
            };
            let Some(limit) = counter.limit().name().and_then(|n| counted.set.limit(n)) else {
                continue;
            };
            let retry = counter
                .expires_in()
                .map_or(limit.seconds, |d| d.as_millis().div_ceil(1000) as u64);
            let reply = refusal(limit, retry);
            return Ok(Response::new(RateLimitResponse {
                overall_code: Code::OverLimit as i32,
                response_headers_to_add: reply
                    .headers
                    .into_iter()
                    .map(|(key, value)| HeaderValue {
                        key: key.to_string(),
                        value,
                        ..Default::default()
                    })
                    .collect(),
                raw_body: reply.body.into_bytes(),
                ..Default::default()
            }));
        }
        Ok(Response::new(RateLimitResponse {
            overall_code: Code::Ok as i32,
            ..Default::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::Policy;
    use limitador::RateLimiter;

    /// Two limits with the same window stay two limits in limitador, each
    /// counted per subject, and the refusal names the one that refused.
    #[test]
    fn limits_with_one_window_stay_apart_and_count_per_subject() {
        let sha = |c: char| c.to_string().repeat(64);
        let json = format!(
            r#"{{"keys": [
                 {{"id": "a", "sha256": "{}", "rate_limits": [
                    {{"name": "wide", "requests": 5, "per": "1m"}},
                    {{"name": "narrow", "requests": 3, "per": "1m"}}]}},
                 {{"id": "b", "sha256": "{}", "rate_limits": [
                    {{"name": "wide", "requests": 5, "per": "1m"}},
                    {{"name": "narrow", "requests": 3, "per": "1m"}}]}}]}}"#,
            sha('a'),
            sha('b')
        );
        let table = match Policy::from_json(json.as_bytes()) {
            Ok(p) => FleetTable::from_policy(&p),
            Err(e) => unreachable!("bad configuration: {e:?}"),
        };
        let limits = limitador_limits(&table).unwrap_or_default();
        assert_eq!(limits.len(), 2);
        let limiter = RateLimiter::new(1000);
        for l in limits {
            assert!(limiter.add_limit(l));
        }
        let take = |id: &str| {
            let counted = table.lookup(id, None);
            let Some(counted) = counted else {
                unreachable!("{id} is limited")
            };
            let ctx = Context::from(HashMap::from([(SUBJECT.to_string(), counted.subject)]));
            match limiter.check_rate_limited_and_update(
                &counted.set.namespace.as_str().into(),
                &ctx,
                1,
            ) {
                Ok(r) => r.limit_name.filter(|_| r.limited),
                Err(e) => unreachable!("in-memory storage failed: {e}"),
            }
        };
        let a: Vec<_> = (0..4).map(|_| take("a")).collect();
        assert_eq!(a, [None, None, None, Some("narrow".to_string())]);
        // b shares the namespace, not the counters.
        assert_eq!(take("b"), None);
    }
}
