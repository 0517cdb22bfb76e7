//! yt-dlp's way out: a forward proxy on loopback that holds yt-dlp's own
//! requests to the address policy of vidpipe's HTTP client.
//!
//! yt-dlp does its own networking: it follows redirects and meta refreshes,
//! and its extractors follow embeds to other hosts. Only the first URL's
//! site is checked before it starts, so any open redirect on a supported
//! site could have made it fetch `http://169.254.169.254/` or a service on
//! the private network. With its proxy variables pointing here, every request of
//! its own HTTP handlers is resolved and checked by this proxy, the same
//! way the guarded client checks each hop: every A and AAAA answer must be
//! public (or in `net_allow`), and the connection goes to an address that
//! was checked, so a second DNS answer cannot differ from the first.
//! yt-dlp is also denied ffmpeg and non-http protocols (see
//! [`super::ytdlp`]), since ffmpeg's HLS demuxer would connect by itself;
//! its websocket handler takes only SOCKS proxies, so extractors that need
//! websockets fail (closed).
//!
//! Two kinds of request: `CONNECT host:port` (https: a tunnel, the TLS
//! stays end to end, closed as soon as either side closes) and a
//! plain-http request in absolute form, of which exactly one is forwarded
//! per connection: its head (origin form, `Host` from the URL,
//! `Connection: close`) and its declared body, then only the response
//! comes back. A refusal is a `403` whose reason phrase carries a random
//! token of this proxy, which is how a run's failure is classified as
//! `blocked_address` (a server cannot forge it).
//!
//! Only yt-dlp may use it: every request must carry `Proxy-Authorization`
//! with a secret made at start (407 otherwise). The secret reaches yt-dlp in
//! its environment, which only its own user can read, never on its command
//! line, which every local user can; any other process on the machine can
//! reach nothing through the port (it can still hold one of its slots for
//! the few seconds a request head may take).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use url::Url;

use super::http::{AddressPolicy, FetchError};

/// Largest request head read from yt-dlp.
const MAX_HEAD: usize = 16 << 10;

/// Time to connect to one upstream address; at most [`MAX_ADDRESSES`]
/// of a name's addresses are tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_ADDRESSES: usize = 3;

/// Time for yt-dlp to send a request head: it sends it as soon as it is
/// connected, and a local process without the secret that connects and
/// waits holds a slot no longer.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections served at once: yt-dlp opens a few per run; anything on the
/// machine can connect to the port, and each costs two descriptors.
const MAX_CONNECTIONS: usize = 64;

/// A running proxy. Stops accepting when dropped; connections under way
/// end at their own pace (at the latest after `max_connection`).
pub struct Egress {
    addr: SocketAddr,
    refusal: Arc<str>,
    /// The secret part of the proxy's URL (user `vidpipe`).
    secret: Arc<str>,
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
        let refusal: Arc<str> = format!(
            "Blocked by vidpipe egress policy {:016x}",
            rand::rng().random::<u64>()
        )
        .into();
        let secret: Arc<str> = format!(
            "{:016x}{:016x}",
            rand::rng().random::<u64>(),
            rand::rng().random::<u64>()
        )
        .into();
        let authorization = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("vidpipe:{secret}"))
        );
        let shared = Arc::new((policy, Arc::clone(&refusal), authorization));
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let accept = tokio::spawn(async move {
            loop {
                // Wait for a free slot before accepting: the rest queue in
                // the listen backlog.
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                let (stream, _) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of descriptors and the like: pause, not spin.
                        tracing::warn!(error = %e, "egress proxy cannot accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    let (policy, refusal, authorization) = &*shared;
                    let _ = tokio::time::timeout(
                        max_connection,
                        serve(stream, policy, refusal, authorization),
                    )
                    .await;
                    drop(slot);
                });
            }
        });
        Ok(Self {
            addr,
            refusal,
            secret,
            accept,
        })
    }

    /// The proxy's URL, with its secret: for yt-dlp's environment
    /// (`http_proxy`, `https_proxy`), never for a command line or a log.
    pub fn proxy_url(&self) -> String {
        format!("http://vidpipe:{}@{}", self.secret, self.addr)
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    /// The reason phrase of this proxy's refusals, which yt-dlp quotes in
    /// its error.
    pub fn refusal(&self) -> &str {
        &self.refusal
    }
}

impl Drop for Egress {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the secret.
        f.debug_struct("Egress").field("addr", &self.addr).finish()
    }
}

/// One proxied connection from yt-dlp.
async fn serve(mut client: TcpStream, policy: &AddressPolicy, refusal: &str, authorization: &str) {
    let (head, rest) = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client)).await {
        Ok(Ok(parts)) => parts,
        Ok(Err(HeadError::TooLarge)) => {
            return answer(&mut client, "431 Request Header Fields Too Large", "").await;
        }
        Ok(Err(HeadError::Closed)) | Err(_) => return,
    };
    if !authorized(&head, authorization) {
        return answer(
            &mut client,
            "407 Proxy Authentication Required",
            "this proxy serves vidpipe's yt-dlp only",
        )
        .await;
    }
    let request = match parse(&head) {
        Ok(r) => r,
        Err(why) => return answer(&mut client, "400 Bad Request", why).await,
    };
    let mut upstream = match connect(&request.host, request.port, policy).await {
        Ok(s) => s,
        Err(Refusal::Blocked(detail)) => {
            tracing::info!(host = %request.host, %detail, "egress refused");
            return answer(&mut client, &format!("403 {refusal}"), &detail).await;
        }
        Err(Refusal::Unreachable(detail)) => {
            return answer(&mut client, "502 Bad Gateway", &detail).await;
        }
    };
    match request.forward {
        None => {
            let established = b"HTTP/1.1 200 Connection established\r\n\r\n";
            if client.write_all(established).await.is_err()
                || upstream.write_all(&rest).await.is_err()
            {
                return;
            }
            // Either side closing ends the tunnel: a killed yt-dlp must not
            // leave it waiting for a silent server.
            let (mut client_read, mut client_write) = client.split();
            let (mut upstream_read, mut upstream_write) = upstream.split();
            tokio::select! {
                _ = tokio::io::copy(&mut client_read, &mut upstream_write) => {}
                _ = tokio::io::copy(&mut upstream_read, &mut client_write) => {}
            }
        }
        Some(Forward { head, body_len }) => {
            // The head, then exactly the declared body: whatever else the
            // client sends (a second request, for another host) is not
            // forwarded, and the response is all that comes back.
            let mut body = rest;
            body.truncate(body_len as usize);
            if upstream.write_all(&head).await.is_err() || upstream.write_all(&body).await.is_err()
            {
                return;
            }
            let missing = body_len - body.len() as u64;
            let (client_read, _) = client.split();
            let (_, mut upstream_write) = upstream.split();
            if tokio::io::copy(&mut client_read.take(missing), &mut upstream_write)
                .await
                .is_err()
            {
                return;
            }
            let _ = tokio::io::copy(&mut upstream, &mut client).await;
            let _ = client.shutdown().await;
        }
    }
}

/// Why no request head was read.
enum HeadError {
    TooLarge,
    Closed,
}

/// Reads up to the end of the request head; returns it and whatever
/// followed it in the same reads.
async fn read_head(client: &mut TcpStream) -> Result<(Vec<u8>, Vec<u8>), HeadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(HeadError::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// What yt-dlp asked for.
#[derive(Debug, PartialEq)]
struct Request {
    host: String,
    port: u16,
    /// For plain http: what to send upstream. None for a tunnel.
    forward: Option<Forward>,
}

/// A plain-http request to forward.
#[derive(Debug, PartialEq)]
struct Forward {
    /// The head in origin form, `Host` from the URL, `Connection: close`.
    head: Vec<u8>,
    /// The body's declared length (0 without `Content-Length`).
    body_len: u64,
}

/// Parses a request head: `CONNECT host:port`, or a plain-http request in
/// absolute form. Header values are passed on as bytes, whatever their
/// encoding; the request line must be ASCII.
fn parse(head: &[u8]) -> Result<Request, &'static str> {
    let mut lines = head
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let first = lines.next().unwrap_or_default();
    let first = std::str::from_utf8(first)
        .ok()
        .filter(|l| l.is_ascii())
        .ok_or("malformed request line")?;
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed request line");
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err("only HTTP/1.0 and HTTP/1.1");
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err("malformed method");
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
    let url = Url::parse(target).map_err(|_| "a proxy request needs an absolute URL")?;
    if url.scheme() != "http"
        || !target
            .get(..7)
            .is_some_and(|p| p.eq_ignore_ascii_case("http://"))
    {
        return Err("only http is forwarded; https goes through CONNECT");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials in the URL");
    }
    let host = url.host_str().ok_or("no host")?;
    let port = url.port_or_known_default().ok_or("no port")?;
    // The path and query as the client wrote them (url would normalise
    // them, which can break a signed URL).
    let after_scheme = &target[7..];
    let origin = match after_scheme.find(['/', '?']) {
        Some(i) if after_scheme[i..].starts_with('/') => after_scheme[i..].to_owned(),
        Some(i) => format!("/{}", &after_scheme[i..]),
        None => "/".to_owned(),
    };
    let authority = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    let mut out = format!("{method} {origin} {version}\r\nHost: {authority}\r\n").into_bytes();
    let mut body_len = 0;
    for line in lines.filter(|l| !l.is_empty()) {
        let name = line.split(|b| *b == b':').next().unwrap_or_default();
        let name = String::from_utf8_lossy(name).trim().to_ascii_lowercase();
        if name == "transfer-encoding" {
            // Its end can only be found by parsing it: not worth it for
            // yt-dlp, which sends bodies with a length.
            return Err("request bodies must have a Content-Length");
        }
        if name == "content-length" {
            let value = line.splitn(2, |b| *b == b':').nth(1).unwrap_or_default();
            body_len = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or("bad Content-Length")?;
        }
        // Hop-by-hop and proxy headers stay here, and Host is the URL's.
        if [
            "host",
            "connection",
            "proxy-connection",
            "proxy-authorization",
            "keep-alive",
        ]
        .contains(&name.as_str())
        {
            continue;
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    Ok(Request {
        host: host.trim_matches(['[', ']']).to_owned(),
        port,
        forward: Some(Forward {
            head: out,
            body_len,
        }),
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
        // Any error refuses: only an address the policy accepts is used.
        match policy.check(addr.ip()) {
            Ok(()) => {}
            Err(FetchError::BlockedAddress { ip, reason, .. }) => {
                return Err(Refusal::Blocked(format!(
                    "{host} resolves to {ip}, which is in a blocked range ({reason})"
                )));
            }
            Err(e) => return Err(Refusal::Blocked(format!("{host}: {e}"))),
        }
    }
    let mut last = String::new();
    for addr in addrs.into_iter().take(MAX_ADDRESSES) {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = format!("{host}: {e}"),
            Err(_) => last = format!("{host}: no connection within {CONNECT_TIMEOUT:?}"),
        }
    }
    Err(Refusal::Unreachable(last))
}

/// Whether the head carries exactly one `Proxy-Authorization`, and it is
/// `expected`.
fn authorized(head: &[u8], expected: &str) -> bool {
    let mut given = head.split(|b| *b == b'\n').skip(1).filter_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let colon = line.iter().position(|b| *b == b':')?;
        let name = &line[..colon];
        name.eq_ignore_ascii_case(b"proxy-authorization")
            .then(|| line[colon + 1..].trim_ascii())
    });
    match (given.next(), given.next()) {
        (Some(value), None) => crate::config::same_secret(value, expected.as_bytes()),
        _ => false,
    }
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

    fn parse_str(head: &str) -> Result<Request, &'static str> {
        parse(head.as_bytes())
    }

    #[test]
    fn requests_parse_into_a_host_and_what_to_send() {
        let tunnel =
            parse_str("CONNECT www.youtube.com:443 HTTP/1.1\r\nHost: www.youtube.com:443\r\n\r\n");
        assert_eq!(
            tunnel,
            Ok(Request {
                host: "www.youtube.com".into(),
                port: 443,
                forward: None
            })
        );
        let v6 = parse_str("CONNECT [::1]:8443 HTTP/1.1\r\n\r\n").expect("v6 target");
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 8443));
        // The scheme's default port is still a port (url would drop it).
        let http = parse_str("CONNECT example.com:80 HTTP/1.1\r\n\r\n").expect("port 80");
        assert_eq!(http.port, 80);

        // Origin form exactly as written, Host from the URL, hop-by-hop
        // headers dropped, other bytes (not UTF-8 here) passed on.
        let mut head =
            b"POST http://Example.com:8080/a/%2e%2e/b?x='1' HTTP/1.1\r\nHost: evil.test\r\n\
             Proxy-Connection: keep-alive\r\nConnection: keep-alive\r\nCookie: n=\xe9\r\n\
             Content-Length: 5\r\n\r\n"
                .to_vec();
        let plain = parse(&head).expect("plain http");
        assert_eq!((plain.host.as_str(), plain.port), ("example.com", 8080));
        assert_eq!(
            plain.forward,
            Some(Forward {
                head: b"POST /a/%2e%2e/b?x='1' HTTP/1.1\r\nHost: example.com:8080\r\n\
                        Cookie: n=\xe9\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
                    .to_vec(),
                body_len: 5,
            })
        );
        head = b"GET http://example.com?q=1 HTTP/1.0\r\n\r\n".to_vec();
        let bare = parse(&head).expect("no path");
        let forward = bare.forward.expect("forwarded");
        assert!(
            forward
                .head
                .starts_with(b"GET /?q=1 HTTP/1.0\r\nHost: example.com\r\n")
        );
        assert_eq!(forward.body_len, 0);

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
                "POST http://example.com/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                "request bodies must have a Content-Length",
            ),
            (
                "POST http://example.com/ HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                "bad Content-Length",
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
            (
                "CONNECT example.com:99999 HTTP/1.1\r\n\r\n",
                "bad CONNECT target",
            ),
            (
                "GET http://example.com/ SPDY/3\r\n\r\n",
                "only HTTP/1.0 and HTTP/1.1",
            ),
            (
                "GET  http://example.com/ HTTP/1.1\r\n\r\n",
                "malformed request line",
            ),
            (
                " GET http://example.com/ HTTP/1.1\r\n\r\n",
                "malformed request line",
            ),
        ] {
            assert_eq!(parse_str(head), Err(why), "{head:?}");
        }
    }
}
