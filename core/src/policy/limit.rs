//! Taking a key's token: the blocked-bucket memo first, then shared data.

use super::Policy;
use crate::denial::{Denial, DenyCode, LimitName, RateInfo};
use crate::host::Host;
use crate::ratelimit::{self, BucketName, Limit, NamedLimit, Outcome, TakeError};

impl Policy {
    /// Takes a token from the bucket of `id` under `rule`: refused from
    /// [`crate::ratelimit::BlockedBuckets`] when this VM already found it blocked, else
    /// read and written in shared data.
    pub(super) fn take(
        &self,
        host: &dyn Host,
        (scope, id): (&str, &str),
        rule: &str,
        name: &LimitName,
        limit: &Limit,
    ) -> Result<Option<RateInfo>, Denial> {
        let closed = |reason| closed(name, limit, reason);
        let bucket = BucketName::new(scope, rule, id).ok_or(closed("bucket name too long"))?;
        let now = host
            .monotonic_ns()
            .ok_or(closed("monotonic clock unavailable (failing closed)"))?;
        let named = |mut o: Outcome| {
            o.info.policy = *name;
            o
        };
        if let Some(o) = self.blocked.refusal(bucket.as_str(), limit, now) {
            return Err(refused(named(o)));
        }
        match ratelimit::take_shared(host.counters(), bucket.as_str(), limit, now).map(named) {
            Ok(o) if o.allowed => Ok(Some(o.info)),
            Ok(o) => {
                self.blocked.record(bucket.as_str(), limit, now, &o);
                Err(refused(o))
            }
            Err(TakeError::Contention) => Err(closed("bucket update contention (failing closed)")),
            Err(TakeError::Store) => Err(closed("bucket store error (failing closed)")),
        }
    }
}

impl Policy {
    /// Takes a token from every one of a key's several limits, in one
    /// shared-data value: spent only if all admit.
    pub(super) fn take_all(
        &self,
        host: &dyn Host,
        (scope, id): (&str, &str),
        limits: &[NamedLimit],
    ) -> Result<Option<RateInfo>, Denial> {
        let Some(first) = limits.first() else {
            return Ok(None);
        };
        let closed = |reason| closed(&first.name, &first.limit, reason);
        let bucket = BucketName::new(scope, "", id).ok_or(closed("bucket name too long"))?;
        let now = host
            .monotonic_ns()
            .ok_or(closed("monotonic clock unavailable (failing closed)"))?;
        match ratelimit::take_shared_all(host.counters(), bucket.as_str(), limits, now) {
            Ok(o) if o.allowed => Ok(Some(o.info)),
            Ok(o) => Err(refused(o)),
            Err(TakeError::Contention) => Err(closed("bucket update contention (failing closed)")),
            Err(TakeError::Store) => Err(closed("bucket store error (failing closed)")),
        }
    }
}

/// The 429 of a refusing bucket, naming the limit in its figures.
fn refused(o: Outcome) -> Denial {
    Denial {
        rate: Some(o.info),
        ..Denial::new(DenyCode::RateLimited, "bucket empty")
    }
}

/// The 429 when the bucket cannot be read or written: fail closed.
fn closed(name: &LimitName, limit: &Limit, reason: &'static str) -> Denial {
    Denial {
        rate: Some(RateInfo {
            policy: *name,
            burst: limit.burst,
            window_secs: limit.window_secs(),
            remaining: 0,
            retry_after_secs: 1,
        }),
        ..Denial::new(DenyCode::RateLimited, reason)
    }
}
