//! Leader election on a `coordination.k8s.io` Lease, so that of several operator replicas exactly one
//! reconciles. The holder renews the Lease every third of its duration; another replica takes it
//! over only after it expired. Every write carries the Lease's `resourceVersion`, so two replicas
//! racing for it cannot both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;

/// One replica's claim on the Lease.
#[derive(Debug, Clone)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: i32,
}

impl Elector {
    /// Competes for Lease `name` through `api` as `identity`, holding it for `duration` seconds
    /// between renewals.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: i32) -> Self {
        Self { api, name: name.into(), identity: identity.into(), duration }
    }

    /// Acquires or renews the Lease once at time `now`; `true` when this replica holds it after.
    pub async fn try_acquire(&self, now: jiff::Timestamp) -> Result<bool, kube::Error> {
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
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let expires = spec.renew_time.as_ref().map(|t| t.0.as_second()).unwrap_or(0)
            + i64::from(spec.lease_duration_seconds.unwrap_or(self.duration));
        if !mine && spec.holder_identity.is_some() && expires > now.as_second() {
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
    /// returned future resolves if leadership is lost (the caller should exit so that it restarts
    /// as a follower).
    pub async fn lead(self) -> impl std::future::Future<Output = ()> {
        let period = Duration::from_secs((self.duration as u64 / 3).max(1));
        loop {
            match self.try_acquire(jiff::Timestamp::now()).await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => super::controller::log("warn", &format!("leader election: {e}"), None),
            }
            tokio::time::sleep(period).await;
        }
        super::controller::log("info", &format!("leading as {}", self.identity), None);
        async move {
            let mut last_renewed = jiff::Timestamp::now();
            loop {
                tokio::time::sleep(period).await;
                match self.try_acquire(jiff::Timestamp::now()).await {
                    Ok(true) => last_renewed = jiff::Timestamp::now(),
                    Ok(false) => return,
                    Err(e) => {
                        super::controller::log("warn", &format!("renewing the lease: {e}"), None);
                        if jiff::Timestamp::now().as_second() - last_renewed.as_second() >= i64::from(self.duration) {
                            return;
                        }
                    }
                }
            }
        }
    }
}
