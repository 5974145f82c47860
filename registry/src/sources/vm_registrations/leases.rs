//! The lease table of registered VMs: which stream holds each entry, which entries lost
//! their stream and until when they are kept. Pure state, no I/O and no clock: every
//! operation takes `now`, so the lease rules are tested without waiting.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use isthmus_proto::model::{Health, Workload};

/// Identifies one registration stream, for the lifetime of the registry process.
pub type StreamId = u64;

/// One registered VM: its entry as the catalog holds it, and who holds its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub workload: Workload,
    /// The WorkloadGroup it was registered from (in the entry's namespace).
    pub group: String,
    pub lease: Lease,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// A stream holds the entry.
    Connected {
        stream: StreamId,
        remote: String,
        since: SystemTime,
    },
    /// No stream holds it; it is removed at `expires` unless the VM registers again.
    Disconnected {
        since: SystemTime,
        expires: SystemTime,
        cause: Disconnect,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    /// The agent's stream ended without a Deregister (agent stopped, network cut).
    StreamEnded,
    /// Found in the store when the registry started: its agent has not reconnected to this
    /// registry yet. Its health is left as it was, since a registry restart says nothing
    /// about the VM.
    RegistryRestarted,
}

impl Disconnect {
    pub fn as_str(&self) -> &'static str {
        match self {
            Disconnect::StreamEnded => "stream ended",
            Disconnect::RegistryRestarted => "registry restarted",
        }
    }
}

impl Registration {
    pub fn is_connected(&self) -> bool {
        matches!(self.lease, Lease::Connected { .. })
    }

    fn held_by(&self, stream: StreamId) -> bool {
        matches!(self.lease, Lease::Connected { stream: s, .. } if s == stream)
    }
}

/// How a registration came to hold its entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    /// No entry of that name existed.
    New,
    /// The entry was waiting out its grace period; it was never removed.
    Reconnected,
    /// Another stream held it; that stream must be closed.
    Replaced { stream: StreamId },
}

impl Takeover {
    pub fn as_str(&self) -> &'static str {
        match self {
            Takeover::New => "new",
            Takeover::Reconnected => "reconnected",
            Takeover::Replaced { .. } => "replaced",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("entry {entry} is held by {holder}, not by the caller {caller}; it is released when that registration ends and its grace period has passed")]
    HeldByOther {
        entry: String,
        holder: String,
        caller: String,
    },
}

/// Every registration, by catalog key.
#[derive(Debug, Default)]
pub struct Leases {
    entries: BTreeMap<String, Registration>,
}

fn millis(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

impl Leases {
    pub fn get(&self, key: &str) -> Option<&Registration> {
        self.entries.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Registration)> {
        self.entries.iter()
    }

    /// (connected, disconnected)
    pub fn counts(&self) -> (usize, usize) {
        let connected = self.entries.values().filter(|r| r.is_connected()).count();
        (connected, self.entries.len() - connected)
    }

    /// Registers `reg` (whose lease is `Connected`) under `key`. The same VM (same identity)
    /// takes over an entry that exists, connected or not, without it being removed; its
    /// health is kept when the entry was live (another stream of the VM, or an entry the
    /// registry found at start), since nothing says the VM changed. An entry held for
    /// another identity is refused.
    pub fn register(&mut self, key: &str, mut reg: Registration) -> Result<Takeover, LeaseError> {
        let takeover = match self.entries.get(key) {
            None => Takeover::New,
            Some(old) if old.workload.identity != reg.workload.identity => {
                let name = |w: &Workload| {
                    w.identity
                        .as_ref()
                        .map_or_else(|| "no identity".to_string(), |i| i.to_string())
                };
                return Err(LeaseError::HeldByOther {
                    entry: format!("{}/{}", old.workload.namespace, old.workload.name),
                    holder: name(&old.workload),
                    caller: name(&reg.workload),
                });
            }
            Some(old) => {
                let keep_health = match &old.lease {
                    Lease::Connected { .. } => true,
                    Lease::Disconnected { cause, .. } => *cause == Disconnect::RegistryRestarted,
                };
                if keep_health {
                    reg.workload.health = old.workload.health;
                }
                match old.lease {
                    Lease::Connected { stream, .. } => Takeover::Replaced { stream },
                    Lease::Disconnected { .. } => Takeover::Reconnected,
                }
            }
        };
        self.entries.insert(key.to_string(), reg);
        Ok(takeover)
    }

    /// Puts `key` back as it was before a [`Self::register`] whose write failed.
    pub fn restore(&mut self, key: &str, previous: Option<Registration>) {
        match previous {
            Some(p) => self.entries.insert(key.to_string(), p),
            None => self.entries.remove(key),
        };
    }

    /// Records a health report from the stream holding `key`. Returns the entry when that
    /// stream holds it (changed or not), `None` when it no longer does.
    pub fn set_health(
        &mut self,
        key: &str,
        stream: StreamId,
        health: Health,
        now: SystemTime,
    ) -> Option<&Workload> {
        let reg = self.entries.get_mut(key).filter(|r| r.held_by(stream))?;
        if reg.workload.health != health {
            reg.workload.health = health;
            reg.workload.last_confirmed_ms = millis(now);
        }
        Some(&reg.workload)
    }

    /// The stream holding `key` ended without a Deregister: the entry stays, unhealthy,
    /// until `now + grace`. Returns it when `stream` held it.
    pub fn disconnect(
        &mut self,
        key: &str,
        stream: StreamId,
        now: SystemTime,
        grace: Duration,
    ) -> Option<&Workload> {
        let reg = self.entries.get_mut(key).filter(|r| r.held_by(stream))?;
        reg.lease = Lease::Disconnected {
            since: now,
            expires: now + grace,
            cause: Disconnect::StreamEnded,
        };
        reg.workload.health = Health::Unhealthy;
        reg.workload.last_confirmed_ms = millis(now);
        Some(&reg.workload)
    }

    /// Removes `key` if `stream` holds it.
    pub fn deregister(&mut self, key: &str, stream: StreamId) -> Option<Registration> {
        if self.entries.get(key)?.held_by(stream) {
            self.entries.remove(key)
        } else {
            None
        }
    }

    /// Takes in entries a previous run registered (found in the store at start): each waits
    /// out a grace period from `now`, as if its stream had just ended.
    pub fn adopt(
        &mut self,
        found: impl IntoIterator<Item = (String, Workload, String)>,
        now: SystemTime,
        grace: Duration,
    ) {
        for (key, workload, group) in found {
            self.entries.entry(key).or_insert(Registration {
                workload,
                group,
                lease: Lease::Disconnected {
                    since: now,
                    expires: now + grace,
                    cause: Disconnect::RegistryRestarted,
                },
            });
        }
    }

    /// Removes the entries whose grace period is over at `now`; returns their keys.
    pub fn expire(&mut self, now: SystemTime) -> Vec<String> {
        let expired: Vec<String> = self
            .entries
            .iter()
            .filter(
                |(_, r)| matches!(r.lease, Lease::Disconnected { expires, .. } if expires <= now),
            )
            .map(|(k, _)| k.clone())
            .collect();
        for k in &expired {
            self.entries.remove(k);
        }
        expired
    }

    /// When the next entry expires, if any is disconnected.
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.entries
            .values()
            .filter_map(|r| match r.lease {
                Lease::Disconnected { expires, .. } => Some(expires),
                Lease::Connected { .. } => None,
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_proto::identity::SpiffeId;

    const GRACE: Duration = Duration::from_secs(10);

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
    }

    fn reg(sa: &str, stream: StreamId, health: Health, at: SystemTime) -> Registration {
        Registration {
            workload: Workload {
                name: "vm-web-10-1-0-5".into(),
                namespace: "shop".into(),
                identity: Some(SpiffeId::parse(&format!("spiffe://td/ns/shop/sa/{sa}")).unwrap()),
                health,
                ..Default::default()
            },
            group: "vm-web".into(),
            lease: Lease::Connected {
                stream,
                remote: format!("10.1.0.5:{stream}"),
                since: at,
            },
        }
    }

    const KEY: &str = "Workload/shop/vm-web-10-1-0-5";

    #[test]
    fn a_dropped_stream_keeps_the_entry_unhealthy_until_the_grace_period_ends() {
        let mut l = Leases::default();
        assert_eq!(
            l.register(KEY, reg("web", 1, Health::Healthy, t(0))),
            Ok(Takeover::New)
        );
        assert!(l.disconnect(KEY, 2, t(1), GRACE).is_none(), "not its lease");
        let w = l.disconnect(KEY, 1, t(1), GRACE).unwrap();
        assert_eq!(w.health, Health::Unhealthy);
        assert_eq!(w.last_confirmed_ms, millis(t(1)));
        assert_eq!(l.counts(), (0, 1));
        assert_eq!(l.next_expiry(), Some(t(11)));
        assert!(l.expire(t(10)).is_empty());
        assert_eq!(l.expire(t(11)), vec![KEY.to_string()]);
        assert!(l.get(KEY).is_none());
        assert_eq!(l.next_expiry(), None);
    }

    #[test]
    fn the_same_vm_reconnecting_within_the_grace_period_keeps_the_entry() {
        let mut l = Leases::default();
        l.register(KEY, reg("web", 1, Health::Healthy, t(0)))
            .unwrap();
        l.disconnect(KEY, 1, t(1), GRACE).unwrap();
        // A probe group starts unhealthy again: the reconnect says nothing of the app yet.
        assert_eq!(
            l.register(KEY, reg("web", 2, Health::Unhealthy, t(5))),
            Ok(Takeover::Reconnected)
        );
        assert_eq!(l.next_expiry(), None, "the lease is held again");
        assert!(l.expire(t(60)).is_empty());
        // The old stream's late end changes nothing.
        assert!(l.disconnect(KEY, 1, t(61), GRACE).is_none());
        assert!(l.set_health(KEY, 1, Health::Healthy, t(61)).is_none());
        assert_eq!(
            l.set_health(KEY, 2, Health::Healthy, t(62)).unwrap().health,
            Health::Healthy
        );
        assert_eq!(l.counts(), (1, 0));
    }

    #[test]
    fn a_second_stream_replaces_the_first_and_keeps_the_health() {
        let mut l = Leases::default();
        l.register(KEY, reg("web", 1, Health::Unhealthy, t(0)))
            .unwrap();
        l.set_health(KEY, 1, Health::Healthy, t(1)).unwrap();
        assert_eq!(
            l.register(KEY, reg("web", 2, Health::Unhealthy, t(2))),
            Ok(Takeover::Replaced { stream: 1 })
        );
        assert_eq!(l.get(KEY).unwrap().workload.health, Health::Healthy);
        assert!(
            l.deregister(KEY, 1).is_none(),
            "the old stream holds nothing"
        );
        assert!(l.deregister(KEY, 2).is_some());
        assert!(l.get(KEY).is_none());
    }

    #[test]
    fn another_identity_cannot_take_an_entry_over() {
        let mut l = Leases::default();
        l.register(KEY, reg("web", 1, Health::Healthy, t(0)))
            .unwrap();
        l.disconnect(KEY, 1, t(1), GRACE).unwrap();
        let err = l
            .register(KEY, reg("admin", 2, Health::Healthy, t(2)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sa/web") && err.contains("sa/admin"), "{err}");
        assert!(!l.get(KEY).unwrap().is_connected());
    }

    #[test]
    fn entries_from_a_previous_run_get_a_grace_period_and_keep_their_health() {
        let mut l = Leases::default();
        let found = reg("web", 0, Health::Healthy, t(0));
        l.adopt(
            [(
                KEY.to_string(),
                found.workload.clone(),
                "vm-web".to_string(),
            )],
            t(100),
            GRACE,
        );
        assert_eq!(l.counts(), (0, 1));
        assert_eq!(l.next_expiry(), Some(t(110)));
        assert_eq!(
            l.register(KEY, reg("web", 1, Health::Unhealthy, t(105))),
            Ok(Takeover::Reconnected)
        );
        assert_eq!(l.get(KEY).unwrap().workload.health, Health::Healthy);
        assert!(l.expire(t(200)).is_empty());
    }
}
