//! VIP allocation: a service hostname without addresses of its own gets one IPv4 from
//! `240.240.0.0/16` and one IPv6 from `2001:2::/48`, so that every DNS proxy, gateway and
//! agent in the mesh answers for it with the same virtual IPs.
//!
//! Who gets one follows Istio's allocation controller: not an entry with `resolution: NONE`
//! (its traffic keeps the destination the app resolved, so a VIP would capture it into a
//! destination with no endpoints), not a wildcard host (no one address stands for every
//! name below it), not an entry with addresses of its own, and not one labelled out
//! (Istio's `networking.istio.io/enable-autoallocate-ip: "false"` or our
//! `isthmus.io/vip: none`). A hostname defined in several namespaces has one allocation,
//! shared by the namespaces' definitions that want one; each proxy routes it to the
//! definition its namespace sees.
//!
//! The search for a free address starts at an offset derived from a hash of the hostname
//! and probes linearly, so two registries allocating independently for the same hostname
//! usually agree, and a hostname keeps its VIPs across restarts (the table is stored). An
//! address held by one hostname, or released but still in its grace period, is never handed
//! to another: a hostname whose last Service went away keeps its VIPs for the grace period
//! and gets them back if it returns; after that a periodic sweep frees them.
//!
//! [`VipTable`] is the pure logic (no I/O, time passed in); [`load`] and [`persist`] are
//! the glue to the store's `vips` table.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use isthmus_proto::model::{Resolution, Service};
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError, Table, VipWrite};

/// The label by which a Service opts out of VIP allocation (value [`VIP_LABEL_NONE`]).
pub const VIP_LABEL: &str = "isthmus.io/vip";
pub const VIP_LABEL_NONE: &str = "none";
/// Istio's label for the same choice: `"false"` (any case, as Istio compares it) opts out.
pub const ISTIO_AUTOALLOCATE_LABEL: &str = "networking.istio.io/enable-autoallocate-ip";
/// How long a released allocation stays reserved for its hostname. An hour covers a
/// redeploy that deletes and recreates a ServiceEntry, or a source that is briefly wrong,
/// without clients that cached the VIP (DNS, connection pools) reaching another service.
pub const DEFAULT_VIP_GRACE: Duration = Duration::from_secs(3600);
/// How often released allocations past their grace period are freed.
pub const VIP_GC_INTERVAL: Duration = Duration::from_secs(60);

/// The IPv4 pool: Class E space, never routed, so a VIP cannot shadow a real address.
pub const IPV4_POOL: (Ipv4Addr, u8) = (Ipv4Addr::new(240, 240, 0, 0), 16);
/// The IPv6 pool: the benchmarking range (RFC 5180), likewise never routed.
pub const IPV6_POOL: (Ipv6Addr, u8) = (Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0), 48);

#[derive(Debug, thiserror::Error)]
pub enum VipError {
    #[error(
        "no free {family} VIP for {hostname}: all {size} addresses of {pool} are allocated or \
         in their release grace period; the service gets no VIP until one is freed (give it \
         addresses, or label unused services {ISTIO_AUTOALLOCATE_LABEL}: \"false\")"
    )]
    PoolExhausted {
        hostname: String,
        family: Family,
        pool: Pool,
        size: u128,
    },
    #[error("VIP {address} for {hostname} is already held by {holder}; keeping {holder}'s")]
    Conflict {
        hostname: String,
        address: IpAddr,
        holder: String,
    },
    #[error("stored VIP allocation for {hostname} does not decode ({why}); it is dropped")]
    Corrupt { hostname: String, why: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        })
    }
}

/// A range of addresses to allocate from, as integers. The network address is never handed
/// out, nor (for IPv4) the all-ones address, which some stacks treat as a broadcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    network: IpAddr,
    prefix: u8,
    /// First usable address.
    first: u128,
    /// Number of usable addresses.
    len: u128,
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Pool {
    /// `prefix` must leave at least two host bits.
    pub fn ipv4(network: Ipv4Addr, prefix: u8) -> Self {
        assert!(
            prefix <= 30,
            "an IPv4 VIP pool needs at least two host bits"
        );
        let size = 1u128 << (32 - prefix);
        let base = u128::from(u32::from(network)) & !(size - 1);
        Self {
            network: IpAddr::V4(Ipv4Addr::from(base as u32)),
            prefix,
            first: base + 1,
            len: size - 2,
        }
    }

    /// `prefix` must leave at least one host bit.
    pub fn ipv6(network: Ipv6Addr, prefix: u8) -> Self {
        assert!(
            (1..=127).contains(&prefix),
            "an IPv6 VIP pool needs a prefix of 1..=127"
        );
        let size = 1u128 << (128 - prefix);
        let base = u128::from(network) & !(size - 1);
        Self {
            network: IpAddr::V6(Ipv6Addr::from(base)),
            prefix,
            first: base + 1,
            len: size - 1,
        }
    }

    pub fn family(&self) -> Family {
        match self.network {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    pub fn size(&self) -> u128 {
        self.len
    }

    fn nth(&self, i: u128) -> u128 {
        self.first + i % self.len
    }
}

/// The two pools every allocation takes one address from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VipPools {
    pub ipv4: Pool,
    pub ipv6: Pool,
}

impl Default for VipPools {
    fn default() -> Self {
        Self {
            ipv4: Pool::ipv4(IPV4_POOL.0, IPV4_POOL.1),
            ipv6: Pool::ipv6(IPV6_POOL.0, IPV6_POOL.1),
        }
    }
}

/// The VIPs of one hostname.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub hostname: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// When the last Service wanting a VIP under this hostname went away; `None` while in use.
    pub released_at: Option<SystemTime>,
}

impl Allocation {
    pub fn is_active(&self) -> bool {
        self.released_at.is_none()
    }

    /// The addresses as the catalog carries them: IPv4 first.
    pub fn addresses(&self) -> Vec<String> {
        vec![self.ipv4.to_string(), self.ipv6.to_string()]
    }

    /// Whether it was released at least `grace` before `now`.
    pub fn expired(&self, now: SystemTime, grace: Duration) -> bool {
        self.released_at
            .is_some_and(|at| now.duration_since(at).is_ok_and(|d| d >= grace))
    }

    /// The value stored under the hostname in the `vips` table.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&StoredVip {
            ipv4: self.ipv4,
            ipv6: self.ipv6,
            released_at_ms: self.released_at.map(unix_ms),
        })
        .expect("a VIP allocation serialises")
    }

    pub fn decode(hostname: &str, bytes: &[u8]) -> Result<Self, VipError> {
        let v: StoredVip = serde_json::from_slice(bytes).map_err(|e| VipError::Corrupt {
            hostname: hostname.to_string(),
            why: e.to_string(),
        })?;
        Ok(Self {
            hostname: hostname.to_string(),
            ipv4: v.ipv4,
            ipv6: v.ipv6,
            released_at: v
                .released_at_ms
                .map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
        })
    }
}

/// What the store holds per hostname. Release times are wall-clock, since they must mean
/// the same thing to the next run of the registry.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredVip {
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    #[serde(default)]
    released_at_ms: Option<u64>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One change to the table, as stored and as applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VipChange {
    /// A new allocation, or a new release state of an existing one.
    Put(Allocation),
    /// The hostname's addresses go back to the pool.
    Free(String),
}

impl VipChange {
    pub fn hostname(&self) -> &str {
        match self {
            VipChange::Put(a) => &a.hostname,
            VipChange::Free(h) => h,
        }
    }
}

/// What a batch of hostnames needs: changes to store and apply, and the hostnames that
/// could not get a VIP.
#[derive(Debug, Default)]
pub struct VipPlan {
    pub changes: Vec<VipChange>,
    pub failures: Vec<VipError>,
}

/// Whether one definition opts out of a VIP by label, ours or Istio's.
pub fn opted_out(s: &Service) -> bool {
    s.labels.get(VIP_LABEL).map(String::as_str) == Some(VIP_LABEL_NONE)
        || s.labels
            .get(ISTIO_AUTOALLOCATE_LABEL)
            .is_some_and(|v| v.eq_ignore_ascii_case("false"))
}

/// Whether the definitions of one hostname in one namespace (one service, whatever the
/// clusters) call for an allocated VIP: none has addresses of its own, resolves with NONE,
/// is a wildcard or opts out.
pub fn wants_vip(defs: &[&Service]) -> bool {
    !defs.is_empty()
        && defs.iter().all(|s| {
            s.addresses.is_empty()
                && s.resolution != Resolution::None
                && !s.hostname.starts_with("*.")
                && !opted_out(s)
        })
}

/// Whether a hostname, from its definitions in every namespace, needs an allocation: one
/// namespace's definitions wanting a VIP is enough.
pub fn hostname_wants_vip(defs: &[&Service]) -> bool {
    let mut by_ns: BTreeMap<&str, Vec<&Service>> = BTreeMap::new();
    for s in defs {
        by_ns.entry(s.namespace.as_str()).or_default().push(s);
    }
    by_ns.values().any(|d| wants_vip(d))
}

/// Whether each hostname defined by `services` wants a VIP.
pub fn wants_by_hostname<'a>(
    services: impl Iterator<Item = &'a Service>,
) -> BTreeMap<String, bool> {
    let mut defs: BTreeMap<&str, Vec<&Service>> = BTreeMap::new();
    for s in services {
        defs.entry(s.hostname.as_str()).or_default().push(s);
    }
    defs.into_iter()
        .map(|(h, d)| (h.to_string(), hostname_wants_vip(&d)))
        .collect()
}

/// Offsets into the two pools where the search for `hostname` starts: a stable hash, the
/// same in every registry and every release.
fn start_offsets(hostname: &str) -> (u128, u128) {
    let d = ring::digest::digest(&ring::digest::SHA256, hostname.as_bytes());
    let b = d.as_ref();
    let v4 = u128::from_be_bytes(b[..16].try_into().expect("16 bytes"));
    let v6 = u128::from_be_bytes(b[16..32].try_into().expect("16 bytes"));
    (v4, v6)
}

/// Every allocation, indexed by hostname and by address.
#[derive(Debug, Default)]
pub struct VipTable {
    pools: VipPools,
    by_host: BTreeMap<String, Allocation>,
    v4: HashMap<Ipv4Addr, String>,
    v6: HashMap<Ipv6Addr, String>,
    /// Allocations in their grace period, counted as they change so that metrics cost
    /// nothing per change.
    released: usize,
}

impl VipTable {
    pub fn new(pools: VipPools) -> Self {
        Self {
            pools,
            ..Default::default()
        }
    }

    pub fn pools(&self) -> &VipPools {
        &self.pools
    }

    pub fn len(&self) -> usize {
        self.by_host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty()
    }

    /// (active, released in their grace period).
    pub fn counts(&self) -> (usize, usize) {
        (self.by_host.len() - self.released, self.released)
    }

    pub fn get(&self, hostname: &str) -> Option<&Allocation> {
        self.by_host.get(hostname)
    }

    /// The allocation of `hostname` if it is in use (not released).
    pub fn active(&self, hostname: &str) -> Option<&Allocation> {
        self.get(hostname).filter(|a| a.is_active())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Allocation> {
        self.by_host.values()
    }

    /// Applies one change. A `Put` that would give an address held by another hostname to
    /// this one is refused: the table never holds an address twice.
    pub fn apply(&mut self, change: &VipChange) -> Result<(), VipError> {
        match change {
            VipChange::Put(a) => {
                let conflict = |address: IpAddr, holder: &String| VipError::Conflict {
                    hostname: a.hostname.clone(),
                    address,
                    holder: holder.clone(),
                };
                if let Some(h) = self.v4.get(&a.ipv4).filter(|h| **h != a.hostname) {
                    return Err(conflict(a.ipv4.into(), h));
                }
                if let Some(h) = self.v6.get(&a.ipv6).filter(|h| **h != a.hostname) {
                    return Err(conflict(a.ipv6.into(), h));
                }
                self.free(&a.hostname);
                self.v4.insert(a.ipv4, a.hostname.clone());
                self.v6.insert(a.ipv6, a.hostname.clone());
                self.released += usize::from(!a.is_active());
                self.by_host.insert(a.hostname.clone(), a.clone());
            }
            VipChange::Free(h) => self.free(h),
        }
        Ok(())
    }

    fn free(&mut self, hostname: &str) {
        if let Some(old) = self.by_host.remove(hostname) {
            self.released -= usize::from(!old.is_active());
            self.v4.remove(&old.ipv4);
            self.v6.remove(&old.ipv6);
        }
    }

    /// What it takes for each hostname to have a VIP exactly when it wants one: allocate
    /// (or take back a released allocation) for those that want one, release those that no
    /// longer do. Does not change the table; apply the plan's changes once they are stored.
    pub fn plan(&self, wants: &BTreeMap<String, bool>, now: SystemTime) -> VipPlan {
        let mut plan = VipPlan::default();
        // Addresses given out earlier in this same plan.
        let mut taken4 = HashSet::new();
        let mut taken6 = HashSet::new();
        for (hostname, &want) in wants {
            match (self.by_host.get(hostname), want) {
                (Some(a), true) if !a.is_active() => {
                    plan.changes.push(VipChange::Put(Allocation {
                        released_at: None,
                        ..a.clone()
                    }))
                }
                (Some(a), false) if a.is_active() => {
                    plan.changes.push(VipChange::Put(Allocation {
                        // As stored, so the table reads the same after a restart.
                        released_at: Some(UNIX_EPOCH + Duration::from_millis(unix_ms(now))),
                        ..a.clone()
                    }))
                }
                (None, true) => match self.find_free(hostname, &taken4, &taken6) {
                    Ok((ipv4, ipv6)) => {
                        taken4.insert(ipv4);
                        taken6.insert(ipv6);
                        plan.changes.push(VipChange::Put(Allocation {
                            hostname: hostname.clone(),
                            ipv4,
                            ipv6,
                            released_at: None,
                        }));
                    }
                    Err(e) => plan.failures.push(e),
                },
                _ => {}
            }
        }
        plan
    }

    /// Allocations released at least `grace` before `now`, to free.
    pub fn expired(&self, now: SystemTime, grace: Duration) -> Vec<VipChange> {
        self.by_host
            .values()
            .filter(|a| a.expired(now, grace))
            .map(|a| VipChange::Free(a.hostname.clone()))
            .collect()
    }

    fn find_free(
        &self,
        hostname: &str,
        taken4: &HashSet<Ipv4Addr>,
        taken6: &HashSet<Ipv6Addr>,
    ) -> Result<(Ipv4Addr, Ipv6Addr), VipError> {
        let (o4, o6) = start_offsets(hostname);
        let ipv4 = probe(
            &self.pools.ipv4,
            hostname,
            o4,
            self.v4.len() + taken4.len(),
            |n| {
                let a = Ipv4Addr::from(n as u32);
                !self.v4.contains_key(&a) && !taken4.contains(&a)
            },
        )?;
        let ipv6 = probe(
            &self.pools.ipv6,
            hostname,
            o6,
            self.v6.len() + taken6.len(),
            |n| {
                let a = Ipv6Addr::from(n);
                !self.v6.contains_key(&a) && !taken6.contains(&a)
            },
        )?;
        Ok((Ipv4Addr::from(ipv4 as u32), Ipv6Addr::from(ipv6)))
    }
}

/// Linear probing from `start`. Only `held` addresses can be in the way, so the search
/// looks at no more than `held + 1` of them, however large the pool.
fn probe(
    pool: &Pool,
    hostname: &str,
    start: u128,
    held: usize,
    free: impl Fn(u128) -> bool,
) -> Result<u128, VipError> {
    let tries = (held as u128 + 1).min(pool.len);
    (0..tries)
        .map(|i| pool.nth(start % pool.len + i))
        .find(|n| free(*n))
        .ok_or_else(|| VipError::PoolExhausted {
            hostname: hostname.to_string(),
            family: pool.family(),
            pool: *pool,
            size: pool.len,
        })
}

/// Reads every stored allocation into a table. A row that does not decode or that claims
/// an address another row holds is reported and left out, never fatal: the hostname gets
/// a fresh VIP when the catalog is reconciled.
pub async fn load(
    store: &dyn Store,
    pools: VipPools,
) -> Result<(VipTable, Vec<VipError>), StoreError> {
    let mut table = VipTable::new(pools);
    let mut problems = Vec::new();
    for (hostname, bytes) in store.list(Table::Vips).await? {
        match Allocation::decode(&hostname, &bytes).and_then(|a| table.apply(&VipChange::Put(a))) {
            Ok(()) => {}
            Err(e) => problems.push(e),
        }
    }
    Ok((table, problems))
}

/// The store writes of `changes` against `table` as it stands before them: a hostname's
/// first allocation claims its addresses, a new state of one keeps them, a freed one
/// releases them if it is still stored as the table has it. (A plan never moves a
/// hostname's allocation to other addresses.)
pub fn writes(changes: &[VipChange], table: &VipTable) -> Vec<VipWrite> {
    changes
        .iter()
        .filter_map(|c| match c {
            VipChange::Put(a) => Some(match table.get(&a.hostname) {
                Some(old) if old.ipv4 == a.ipv4 && old.ipv6 == a.ipv6 => VipWrite::Update {
                    hostname: a.hostname.clone(),
                    value: a.encode(),
                },
                _ => VipWrite::New {
                    hostname: a.hostname.clone(),
                    value: a.encode(),
                    addresses: a.addresses(),
                },
            }),
            VipChange::Free(h) => table.get(h).map(|old| VipWrite::Free {
                hostname: h.clone(),
                expected: old.encode(),
                addresses: old.addresses(),
            }),
        })
        .collect()
}

/// Writes `changes` (`writes` is what [`writes`] made of them) and returns those stored: on
/// a store several registries share, a change another registry got in first is left out.
pub async fn persist(
    store: &dyn Store,
    changes: Vec<VipChange>,
    writes: Vec<VipWrite>,
) -> Result<Vec<VipChange>, StoreError> {
    if changes.is_empty() {
        return Ok(changes);
    }
    let lost = store.write_vips(writes).await?;
    if lost.is_empty() {
        return Ok(changes);
    }
    Ok(changes
        .into_iter()
        .filter(|c| !lost.iter().any(|h| h == c.hostname()))
        .collect())
}

#[cfg(test)]
mod tests;
