//! The one HTTP GET of the commands that read a program's admin or metrics port: plain
//! HTTP/1.1 over TCP, the answer read to its end (`Connection: close`, a chunked body
//! undone) within a bound of time and size. Each command says what a failure means for it.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why a GET got no HTTP answer.
#[derive(Debug, thiserror::Error)]
pub(super) enum GetError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("reading the answer: {0}")]
    Read(std::io::Error),
    #[error("no answer within {}s", .0.as_secs())]
    Timeout(Duration),
    #[error("not an HTTP answer ({0})")]
    NotHttp(&'static str),
}

/// `GET path` from `authority` (`host:port`): the status and the body, at most `max` bytes
/// of answer, all within `timeout`.
pub(super) async fn get(
    authority: &str,
    path: &str,
    accept: &str,
    timeout: Duration,
    max: u64,
) -> Result<(u16, String), GetError> {
    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(GetError::Connect)?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
        );
        conn.write_all(request.as_bytes())
            .await
            .map_err(GetError::Read)?;
        let mut raw = Vec::new();
        conn.take(max)
            .read_to_end(&mut raw)
            .await
            .map_err(GetError::Read)?;
        Ok::<_, GetError>(raw)
    };
    let raw = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| GetError::Timeout(timeout))??;
    parse_response(&raw)
}

/// The status and body of an HTTP/1.x response read to its end, undoing a chunked
/// transfer encoding.
pub(super) fn parse_response(raw: &[u8]) -> Result<(u16, String), GetError> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or(GetError::NotHttp("no end of headers"))?;
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .filter(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or(GetError::NotHttp("no status line"))?;
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding") && v.trim() == "chunked"
        })
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut rest: &str) -> Result<String, GetError> {
    let truncated = || GetError::NotHttp("truncated chunk");
    let mut out = String::new();
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return Err(truncated());
        };
        let size = size.split(';').next().unwrap_or_default().trim();
        let n = usize::from_str_radix(size, 16).map_err(|_| GetError::NotHttp("bad chunk size"))?;
        if n == 0 {
            return Ok(out);
        }
        out.push_str(after.get(..n).ok_or_else(truncated)?);
        rest = after
            .get(n..)
            .unwrap_or_default()
            .trim_start_matches("\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunked_answer_is_reassembled() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n";
        assert_eq!(parse_response(raw).unwrap(), (200, "{\"a\":1}".to_string()));
        let plain = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\nno";
        assert_eq!(parse_response(plain).unwrap(), (503, "no".to_string()));
        assert!(matches!(
            parse_response(b"SSH-2.0-OpenSSH\r\n\r\n"),
            Err(GetError::NotHttp("no status line"))
        ));
    }
}
