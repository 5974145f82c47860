//! The answer cache in front of forwarding: positive answers for their smallest record TTL,
//! negative answers (NXDOMAIN, NODATA) for the SOA minimum (RFC 2308), both capped, in a
//! bounded number of entries evicted oldest first. No I/O and no clock: callers pass `now`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

/// What an answer is cached under: the question, with the name lowercased, and whether the
/// client asked for DNSSEC records (an answer stripped of them must not serve one that did).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub name: Box<str>,
    pub qtype: RecordType,
    pub qclass: DNSClass,
    pub dnssec_ok: bool,
}

/// A cached answer, its TTLs already lowered by the time it spent in the cache.
#[derive(Debug, Clone)]
pub struct CachedAnswer {
    pub response_code: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
    pub authentic_data: bool,
}

/// A cached answer's records as they go on the wire after the question, encoded once when
/// cached, so that a hit for a plain query ([`crate::fast`]) is copied out with its TTLs
/// rewritten instead of encoded again. Compression pointers in it point into the question,
/// which is the same for every query under the same key (the name differs in case at most).
#[derive(Debug)]
pub struct WireRecords {
    /// Answer, authority and additional records (no OPT).
    pub bytes: Vec<u8>,
    /// Where each record's TTL is in `bytes`, and the TTL as cached.
    pub ttls: Vec<(usize, u32)>,
    /// Answer, authority and additional record counts.
    pub counts: [u16; 3],
    /// The RCODE (it fits the header: extended codes are not cached on the wire).
    pub rcode: u8,
    pub authentic_data: bool,
}

/// A wire answer from the cache, with what its TTLs must lose.
#[derive(Debug)]
pub struct WireHit {
    pub records: Arc<WireRecords>,
    /// Seconds the answer has spent in the cache.
    pub age: u32,
    /// Seconds it has left: no TTL is sent above this.
    pub left: u32,
}

impl WireHit {
    /// `ttl` as sent now (as [`Cache::get`] lowers it).
    pub fn ttl(&self, ttl: u32) -> u32 {
        ttl.saturating_sub(self.age).clamp(1, self.left)
    }
}

impl WireRecords {
    /// Encodes `answer` after the question `key`; `None` when it cannot be (then only the
    /// general path answers from the entry).
    fn encode(key: &CacheKey, answer: &CachedAnswer) -> Option<Self> {
        let rcode = u16::from(answer.response_code);
        if rcode > 0x0f {
            return None;
        }
        let name = Name::from_ascii(format!("{}.", key.name)).ok()?;
        let mut query = Query::query(name, key.qtype);
        query.query_class = key.qclass;
        let mut m = Message::new(0, MessageType::Response, OpCode::Query);
        m.queries.push(query);
        m.answers = answer.answers.clone();
        m.authorities = answer.authorities.clone();
        m.additionals = answer.additionals.clone();
        let bytes = m.to_vec().ok()?;
        // Skip the header and the question (a name of labels, no pointers, then type and
        // class), then find each record's TTL.
        let mut at = 12;
        while *bytes.get(at)? != 0 {
            at += 1 + usize::from(bytes[at]);
        }
        let start = at + 5;
        let counts = [
            answer.answers.len(),
            answer.authorities.len(),
            answer.additionals.len(),
        ]
        .map(|n| u16::try_from(n).unwrap_or(u16::MAX));
        let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
        let mut ttls = Vec::with_capacity(total);
        let mut at = start;
        for _ in 0..total {
            // The owner: labels ending in a zero byte or a two-byte pointer.
            loop {
                let len = *bytes.get(at)?;
                if len & 0xc0 == 0xc0 {
                    at += 2;
                    break;
                }
                at += 1 + usize::from(len);
                if len == 0 {
                    break;
                }
            }
            let fixed = bytes.get(at..at + 10)?;
            let ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
            let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
            ttls.push((at + 4 - start, ttl));
            at += 10 + rdlen;
        }
        if at != bytes.len() {
            return None;
        }
        Some(Self {
            bytes: bytes[start..].to_vec(),
            ttls,
            counts,
            rcode: rcode as u8,
            authentic_data: answer.authentic_data,
        })
    }
}

#[derive(Debug)]
struct Entry {
    answer: CachedAnswer,
    wire: Option<Arc<WireRecords>>,
    stored: Instant,
    expires: Instant,
    /// Distinguishes this entry from an older one under the same key in the eviction queue.
    serial: u64,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<CacheKey, Entry>,
    /// Insertion order, for eviction; stale pairs (replaced entries) are skipped.
    order: VecDeque<(CacheKey, u64)>,
    serial: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    pub max_entries: usize,
    pub max_ttl: Duration,
    pub max_negative_ttl: Duration,
}

#[derive(Debug)]
pub struct Cache {
    inner: Mutex<Inner>,
    limits: CacheLimits,
}

impl Cache {
    pub fn new(limits: CacheLimits) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            limits,
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("cache poisoned").entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, key: &CacheKey, now: Instant) -> Option<CachedAnswer> {
        let mut inner = self.inner.lock().expect("cache poisoned");
        let entry = inner.entries.get(key)?;
        if now >= entry.expires {
            inner.entries.remove(key);
            return None;
        }
        let age = now.saturating_duration_since(entry.stored).as_secs() as u32;
        let left = entry
            .expires
            .saturating_duration_since(now)
            .as_secs()
            .max(1) as u32;
        let mut answer = entry.answer.clone();
        drop(inner);
        for r in answer
            .answers
            .iter_mut()
            .chain(answer.authorities.iter_mut())
            .chain(answer.additionals.iter_mut())
        {
            r.ttl = r.ttl.saturating_sub(age).clamp(1, left);
        }
        Some(answer)
    }

    /// The answer under `key` as wire records, if it has them and has not expired.
    pub fn get_wire(&self, key: &CacheKey, now: Instant) -> Option<WireHit> {
        let inner = self.inner.lock().expect("cache poisoned");
        let entry = inner.entries.get(key)?;
        if now >= entry.expires {
            // Left for the general path, which removes it.
            return None;
        }
        Some(WireHit {
            records: entry.wire.clone()?,
            age: now.saturating_duration_since(entry.stored).as_secs() as u32,
            left: entry
                .expires
                .saturating_duration_since(now)
                .as_secs()
                .max(1) as u32,
        })
    }

    /// Caches `response` to the question `key` if it is cacheable; returns for how long.
    pub fn insert(&self, key: CacheKey, response: &Message, now: Instant) -> Option<Duration> {
        if self.limits.max_entries == 0 {
            return None;
        }
        let ttl = self.ttl_for(response)?;
        let answer = CachedAnswer {
            response_code: response.metadata.response_code,
            answers: response.answers.clone(),
            authorities: response.authorities.clone(),
            additionals: response.additionals.clone(),
            authentic_data: response.metadata.authentic_data,
        };
        let wire = WireRecords::encode(&key, &answer).map(Arc::new);
        let mut inner = self.inner.lock().expect("cache poisoned");
        inner.serial += 1;
        let serial = inner.serial;
        inner.order.push_back((key.clone(), serial));
        inner.entries.insert(
            key,
            Entry {
                answer,
                wire,
                stored: now,
                expires: now + ttl,
                serial,
            },
        );
        while inner.entries.len() > self.limits.max_entries {
            let Some((old, s)) = inner.order.pop_front() else {
                break;
            };
            if inner.entries.get(&old).is_some_and(|e| e.serial == s) {
                inner.entries.remove(&old);
            }
        }
        // Keep the queue from growing without bound when the same keys are refreshed.
        if inner.order.len() > 2 * self.limits.max_entries + 16 {
            let Inner { entries, order, .. } = &mut *inner;
            order.retain(|(k, s)| entries.get(k).is_some_and(|e| e.serial == *s));
        }
        Some(ttl)
    }

    /// How long `response` may be cached, or None if it must not be.
    pub fn ttl_for(&self, response: &Message) -> Option<Duration> {
        if response.metadata.truncation {
            return None;
        }
        let secs = match response.metadata.response_code {
            ResponseCode::NoError if !response.answers.is_empty() => {
                let min = response.answers.iter().map(|r| r.ttl).min()?;
                u64::from(min).min(self.limits.max_ttl.as_secs())
            }
            ResponseCode::NoError | ResponseCode::NXDomain => {
                // RFC 2308 §5: the negative TTL is the smaller of the SOA's TTL and its
                // MINIMUM; without an SOA a negative answer is not cached.
                let soa = response.authorities.iter().find_map(|r| match &r.data {
                    RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                    _ => None,
                })?;
                u64::from(soa).min(self.limits.max_negative_ttl.as_secs())
            }
            _ => return None,
        };
        (secs > 0).then(|| Duration::from_secs(secs))
    }

    /// Drops expired entries; returns how many remain.
    pub fn purge(&self, now: Instant) -> usize {
        let mut inner = self.inner.lock().expect("cache poisoned");
        inner.entries.retain(|_, e| e.expires > now);
        let Inner { entries, order, .. } = &mut *inner;
        order.retain(|(k, s)| entries.get(k).is_some_and(|e| e.serial == *s));
        entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, OpCode};
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::Name;

    fn limits(max_entries: usize) -> CacheLimits {
        CacheLimits {
            max_entries,
            max_ttl: Duration::from_secs(300),
            max_negative_ttl: Duration::from_secs(60),
        }
    }

    fn key(name: &str) -> CacheKey {
        CacheKey {
            name: name.into(),
            qtype: RecordType::A,
            qclass: DNSClass::IN,
            dnssec_ok: false,
        }
    }

    fn positive(ttls: &[u32]) -> Message {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        for (i, ttl) in ttls.iter().enumerate() {
            m.answers.push(Record::from_rdata(
                Name::from_ascii("a.example.com.").unwrap(),
                *ttl,
                RData::A(A::new(10, 0, 0, i as u8)),
            ));
        }
        m
    }

    fn negative(code: ResponseCode, soa_ttl: u32, minimum: u32) -> Message {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.metadata.response_code = code;
        let zone = Name::from_ascii("example.com.").unwrap();
        m.authorities.push(Record::from_rdata(
            zone.clone(),
            soa_ttl,
            RData::SOA(SOA::new(zone.clone(), zone, 1, 3600, 600, 86400, minimum)),
        ));
        m
    }

    #[test]
    fn honours_the_smallest_ttl_and_counts_down() {
        let c = Cache::new(limits(10));
        let t0 = Instant::now();
        assert_eq!(
            c.insert(key("a"), &positive(&[100, 40]), t0),
            Some(Duration::from_secs(40))
        );
        let hit = c.get(&key("a"), t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(
            hit.answers.iter().map(|r| r.ttl).collect::<Vec<_>>(),
            [30, 30]
        );
        assert!(
            c.get(&key("a"), t0 + Duration::from_secs(40)).is_none(),
            "expired"
        );
        assert_eq!(c.len(), 0, "an expired entry is dropped when read");
    }

    #[test]
    fn caps_ttls() {
        let c = Cache::new(limits(10));
        assert_eq!(
            c.ttl_for(&positive(&[86400])),
            Some(Duration::from_secs(300))
        );
        assert_eq!(c.ttl_for(&positive(&[0])), None, "TTL 0 means do not cache");
    }

    #[test]
    fn negative_answers_use_the_soa_minimum() {
        let c = Cache::new(limits(10));
        assert_eq!(
            c.ttl_for(&negative(ResponseCode::NXDomain, 3600, 30)),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            c.ttl_for(&negative(ResponseCode::NoError, 20, 30)),
            Some(Duration::from_secs(20)),
            "NODATA, and the SOA's own TTL when smaller"
        );
        assert_eq!(
            c.ttl_for(&negative(ResponseCode::NXDomain, 3600, 3600)),
            Some(Duration::from_secs(60)),
            "capped"
        );
        let mut no_soa = positive(&[]);
        no_soa.metadata.response_code = ResponseCode::NXDomain;
        assert_eq!(c.ttl_for(&no_soa), None, "no SOA, no negative caching");
        assert_eq!(c.ttl_for(&negative(ResponseCode::ServFail, 60, 60)), None);
        let mut tc = positive(&[60]);
        tc.metadata.truncation = true;
        assert_eq!(c.ttl_for(&tc), None, "a truncated answer is incomplete");
    }

    #[test]
    fn bounded_oldest_evicted_first() {
        let c = Cache::new(limits(3));
        let t0 = Instant::now();
        for n in ["a", "b", "c"] {
            c.insert(key(n), &positive(&[60]), t0);
        }
        // Refreshing "a" makes it the newest.
        c.insert(key("a"), &positive(&[60]), t0);
        c.insert(key("d"), &positive(&[60]), t0);
        assert_eq!(c.len(), 3);
        assert!(c.get(&key("b"), t0).is_none(), "the oldest went");
        for n in ["a", "c", "d"] {
            assert!(c.get(&key(n), t0).is_some(), "{n}");
        }
        for i in 0..100 {
            c.insert(key("a"), &positive(&[60 + i]), t0);
        }
        assert!(c.inner.lock().unwrap().order.len() <= 2 * 3 + 16);
        assert_eq!(c.purge(t0 + Duration::from_secs(61)), 1);
    }
}
