//! The ClientHello reader of the proxy core: it takes the bytes a client sends first,
//! possibly split across many TCP segments and several TLS records, and finds the server
//! name in the ClientHello without decrypting or answering anything; everything it reads is
//! kept so the east-west gateway can replay it to the chosen endpoint. It is pure logic with
//! no I/O, and reads untrusted bytes, so it has a fuzz target (`client_hello`).
//!
//! What the server name means (the mesh key `outbound_.<port>_.<subset>_.<hostname>`) is
//! [`isthmus_proto::sni::SniKey`]'s business, not the reader's.

/// Bytes of ClientHello the reader accepts before giving up: real ones are well under 2 KiB
/// (a post-quantum key share makes them ~1.3 KiB), 16 KiB leaves room for large ones.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;

/// Why the first bytes of a connection are not a ClientHello we can route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("not TLS: the first bytes are not a TLS handshake record")]
    NotTls,
    #[error("the TLS handshake does not start with a ClientHello")]
    NotClientHello,
    #[error("the ClientHello is longer than {MAX_CLIENT_HELLO} bytes")]
    TooLarge,
    #[error("the ClientHello is malformed")]
    Malformed,
    #[error("the ClientHello carries no server name (SNI)")]
    NoSni,
}

impl HelloError {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            HelloError::NotTls => "not_tls",
            HelloError::NotClientHello => "not_client_hello",
            HelloError::TooLarge => "client_hello_too_large",
            HelloError::Malformed => "malformed_client_hello",
            HelloError::NoSni => "no_sni",
        }
    }
}

/// What the reader needs next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// Feed more bytes.
    NeedMore,
    /// The server name the client asked for.
    ServerName(String),
}

/// Reads a ClientHello incrementally from whatever the client sends first.
#[derive(Debug, Default)]
pub struct ClientHelloReader {
    /// Every byte received, to be replayed to the upstream unchanged.
    received: Vec<u8>,
    /// The handshake bytes gathered from the records so far.
    handshake: Vec<u8>,
    /// How much of `received` has been taken apart into records.
    consumed: usize,
}

impl ClientHelloReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything received so far (the bytes to replay).
    pub fn received(&self) -> &[u8] {
        &self.received
    }

    pub fn into_received(self) -> Vec<u8> {
        self.received
    }

    /// Adds bytes from the client and says whether the server name is known yet.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Hello, HelloError> {
        self.received.extend_from_slice(bytes);
        self.parse()
    }

    /// Where the next bytes from the client go: a reader appends to it (into its spare
    /// capacity, with no copy and no zeroing), then calls [`parse`](Self::parse).
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.received
    }

    /// Says whether the bytes received so far (see [`buffer`](Self::buffer)) name the server
    /// yet; as [`feed`](Self::feed) does after adding its bytes.
    pub fn parse(&mut self) -> Result<Hello, HelloError> {
        if self.received.len() > MAX_CLIENT_HELLO + RECORD_HEADER * 4 {
            return Err(HelloError::TooLarge);
        }
        // Take apart every complete record, gathering the handshake bytes.
        loop {
            let rest = &self.received[self.consumed..];
            if rest.is_empty() {
                break;
            }
            // Judge the record type and version as soon as they arrive, so that plaintext
            // is refused on its first byte rather than after a timeout.
            if rest[0] != CONTENT_HANDSHAKE {
                return Err(if self.consumed == 0 {
                    HelloError::NotTls
                } else {
                    HelloError::Malformed
                });
            }
            if rest.len() >= 2 && rest[1] != 3 {
                return Err(HelloError::NotTls);
            }
            if rest.len() < RECORD_HEADER {
                break;
            }
            let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
            if len == 0 || len > MAX_CLIENT_HELLO {
                return Err(HelloError::Malformed);
            }
            if rest.len() < RECORD_HEADER + len {
                break;
            }
            self.handshake
                .extend_from_slice(&rest[RECORD_HEADER..RECORD_HEADER + len]);
            self.consumed += RECORD_HEADER + len;
        }
        if self.handshake.is_empty() {
            return Ok(Hello::NeedMore);
        }
        if self.handshake[0] != HANDSHAKE_CLIENT_HELLO {
            return Err(HelloError::NotClientHello);
        }
        if self.handshake.len() < 4 {
            return Ok(Hello::NeedMore);
        }
        let body_len = (usize::from(self.handshake[1]) << 16)
            | (usize::from(self.handshake[2]) << 8)
            | usize::from(self.handshake[3]);
        if body_len > MAX_CLIENT_HELLO {
            return Err(HelloError::TooLarge);
        }
        if self.handshake.len() < 4 + body_len {
            return Ok(Hello::NeedMore);
        }
        server_name(&self.handshake[4..4 + body_len]).map(Hello::ServerName)
    }
}

/// A cursor over a byte slice that fails instead of panicking.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HelloError> {
        if self.0.len() < n {
            return Err(HelloError::Malformed);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, HelloError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, HelloError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn vec8(&mut self) -> Result<&'a [u8], HelloError> {
        let n = usize::from(self.u8()?);
        self.take(n)
    }

    fn vec16(&mut self) -> Result<&'a [u8], HelloError> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
}

/// The host name in a ClientHello body (RFC 8446 4.1.2, RFC 6066 3).
fn server_name(body: &[u8]) -> Result<String, HelloError> {
    let mut c = Cursor(body);
    c.take(2)?; // legacy_version
    c.take(32)?; // random
    c.vec8()?; // legacy_session_id
    c.vec16()?; // cipher_suites
    c.vec8()?; // legacy_compression_methods
    if c.0.is_empty() {
        return Err(HelloError::NoSni);
    }
    // Every extension is read: RFC 8446 4.2 allows one extension of each type and RFC 6066 3
    // one name of each type, so a second server name (which another reader might route on
    // instead) makes the hello malformed rather than routable by its first.
    let mut exts = Cursor(c.vec16()?);
    let mut found: Option<String> = None;
    let mut seen_server_name = false;
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let data = exts.vec16()?;
        if ty != EXT_SERVER_NAME {
            continue;
        }
        if std::mem::replace(&mut seen_server_name, true) {
            return Err(HelloError::Malformed);
        }
        let mut list = Cursor(Cursor(data).vec16()?);
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec16()?;
            if name_type != NAME_TYPE_HOST {
                continue;
            }
            if found.is_some() {
                return Err(HelloError::Malformed);
            }
            let name = std::str::from_utf8(name).map_err(|_| HelloError::Malformed)?;
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(HelloError::Malformed);
            }
            found = Some(name.to_ascii_lowercase());
        }
    }
    found.ok_or(HelloError::NoSni)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A real ClientHello from rustls for `sni` (None: no SNI extension).
    fn client_hello(sni: Option<&str>) -> Vec<u8> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(isthmus_proto::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        cfg.enable_sni = sni.is_some();
        let name =
            rustls::pki_types::ServerName::try_from(sni.unwrap_or("no-sni.invalid").to_string())
                .unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    #[test]
    fn reads_the_server_name_of_a_real_client_hello() {
        let sni = "outbound_.9080_._.reviews.shop.svc.cluster.local";
        let hello = client_hello(Some(sni));
        let mut r = ClientHelloReader::new();
        assert_eq!(r.feed(&hello).unwrap(), Hello::ServerName(sni.to_string()));
        assert_eq!(
            r.received(),
            &hello[..],
            "every byte is kept for the replay"
        );
    }

    #[test]
    fn a_client_hello_split_byte_by_byte_is_read() {
        let hello = client_hello(Some("outbound_.80_._.a.example.com"));
        let mut r = ClientHelloReader::new();
        for (i, b) in hello.iter().enumerate() {
            let got = r.feed(std::slice::from_ref(b)).unwrap();
            if i + 1 < hello.len() {
                assert_eq!(got, Hello::NeedMore, "byte {i}");
            } else {
                assert_eq!(
                    got,
                    Hello::ServerName("outbound_.80_._.a.example.com".into())
                );
            }
        }
    }

    #[test]
    fn a_client_hello_split_across_records_is_read() {
        let hello = client_hello(Some("outbound_.80_._.split.example.com"));
        let body = &hello[RECORD_HEADER..];
        // Re-frame the handshake bytes as three records of uneven sizes.
        let mut framed = Vec::new();
        for chunk in [&body[..7], &body[7..100], &body[100..]] {
            framed.extend_from_slice(&[CONTENT_HANDSHAKE, 3, 1]);
            framed.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            framed.extend_from_slice(chunk);
        }
        let mut r = ClientHelloReader::new();
        assert_eq!(
            r.feed(&framed).unwrap(),
            Hello::ServerName("outbound_.80_._.split.example.com".into())
        );
    }

    #[test]
    fn refusals_are_named() {
        let mut r = ClientHelloReader::new();
        assert_eq!(r.feed(b"GET / HTTP/1.1\r\n\r\n"), Err(HelloError::NotTls));
        let mut r = ClientHelloReader::new();
        assert_eq!(
            r.feed(&[CONTENT_HANDSHAKE, 9]),
            Err(HelloError::NotTls),
            "wrong version byte, refused at byte 2"
        );
        let mut r = ClientHelloReader::new();
        assert_eq!(
            r.feed(&[CONTENT_HANDSHAKE, 3, 1, 0, 4, 2, 0, 0, 0]),
            Err(HelloError::NotClientHello)
        );
        let hello = client_hello(None);
        let mut r = ClientHelloReader::new();
        assert_eq!(r.feed(&hello), Err(HelloError::NoSni));
        let mut r = ClientHelloReader::new();
        assert_eq!(
            r.feed(&[CONTENT_HANDSHAKE, 3, 1, 0xff, 0xff]),
            Err(HelloError::Malformed)
        );
        // A handshake claiming a huge body is refused without waiting for it.
        let mut r = ClientHelloReader::new();
        assert_eq!(
            r.feed(&[CONTENT_HANDSHAKE, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff]),
            Err(HelloError::TooLarge)
        );
        // Endless small records never grow past the bound.
        let mut r = ClientHelloReader::new();
        let mut result = Ok(Hello::NeedMore);
        for _ in 0..10_000 {
            result = r.feed(&[CONTENT_HANDSHAKE, 3, 1, 0, 1, 1]);
            if result.is_err() {
                break;
            }
        }
        assert!(result.is_err(), "bounded");
        assert!(r.received().len() <= MAX_CLIENT_HELLO + 64);
    }

    /// A hand-built TLS 1.3 ClientHello record with `extensions` (type, data) in order.
    fn hello_with(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut exts = Vec::new();
        for (ty, data) in extensions {
            exts.extend_from_slice(&ty.to_be_bytes());
            exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
            exts.extend_from_slice(data);
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]); // random
        body.push(0); // no session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![22, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    /// A server_name extension's data naming `hosts`, each as a host_name entry.
    fn sni(hosts: &[&str]) -> Vec<u8> {
        let mut list = Vec::new();
        for h in hosts {
            list.push(NAME_TYPE_HOST);
            list.extend_from_slice(&(h.len() as u16).to_be_bytes());
            list.extend_from_slice(h.as_bytes());
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        data
    }

    #[test]
    fn a_second_server_name_makes_the_hello_malformed() {
        let read = |rec: Vec<u8>| ClientHelloReader::new().feed(&rec);
        let one = hello_with(&[(EXT_SERVER_NAME, sni(&["a.example"]))]);
        assert_eq!(read(one), Ok(Hello::ServerName("a.example".into())));
        // Two server_name extensions: whichever a reader takes, another may take the other.
        let twice = hello_with(&[
            (EXT_SERVER_NAME, sni(&["a.example"])),
            (10, vec![0, 2, 0, 29]),
            (EXT_SERVER_NAME, sni(&["b.example"])),
        ]);
        assert_eq!(read(twice), Err(HelloError::Malformed));
        // Two host names in one extension.
        let two_names = hello_with(&[(EXT_SERVER_NAME, sni(&["a.example", "b.example"]))]);
        assert_eq!(read(two_names), Err(HelloError::Malformed));
        // Other extensions after the server name are still read (and checked).
        let after = hello_with(&[(EXT_SERVER_NAME, sni(&["a.example"])), (43, vec![2, 3, 4])]);
        assert_eq!(read(after), Ok(Hello::ServerName("a.example".into())));
    }

    #[test]
    fn truncated_hellos_never_panic() {
        let hello = client_hello(Some("outbound_.80_._.t.example.com"));
        // Every prefix, re-framed as if complete, is either refused or waits.
        for n in 0..hello.len() - RECORD_HEADER {
            let body = &hello[RECORD_HEADER..RECORD_HEADER + n];
            let mut framed = vec![CONTENT_HANDSHAKE, 3, 1];
            framed.extend_from_slice(&(body.len().max(1) as u16).to_be_bytes());
            framed.extend_from_slice(body);
            if body.is_empty() {
                framed.push(1);
            }
            let _ = ClientHelloReader::new().feed(&framed);
        }
    }
}
