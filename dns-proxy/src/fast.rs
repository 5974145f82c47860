//! The answers to the most common queries, written straight onto the wire. A plain query
//! (one question of class IN, nothing else but perhaps an EDNS OPT record) is read in place
//! (the name lowercased into a buffer on the stack), and its answer is built from the
//! query's own header and question followed by:
//!
//! - for an A or AAAA question of a mesh name as the catalog spells it (or under a
//!   wildcard), each address as a record whose owner is a compression pointer to the
//!   question's name;
//! - for a name in the cache, the records the cache keeps encoded
//!   ([`crate::cache::WireRecords`]), their TTLs rewritten.
//!
//! No message is decoded or encoded; nothing is allocated but the answer (and the cache
//! key). Anything else (another class, a short name answered with its CNAME chain, an
//! answer that does not fit the client's size, an EDNS version above 0, any doubt about
//! the packet) is left to the general path, [`crate::server::Resolver::begin`], which gives
//! the same answer the long way.

use crate::cache::WireHit;
use crate::config::MAX_QUERY_BYTES;
use crate::names::{MeshName, NameTable};

const HEADER_LEN: usize = 12;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
/// The longest name on the wire (RFC 1035 3.1), so the longest in text is 253 characters.
const MAX_NAME: usize = 255;
/// What every DNS client accepts over UDP without EDNS (RFC 1035).
const CLASSIC_UDP_PAYLOAD: usize = 512;

/// A plain query for one name of class IN, read in place.
#[derive(Debug)]
pub struct PlainQuery<'a> {
    packet: &'a [u8],
    /// The question (name, type and class) as sent, echoed in the answer.
    question: std::ops::Range<usize>,
    name: [u8; MAX_NAME],
    name_len: usize,
    pub qtype: u16,
    /// The client's EDNS: its UDP payload size and DO bit.
    edns: Option<(u16, bool)>,
}

impl<'a> PlainQuery<'a> {
    /// Reads `packet` as a plain query of class IN, or `None` for anything else.
    pub fn parse(packet: &'a [u8]) -> Option<Self> {
        if packet.len() < HEADER_LEN || packet.len() > MAX_QUERY_BYTES {
            return None;
        }
        let counts = |i: usize| u16::from_be_bytes([packet[i], packet[i + 1]]);
        // QR = 0, opcode QUERY; one question, no answers or authorities, at most one
        // additional (the OPT).
        if packet[2] & 0xf8 != 0 || counts(4) != 1 || counts(6) != 0 || counts(8) != 0 {
            return None;
        }
        let additionals = counts(10);
        if additionals > 1 {
            return None;
        }
        let mut name = [0u8; MAX_NAME];
        let mut name_len = 0;
        let mut at = HEADER_LEN;
        loop {
            let len = usize::from(*packet.get(at)?);
            at += 1;
            if len == 0 {
                break;
            }
            // A compression pointer (or a reserved label type) in a question: the long way.
            if len > 63 {
                return None;
            }
            let label = packet.get(at..at + len)?;
            if name_len + len + 1 > MAX_NAME - 2 {
                return None;
            }
            if name_len > 0 {
                name[name_len] = b'.';
                name_len += 1;
            }
            for &b in label {
                // Only what a hostname holds; anything a text name would escape goes the
                // long way.
                if !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'*') {
                    return None;
                }
                name[name_len] = b.to_ascii_lowercase();
                name_len += 1;
            }
            at += len;
        }
        let fixed = packet.get(at..at + 4)?;
        let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let qclass = u16::from_be_bytes([fixed[2], fixed[3]]);
        if qclass != CLASS_IN || name_len == 0 {
            return None;
        }
        let question = HEADER_LEN..at + 4;
        at += 4;
        let edns = if additionals == 1 {
            // The OPT record: root owner, type 41, class = payload size, TTL = extended
            // RCODE, version and flags, then its options, and nothing after it.
            let opt = packet.get(at..at + 11)?;
            if opt[0] != 0 || u16::from_be_bytes([opt[1], opt[2]]) != TYPE_OPT {
                return None;
            }
            let version = opt[6];
            let rdlen = usize::from(u16::from_be_bytes([opt[9], opt[10]]));
            if version != 0 || at + 11 + rdlen != packet.len() {
                return None;
            }
            Some((u16::from_be_bytes([opt[3], opt[4]]), opt[7] & 0x80 != 0))
        } else {
            if at != packet.len() {
                return None;
            }
            None
        };
        Some(Self {
            packet,
            question,
            name,
            name_len,
            qtype,
            edns,
        })
    }

    /// The name asked, lowercased, without the trailing dot.
    pub fn name(&self) -> &str {
        // Only ASCII was copied in.
        std::str::from_utf8(&self.name[..self.name_len]).unwrap_or_default()
    }

    /// Whether the client asked for DNSSEC records (the DO bit).
    pub fn dnssec_ok(&self) -> bool {
        self.edns.is_some_and(|(_, dnssec_ok)| dnssec_ok)
    }

    /// The answer when the name is a mesh name in `table` asked as A or AAAA under the name
    /// as asked, with `ttl` and our EDNS payload `max_udp_payload`, and fits the client's
    /// UDP size; `None` leaves the query to the general path.
    pub fn answer(&self, table: &NameTable, ttl: u32, max_udp_payload: u16) -> Option<Vec<u8>> {
        let found = table.lookup(self.name())?;
        if !matches!(self.qtype, TYPE_A | TYPE_AAAA)
            || (!found.hostname.starts_with("*.") && found.hostname != self.name())
        {
            // Another type (no data, with the SOA), or a short name (its CNAME chain): the
            // general path's.
            return None;
        }
        self.encode(found, ttl, max_udp_payload)
    }

    /// The answer from a cache hit, if it fits the client's UDP size.
    pub fn answer_cached(&self, hit: &WireHit, max_udp_payload: u16) -> Option<Vec<u8>> {
        let w = &hit.records;
        let [answers, authorities, additionals] = w.counts;
        let len = self.reply_len(w.bytes.len(), max_udp_payload)?;
        let mut out = Vec::with_capacity(len);
        // Not authoritative; the upstream's AD bit.
        self.header(
            &mut out,
            0,
            (if w.authentic_data { 0x20 } else { 0 }) | w.rcode,
            [answers, authorities, additionals],
        );
        let at = out.len();
        out.extend_from_slice(&w.bytes);
        for &(offset, ttl) in &w.ttls {
            out[at + offset..at + offset + 4].copy_from_slice(&hit.ttl(ttl).to_be_bytes());
        }
        self.opt(&mut out, max_udp_payload);
        Some(out)
    }

    /// The length of an answer of `records` bytes after the question, or `None` when that
    /// is more than the client takes over UDP (truncation is the general path's).
    fn reply_len(&self, records: usize, max_udp_payload: u16) -> Option<usize> {
        let limit = match self.edns {
            Some((size, _)) => usize::from(size.min(max_udp_payload)).max(CLASSIC_UDP_PAYLOAD),
            None => CLASSIC_UDP_PAYLOAD,
        };
        let opt_len = if self.edns.is_some() { 11 } else { 0 };
        let len = HEADER_LEN + self.question.len() + records + opt_len;
        (len <= limit).then_some(len)
    }

    /// The header and the question: the query's ID, QR, opcode QUERY, `aa`, the client's
    /// RD; RA, the client's CD and `flags` (AD and RCODE); the counts (one more additional
    /// for our OPT when the client sent EDNS).
    fn header(&self, out: &mut Vec<u8>, aa: u8, flags: u8, [an, ns, ar]: [u16; 3]) {
        let q = self.packet;
        out.extend_from_slice(&q[0..2]);
        out.push(0x80 | aa | (q[2] & 0x01));
        out.push(0x80 | (q[3] & 0x10) | flags);
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&an.to_be_bytes());
        out.extend_from_slice(&ns.to_be_bytes());
        out.extend_from_slice(&(ar + u16::from(self.edns.is_some())).to_be_bytes());
        out.extend_from_slice(&q[self.question.clone()]);
    }

    /// Our OPT record when the client sent EDNS: our payload size, version 0, its DO bit.
    fn opt(&self, out: &mut Vec<u8>, max_udp_payload: u16) {
        if let Some((_, dnssec_ok)) = self.edns {
            out.push(0);
            out.extend_from_slice(&TYPE_OPT.to_be_bytes());
            out.extend_from_slice(&max_udp_payload.to_be_bytes());
            // Extended RCODE 0, version 0, the DO bit echoed; no options.
            out.extend_from_slice(&[0, 0, if dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
        }
    }

    fn encode(&self, found: &MeshName, ttl: u32, max_udp_payload: u16) -> Option<Vec<u8>> {
        let (count, rdlen) = match self.qtype {
            TYPE_A => (found.v4.len(), 4),
            _ => (found.v6.len(), 16),
        };
        let count = u16::try_from(count).ok()?;
        let len = self.reply_len(usize::from(count) * (12 + rdlen), max_udp_payload)?;
        let mut out = Vec::with_capacity(len);
        // Authoritative, NOERROR.
        self.header(&mut out, 0x04, 0, [count, 0, 0]);
        let mut record = |rdata: &[u8]| {
            // Owner: a pointer to the question's name at offset 12.
            out.extend_from_slice(&[0xc0, 0x0c]);
            out.extend_from_slice(&self.qtype.to_be_bytes());
            out.extend_from_slice(&CLASS_IN.to_be_bytes());
            out.extend_from_slice(&ttl.to_be_bytes());
            out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            out.extend_from_slice(rdata);
        };
        match self.qtype {
            TYPE_A => found.v4.iter().for_each(|a| record(&a.octets())),
            _ => found.v6.iter().for_each(|a| record(&a.octets())),
        }
        self.opt(&mut out, max_udp_payload);
        Some(out)
    }
}
