//! Leader election on a `coordination.k8s.io` Lease, so that of several operator replicas exactly one
//! reconciles, the way client-go's leader election does it:
//!
//! - a replica judges the holder's Lease expired by its own clock: it notes when it last saw the
//!   Lease's record (holder and renew time) change and takes the Lease over only after a full lease
//!   duration without change, never by comparing the holder's `renewTime` with its own clock (two
//!   machines' clocks may disagree by more than a lease);
//! - the holder renews every [`Elector::retry_period`] and stops leading when it could not renew for
//!   the renew deadline (two thirds of the lease), before any other replica may take the Lease over;
//! - every write carries the Lease's `resourceVersion`, so two replicas racing for it cannot both win.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;

/// One replica's claim on the Lease.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: i32,
    /// The holder's record as last seen, and when this replica saw it change.
    observed: Mutex<Option<(Record, Instant)>>,
}

/// What tells one renewal of a Lease from the next.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    renewed: Option<jiff::Timestamp>,
}

impl Elector {
    /// Competes for Lease `name` through `api` as `identity`, holding it for `duration` seconds
    /// between renewals.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: i32) -> Self {
        Self { api, name: name.into(), identity: identity.into(), duration, observed: Mutex::new(None) }
    }

    /// How often the holder renews and the others check.
    pub fn retry_period(&self) -> Duration {
        Duration::from_secs((self.duration as u64 / 5).max(1))
    }

    /// How long the holder keeps leading without a successful renewal.
    pub fn renew_deadline(&self) -> Duration {
        Duration::from_secs(self.duration as u64 * 2 / 3)
    }

    /// Acquires or renews the Lease once; `now` is written into it, `local` is this replica's
    /// monotonic clock, by which it judges expiry. `true` when this replica holds it after.
    pub async fn try_acquire(&self, now: jiff::Timestamp, local: Instant) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                spec: Some(self.claim(None, now)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let record = Record { holder: spec.holder_identity.clone(), renewed: spec.renew_time.as_ref().map(|t| t.0) };
        let seen = {
            let mut observed = self.observed.lock().expect("elector lock");
            match observed.as_ref() {
                Some((r, at)) if *r == record => *at,
                _ => {
                    *observed = Some((record.clone(), local));
                    local
                }
            }
        };
        let mine = record.holder.as_deref() == Some(self.identity.as_str());
        let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(self.duration).max(1) as u64);
        let expired = local.saturating_duration_since(seen) >= duration;
        if !mine && record.holder.is_some() && !expired {
            return Ok(false);
        }
        lease.spec = Some(self.claim(Some(&spec), now));
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn claim(&self, previous: Option<&LeaseSpec>, now: jiff::Timestamp) -> LeaseSpec {
        let mine = previous.and_then(|p| p.holder_identity.as_deref()) == Some(self.identity.as_str());
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration),
            acquire_time: if mine { previous.and_then(|p| p.acquire_time.clone()) } else { Some(MicroTime(now)) },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if mine || previous.is_none() { transitions } else { transitions + 1 }),
            ..LeaseSpec::default()
        }
    }

    /// Waits until this replica holds the Lease, then keeps renewing it in the background; the
    /// returned future resolves when leadership is lost: another replica holds the Lease, or no
    /// renewal succeeded within the renew deadline (the caller should exit so that it restarts as
    /// a follower, before another replica may take over).
    pub async fn lead(self) -> impl std::future::Future<Output = ()> {
        let period = self.retry_period();
        loop {
            match self.try_acquire(jiff::Timestamp::now(), Instant::now()).await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election"),
            }
            tokio::time::sleep(period).await;
        }
        tracing::info!(identity = %self.identity, "leading");
        async move {
            let mut renewed = Instant::now();
            loop {
                tokio::time::sleep(period).await;
                let attempt = self.try_acquire(jiff::Timestamp::now(), Instant::now());
                // A renewal that hangs past the deadline is a failed one.
                let left = self.renew_deadline().saturating_sub(renewed.elapsed());
                match tokio::time::timeout(left, attempt).await {
                    Ok(Ok(true)) => renewed = Instant::now(),
                    Ok(Ok(false)) => return,
                    Ok(Err(e)) => tracing::warn!(error = %e, "renewing the lease"),
                    Err(_) => {}
                }
                if renewed.elapsed() >= self.renew_deadline() {
                    tracing::warn!("could not renew the lease within the renew deadline");
                    return;
                }
            }
        }
    }
}
