//! Retries of transient store failures, with exponential backoff and full jitter.
//!
//! Cloud clients already retry single HTTP requests; this layer retries whole operations (a listing,
//! a download resumed at the byte it stopped, one part of an upload), so a stage survives a store
//! that fails now and then whatever the backend. Failures that waiting cannot fix (missing object,
//! denied access, a full disk, a read-only file system) are returned at once.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use object_store::path::Path;

/// How often and how patiently an operation is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    /// Tries in all, the first included (1: no retry).
    pub attempts: u32,
    /// Upper bound of the first wait; each later bound doubles.
    pub base: Duration,
    /// Largest wait.
    pub cap: Duration,
}

impl Default for Retry {
    /// 8 tries over at most about 10 s of waiting: at a 5% failure rate, one operation in 2.5e10
    /// still fails.
    fn default() -> Self {
        Self { attempts: 8, base: Duration::from_millis(50), cap: Duration::from_secs(4) }
    }
}

impl Retry {
    /// One try, no retry.
    pub const NONE: Self = Self { attempts: 1, base: Duration::ZERO, cap: Duration::ZERO };

    /// The wait before try `attempt + 1`: uniform in `[0, min(cap, base * 2^(attempt-1))]` ("full
    /// jitter"), so clients that failed together do not retry together.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let bound = self.base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20)).min(self.cap);
        bound.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// Runs `op` (an operation named `what` on `key`) until it succeeds, fails permanently, or has
    /// used every try. Each retry is named on stderr with the failure that caused it.
    pub async fn run<T, F, Fut>(&self, what: &str, key: &Path, mut op: F) -> Result<T, object_store::Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, object_store::Error>>,
    {
        let mut attempt = 1;
        loop {
            match op().await {
                Ok(value) => return Ok(value),
                Err(e) if attempt < self.attempts && is_transient(&e) => {
                    let wait = self.delay(attempt, jitter());
                    eprintln!(
                        "store: {what} {key}: {e}; retry {attempt}/{} in {} ms",
                        self.attempts - 1,
                        wait.as_millis()
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Whether retrying may help: generic failures (HTTP 5xx, timeouts, connection resets) may pass;
/// a missing object, a refused precondition or credential, and local errors such as a full disk or
/// a read-only file system will not.
pub fn is_transient(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    match e {
        E::Generic { source, .. } => !permanent_io(source.as_ref()),
        E::JoinError { .. } => true,
        _ => false,
    }
}

fn permanent_io(mut error: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind as K;
    loop {
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                K::StorageFull
                    | K::QuotaExceeded
                    | K::ReadOnlyFilesystem
                    | K::PermissionDenied
                    | K::FileTooLarge
                    | K::InvalidInput
                    | K::IsADirectory
                    | K::NotADirectory
            )
        {
            return true;
        }
        match error.source() {
            Some(next) => error = next,
            None => return false,
        }
    }
}

/// A uniform number in `[0, 1)`: jitter needs spread across processes, not cryptography.
pub(crate) fn jitter() -> f64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let seed = || {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        (nanos as u64) ^ (u64::from(std::process::id()) << 32) | 1
    };
    let mut x = STATE.load(Ordering::Relaxed);
    if x == 0 {
        x = seed();
    }
    x = pretrain_crd::seeded::mix(x);
    STATE.store(x, Ordering::Relaxed);
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generic(source: impl std::error::Error + Send + Sync + 'static) -> object_store::Error {
        object_store::Error::Generic { store: "test", source: Box::new(source) }
    }

    #[test]
    fn waits_grow_to_the_cap_and_spread_below_it() {
        let r = Retry { attempts: 10, base: Duration::from_millis(100), cap: Duration::from_secs(1) };
        assert_eq!(r.delay(1, 1.0), Duration::from_millis(100));
        assert_eq!(r.delay(3, 1.0), Duration::from_millis(400));
        assert_eq!(r.delay(9, 1.0), Duration::from_secs(1));
        assert_eq!(r.delay(3, 0.5), Duration::from_millis(200));
        assert_eq!(r.delay(60, 1.0), Duration::from_secs(1), "no overflow");
        let units: Vec<f64> = (0..1000).map(|_| jitter()).collect();
        assert!(units.iter().all(|u| (0.0..1.0).contains(u)));
        let mean = units.iter().sum::<f64>() / 1000.0;
        assert!((0.4..0.6).contains(&mean), "{mean}");
    }

    #[test]
    fn full_disks_and_missing_objects_are_not_retried() {
        use std::io::{Error, ErrorKind};
        assert!(is_transient(&generic(Error::new(ErrorKind::ConnectionReset, "reset"))));
        assert!(is_transient(&generic(Error::other("503 Service Unavailable"))));
        assert!(!is_transient(&generic(Error::new(ErrorKind::StorageFull, "No space left on device"))));
        assert!(!is_transient(&generic(Error::new(ErrorKind::ReadOnlyFilesystem, "read-only"))));
        // Nested the way LocalFileSystem nests io errors in its own.
        #[derive(Debug, thiserror::Error)]
        #[error("unable to write")]
        struct Wrapper(#[source] Error);
        assert!(!is_transient(&generic(Wrapper(Error::new(ErrorKind::StorageFull, "full")))));
        let missing = object_store::Error::NotFound { path: "a".into(), source: "gone".into() };
        assert!(!is_transient(&missing));
    }

    #[tokio::test]
    async fn transient_failures_are_retried_and_permanent_ones_returned_at_once() {
        let r = Retry { attempts: 4, base: Duration::from_millis(1), cap: Duration::from_millis(2) };
        let mut calls = 0;
        let out = r
            .run("op", &Path::from("k"), || {
                calls += 1;
                let fail = calls < 3;
                async move { if fail { Err(generic(std::io::Error::other("503"))) } else { Ok(calls) } }
            })
            .await;
        assert_eq!(out.unwrap(), 3);
        let mut calls = 0;
        let out: Result<(), _> = r
            .run("op", &Path::from("k"), || {
                calls += 1;
                async { Err(generic(std::io::Error::other("503"))) }
            })
            .await;
        assert!(out.is_err());
        assert_eq!(calls, 4, "every try used");
        let mut calls = 0;
        let out: Result<(), _> = r
            .run("op", &Path::from("k"), || {
                calls += 1;
                async { Err(object_store::Error::NotFound { path: "a".into(), source: "gone".into() }) }
            })
            .await;
        assert!(out.is_err());
        assert_eq!(calls, 1);
    }
}
