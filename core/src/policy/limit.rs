//! Taking a key's token: the blocked-bucket memo first, then shared data.

use super::Policy;
use crate::denial::{Denial, DenyCode, RateInfo};
use crate::host::Host;
use crate::ratelimit::{self, BucketName, Limit, Outcome, TakeError};

impl Policy {
    /// Takes a token from the bucket of `id` under `rule`: refused from
    /// [`crate::ratelimit::BlockedBuckets`] when this VM already found it blocked, else
    /// read and written in shared data.
    pub(super) fn take(
        &self,
        host: &dyn Host,
        rule: &str,
        id: &str,
        limit: &Limit,
    ) -> Result<Option<RateInfo>, Denial> {
        let closed = |reason| Denial {
            rate: Some(RateInfo {
                burst: limit.burst,
                window_secs: limit.window_secs(),
                remaining: 0,
                retry_after_secs: 1,
            }),
            ..Denial::new(DenyCode::RateLimited, reason)
        };
        let bucket =
            BucketName::new(&self.bucket_scope, rule, id).ok_or(closed("bucket name too long"))?;
        let now = host
            .monotonic_ns()
            .ok_or(closed("monotonic clock unavailable (failing closed)"))?;
        let refused = |o: Outcome| Denial {
            rate: Some(o.info),
            ..Denial::new(DenyCode::RateLimited, "bucket empty")
        };
        if let Some(o) = self.blocked.refusal(bucket.as_str(), limit, now) {
            return Err(refused(o));
        }
        match ratelimit::take_shared(host.counters(), bucket.as_str(), limit, now) {
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
