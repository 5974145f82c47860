//! The request path, and DNS over TCP (UDP is [`crate::udp`]).
//!
//! [`Resolver::begin`] does everything that needs no upstream synchronously: it answers a
//! plain query of a mesh name on the wire ([`crate::fast`]), else parses the query, answers
//! mesh names from the name table and known answers from the cache, and refuses what it
//! must. Only a query that needs an upstream becomes a task
//! ([`Resolver::finish`]), bounded by a semaphore. So the common case (a mesh name, a cached
//! name) costs one parse, one table or cache lookup and one encode, with no task, no lock
//! shared with catalog updates and no allocation beyond the answer.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use isthmus_proto::drain;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::cache::{Cache, CacheKey, CachedAnswer};
use crate::config::MAX_QUERY_BYTES;
use crate::fast::PlainQuery;
use crate::forwarder::Forwarder;
use crate::metrics::{MalformedReason, Metrics, Outcome, QueryKind, ShedReason};
use crate::names::{normalize, MeshName, NameTable};
use crate::ratelimit::{RateLimiter, ShareGuard, UpstreamShares, Verdict};
use isthmus_proto::limits::{AcceptErrors, ACCEPT_ERROR_BACKOFF};

/// Size of a DNS header.
const HEADER_LEN: usize = 12;
/// What every DNS client accepts over UDP without EDNS (RFC 1035).
const CLASSIC_UDP_PAYLOAD: usize = 512;
const TCP_MAX_MESSAGE: usize = u16::MAX as usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What to do with one packet from a client.
#[derive(Debug)]
pub enum Step {
    Reply(Vec<u8>),
    /// Not worth an answer (too short to carry an ID, or itself a response); counted.
    Drop,
    /// Needs an upstream: run [`Resolver::finish`] on it.
    Forward(Box<Pending>),
}

/// A query waiting on an upstream, holding its place among the bounded in-flight queries.
#[derive(Debug)]
pub struct Pending {
    request: Message,
    key: CacheKey,
    limit: usize,
    _permit: OwnedSemaphorePermit,
    /// The client's part of its upstream share (none for a query without a known client).
    _share: Option<ShareGuard>,
}

/// Answers queries: the name table first, then the cache, then the upstreams.
#[derive(Debug)]
pub struct Resolver {
    names: Arc<ArcSwap<NameTable>>,
    cache: Cache,
    forwarder: Forwarder,
    metrics: Arc<Metrics>,
    /// `isthmus_dns_queries_total` of A and AAAA mesh hits, looked up once: the fast path
    /// counts without a label lookup.
    mesh_hits: [Counter; 2],
    /// The same of A and AAAA cache hits.
    cache_hits: [Counter; 2],
    inflight: Arc<Semaphore>,
    /// How many of the in-flight slots one client address may hold.
    shares: Arc<UpstreamShares>,
    ttl: u32,
    max_udp_payload: u16,
    /// The SOA of the cluster domain, in our NXDOMAIN answers (negative caching downstream).
    soa: Record,
    limiter: Option<RateLimiter>,
    /// Loopback clients are limited only when this is set.
    limit_loopback: bool,
    /// Clients never limited.
    rate_exempt: Vec<IpAddr>,
}

impl Resolver {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        names: Arc<ArcSwap<NameTable>>,
        cache: Cache,
        forwarder: Forwarder,
        metrics: Arc<Metrics>,
        max_inflight: usize,
        ttl: Duration,
        max_udp_payload: u16,
        cluster_domain: &str,
    ) -> Self {
        let ttl = ttl.as_secs().clamp(1, i32::MAX as u64) as u32;
        let zone = Name::from_ascii(format!("{}.", normalize(cluster_domain)))
            .unwrap_or_else(|_| Name::root());
        let mname = zone.prepend_label("ns").unwrap_or_else(|_| zone.clone());
        let rname = zone
            .prepend_label("hostmaster")
            .unwrap_or_else(|_| zone.clone());
        let soa = Record::from_rdata(
            zone,
            ttl,
            RData::SOA(SOA::new(mname, rname, 1, 3600, 600, 86400, ttl)),
        );
        let counter = |qtype: RecordType, outcome: Outcome| {
            metrics
                .queries
                .get_or_create(&QueryKind {
                    qtype: qtype.into(),
                    outcome,
                })
                .clone()
        };
        Self {
            names,
            cache,
            forwarder,
            mesh_hits: [
                counter(RecordType::A, Outcome::mesh_hit),
                counter(RecordType::AAAA, Outcome::mesh_hit),
            ],
            cache_hits: [
                counter(RecordType::A, Outcome::cache_hit),
                counter(RecordType::AAAA, Outcome::cache_hit),
            ],
            metrics,
            inflight: Arc::new(Semaphore::new(max_inflight)),
            shares: UpstreamShares::new(max_inflight),
            ttl,
            max_udp_payload,
            soa,
            limiter: None,
            limit_loopback: false,
            rate_exempt: Vec::new(),
        }
    }

    /// Limits each client address to `per_second` queries (with `burst`); 0 turns it off.
    /// Loopback clients (unless `limit_loopback`) and the `exempt` addresses are never
    /// limited.
    pub fn with_client_rate_limit(
        mut self,
        per_second: u32,
        burst: u32,
        max_clients: usize,
        limit_loopback: bool,
        exempt: Vec<IpAddr>,
    ) -> Self {
        self.limiter = (per_second > 0).then(|| RateLimiter::new(per_second, burst, max_clients));
        self.limit_loopback = limit_loopback;
        self.rate_exempt = exempt;
        self
    }

    /// One client address holds at most `per_client` of the upstream slots at once, so a
    /// client sending unique names to a slow or dead upstream cannot take every slot.
    pub fn with_client_upstream_share(mut self, per_client: usize) -> Self {
        self.shares = UpstreamShares::new(per_client);
        self
    }

    /// What to do with another query from `client` now (see [`crate::ratelimit`]); a
    /// refusal and a drop are counted.
    pub fn admit(&self, client: IpAddr) -> Verdict {
        let Some(l) = &self.limiter else {
            return Verdict::Answer;
        };
        if (client.is_loopback() && !self.limit_loopback) || self.rate_exempt.contains(&client) {
            return Verdict::Answer;
        }
        let verdict = l.check(client, Instant::now());
        match verdict {
            Verdict::Answer => {}
            Verdict::Refuse => {
                self.metrics.rate_limited.inc();
            }
            Verdict::Drop => {
                self.metrics.rate_limited_dropped.inc();
            }
        }
        verdict
    }

    pub fn names(&self) -> Arc<NameTable> {
        self.names.load_full()
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Handles a packet completely (forwarding inline if needed).
    pub async fn handle(&self, packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
        self.handle_from(packet, transport, None).await
    }

    /// [`Resolver::handle`] for a query from `client` (see [`Resolver::begin_from`]).
    pub async fn handle_from(
        &self,
        packet: &[u8],
        transport: Transport,
        client: Option<IpAddr>,
    ) -> Option<Vec<u8>> {
        match self.begin_from(packet, transport, client) {
            Step::Reply(b) => Some(b),
            Step::Drop => None,
            Step::Forward(p) => Some(self.finish(*p).await),
        }
    }

    /// The synchronous part of a query: everything but the upstream.
    pub fn begin(&self, packet: &[u8], transport: Transport) -> Step {
        self.begin_from(packet, transport, None)
    }

    /// [`Resolver::begin`] for a query from `client`, which holds at most its share of the
    /// upstream slots.
    pub fn begin_from(&self, packet: &[u8], transport: Transport, client: Option<IpAddr>) -> Step {
        match self.answer_fast(packet) {
            Some(answer) => Step::Reply(answer),
            None => self.begin_general(packet, transport, client),
        }
    }

    /// The answer to a plain query of a mesh name (A or AAAA) or of a cached name, written
    /// straight onto the wire ([`crate::fast`]); `None` for every other packet.
    fn answer_fast(&self, packet: &[u8]) -> Option<Vec<u8>> {
        let query = PlainQuery::parse(packet)?;
        let table = self.names.load();
        let name = query.name();
        if table.lookup(name).is_some() {
            let answer = query.answer(&table, self.ttl, self.max_udp_payload)?;
            self.mesh_hits[usize::from(query.qtype != 1)].inc();
            return Some(answer);
        }
        // The service domain is the mesh's, never the cache's (see `begin_general`).
        if table.is_service_domain(name) {
            return None;
        }
        let key = CacheKey {
            name: name.into(),
            qtype: RecordType::from(query.qtype),
            qclass: DNSClass::IN,
            dnssec_ok: query.dnssec_ok(),
        };
        let hit = self.cache.get_wire(&key, Instant::now())?;
        let answer = query.answer_cached(&hit, self.max_udp_payload)?;
        match key.qtype {
            RecordType::A => self.cache_hits[0].inc(),
            RecordType::AAAA => self.cache_hits[1].inc(),
            other => {
                self.metrics.query(other, Outcome::cache_hit);
                0
            }
        };
        Some(answer)
    }

    /// [`Resolver::begin_from`] the long way: the query decoded, the answer encoded.
    fn begin_general(&self, packet: &[u8], transport: Transport, client: Option<IpAddr>) -> Step {
        if packet.len() < HEADER_LEN {
            self.metrics.malformed(MalformedReason::short);
            return Step::Drop;
        }
        if packet.len() > MAX_QUERY_BYTES {
            self.metrics.malformed(MalformedReason::oversize);
            return Step::Drop;
        }
        if packet[2] & 0x80 != 0 {
            self.metrics.malformed(MalformedReason::response);
            return Step::Drop;
        }
        let id = u16::from_be_bytes([packet[0], packet[1]]);
        let opcode = (packet[2] >> 3) & 0x0f;
        let rd = packet[2] & 0x01 != 0;
        let request = match Message::from_vec(packet) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "unparseable query");
                self.metrics.malformed(MalformedReason::unparseable);
                self.metrics.query(RecordType::NULL, Outcome::formerr);
                return Step::Reply(header_only(id, opcode, rd, ResponseCode::FormErr));
            }
        };
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            // RFC 6891 6.1.3: only EDNS version 0 exists; a higher one is answered BADVERS
            // (with our OPT at version 0) so the client can fall back.
            let qtype = request
                .queries
                .first()
                .map_or(RecordType::NULL, |q| q.query_type);
            self.metrics.query(qtype, Outcome::badvers);
            let limit = self.limit(&request, transport);
            return Step::Reply(self.respond(
                &request,
                ResponseCode::BADVERS,
                false,
                Vec::new(),
                Vec::new(),
                limit,
            ));
        }
        if request.queries.len() != 1 {
            self.metrics.malformed(MalformedReason::questions);
            self.metrics.query(RecordType::NULL, Outcome::formerr);
            return Step::Reply(header_only(id, opcode, rd, ResponseCode::FormErr));
        }
        let query = &request.queries[0];
        let qtype = query.query_type;
        if request.metadata.op_code != OpCode::Query {
            self.metrics.query(qtype, Outcome::refused);
            return Step::Reply(header_only(id, opcode, rd, ResponseCode::NotImp));
        }
        let limit = self.limit(&request, transport);
        let name = normalize(&query.name.to_ascii());

        // The mesh owns its names: A and AAAA come from the catalog, and any other type
        // (TXT, MX, SRV, HTTPS, ANY, ...) of a mesh name is NOERROR with no data, never sent
        // upstream, whose NXDOMAIN would deny every type of the name (RFC 8020) and break
        // the A answer for caching resolvers and browsers' HTTPS queries.
        let mesh_type = matches!(query.query_type, RecordType::A | RecordType::AAAA);
        if query.query_class == DNSClass::IN {
            let table = self.names.load();
            if let Some(found) = table.lookup(&name) {
                self.metrics.query(qtype, Outcome::mesh_hit);
                let (answers, authorities) = if mesh_type {
                    (self.mesh_records(query, found), Vec::new())
                } else {
                    (Vec::new(), vec![self.soa.clone()])
                };
                return Step::Reply(self.respond(
                    &request,
                    ResponseCode::NoError,
                    true,
                    answers,
                    authorities,
                    limit,
                ));
            }
            if table.is_service_domain(&name) {
                // This proxy is the authority for the service domain: a name the catalog
                // does not have does not exist, and is never sent upstream. Before the first
                // sync it cannot know yet.
                if !table.synced() {
                    self.metrics.query(qtype, Outcome::servfail);
                    return Step::Reply(self.respond(
                        &request,
                        ResponseCode::ServFail,
                        false,
                        Vec::new(),
                        Vec::new(),
                        limit,
                    ));
                }
                self.metrics.query(qtype, Outcome::nxdomain);
                return Step::Reply(self.respond(
                    &request,
                    ResponseCode::NXDomain,
                    true,
                    Vec::new(),
                    vec![self.soa.clone()],
                    limit,
                ));
            }
        }

        let key = CacheKey {
            name: name.into_boxed_str(),
            qtype,
            qclass: query.query_class,
            dnssec_ok: request.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
        };
        if let Some(hit) = self.cache.get(&key, std::time::Instant::now()) {
            self.metrics.query(qtype, Outcome::cache_hit);
            return Step::Reply(self.upstream_answer(&request, hit, limit));
        }
        // Shedding load beats queueing: the client retries, perhaps elsewhere. A client at
        // its share is refused before it can take a slot another client needs.
        let share = match client.map(|c| self.shares.take(c)) {
            Some(None) => Err(ShedReason::upstream_client_share),
            Some(Some(guard)) => Ok(Some(guard)),
            None => Ok(None),
        };
        let slot = share.and_then(|share| {
            self.inflight
                .clone()
                .try_acquire_owned()
                .map(|permit| (permit, share))
                .map_err(|_| ShedReason::upstream_slots_full)
        });
        match slot {
            Ok((permit, share)) => Step::Forward(Box::new(Pending {
                request,
                key,
                limit,
                _permit: permit,
                _share: share,
            })),
            Err(reason) => {
                self.metrics.shed(reason);
                self.metrics.query(qtype, Outcome::refused);
                Step::Reply(self.respond(
                    &request,
                    ResponseCode::Refused,
                    false,
                    Vec::new(),
                    Vec::new(),
                    limit,
                ))
            }
        }
    }

    /// Asks the upstreams for a query [`Resolver::begin`] could not answer.
    pub async fn finish(&self, pending: Pending) -> Vec<u8> {
        let Pending {
            request,
            key,
            limit,
            _permit,
            _share,
        } = pending;
        let query = &request.queries[0];
        let dnssec_ok = key.dnssec_ok;
        self.metrics.upstream_inflight.inc();
        let result = self.forwarder.forward(query, dnssec_ok).await;
        self.metrics.upstream_inflight.dec();
        match result {
            Ok(answer) => {
                self.metrics.query(query.query_type, Outcome::forwarded);
                let answer = answer.maybe_strip_dnssec_records(dnssec_ok);
                if self
                    .cache
                    .insert(key, &answer, std::time::Instant::now())
                    .is_some()
                {
                    self.metrics.cache_entries.set(self.cache.len() as i64);
                }
                let cached = CachedAnswer {
                    response_code: answer.metadata.response_code,
                    authentic_data: answer.metadata.authentic_data,
                    answers: answer.answers,
                    authorities: answer.authorities,
                    additionals: answer.additionals,
                };
                self.upstream_answer(&request, cached, limit)
            }
            Err(e) => {
                tracing::debug!(name = %query.name, error = %e, "forwarding failed");
                self.metrics.query(query.query_type, Outcome::servfail);
                self.respond(
                    &request,
                    ResponseCode::ServFail,
                    false,
                    Vec::new(),
                    Vec::new(),
                    limit,
                )
            }
        }
    }

    fn limit(&self, request: &Message, transport: Transport) -> usize {
        match transport {
            Transport::Tcp => TCP_MAX_MESSAGE,
            Transport::Udp => match &request.edns {
                Some(e) => {
                    usize::from(e.max_payload().min(self.max_udp_payload)).max(CLASSIC_UDP_PAYLOAD)
                }
                None => CLASSIC_UDP_PAYLOAD,
            },
        }
    }

    fn mesh_records(&self, query: &Query, found: &MeshName) -> Vec<Record> {
        let asked = &query.name;
        let mut out = Vec::new();
        // A short name found through the search list is answered with the CNAME chain a
        // resolver would have followed (asked name -> service hostname -> addresses), so
        // the client learns the canonical name; a full name or a wildcard match is answered
        // under the name as asked.
        let mut owner = asked.clone();
        if !found.hostname.starts_with("*.") && normalize(&asked.to_ascii()) != found.hostname {
            if let Ok(canonical) = Name::from_ascii(format!("{}.", found.hostname)) {
                out.push(Record::from_rdata(
                    asked.clone(),
                    self.ttl,
                    RData::CNAME(CNAME(canonical.clone())),
                ));
                owner = canonical;
            }
        }
        match query.query_type {
            RecordType::A => out.extend(
                found
                    .v4
                    .iter()
                    .map(|a| Record::from_rdata(owner.clone(), self.ttl, RData::A(A(*a)))),
            ),
            _ => out.extend(
                found
                    .v6
                    .iter()
                    .map(|a| Record::from_rdata(owner.clone(), self.ttl, RData::AAAA(AAAA(*a)))),
            ),
        }
        out
    }

    fn upstream_answer(&self, request: &Message, answer: CachedAnswer, limit: usize) -> Vec<u8> {
        let mut m = self.response(request, answer.response_code, false);
        m.metadata.authentic_data = answer.authentic_data;
        m.answers = answer.answers;
        m.authorities = answer.authorities;
        m.additionals = answer.additionals;
        encode_within(m, limit)
    }

    fn respond(
        &self,
        request: &Message,
        code: ResponseCode,
        authoritative: bool,
        answers: Vec<Record>,
        authorities: Vec<Record>,
        limit: usize,
    ) -> Vec<u8> {
        let mut m = self.response(request, code, authoritative);
        m.answers = answers;
        m.authorities = authorities;
        encode_within(m, limit)
    }

    fn response(&self, request: &Message, code: ResponseCode, authoritative: bool) -> Message {
        let mut m = Message::response(request.metadata.id, request.metadata.op_code);
        m.metadata.response_code = code;
        m.metadata.authoritative = authoritative;
        m.metadata.recursion_desired = request.metadata.recursion_desired;
        m.metadata.recursion_available = true;
        m.metadata.checking_disabled = request.metadata.checking_disabled;
        m.queries = request.queries.clone();
        if let Some(e) = &request.edns {
            let mut edns = Edns::new();
            edns.set_max_payload(self.max_udp_payload);
            edns.set_dnssec_ok(e.flags().dnssec_ok);
            m.set_edns(edns);
        }
        m
    }
}

/// Encodes `m` in at most `limit` bytes: additional records go first, then authority and
/// answer records (halving), with TC set whenever an answer or authority record was cut so
/// the client retries over TCP.
pub fn encode_within(mut m: Message, limit: usize) -> Vec<u8> {
    loop {
        let bytes = match m.to_vec() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode an answer; sending SERVFAIL");
                return header_only(
                    m.metadata.id,
                    u8::from(m.metadata.op_code),
                    m.metadata.recursion_desired,
                    ResponseCode::ServFail,
                );
            }
        };
        if bytes.len() <= limit {
            return bytes;
        }
        if !m.additionals.is_empty() {
            m.additionals.clear();
        } else if !m.authorities.is_empty() {
            m.authorities.clear();
            m.metadata.truncation = true;
        } else if !m.answers.is_empty() {
            let keep = m.answers.len() / 2;
            m.answers.truncate(keep);
            m.metadata.truncation = true;
        } else {
            // Only the question is left and it does not fit: the query itself was too big.
            return bytes;
        }
    }
}

/// A response that is only a header: for queries whose question cannot be echoed.
/// A bare REFUSED header answering `query`, when it looks like a query at all.
pub(crate) fn refusal_for(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < HEADER_LEN || query[2] & 0x80 != 0 {
        return None;
    }
    let id = u16::from_be_bytes([query[0], query[1]]);
    Some(header_only(
        id,
        (query[2] >> 3) & 0x0f,
        query[2] & 0x01 != 0,
        ResponseCode::Refused,
    ))
}

fn header_only(id: u16, opcode: u8, rd: bool, code: ResponseCode) -> Vec<u8> {
    let code = u16::from(code) as u8 & 0x0f;
    let mut b = vec![0u8; HEADER_LEN];
    b[0..2].copy_from_slice(&id.to_be_bytes());
    b[2] = 0x80 | ((opcode & 0x0f) << 3) | u8::from(rd);
    b[3] = 0x80 | code;
    b
}

#[derive(Debug, Clone, Copy)]
pub struct TcpLimits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
}

/// The open client TCP connections, and since when each has been idle (waiting for its next
/// query), so that when every slot is taken a new client gets the slot of the connection
/// idle the longest (RFC 7766 6.2.3: a server under pressure closes idle connections first).
/// Only a connection busy with a query keeps its slot against a newcomer.
#[derive(Debug)]
struct TcpSlots {
    max: usize,
    open: std::sync::Mutex<SlotTable>,
}

#[derive(Debug, Default)]
struct SlotTable {
    next_id: u64,
    open: std::collections::HashMap<u64, SlotState>,
}

#[derive(Debug)]
struct SlotState {
    /// `None` while a query is being answered.
    idle_since: Option<Instant>,
    close: Arc<tokio::sync::Notify>,
}

/// One connection's slot; given back when dropped.
#[derive(Debug)]
struct TcpSlot {
    slots: Arc<TcpSlots>,
    id: u64,
    close: Arc<tokio::sync::Notify>,
}

/// How a new connection got its slot.
#[derive(Debug)]
enum Admission {
    Free(TcpSlot),
    /// The connection idle the longest was told to close to make room.
    Evicted(TcpSlot),
    /// Every connection is busy with a query.
    Full,
}

impl TcpSlots {
    fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            open: Default::default(),
        })
    }

    fn admit(self: &Arc<Self>, now: Instant) -> Admission {
        let mut t = self.open.lock().expect("tcp slots lock");
        let mut evicted = false;
        if t.open.len() >= self.max {
            let oldest = t
                .open
                .iter()
                .filter_map(|(id, s)| s.idle_since.map(|at| (at, *id)))
                .min();
            let Some((_, id)) = oldest else {
                return Admission::Full;
            };
            if let Some(s) = t.open.remove(&id) {
                s.close.notify_one();
            }
            evicted = true;
        }
        let id = t.next_id;
        t.next_id += 1;
        let close = Arc::new(tokio::sync::Notify::new());
        t.open.insert(
            id,
            SlotState {
                idle_since: Some(now),
                close: close.clone(),
            },
        );
        let slot = TcpSlot {
            slots: self.clone(),
            id,
            close,
        };
        if evicted {
            Admission::Evicted(slot)
        } else {
            Admission::Free(slot)
        }
    }
}

impl TcpSlot {
    /// Marks the connection busy (`None`) or idle since `at`.
    fn set_idle(&self, at: Option<Instant>) {
        let mut t = self.slots.open.lock().expect("tcp slots lock");
        if let Some(s) = t.open.get_mut(&self.id) {
            s.idle_since = at;
        }
    }

    /// Resolves when a newcomer took this connection's slot.
    async fn closed(&self) {
        self.close.notified().await
    }
}

impl Drop for TcpSlot {
    fn drop(&mut self) {
        let mut t = self.slots.open.lock().expect("tcp slots lock");
        t.open.remove(&self.id);
    }
}

/// Serves DNS over TCP (RFC 7766: length-prefixed messages, several per connection).
pub async fn serve_tcp(
    listener: TcpListener,
    resolver: Arc<Resolver>,
    metrics: Arc<Metrics>,
    limits: TcpLimits,
    shutdown: drain::Watch,
) {
    let slots = TcpSlots::new(limits.max_connections);
    let stop = shutdown.clone().signaled();
    tokio::pin!(stop);
    let accept_errors = AcceptErrors::new("dns_tcp");
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors, above all: counted, logged once per interval, and
                    // a pause so that the loop does not spin on it.
                    accept_errors.record(&e);
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        let slot = match slots.admit(Instant::now()) {
            Admission::Free(slot) => slot,
            Admission::Evicted(slot) => {
                metrics.shed(ShedReason::tcp_idle_closed);
                slot
            }
            Admission::Full => {
                tracing::debug!(%peer, "every tcp slot is busy with a query; closing");
                metrics.shed(ShedReason::tcp_slots_full);
                continue;
            }
        };
        let resolver = resolver.clone();
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            metrics.tcp_connections.inc();
            tokio::select! {
                _ = shutdown.signaled() => {}
                _ = slot.closed() => {}
                _ = connection(stream, &resolver, &metrics, limits.idle_timeout, &slot) => {}
            }
            metrics.tcp_connections.dec();
        });
    }
}

async fn connection(
    mut stream: TcpStream,
    resolver: &Resolver,
    metrics: &Metrics,
    idle: Duration,
    slot: &TcpSlot,
) {
    let _ = stream.set_nodelay(true);
    let client = stream.peer_addr().map(|a| a.ip()).ok();
    let mut buf = Vec::new();
    loop {
        let len = match tokio::time::timeout(idle, stream.read_u16()).await {
            Ok(Ok(l)) => usize::from(l),
            _ => return,
        };
        if len < HEADER_LEN {
            metrics.malformed(MalformedReason::short);
            return;
        }
        if len > MAX_QUERY_BYTES {
            metrics.malformed(MalformedReason::oversize);
            return;
        }
        buf.resize(len, 0);
        match tokio::time::timeout(idle, stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        // Over the limit the connection is closed, after a REFUSED while the refusal budget
        // lasts; a TCP client sees the close at once either way.
        match client.map_or(Verdict::Answer, |c| resolver.admit(c)) {
            Verdict::Answer => {}
            Verdict::Refuse => {
                if let Some(refused) = refusal_for(&buf) {
                    let mut out = (refused.len() as u16).to_be_bytes().to_vec();
                    out.extend_from_slice(&refused);
                    let _ = tokio::time::timeout(idle, stream.write_all(&out)).await;
                }
                return;
            }
            Verdict::Drop => return,
        }
        slot.set_idle(None);
        let Some(reply) = resolver.handle_from(&buf, Transport::Tcp, client).await else {
            return;
        };
        let mut out = Vec::with_capacity(reply.len() + 2);
        out.extend_from_slice(&(reply.len() as u16).to_be_bytes());
        out.extend_from_slice(&reply);
        match tokio::time::timeout(idle, stream.write_all(&out)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
        slot.set_idle(Some(Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheLimits;
    use crate::forwarder::UpstreamMode;
    use crate::names::Locale;
    use hickory_proto::op::MessageType;
    use isthmus_proto::model::{Resolution, Service, ServiceAddress, ServiceView, ViewResource};
    use isthmus_proto::subscription::LocalView;
    use prometheus_client::registry::Registry;

    fn locale() -> Locale {
        Locale {
            network: "net-a".into(),
            cluster: "c1".into(),
            namespace: "shop".into(),
            cluster_domain: "cluster.local".into(),
            ipv6: true,
        }
    }

    fn resolver(services: &[(&str, Vec<&str>)], synced: bool) -> Resolver {
        let view = LocalView {
            version: "v1".into(),
            resources: services
                .iter()
                .map(|(host, addrs)| {
                    let r = ViewResource::Service(Arc::new(ServiceView {
                        service: Service {
                            hostname: host.to_string(),
                            addresses: addrs
                                .iter()
                                .map(|a| ServiceAddress {
                                    cluster: String::new(),
                                    address: a.to_string(),
                                })
                                .collect(),
                            resolution: Resolution::Static,
                            ..Default::default()
                        },
                        endpoints: vec![],
                        ..Default::default()
                    }));
                    (r.key(), r)
                })
                .collect(),
        };
        let metrics = Arc::new(Metrics::register(&mut Registry::default()));
        Resolver::new(
            Arc::new(ArcSwap::from_pointee(NameTable::build(
                &view,
                &locale(),
                synced,
            ))),
            Cache::new(CacheLimits {
                max_entries: 10,
                max_ttl: Duration::from_secs(60),
                max_negative_ttl: Duration::from_secs(60),
            }),
            Forwarder::new(
                vec![],
                UpstreamMode::Sequential,
                Duration::from_secs(1),
                metrics.clone(),
            ),
            metrics,
            4,
            Duration::from_secs(30),
            1232,
            "cluster.local",
        )
    }

    fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::new(7, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.queries
            .push(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn reply(r: &Resolver, packet: &[u8], transport: Transport) -> Message {
        match r.begin(packet, transport) {
            Step::Reply(b) => Message::from_vec(&b).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn many() -> Vec<&'static str> {
        // 200 addresses: far more than 512 or 1232 bytes of A records.
        let v: Vec<String> = (0..200)
            .map(|i| format!("10.1.{}.{}", i / 250, i % 250 + 1))
            .collect();
        v.into_iter()
            .map(|s| &*Box::leak(s.into_boxed_str()))
            .collect()
    }

    #[test]
    fn mesh_answers_are_authoritative_with_the_configured_ttl() {
        let r = resolver(
            &[("web.shop.svc.cluster.local", vec!["10.96.0.1", "fd00::1"])],
            true,
        );
        let m = reply(&r, &query("web.", RecordType::A, None), Transport::Udp);
        assert_eq!(m.metadata.id, 7);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        // The short name is answered with its CNAME chain to the service hostname.
        assert_eq!(m.answers.len(), 2);
        assert!(m.answers.iter().all(|r| r.ttl == 30));
        assert_eq!(m.answers[0].name.to_ascii(), "web.");
        assert_eq!(m.answers[0].record_type(), RecordType::CNAME);
        assert_eq!(m.answers[1].name.to_ascii(), "web.shop.svc.cluster.local.");
        assert_eq!(m.answers[1].record_type(), RecordType::A);
        let m = reply(
            &r,
            &query("WEB.shop.svc.cluster.local.", RecordType::AAAA, None),
            Transport::Udp,
        );
        assert_eq!(m.answers.len(), 1, "case-insensitive");
    }

    #[test]
    fn wrong_family_and_other_types_of_a_mesh_name_are_nodata_never_forwarded() {
        let r = resolver(&[("web.shop.svc.cluster.local", vec!["10.96.0.1"])], true);
        let m = reply(
            &r,
            &query("web.shop.svc.cluster.local.", RecordType::AAAA, None),
            Transport::Udp,
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        for t in [
            RecordType::TXT,
            RecordType::HTTPS,
            RecordType::SRV,
            RecordType::MX,
            RecordType::ANY,
        ] {
            let packet = query("web.shop.svc.cluster.local.", t, None);
            let step = r.begin(&packet, Transport::Udp);
            assert!(
                matches!(step, Step::Reply(_)),
                "{t} is never forwarded: {step:?}"
            );
            let m = reply(&r, &packet, Transport::Udp);
            assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{t}");
            assert!(m.answers.is_empty(), "{t}");
            assert!(m.metadata.authoritative, "{t}");
            assert!(
                matches!(m.authorities[0].data, RData::SOA(_)),
                "{t}: SOA for negative caching"
            );
        }
        // A name outside the mesh still goes upstream, whatever its type.
        let step = r.begin(
            &query("example.org.", RecordType::TXT, None),
            Transport::Udp,
        );
        assert!(matches!(step, Step::Forward(_)), "{step:?}");
    }

    #[test]
    fn an_edns_version_above_zero_is_badvers() {
        let r = resolver(&[("web.shop.svc.cluster.local", vec!["10.96.0.1"])], true);
        let mut m = Message::new(9, MessageType::Query, OpCode::Query);
        m.queries.push(Query::query(
            Name::from_ascii("web.shop.svc.cluster.local.").unwrap(),
            RecordType::A,
        ));
        let mut e = Edns::new();
        e.set_version(1);
        m.set_edns(e);
        let answer = reply(&r, &m.to_vec().unwrap(), Transport::Udp);
        // Code 16 is both BADVERS and TSIG's BADSIG; a decoder names it either way.
        assert_eq!(u16::from(answer.metadata.response_code), 16);
        assert!(answer.answers.is_empty());
        assert_eq!(
            answer.edns.as_ref().map(|e| e.version()),
            Some(0),
            "our OPT is version 0"
        );
    }

    #[test]
    fn unknown_service_domain_names_are_nxdomain_once_synced_servfail_before() {
        let r = resolver(&[], true);
        let m = reply(
            &r,
            &query("gone.shop.svc.cluster.local.", RecordType::A, None),
            Transport::Udp,
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(
            matches!(m.authorities[0].data, RData::SOA(_)),
            "SOA for negative caching"
        );
        let r = resolver(&[], false);
        let m = reply(
            &r,
            &query("web.shop.svc.cluster.local.", RecordType::A, None),
            Transport::Udp,
        );
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    }

    #[test]
    fn truncates_to_the_client_udp_size_with_tc() {
        let r = resolver(&[("big.example.com", many())], true);
        let plain = match r.begin(
            &query("big.example.com.", RecordType::A, None),
            Transport::Udp,
        ) {
            Step::Reply(b) => b,
            other => panic!("{other:?}"),
        };
        assert!(plain.len() <= 512, "{}", plain.len());
        let m = Message::from_vec(&plain).unwrap();
        assert!(m.metadata.truncation);
        assert!(!m.answers.is_empty() && m.answers.len() < 200);

        let edns = match r.begin(
            &query("big.example.com.", RecordType::A, Some(4096)),
            Transport::Udp,
        ) {
            Step::Reply(b) => b,
            other => panic!("{other:?}"),
        };
        assert!(edns.len() <= 1232 && edns.len() > 512, "{}", edns.len());
        let m = Message::from_vec(&edns).unwrap();
        assert!(m.metadata.truncation);
        assert!(m.edns.is_some(), "an EDNS query gets an EDNS answer");

        let m = reply(
            &r,
            &query("big.example.com.", RecordType::A, None),
            Transport::Tcp,
        );
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 200, "TCP carries everything");
    }

    #[test]
    fn malformed_packets_are_dropped_or_formerr() {
        let r = resolver(&[], true);
        assert!(matches!(r.begin(&[1, 2, 3], Transport::Udp), Step::Drop));
        // A response is never answered (two resolvers must not loop).
        let mut resp = query("x.", RecordType::A, None);
        resp[2] |= 0x80;
        assert!(matches!(r.begin(&resp, Transport::Udp), Step::Drop));
        // A label longer than the packet; a compression pointer to itself; garbage.
        let mut bad_label = query("x.", RecordType::A, None)[..12].to_vec();
        bad_label.extend_from_slice(&[63, b'a', b'b']);
        let mut looped = query("x.", RecordType::A, None)[..12].to_vec();
        looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        let mut garbage = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        garbage.extend(std::iter::repeat_n(0xff, 40));
        for p in [bad_label, looped, garbage] {
            let m = reply(&r, &p, Transport::Udp);
            assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
            assert_eq!(m.metadata.id, u16::from_be_bytes([p[0], p[1]]));
        }
        // No question.
        let mut none = query("x.", RecordType::A, None)[..12].to_vec();
        none[5] = 0;
        assert_eq!(
            reply(&r, &none, Transport::Udp).metadata.response_code,
            ResponseCode::FormErr
        );
        assert!(matches!(
            r.begin(&vec![0u8; MAX_QUERY_BYTES + 1], Transport::Udp),
            Step::Drop
        ));
    }

    #[test]
    fn encode_within_keeps_what_fits() {
        let mut m = Message::response(1, OpCode::Query);
        m.queries
            .push(Query::query(Name::from_ascii("a.").unwrap(), RecordType::A));
        for i in 0..100u8 {
            m.answers.push(Record::from_rdata(
                Name::from_ascii("a.").unwrap(),
                60,
                RData::A(A::new(10, 0, 0, i)),
            ));
        }
        let b = encode_within(m.clone(), 100);
        assert!(b.len() <= 100);
        assert!(Message::from_vec(&b).unwrap().metadata.truncation);
        let b = encode_within(m, 65535);
        let back = Message::from_vec(&b).unwrap();
        assert_eq!(back.answers.len(), 100);
        assert!(!back.metadata.truncation);
    }

    #[test]
    fn a_new_tcp_client_takes_the_slot_of_the_oldest_idle_one() {
        let slots = TcpSlots::new(2);
        let t0 = Instant::now();
        let Admission::Free(first) = slots.admit(t0) else {
            panic!("a free slot")
        };
        let Admission::Free(second) = slots.admit(t0 + Duration::from_secs(1)) else {
            panic!("a free slot")
        };
        // The first is busy with a query: the second, idle, is the one closed.
        first.set_idle(None);
        let Admission::Evicted(third) = slots.admit(t0 + Duration::from_secs(2)) else {
            panic!("an idle slot taken")
        };
        assert!(
            futures_util::FutureExt::now_or_never(second.closed()).is_some(),
            "the idle connection is told to close"
        );
        assert!(futures_util::FutureExt::now_or_never(first.closed()).is_none());
        // Both remaining are busy: nobody is closed for a newcomer.
        third.set_idle(None);
        assert!(matches!(
            slots.admit(t0 + Duration::from_secs(3)),
            Admission::Full
        ));
        drop(second);
        assert_eq!(
            slots.open.lock().unwrap().open.len(),
            2,
            "an evicted slot is not counted twice"
        );
        drop(first);
        assert!(matches!(
            slots.admit(t0 + Duration::from_secs(4)),
            Admission::Free(_)
        ));
    }

    #[test]
    fn the_fast_path_answers_as_the_general_path_does() {
        let r = resolver(
            &[
                (
                    "web.shop.svc.cluster.local",
                    vec!["10.96.0.1", "10.96.0.2", "fd00::1"],
                ),
                ("*.wild.example.com", vec!["240.240.0.7"]),
                ("big.example.com", many()),
            ],
            true,
        );
        let mut dnssec = query("web.shop.svc.cluster.local.", RecordType::A, Some(1232));
        // The DO bit, in the OPT record's flags (the last record of the query).
        let flags = dnssec.len() - 4;
        dnssec[flags] |= 0x80;
        let mut mixed_case = query("Web.Shop.svc.cluster.local.", RecordType::AAAA, None);
        mixed_case[3] |= 0x10; // CD
        let fast = [
            query("web.shop.svc.cluster.local.", RecordType::A, None),
            query("web.shop.svc.cluster.local.", RecordType::AAAA, Some(4096)),
            query("a.b.wild.example.com.", RecordType::A, None),
            dnssec,
            mixed_case,
        ];
        for p in &fast {
            let quick = r
                .answer_fast(p)
                .expect("a plain mesh query takes the fast path");
            let Step::Reply(general) = r.begin_general(p, Transport::Udp, None) else {
                panic!("a reply")
            };
            let (a, b) = (
                Message::from_vec(&quick).unwrap(),
                Message::from_vec(&general).unwrap(),
            );
            assert_eq!(a.to_vec().unwrap(), b.to_vec().unwrap(), "{a:?}\n{b:?}");
        }
        // The rest goes the long way: a short name (CNAME chain), too big for 512 bytes,
        // another type, an unknown name, an EDNS version above 0.
        let mut badvers = query("web.shop.svc.cluster.local.", RecordType::A, Some(1232));
        let version = badvers.len() - 5;
        badvers[version] = 1;
        for p in [
            query("web.", RecordType::A, None),
            query("big.example.com.", RecordType::A, None),
            query("web.shop.svc.cluster.local.", RecordType::TXT, None),
            query("example.org.", RecordType::A, None),
            badvers,
        ] {
            assert!(r.answer_fast(&p).is_none(), "{:?}", Message::from_vec(&p));
        }
    }

    #[test]
    fn a_cache_hit_on_the_fast_path_is_the_general_paths_answer() {
        let r = resolver(&[("web.shop.svc.cluster.local", vec!["10.96.0.1"])], true);
        let now = Instant::now();
        let owner = Name::from_ascii("www.example.org.").unwrap();
        let target = Name::from_ascii("edge.example.net.").unwrap();
        let mut upstream = Message::response(1, OpCode::Query);
        upstream.metadata.authentic_data = true;
        upstream.answers = vec![
            Record::from_rdata(owner.clone(), 300, RData::CNAME(CNAME(target.clone()))),
            Record::from_rdata(target.clone(), 60, RData::A(A::new(192, 0, 2, 1))),
            Record::from_rdata(target, 60, RData::A(A::new(192, 0, 2, 2))),
        ];
        for dnssec_ok in [false, true] {
            let key = CacheKey {
                name: "www.example.org".into(),
                qtype: RecordType::A,
                qclass: DNSClass::IN,
                dnssec_ok,
            };
            r.cache().insert(key, &upstream, now).unwrap();
        }
        let mut with_do = query("www.example.org.", RecordType::A, Some(1232));
        let flags = with_do.len() - 4;
        with_do[flags] |= 0x80;
        for p in [
            query("www.example.org.", RecordType::A, None),
            query("WWW.Example.org.", RecordType::A, Some(4096)),
            with_do,
        ] {
            let quick = r
                .answer_fast(&p)
                .expect("a cached name takes the fast path");
            let Step::Reply(general) = r.begin_general(&p, Transport::Udp, None) else {
                panic!("a reply")
            };
            let (a, b) = (
                Message::from_vec(&quick).unwrap(),
                Message::from_vec(&general).unwrap(),
            );
            // The same but for the case of the owner names: the fast path's point to the
            // question as the client spelled it, the general path's are as cached.
            let lower = |m: &Message| {
                let mut m = m.clone();
                m.queries
                    .iter_mut()
                    .for_each(|q| q.name = q.name.to_lowercase());
                m.answers
                    .iter_mut()
                    .for_each(|r| r.name = r.name.to_lowercase());
                m.to_vec().unwrap()
            };
            assert_eq!(lower(&a), lower(&b), "{a:?}\n{b:?}");
            assert!(a.metadata.authentic_data);
            assert_eq!(a.answers.len(), 3);
        }
        // Not cached: the general path (which forwards).
        assert!(r
            .answer_fast(&query("other.example.org.", RecordType::A, None))
            .is_none());
        // The service domain never comes from the cache.
        assert!(r
            .answer_fast(&query("gone.shop.svc.cluster.local.", RecordType::A, None))
            .is_none());
    }
}
