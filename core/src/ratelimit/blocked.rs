//! The per-VM memo of buckets found blocked, whose 429s skip the
//! shared-data read.

use super::{take, Limit, Outcome};

/// Most buckets [`BlockedBuckets`] keeps. A short list scanned in place
/// costs a request less than hashing its bucket name would.
pub(super) const MAX_BLOCKED: usize = 64;

/// Buckets this VM last found blocked, with the TAT it read, so that a key
/// sending over its limit is refused without a shared-data read.
///
/// Exact, not a cache that can drift: under one limit a bucket's TAT changes
/// only when a request is admitted, and none can be admitted (by any VM)
/// while the remembered TAT still blocks, because the stored TAT is never
/// below it. So while the entry blocks, the stored TAT equals it, and the
/// refusal and its figures are those the shared read would give. An entry
/// counts only for the limit it was read under; a copy starts empty. When
/// full, a new entry takes the place of one that no longer blocks, else the
/// slots are overwritten in turn.
#[derive(Default)]
pub struct BlockedBuckets {
    seen: std::cell::RefCell<Vec<Blocked>>,
    /// Where the next entry goes when all of them still block.
    next: std::cell::Cell<usize>,
}

struct Blocked {
    bucket: Box<str>,
    limit: Limit,
    tat: u64,
}

impl Clone for BlockedBuckets {
    fn clone(&self) -> Self {
        BlockedBuckets::default()
    }
}

impl std::fmt::Debug for BlockedBuckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockedBuckets({})", self.len())
    }
}

impl BlockedBuckets {
    /// The refusal for `key` at `now`, if it was found blocked under `limit`
    /// and still is.
    pub fn refusal(&self, key: &str, limit: &Limit, now: u64) -> Option<Outcome> {
        let seen = self.seen.try_borrow().ok()?;
        let entry = seen.iter().find(|b| &*b.bucket == key)?;
        if entry.limit != *limit {
            return None;
        }
        let outcome = take(limit, entry.tat, now);
        (!outcome.allowed && !outcome.store).then_some(outcome)
    }

    /// Records a shared-data decision: a refusal is remembered; an admission
    /// leaves any old entry, which no longer blocks, to be replaced.
    pub fn record(&self, key: &str, limit: &Limit, now: u64, outcome: &Outcome) {
        if outcome.allowed {
            return;
        }
        let Ok(mut seen) = self.seen.try_borrow_mut() else {
            return;
        };
        let entry = Blocked {
            bucket: key.into(),
            limit: *limit,
            tat: outcome.new_tat,
        };
        let slot = match seen.iter().position(|b| &*b.bucket == key) {
            Some(at) => Some(at),
            None => seen.iter().position(|b| take(&b.limit, b.tat, now).allowed),
        };
        if let Some(slot) = slot.and_then(|at| seen.get_mut(at)) {
            *slot = entry;
        } else if seen.len() < MAX_BLOCKED {
            seen.push(entry);
        } else {
            let at = self.next.get() % MAX_BLOCKED;
            self.next.set(at + 1);
            if let Some(slot) = seen.get_mut(at) {
                *slot = entry;
            }
        }
    }

    /// Number of buckets remembered.
    pub fn len(&self) -> usize {
        self.seen.try_borrow().map_or(0, |s| s.len())
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
