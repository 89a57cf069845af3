//! One HTTP/1.1 POST with a JSON body over a fresh TCP connection, which is
//! all etcd's JSON gateway needs. A fresh connection per call keeps the
//! failure modes simple (no half-dead pooled socket after etcd restarts);
//! on loopback or a LAN it costs well under a millisecond.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// The most response bytes read from etcd: larger answers are refused (our
/// records are a few hundred bytes; a prefix read of node states a few KiB).
pub const MAX_RESPONSE: usize = 4 << 20;

/// Why an HTTP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The endpoint is not `http://HOST:PORT`.
    #[error("etcd endpoint '{0}' must look like http://HOST:PORT (TLS to etcd is not supported yet: keep etcd's client port on loopback or a trusted network)")]
    Endpoint(String),
    /// Connecting, sending or receiving failed (or timed out).
    #[error("{endpoint}: {source}")]
    Io {
        /// The endpoint.
        endpoint: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The answer is not well-formed HTTP/1.1.
    #[error("{endpoint}: malformed HTTP answer: {why}")]
    Malformed {
        /// The endpoint.
        endpoint: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// An etcd client URL, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `HOST:PORT`, as given.
    pub authority: String,
}

impl std::str::FromStr for Endpoint {
    type Err = HttpError;

    fn from_str(s: &str) -> Result<Endpoint, HttpError> {
        let rest = s
            .strip_prefix("http://")
            .ok_or_else(|| HttpError::Endpoint(s.to_string()))?;
        let authority = rest.trim_end_matches('/');
        let port_ok = authority
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !port_ok || authority.contains('/') {
            return Err(HttpError::Endpoint(s.to_string()));
        }
        Ok(Endpoint {
            authority: authority.to_string(),
        })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}", self.authority)
    }
}

/// POSTs `body` (JSON) to `path`; the status code and the body of the answer.
/// `timeout` bounds the connect and each read and write.
pub fn post(
    ep: &Endpoint,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<(u16, Vec<u8>), HttpError> {
    let io = |source| HttpError::Io {
        endpoint: ep.to_string(),
        source,
    };
    let addr = ep
        .authority
        .to_socket_addrs()
        .map_err(io)?
        .next()
        .ok_or_else(|| io(std::io::Error::other("the host name has no address")))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    s.set_nodelay(true).map_err(io)?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        ep.authority,
        body.len()
    );
    s.write_all(head.as_bytes()).map_err(io)?;
    s.write_all(body).map_err(io)?;
    let mut raw = Vec::with_capacity(1024);
    s.take(MAX_RESPONSE as u64 + 1)
        .read_to_end(&mut raw)
        .map_err(io)?;
    if raw.len() > MAX_RESPONSE {
        return Err(HttpError::Malformed {
            endpoint: ep.to_string(),
            why: "answer larger than 4 MiB",
        });
    }
    parse_response(&raw).map_err(|why| HttpError::Malformed {
        endpoint: ep.to_string(),
        why,
    })
}

/// Splits a complete HTTP/1.1 answer (the connection was closed after it)
/// into its status code and body, undoing chunked transfer encoding.
pub fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), &'static str> {
    let end = find(raw, b"\r\n\r\n").ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "headers are not UTF-8")?;
    let body = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status = lines.next().ok_or("no status line")?;
    let mut parts = status.splitn(3, ' ');
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err("not an HTTP/1.x status line");
    }
    let code: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or("bad status code")?;
    let (mut chunked, mut length) = (false, None);
    for line in lines {
        let (name, value) = line.split_once(':').ok_or("header without a colon")?;
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().map_err(|_| "bad Content-Length")?);
        }
    }
    let body = match (chunked, length) {
        (true, _) => dechunk(body)?,
        (false, Some(n)) => body
            .get(..n)
            .ok_or("body shorter than Content-Length")?
            .to_vec(),
        (false, None) => body.to_vec(),
    };
    Ok((code, body))
}

/// Decodes a chunked body (RFC 9112 §7.1); trailers are ignored.
pub fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::new();
    loop {
        let eol = find(b, b"\r\n").ok_or("chunk size line not terminated")?;
        let line = std::str::from_utf8(&b[..eol]).map_err(|_| "chunk size is not text")?;
        let hex = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(hex, 16).map_err(|_| "bad chunk size")?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if size > b.len() || b.len() - size < 2 || &b[size..size + 2] != b"\r\n" {
            return Err("chunk shorter than its size");
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_http_host_port() {
        assert!("http://127.0.0.1:2379".parse::<Endpoint>().is_ok());
        assert!("http://etcd.local:2379/".parse::<Endpoint>().is_ok());
        for bad in [
            "127.0.0.1:2379",
            "https://a:1",
            "http://a",
            "http://:1",
            "http://a:1/x",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn answers_with_length_or_chunks_parse() {
        let fixed = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}junk";
        assert_eq!(parse_response(fixed), Ok((200, b"{}".to_vec())));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4;x=y\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked), Ok((200, b"{\"a\":1}".to_vec())));
        let err = b"HTTP/1.1 400 Bad Request\r\n\r\nno";
        assert_eq!(parse_response(err), Ok((400, b"no".to_vec())));
    }

    #[test]
    fn truncated_answers_are_errors() {
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{}").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nab")
                .is_err()
        );
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5").is_err());
        assert!(parse_response(b"SMTP 200 OK\r\n\r\n").is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_never_panic(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = parse_response(&raw);
            let _ = dechunk(&raw);
        }

        #[test]
        fn chunking_round_trips(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), cut in 1usize..50) {
            let mut enc = Vec::new();
            for c in body.chunks(cut) {
                enc.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                enc.extend_from_slice(c);
                enc.extend_from_slice(b"\r\n");
            }
            enc.extend_from_slice(b"0\r\n\r\n");
            proptest::prop_assert_eq!(dechunk(&enc).unwrap(), body);
        }
    }
}
