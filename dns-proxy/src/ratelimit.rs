//! Per-client limits. The rate limit: a token bucket per client address, refilled at a
//! steady rate with a burst allowance; pure logic with `now` passed in, so it is tested in
//! simulated time; the memory it holds is bounded by a maximum number of tracked clients.
//!
//! A query over the limit is refused (REFUSED, the bare header), so a resolver library moves
//! on at once instead of waiting out its timeout. Refusals have a bucket of their own, as
//! large as the answers' one: a client sending up to twice its limit gets an answer or a
//! refusal for every query, and only beyond that are the extra queries dropped without a
//! word. A flood from one address then costs the proxy a read and a lookup per packet, not
//! a send as well, and the clients queued behind it on the same socket wait less (unbound's
//! `ip-ratelimit` drops nine in ten over its limit).
//! The upstream share ([`UpstreamShares`]): how many of the shared upstream slots one
//! client address may hold at once, so one client cannot take them all.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    /// What is left of the refusal budget.
    refusals: f64,
    at: Instant,
}

/// What to do with one query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Answer,
    /// Over the limit: answer REFUSED.
    Refuse,
    /// Over the limit and over the refusal budget: no answer at all.
    Drop,
}

#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    max_clients: usize,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RateLimiter {
    /// `per_second` queries a second per client, `burst` at once; `max_clients` addresses are
    /// tracked at most.
    pub fn new(per_second: u32, burst: u32, max_clients: usize) -> Self {
        Self {
            per_second: f64::from(per_second),
            burst: f64::from(burst.max(1)),
            max_clients: max_clients.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn refill(&self, tokens: f64, since: Instant, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(since).as_secs_f64();
        (tokens + elapsed * self.per_second).min(self.burst)
    }

    /// Whether `client` may send one more query at `now` (the tests' shorthand; the
    /// servers ask [`RateLimiter::check`], which also says refuse or drop).
    #[cfg(test)]
    fn allow(&self, client: IpAddr, now: Instant) -> bool {
        self.check(client, now) == Verdict::Answer
    }

    /// What to do with one more query from `client` at `now`.
    pub fn check(&self, client: IpAddr, now: Instant) -> Verdict {
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        if !buckets.contains_key(&client) && buckets.len() >= self.max_clients {
            // Forget clients whose buckets have refilled: they are idle and lose nothing.
            buckets.retain(|_, b| self.refill(b.tokens, b.at, now) < self.burst);
            if buckets.len() >= self.max_clients {
                // Every tracked client is busy: a flood from many addresses. Refuse the new
                // one rather than grow without bound.
                return Verdict::Refuse;
            }
        }
        let b = buckets.entry(client).or_insert(Bucket {
            tokens: self.burst,
            refusals: self.burst,
            at: now,
        });
        b.tokens = self.refill(b.tokens, b.at, now);
        b.refusals = self.refill(b.refusals, b.at, now);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Verdict::Answer
        } else if b.refusals >= 1.0 {
            b.refusals -= 1.0;
            Verdict::Refuse
        } else {
            Verdict::Drop
        }
    }

    pub fn tracked_clients(&self) -> usize {
        self.buckets.lock().expect("rate limiter lock").len()
    }
}

/// How many queries waiting on an upstream each client address holds, and the most one may
/// hold. Only addresses with a query in flight are tracked, so the map is bounded by the
/// in-flight limit.
#[derive(Debug)]
pub struct UpstreamShares {
    per_client: u32,
    held: Mutex<HashMap<IpAddr, u32>>,
}

/// One upstream slot held by a client; given back when dropped.
#[derive(Debug)]
pub struct ShareGuard {
    shares: Arc<UpstreamShares>,
    client: IpAddr,
}

impl UpstreamShares {
    pub fn new(per_client: usize) -> Arc<Self> {
        Arc::new(Self {
            per_client: u32::try_from(per_client.max(1)).unwrap_or(u32::MAX),
            held: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `client`, unless it already holds its share.
    pub fn take(self: &Arc<Self>, client: IpAddr) -> Option<ShareGuard> {
        let mut held = self.held.lock().expect("upstream shares lock");
        let n = held.entry(client).or_insert(0);
        if *n >= self.per_client {
            return None;
        }
        *n += 1;
        Some(ShareGuard {
            shares: self.clone(),
            client,
        })
    }

    /// Slots `client` holds now.
    pub fn held(&self, client: IpAddr) -> u32 {
        let held = self.held.lock().expect("upstream shares lock");
        held.get(&client).copied().unwrap_or(0)
    }
}

impl Drop for ShareGuard {
    fn drop(&mut self) {
        let mut held = self.shares.held.lock().expect("upstream shares lock");
        if let Some(n) = held.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn burst_then_steady_rate() {
        let rl = RateLimiter::new(10, 5, 100);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(rl.allow(ip(1), t0));
        }
        assert!(!rl.allow(ip(1), t0), "burst spent");
        // Another client is not affected.
        assert!(rl.allow(ip(2), t0));
        // 100 ms later one token is back (10/s).
        assert!(rl.allow(ip(1), t0 + Duration::from_millis(100)));
        assert!(!rl.allow(ip(1), t0 + Duration::from_millis(100)));
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..5 {
            assert!(rl.allow(ip(1), later));
        }
        assert!(!rl.allow(ip(1), later));
    }

    /// Over the limit, as many refusals again as the limit allows answers; beyond that,
    /// silence; both budgets come back with time.
    #[test]
    fn refusals_have_a_budget_of_their_own() {
        let rl = RateLimiter::new(10, 5, 100);
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..12).map(|_| rl.check(ip(1), t0)).collect();
        assert_eq!(verdicts[..5], [Verdict::Answer; 5]);
        assert_eq!(verdicts[5..10], [Verdict::Refuse; 5]);
        assert_eq!(verdicts[10..], [Verdict::Drop; 2]);
        let later = t0 + Duration::from_millis(100);
        assert_eq!(rl.check(ip(1), later), Verdict::Answer);
        assert_eq!(rl.check(ip(1), later), Verdict::Refuse);
        assert_eq!(rl.check(ip(1), later), Verdict::Drop);
    }

    #[test]
    fn tracked_clients_are_bounded_and_idle_ones_forgotten() {
        let rl = RateLimiter::new(1, 2, 3);
        let t0 = Instant::now();
        for i in 1..=3 {
            assert!(rl.allow(ip(i), t0));
        }
        // All three are mid-bucket: a fourth client is refused, nothing grows.
        assert!(!rl.allow(ip(4), t0));
        assert_eq!(rl.tracked_clients(), 3);
        // Once they have refilled they are forgotten and the newcomer is admitted.
        assert!(rl.allow(ip(4), t0 + Duration::from_secs(5)));
        assert_eq!(rl.tracked_clients(), 1);
    }

    #[test]
    fn one_client_holds_at_most_its_upstream_share() {
        let shares = UpstreamShares::new(2);
        let a = shares.take(ip(1)).unwrap();
        let _b = shares.take(ip(1)).unwrap();
        assert!(shares.take(ip(1)).is_none(), "share spent");
        // Another client has a share of its own.
        assert!(shares.take(ip(2)).is_some());
        drop(a);
        assert_eq!(shares.held(ip(1)), 1);
        assert!(
            shares.take(ip(1)).is_some(),
            "a slot given back is taken again"
        );
        assert_eq!(
            shares.held(ip(2)),
            0,
            "an address without queries is forgotten"
        );
    }
}
