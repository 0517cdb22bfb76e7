//! yt-dlp's way out: a forward proxy on loopback that holds yt-dlp's own
//! requests to the address policy of vidpipe's HTTP client.
//!
//! yt-dlp does its own networking: it follows redirects and meta refreshes,
//! and its extractors follow embeds to other hosts. Only the first URL's
//! site is checked before it starts, so any open redirect on a supported
//! site could have made it fetch `http://169.254.169.254/` or a service on
//! the private network. Run with `--proxy` pointing here, every request it
//! makes is resolved and checked by this proxy, the same way the guarded
//! client checks each hop: every A and AAAA answer must be public (or in
//! `net_allow`), and the connection goes to an address that was checked,
//! so a second DNS answer cannot differ from the first.
//!
//! Two kinds of request: `CONNECT host:port` (https: a tunnel, the TLS
//! stays end to end) and a plain-http request in absolute form, which is
//! forwarded with `Connection: close` so that one proxy connection never
//! carries requests for two hosts. A refusal is a `403` whose reason
//! phrase names this proxy, which is how a run's failure is classified as
//! `blocked_address`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use url::Url;

use super::http::{AddressPolicy, FetchError};

/// The reason phrase of a refusal; yt-dlp quotes it in its error.
pub const REFUSED: &str = "Blocked by vidpipe egress policy";

/// Largest request head read from yt-dlp.
const MAX_HEAD: usize = 16 << 10;

/// Time to connect to an upstream address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Time for yt-dlp to send a request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// A running proxy. Stops accepting when dropped; connections under way
/// end at their own pace (at the latest after `max_connection`).
pub struct Egress {
    addr: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
}

impl Egress {
    /// Starts the proxy on an ephemeral loopback port. `max_connection`
    /// bounds each proxied connection's life (yt-dlp's own timeout: it
    /// is killed by then, and a peer that never closes must not hold the
    /// task).
    pub async fn start(policy: AddressPolicy, max_connection: Duration) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let policy = Arc::new(policy);
        let accept = tokio::spawn(async move {
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of descriptors and the like: pause, not spin.
                        tracing::warn!(error = %e, "egress proxy cannot accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let policy = Arc::clone(&policy);
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(max_connection, serve(stream, &policy)).await;
                });
            }
        });
        Ok(Self { addr, accept })
    }

    /// The value of yt-dlp's `--proxy`.
    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Egress {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress").field("addr", &self.addr).finish()
    }
}

/// One proxied connection from yt-dlp.
async fn serve(mut client: TcpStream, policy: &AddressPolicy) {
    let (head, rest) = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client)).await {
        Ok(Ok(parts)) => parts,
        _ => return,
    };
    let request = match parse(&head) {
        Ok(r) => r,
        Err(why) => return answer(&mut client, "400 Bad Request", why).await,
    };
    let mut upstream = match connect(&request.host, request.port, policy).await {
        Ok(s) => s,
        Err(Refusal::Blocked(detail)) => {
            tracing::info!(host = %request.host, %detail, "egress refused");
            return answer(&mut client, &format!("403 {REFUSED}"), &detail).await;
        }
        Err(Refusal::Unreachable(detail)) => {
            return answer(&mut client, "502 Bad Gateway", &detail).await;
        }
    };
    let opening = match &request.forward {
        // A tunnel: say so, then pass bytes both ways.
        None => {
            if client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            rest
        }
        Some(head) => {
            let mut bytes = head.clone().into_bytes();
            bytes.extend_from_slice(&rest);
            bytes
        }
    };
    if upstream.write_all(&opening).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// Reads up to the end of the request head; returns it and whatever
/// followed it in the same reads.
async fn read_head(client: &mut TcpStream) -> std::io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            let head = String::from_utf8(buf)
                .map_err(|_| std::io::Error::other("request head is not UTF-8"))?;
            return Ok((head, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("request head too large"));
        }
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// What yt-dlp asked for.
#[derive(Debug, PartialEq)]
struct Request {
    host: String,
    port: u16,
    /// For plain http: the head to send upstream. None for a tunnel.
    forward: Option<String>,
}

/// Parses a request head: `CONNECT host:port`, or a plain-http request in
/// absolute form, rewritten to origin form with `Connection: close`.
fn parse(head: &str) -> Result<Request, &'static str> {
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed request line");
    };
    if !version.starts_with("HTTP/1.") {
        return Err("only HTTP/1.x");
    }
    if method == "CONNECT" {
        // host:port, or [v6]:port
        let (host, port) = target.rsplit_once(':').ok_or("CONNECT needs a port")?;
        let port: u16 = port.parse().map_err(|_| "bad CONNECT target")?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() || host.contains(['/', '@', '[', ']']) {
            return Err("bad CONNECT target");
        }
        return Ok(Request {
            host: host.to_owned(),
            port,
            forward: None,
        });
    }
    if !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err("malformed method");
    }
    let url = Url::parse(target).map_err(|_| "a proxy request needs an absolute URL")?;
    if url.scheme() != "http" {
        return Err("only http is forwarded; https goes through CONNECT");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials in the URL");
    }
    let host = url.host_str().ok_or("no host")?;
    let port = url.port_or_known_default().ok_or("no port")?;
    let mut path = url.path().to_owned();
    if let Some(q) = url.query() {
        path.push('?');
        path.push_str(q);
    }
    let mut out = format!("{method} {path} {version}\r\n");
    for line in lines.filter(|l| !l.is_empty()) {
        let name = line.split(':').next().unwrap_or_default().trim();
        // Hop-by-hop and proxy headers stay here; the connection closes
        // after one response.
        if [
            "connection",
            "proxy-connection",
            "proxy-authorization",
            "keep-alive",
        ]
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
        {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    Ok(Request {
        host: host.trim_matches(['[', ']']).to_owned(),
        port,
        forward: Some(out),
    })
}

enum Refusal {
    Blocked(String),
    Unreachable(String),
}

/// Resolves `host`, checks every answer, and connects to a checked one.
async fn connect(host: &str, port: u16, policy: &AddressPolicy) -> Result<TcpStream, Refusal> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| Refusal::Unreachable(format!("cannot resolve {host}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(Refusal::Unreachable(format!("{host} has no addresses")));
    }
    for addr in &addrs {
        if let Err(FetchError::BlockedAddress { ip, reason, .. }) = policy.check(addr.ip()) {
            return Err(Refusal::Blocked(format!(
                "{host} resolves to {ip} ({reason})"
            )));
        }
    }
    let mut last = String::new();
    for addr in addrs {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = format!("{host}: {e}"),
            Err(_) => last = format!("{host}: no connection within {CONNECT_TIMEOUT:?}"),
        }
    }
    Err(Refusal::Unreachable(last))
}

/// Answers yt-dlp with `status` and a one-line explanation, then closes.
async fn answer(client: &mut TcpStream, status: &str, detail: &str) {
    let body = format!("{detail}\n");
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = client.write_all(head.as_bytes()).await;
    let _ = client.write_all(body.as_bytes()).await;
    let _ = client.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_into_a_host_and_what_to_send() {
        let tunnel =
            parse("CONNECT www.youtube.com:443 HTTP/1.1\r\nHost: www.youtube.com:443\r\n\r\n");
        assert_eq!(
            tunnel,
            Ok(Request {
                host: "www.youtube.com".into(),
                port: 443,
                forward: None
            })
        );
        let v6 = parse("CONNECT [::1]:8443 HTTP/1.1\r\n\r\n").expect("v6 target");
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 8443));
        // The scheme's default port is still a port (url would drop it).
        let http = parse("CONNECT example.com:80 HTTP/1.1\r\n\r\n").expect("port 80");
        assert_eq!(http.port, 80);

        let plain = parse(
            "GET http://example.com/a/b?x=1 HTTP/1.1\r\nHost: example.com\r\n\
             Proxy-Connection: keep-alive\r\nConnection: keep-alive\r\nAccept: */*\r\n\r\n",
        )
        .expect("plain http");
        assert_eq!((plain.host.as_str(), plain.port), ("example.com", 80));
        assert_eq!(
            plain.forward.as_deref(),
            Some(
                "GET /a/b?x=1 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\
                 Connection: close\r\n\r\n"
            )
        );

        for (head, why) in [
            (
                "GET /relative HTTP/1.1\r\n\r\n",
                "a proxy request needs an absolute URL",
            ),
            (
                "GET https://example.com/ HTTP/1.1\r\n\r\n",
                "only http is forwarded; https goes through CONNECT",
            ),
            (
                "GET ftp://example.com/ HTTP/1.1\r\n\r\n",
                "only http is forwarded; https goes through CONNECT",
            ),
            (
                "GET http://u:p@example.com/ HTTP/1.1\r\n\r\n",
                "credentials in the URL",
            ),
            (
                "CONNECT example.com HTTP/1.1\r\n\r\n",
                "CONNECT needs a port",
            ),
            (
                "CONNECT u@example.com:443 HTTP/1.1\r\n\r\n",
                "bad CONNECT target",
            ),
            (
                "CONNECT example.com:http HTTP/1.1\r\n\r\n",
                "bad CONNECT target",
            ),
            ("GET http://example.com/ SPDY/3\r\n\r\n", "only HTTP/1.x"),
            (
                "GET  http://example.com/ HTTP/1.1\r\n\r\n",
                "malformed request line",
            ),
        ] {
            assert_eq!(parse(head), Err(why), "{head:?}");
        }
    }
}
