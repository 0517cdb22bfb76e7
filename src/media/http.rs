//! The guarded HTTP fetcher: direct media files and RSS/Atom feeds.
//!
//! Every URL and every response is hostile. The fetcher therefore
//!
//! - accepts only `http`/`https` URLs without whitespace or control
//!   characters (and none that starts with `-`, which a tool further down
//!   could read as an option);
//! - checks every address before connecting: a literal IP in the URL here
//!   (reqwest never asks the resolver for one), every name through
//!   [`GuardedResolver`], which refuses the name if *any* of its A/AAAA
//!   answers is blocked, so a name cannot smuggle a private address in
//!   beside a public one. Redirects are followed here, hop by hop, so each
//!   hop is checked again; proxies from the environment are ignored, since
//!   a proxy would connect on our behalf without these checks;
//! - bounds each transfer: a byte cap enforced while streaming whatever
//!   Content-Length says, a total deadline, a minimum throughput per window
//!   (a trickling server cannot hold a worker for hours), and cancellation;
//! - streams to `<dest>.part` while hashing, renames on success and deletes
//!   the partial file on every failure; a body is never held in memory;
//! - refuses HTML pages and playlists where media was expected.
//!
//! [`Sites`] limits concurrent downloads per host and carries cool-downs
//! after a 429 or a bot check, shared by all workers of an instance.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, LOCATION, RETRY_AFTER};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use url::{Host, Url};

use crate::template::StageError;

/// The longest Retry-After honoured: a hostile or confused server must not
/// park a video for days.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How many leading bytes are kept to recognise HTML pages and playlists.
const SNIFF_BYTES: usize = 1024;

/// Sent with every request: some servers refuse requests without one, and
/// an honest name lets operators see who is fetching.
const USER_AGENT: &str = concat!("vidpipe/", env!("CARGO_PKG_VERSION"));

/// Why a fetch failed. Convert with `StageError::from` for a stage.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The URL is malformed, not http(s), or looks like an option.
    #[error("bad URL: {0}")]
    BadUrl(String),
    /// The host is, or resolves to, an address in a blocked range.
    #[error("{host} resolves to {ip}, which is in a blocked range ({reason})")]
    BlockedAddress {
        /// Host name or literal from the URL.
        host: String,
        /// The offending address.
        ip: IpAddr,
        /// Which range it is in.
        reason: &'static str,
    },
    /// An entry of the allow list is not a CIDR or address.
    #[error("invalid allow-list entry {entry:?}: expected a CIDR such as 127.0.0.1/32")]
    BadAllowList {
        /// The entry as written.
        entry: String,
    },
    /// The redirect chain is longer than the limit.
    #[error("more than {limit} redirects, last at {url}")]
    TooManyRedirects {
        /// The configured limit.
        limit: usize,
        /// The last hop (redacted).
        url: String,
    },
    /// A redirect without a usable Location.
    #[error("bad redirect from {url}: {reason}")]
    BadRedirect {
        /// The redirecting URL (redacted).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A non-success HTTP status other than 429.
    #[error("HTTP {status} from {url}")]
    Status {
        /// The status code.
        status: u16,
        /// The URL (redacted).
        url: String,
    },
    /// HTTP 429.
    #[error("HTTP 429 Too Many Requests from {url}")]
    RateLimited {
        /// The URL (redacted).
        url: String,
        /// The server's Retry-After, if it sent a usable one.
        retry_after: Option<Duration>,
    },
    /// The body is (or is declared) larger than the cap.
    #[error("the response is larger than the limit of {limit} bytes{}", declared.map(|d| format!(" (Content-Length {d})")).unwrap_or_default())]
    TooLarge {
        /// The cap.
        limit: u64,
        /// The Content-Length, when that alone was over the cap.
        declared: Option<u64>,
    },
    /// Throughput fell below the minimum over a whole window.
    #[error("the server is too slow: {got} bytes in {window:?}, at least {need} required")]
    TooSlow {
        /// Bytes received in the window.
        got: u64,
        /// Bytes required in the window.
        need: u64,
        /// The window.
        window: Duration,
    },
    /// The total deadline or the wait for response headers ran out.
    #[error("timed out: {0}")]
    Timeout(String),
    /// An HTML page or a playlist where a media file was expected.
    #[error("{url} returned {what}, not a media file")]
    NotMedia {
        /// The URL (redacted).
        url: String,
        /// What came back instead.
        what: String,
    },
    /// The cancellation token fired.
    #[error("cancelled")]
    Cancelled,
    /// Connecting failed (refused, unreachable, DNS, TLS).
    #[error("cannot connect to {url}: {detail}")]
    Connect {
        /// The URL (redacted).
        url: String,
        /// The cause, without the URL.
        detail: String,
    },
    /// The connection broke while reading.
    #[error("network error reading {url}: {detail}")]
    Network {
        /// The URL (redacted).
        url: String,
        /// The cause, without the URL.
        detail: String,
    },
    /// Writing the destination failed.
    #[error("cannot write {path}: {detail}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        detail: String,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

impl FetchError {
    /// The short machine-readable kind used in [`StageError`]s and metrics.
    pub fn kind(&self) -> String {
        match self {
            FetchError::BadUrl(_) => "bad_url".into(),
            FetchError::BlockedAddress { .. } => "blocked_address".into(),
            FetchError::BadAllowList { .. } => "bad_config".into(),
            FetchError::TooManyRedirects { .. } => "too_many_redirects".into(),
            FetchError::BadRedirect { .. } => "bad_redirect".into(),
            FetchError::Status { status, .. } => format!("http_{status}"),
            FetchError::RateLimited { .. } => "rate_limited".into(),
            FetchError::TooLarge { .. } => "too_large".into(),
            FetchError::TooSlow { .. } => "too_slow".into(),
            FetchError::Timeout(_) => "timeout".into(),
            FetchError::NotMedia { .. } => "not_media".into(),
            FetchError::Cancelled => "cancelled".into(),
            FetchError::Connect { .. } => "connect".into(),
            FetchError::Network { .. } => "network".into(),
            FetchError::Io { .. } => "io".into(),
            FetchError::Client(_) => "http_client".into(),
        }
    }

    /// Whether trying again later can help.
    pub fn is_retryable(&self) -> bool {
        match self {
            FetchError::Status { status, .. } => *status >= 500,
            FetchError::RateLimited { .. }
            | FetchError::TooSlow { .. }
            | FetchError::Timeout(_)
            | FetchError::Cancelled
            | FetchError::Connect { .. }
            | FetchError::Network { .. }
            | FetchError::Io { .. } => true,
            FetchError::BadUrl(_)
            | FetchError::BlockedAddress { .. }
            | FetchError::BadAllowList { .. }
            | FetchError::TooManyRedirects { .. }
            | FetchError::BadRedirect { .. }
            | FetchError::TooLarge { .. }
            | FetchError::NotMedia { .. }
            | FetchError::Client(_) => false,
        }
    }

    /// What a person can do about it, appended to the stage error message.
    fn hint(&self) -> &'static str {
        match self {
            FetchError::BlockedAddress { .. } => {
                "private, local and reserved addresses are refused; for tests only, \
                 exempt a range with net_allow (e.g. 127.0.0.1/32)"
            }
            FetchError::BadAllowList { .. } => "fix net_allow: comma-separated CIDRs",
            FetchError::TooLarge { .. } => "raise the download size limit if this file is wanted",
            FetchError::NotMedia { .. } => {
                "submit the page through a site extractor (yt-dlp) or a direct link to the file"
            }
            FetchError::Status { status, .. } if *status < 500 => {
                "check that the URL is correct and publicly reachable"
            }
            _ => "",
        }
    }
}

impl From<FetchError> for StageError {
    fn from(e: FetchError) -> Self {
        let kind = e.kind();
        let hint = e.hint();
        let message = if hint.is_empty() {
            e.to_string()
        } else {
            format!("{e}; {hint}")
        };
        let retry_after = match &e {
            FetchError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        };
        let err = if e.is_retryable() {
            StageError::retryable(kind, message)
        } else {
            StageError::permanent(kind, message)
        };
        match retry_after {
            Some(d) => err.with_retry_after(d),
            None => err,
        }
    }
}

/// Bounds on one transfer.
#[derive(Debug, Clone)]
pub struct FetchLimits {
    /// Largest body accepted, whatever Content-Length says.
    pub max_bytes: u64,
    /// Total time for the whole transfer, redirects included.
    pub deadline: Duration,
    /// Minimum throughput; 0 disables the check.
    pub min_bytes_per_sec: u64,
    /// Window over which throughput is measured (also the longest wait for
    /// response headers); zero disables the throughput check.
    pub rate_window: Duration,
    /// Redirects followed before giving up.
    pub max_redirects: usize,
    /// Time to establish a connection (TCP and TLS).
    pub connect_timeout: Duration,
}

impl Default for FetchLimits {
    fn default() -> Self {
        Self {
            max_bytes: 2 << 30,
            deadline: Duration::from_secs(30 * 60),
            min_bytes_per_sec: 16 << 10,
            rate_window: Duration::from_secs(30),
            max_redirects: 5,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Blocked IPv4 ranges: (network, prefix length, reason).
const BLOCKED_V4: &[(u32, u8, &str)] = &[
    (0x0000_0000, 8, "\"this network\" 0.0.0.0/8"),
    (0x0a00_0000, 8, "private 10.0.0.0/8"),
    (0x6440_0000, 10, "carrier-grade NAT 100.64.0.0/10"),
    (0x7f00_0000, 8, "loopback 127.0.0.0/8"),
    // A public address that serves Azure VMs their platform data (the
    // WireServer): a metadata endpoint like 169.254.169.254.
    (0xa83f_8110, 32, "Azure platform endpoint 168.63.129.16"),
    (0xa9fe_0000, 16, "link-local/metadata 169.254.0.0/16"),
    (0xac10_0000, 12, "private 172.16.0.0/12"),
    (0xc000_0000, 24, "IETF protocol assignments 192.0.0.0/24"),
    (0xc000_0200, 24, "documentation 192.0.2.0/24"),
    (0xc058_6300, 24, "6to4 relay 192.88.99.0/24"),
    (0xc0a8_0000, 16, "private 192.168.0.0/16"),
    (0xc612_0000, 15, "benchmarking 198.18.0.0/15"),
    (0xc633_6400, 24, "documentation 198.51.100.0/24"),
    (0xcb00_7100, 24, "documentation 203.0.113.0/24"),
    (0xe000_0000, 4, "multicast 224.0.0.0/4"),
    (0xf000_0000, 4, "reserved/broadcast 240.0.0.0/4"),
];

/// Blocked IPv6 ranges: (network, prefix length, reason). Ranges that embed
/// an IPv4 address (mapped, NAT64, 6to4) are handled in code instead.
const BLOCKED_V6: &[(u128, u8, &str)] = &[
    (0, 128, "unspecified ::"),
    (1, 128, "loopback ::1"),
    (0, 96, "IPv4-compatible ::/96"),
    (0x0064_ff9b_0001 << 80, 48, "local NAT64 64:ff9b:1::/48"),
    (0x0100 << 112, 64, "discard 100::/64"),
    (0x2001 << 112, 23, "IETF protocol assignments 2001::/23"),
    (0x2001_0db8 << 96, 32, "documentation 2001:db8::/32"),
    (0x3fff << 112, 20, "documentation 3fff::/20"),
    (
        0xfc00 << 112,
        7,
        "unique local fc00::/7 (includes fd00:ec2::254)",
    ),
    (0xfe80 << 112, 10, "link-local fe80::/10"),
    (0xfec0 << 112, 10, "site-local fec0::/10"),
    (0xff00 << 112, 8, "multicast ff00::/8"),
];

fn in_v4(ip: u32, net: u32, len: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    ip & mask == net & mask
}

fn in_v6(ip: u128, net: u128, len: u8) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    ip & mask == net & mask
}

fn blocked_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let n = u32::from(ip);
    BLOCKED_V4
        .iter()
        .find(|(net, len, _)| in_v4(n, *net, *len))
        .map(|(_, _, why)| *why)
}

fn blocked_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let n = u128::from(ip);
    // IPv4-mapped (::ffff:0:0/96) and NAT64 (64:ff9b::/96) carry an IPv4
    // address in their low 32 bits; 6to4 (2002::/16) in bits 16..48. Each
    // reaches that IPv4 address, so it is judged as one.
    if in_v6(n, 0xffff << 32, 96) || in_v6(n, 0x0064_ff9b << 96, 96) {
        let v4 = Ipv4Addr::from((n & 0xffff_ffff) as u32);
        return blocked_v4(v4).map(|_| "IPv6 address embedding a blocked IPv4 address");
    }
    if in_v6(n, 0x2002 << 112, 16) {
        let v4 = Ipv4Addr::from(((n >> 80) & 0xffff_ffff) as u32);
        return blocked_v4(v4).map(|_| "6to4 address embedding a blocked IPv4 address");
    }
    BLOCKED_V6
        .iter()
        .find(|(net, len, _)| in_v6(n, *net, *len))
        .map(|(_, _, why)| *why)
}

/// Which addresses may be connected to: everything public, minus the
/// blocked ranges, plus an explicit allow list (for tests and local
/// development only).
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    allow: Vec<IpNet>,
}

impl AddressPolicy {
    /// Public addresses only.
    pub fn strict() -> Self {
        Self::default()
    }

    /// Strict plus the comma-separated CIDRs (or bare addresses) in `csv`,
    /// e.g. `127.0.0.1/32, ::1`. An empty string is [`strict`](Self::strict).
    pub fn parse_allow(csv: &str) -> Result<Self, FetchError> {
        let mut allow = Vec::new();
        for entry in csv.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let net = match entry.parse::<IpNet>() {
                Ok(net) => net,
                Err(_) => match entry.parse::<IpAddr>() {
                    Ok(ip) => IpNet::from(ip),
                    Err(_) => {
                        return Err(FetchError::BadAllowList {
                            entry: entry.chars().take(100).collect(),
                        });
                    }
                },
            };
            allow.push(net);
        }
        Ok(Self { allow })
    }

    /// Ok if `ip` may be connected to.
    pub fn check(&self, ip: IpAddr) -> Result<(), FetchError> {
        // `::ffff:127.0.0.1` is 127.0.0.1 on the wire: match the allow list
        // against both spellings.
        let canonical = ip.to_canonical();
        if self
            .allow
            .iter()
            .any(|net| net.contains(&ip) || net.contains(&canonical))
        {
            return Ok(());
        }
        let reason = match ip {
            IpAddr::V4(v4) => blocked_v4(v4),
            IpAddr::V6(v6) => blocked_v6(v6),
        };
        match reason {
            Some(reason) => Err(FetchError::BlockedAddress {
                host: ip.to_string(),
                ip,
                reason,
            }),
            None => Ok(()),
        }
    }
}

/// A DNS resolver that refuses a name when any of its answers is blocked.
///
/// Checking at resolution time (rather than before the request) means the
/// address that is checked is the address that is connected to: a name
/// that answers differently on a second lookup (DNS rebinding) gains
/// nothing.
#[derive(Debug, Clone)]
struct GuardedResolver {
    policy: Arc<AddressPolicy>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = Arc::clone(&self.policy);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addrs.is_empty() {
                return Err(format!("{host} has no addresses").into());
            }
            for addr in &addrs {
                if let Err(FetchError::BlockedAddress { ip, reason, .. }) = policy.check(addr.ip())
                {
                    // Boxed as a FetchError so that `classify` can find it
                    // again in reqwest's error chain.
                    return Err(Box::new(FetchError::BlockedAddress {
                        host: host.clone(),
                        ip,
                        reason,
                    }) as _);
                }
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// The result of [`Fetcher::fetch_to_file`].
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The URL after redirects, without user name or password.
    pub final_url: Url,
    /// Bytes written.
    pub bytes: u64,
    /// SHA-256 of the content, lowercase hex.
    pub sha256: String,
    /// The Content-Type header as sent, if any.
    pub content_type: Option<String>,
}

/// The guarded HTTP client. Cheap to clone (the connection pool is shared).
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    policy: Arc<AddressPolicy>,
    limits: FetchLimits,
}

impl Fetcher {
    /// A client that enforces `policy` on every connection and `limits` on
    /// every transfer.
    pub fn new(policy: AddressPolicy, limits: FetchLimits) -> Result<Self, FetchError> {
        let policy = Arc::new(policy);
        let client = reqwest::Client::builder()
            // Redirects are followed in `open`, so that each hop is checked.
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would connect on our behalf, past the address checks.
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver {
                policy: Arc::clone(&policy),
            }))
            .connect_timeout(limits.connect_timeout)
            .user_agent(USER_AGENT)
            .build()
            .map_err(|e| FetchError::Client(error_chain(&e)))?;
        Ok(Self {
            client,
            policy,
            limits,
        })
    }

    /// The limits this fetcher enforces.
    pub fn limits(&self) -> &FetchLimits {
        &self.limits
    }

    /// Downloads `url` to `dest`: streamed to `dest.part` while hashing,
    /// renamed to `dest` on success, the partial file deleted on any error.
    pub async fn fetch_to_file(
        &self,
        url: &str,
        dest: &Path,
        cancel: &CancellationToken,
    ) -> Result<Fetched, FetchError> {
        let part = dest.with_extension("part");
        let work = self.stream_to_part(url, part);
        let (guard, fetched) = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(FetchError::Cancelled),
            _ = tokio::time::sleep(self.limits.deadline) => {
                return Err(FetchError::Timeout(format!(
                    "the download did not finish within {:?}",
                    self.limits.deadline
                )));
            }
            r = work => r?,
        };
        // Outside the select: a rename that has started is not abandoned
        // half-way by a cancellation.
        tokio::fs::rename(&guard.path, dest)
            .await
            .map_err(|e| io_error(dest, &e))?;
        guard.disarm();
        tracing::debug!(
            host = fetched.final_url.host_str().unwrap_or(""),
            bytes = fetched.bytes,
            "fetched"
        );
        Ok(fetched)
    }

    /// Fetches a small text document (an RSS/Atom feed) with the same
    /// guards, up to `max_bytes`. Invalid UTF-8 is replaced, not refused:
    /// feed parsers cope, and one bad byte should not lose a whole feed.
    pub async fn get_text(
        &self,
        url: &str,
        max_bytes: u64,
    ) -> Result<(String, Option<String>), FetchError> {
        let work = async {
            let (resp, final_url) = self.open(url).await?;
            let content_type = header_str(resp.headers(), CONTENT_TYPE.as_str());
            let mut body = Body::new(resp, &final_url, &self.limits, max_bytes)?;
            let mut buf = Vec::new();
            while let Some(chunk) = body.next().await? {
                buf.extend_from_slice(&chunk);
            }
            Ok((String::from_utf8_lossy(&buf).into_owned(), content_type))
        };
        tokio::select! {
            _ = tokio::time::sleep(self.limits.deadline) => Err(FetchError::Timeout(format!(
                "the document did not arrive within {:?}",
                self.limits.deadline
            ))),
            r = work => r,
        }
    }

    async fn stream_to_part(
        &self,
        url: &str,
        part: PathBuf,
    ) -> Result<(PartialFile, Fetched), FetchError> {
        let (resp, final_url) = self.open(url).await?;
        let content_type = header_str(resp.headers(), CONTENT_TYPE.as_str());
        if let Some(what) = content_type.as_deref().and_then(not_media_type) {
            return Err(FetchError::NotMedia {
                url: redact(&final_url),
                what: what.into(),
            });
        }
        let mut body = Body::new(resp, &final_url, &self.limits, self.limits.max_bytes)?;

        if let Some(parent) = part.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| io_error(parent, &e))?;
        }
        // The guard exists before the file does, so that any early return
        // (or the future being dropped) removes what was written.
        let guard = PartialFile::new(part);
        let file = tokio::fs::File::create(&guard.path)
            .await
            .map_err(|e| io_error(&guard.path, &e))?;
        let mut out = tokio::io::BufWriter::with_capacity(256 << 10, file);
        let mut hasher = Sha256::new();
        let mut head: Vec<u8> = Vec::with_capacity(SNIFF_BYTES);
        let mut sniffed = false;
        let mut bytes = 0u64;
        while let Some(chunk) = body.next().await? {
            if !sniffed {
                let take = (SNIFF_BYTES - head.len()).min(chunk.len());
                head.extend_from_slice(&chunk[..take]);
                if head.len() >= SNIFF_BYTES {
                    sniffed = true;
                    check_head(&head, &final_url)?;
                }
            }
            hasher.update(&chunk);
            out.write_all(&chunk)
                .await
                .map_err(|e| io_error(&guard.path, &e))?;
            bytes += chunk.len() as u64;
        }
        if !sniffed {
            check_head(&head, &final_url)?;
        }
        out.flush().await.map_err(|e| io_error(&guard.path, &e))?;
        let file = out.into_inner();
        file.sync_all()
            .await
            .map_err(|e| io_error(&guard.path, &e))?;
        drop(file);

        let mut final_url = final_url;
        // Credentials stay out of records and logs.
        let _ = final_url.set_username("");
        let _ = final_url.set_password(None);
        let fetched = Fetched {
            final_url,
            bytes,
            sha256: hex::encode(hasher.finalize()),
            content_type,
        };
        Ok((guard, fetched))
    }

    /// Sends the request, following redirects hop by hop, and returns the
    /// first 2xx response with the URL that produced it.
    async fn open(&self, url: &str) -> Result<(reqwest::Response, Url), FetchError> {
        let mut current = parse_url(url)?;
        let header_wait = self.limits.rate_window.max(self.limits.connect_timeout);
        let mut hops = 0usize;
        loop {
            self.check_literal_host(&current)?;
            let send = self
                .client
                .get(current.clone())
                .header(reqwest::header::ACCEPT, "*/*")
                .send();
            let resp = match tokio::time::timeout(header_wait, send).await {
                Ok(Ok(resp)) => resp,
                Ok(Err(e)) => return Err(classify(&e, &current)),
                Err(_) => {
                    return Err(FetchError::Timeout(format!(
                        "{} sent no response within {header_wait:?}",
                        redact(&current)
                    )));
                }
            };
            let status = resp.status();
            if status.is_success() {
                return Ok((resp, current));
            }
            if matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
                if hops >= self.limits.max_redirects {
                    return Err(FetchError::TooManyRedirects {
                        limit: self.limits.max_redirects,
                        url: redact(&current),
                    });
                }
                hops += 1;
                let next = redirect_target(&current, resp.headers())?;
                tracing::debug!(
                    from = current.host_str().unwrap_or(""),
                    to = next.host_str().unwrap_or(""),
                    hop = hops,
                    "following redirect"
                );
                current = next;
                continue;
            }
            return Err(status_error(status.as_u16(), resp.headers(), &current));
        }
    }

    /// reqwest connects to a literal IP without asking the resolver, so
    /// literals are checked here.
    fn check_literal_host(&self, url: &Url) -> Result<(), FetchError> {
        let ip = match url.host() {
            Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
            Some(Host::Domain(_)) => return Ok(()),
            None => return Err(FetchError::BadUrl("the URL has no host".into())),
        };
        self.policy.check(ip).map_err(|e| match e {
            FetchError::BlockedAddress { ip, reason, .. } => FetchError::BlockedAddress {
                host: url.host_str().unwrap_or_default().to_owned(),
                ip,
                reason,
            },
            other => other,
        })
    }
}

/// A response body read under the byte cap and the throughput minimum.
struct Body {
    stream: futures::stream::BoxStream<'static, reqwest::Result<tokio_util::bytes::Bytes>>,
    url: Url,
    max_bytes: u64,
    total: u64,
    window: Duration,
    need_per_window: u64,
    window_end: Instant,
    window_bytes: u64,
}

impl Body {
    fn new(
        resp: reqwest::Response,
        url: &Url,
        limits: &FetchLimits,
        max_bytes: u64,
    ) -> Result<Self, FetchError> {
        // A declared length over the cap fails before any byte is read; a
        // declared length under it proves nothing and is not relied on.
        if let Some(declared) = header_str(resp.headers(), CONTENT_LENGTH.as_str())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|d| *d > max_bytes)
        {
            return Err(FetchError::TooLarge {
                limit: max_bytes,
                declared: Some(declared),
            });
        }
        let need_per_window = if limits.rate_window.is_zero() {
            0
        } else {
            let millis = u64::try_from(limits.rate_window.as_millis()).unwrap_or(u64::MAX);
            limits.min_bytes_per_sec.saturating_mul(millis) / 1000
        };
        Ok(Self {
            stream: resp.bytes_stream().boxed(),
            url: url.clone(),
            max_bytes,
            total: 0,
            window: limits.rate_window,
            need_per_window,
            window_end: Instant::now() + limits.rate_window,
            window_bytes: 0,
        })
    }

    /// The next chunk, `None` at the end of the body.
    async fn next(&mut self) -> Result<Option<tokio_util::bytes::Bytes>, FetchError> {
        loop {
            let item = if self.need_per_window == 0 {
                self.stream.next().await
            } else {
                // Wake at the window's end even when nothing arrives: a
                // stalled server must fail as surely as a trickling one.
                match tokio::time::timeout_at(self.window_end, self.stream.next()).await {
                    Ok(item) => item,
                    Err(_) => {
                        self.close_window()?;
                        continue;
                    }
                }
            };
            return match item {
                None => Ok(None),
                Some(Err(e)) => Err(classify(&e, &self.url)),
                Some(Ok(chunk)) => {
                    let len = chunk.len() as u64;
                    self.total = self.total.saturating_add(len);
                    if self.total > self.max_bytes {
                        return Err(FetchError::TooLarge {
                            limit: self.max_bytes,
                            declared: None,
                        });
                    }
                    self.window_bytes = self.window_bytes.saturating_add(len);
                    if self.need_per_window > 0 && Instant::now() >= self.window_end {
                        self.close_window()?;
                    }
                    Ok(Some(chunk))
                }
            };
        }
    }

    fn close_window(&mut self) -> Result<(), FetchError> {
        if self.window_bytes < self.need_per_window {
            return Err(FetchError::TooSlow {
                got: self.window_bytes,
                need: self.need_per_window,
                window: self.window,
            });
        }
        self.window_bytes = 0;
        self.window_end = Instant::now() + self.window;
        Ok(())
    }
}

/// Deletes the partial file when dropped, unless disarmed after the rename.
struct PartialFile {
    path: PathBuf,
    armed: bool,
}

impl PartialFile {
    fn new(path: PathBuf) -> Self {
        Self { path, armed: true }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if self.armed {
            // Best effort: the file may never have been created.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Parses and vets a URL given by a user or found in a document.
fn parse_url(raw: &str) -> Result<Url, FetchError> {
    if raw.starts_with('-') {
        return Err(FetchError::BadUrl(
            "the URL starts with '-' (it could be read as an option)".into(),
        ));
    }
    if raw.is_empty() {
        return Err(FetchError::BadUrl("the URL is empty".into()));
    }
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(FetchError::BadUrl(
            "the URL contains whitespace or control characters".into(),
        ));
    }
    let url = Url::parse(raw).map_err(|e| FetchError::BadUrl(format!("cannot parse: {e}")))?;
    check_scheme(&url)?;
    Ok(url)
}

fn check_scheme(url: &Url) -> Result<(), FetchError> {
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Err(FetchError::BadUrl(format!(
                "scheme {:?} is not allowed (only http and https)",
                other.chars().take(20).collect::<String>()
            )));
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(FetchError::BadUrl("the URL has no host".into()));
    }
    Ok(())
}

/// The next hop of a redirect, vetted like the first URL.
fn redirect_target(from: &Url, headers: &HeaderMap) -> Result<Url, FetchError> {
    let bad = |reason: &str| FetchError::BadRedirect {
        url: redact(from),
        reason: reason.into(),
    };
    let location = headers
        .get(LOCATION)
        .ok_or_else(|| bad("no Location header"))?
        .to_str()
        .map_err(|_| bad("the Location header is not ASCII"))?;
    if location.chars().any(|c| c.is_control()) {
        return Err(bad("the Location header contains control characters"));
    }
    let next = from
        .join(location.trim())
        .map_err(|e| bad(&format!("unparsable Location: {e}")))?;
    check_scheme(&next).map_err(|e| match e {
        FetchError::BadUrl(why) => FetchError::BadUrl(format!("redirect target: {why}")),
        other => other,
    })?;
    Ok(next)
}

fn status_error(status: u16, headers: &HeaderMap, url: &Url) -> FetchError {
    if status == 429 {
        return FetchError::RateLimited {
            url: redact(url),
            retry_after: header_str(headers, RETRY_AFTER.as_str())
                .and_then(|v| parse_retry_after(&v)),
        };
    }
    FetchError::Status {
        status,
        url: redact(url),
    }
}

/// Retry-After as delta-seconds or an HTTP date, capped at an hour.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    let after = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
        let delta = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
        delta.to_std().unwrap_or(Duration::ZERO)
    };
    Some(after.min(MAX_RETRY_AFTER))
}

/// Maps a reqwest error to a [`FetchError`], recovering the resolver's
/// refusal from the error chain.
fn classify(e: &reqwest::Error, url: &Url) -> FetchError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(fe) = err.downcast_ref::<FetchError>() {
            return fe.clone();
        }
        source = err.source();
    }
    let detail = error_chain(e);
    if e.is_timeout() {
        FetchError::Timeout(format!("{}: {detail}", redact(url)))
    } else if e.is_connect() {
        FetchError::Connect {
            url: redact(url),
            detail,
        }
    } else if e.is_builder() {
        FetchError::BadUrl(detail)
    } else {
        FetchError::Network {
            url: redact(url),
            detail,
        }
    }
}

/// An error's causes on one line, without any URL: reqwest's own Display
/// includes the full URL, credentials and all, and its top-level message is
/// generic ("error sending request"); the causes say what happened.
fn error_chain(e: &reqwest::Error) -> String {
    let mut out = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&err.to_string());
        source = err.source();
    }
    if out.is_empty() {
        out = if e.is_timeout() {
            "timed out".into()
        } else {
            "request failed".into()
        };
    }
    out.chars().take(500).collect()
}

/// `scheme://host[:port]/path` with no credentials, query or fragment
/// (signed URLs carry tokens there), shortened for messages.
pub fn redact(url: &Url) -> String {
    let mut out = format!("{}://{}", url.scheme(), url.host_str().unwrap_or("?"));
    if let Some(port) = url.port() {
        out.push_str(&format!(":{port}"));
    }
    let path = url.path();
    if path.chars().count() > 80 {
        out.extend(path.chars().take(80));
        out.push('…');
    } else {
        out.push_str(path);
    }
    out
}

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(200).collect())
}

/// A Content-Type that is certainly not a media file.
fn not_media_type(content_type: &str) -> Option<&'static str> {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "text/html" | "application/xhtml+xml" => Some("an HTML page"),
        "application/vnd.apple.mpegurl"
        | "application/x-mpegurl"
        | "audio/mpegurl"
        | "audio/x-mpegurl" => Some("a playlist (M3U/HLS), which references other files"),
        "application/dash+xml" => Some("a DASH manifest, which references other files"),
        _ => None,
    }
}

/// Recognises HTML pages and M3U playlists by their first bytes, for
/// servers that send them as `application/octet-stream` or without a type.
fn sniff_not_media(head: &[u8]) -> Option<&'static str> {
    let head = head.strip_prefix(b"\xef\xbb\xbf").unwrap_or(head);
    let start = head
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(head.len());
    let rest = &head[start..];
    let starts = |prefix: &[u8]| {
        rest.len() >= prefix.len() && rest[..prefix.len()].eq_ignore_ascii_case(prefix)
    };
    if starts(b"<!doctype html") || starts(b"<html") {
        Some("an HTML page")
    } else if starts(b"#extm3u") {
        Some("a playlist (M3U/HLS), which references other files")
    } else {
        None
    }
}

fn check_head(head: &[u8], url: &Url) -> Result<(), FetchError> {
    match sniff_not_media(head) {
        Some(what) => Err(FetchError::NotMedia {
            url: redact(url),
            what: what.into(),
        }),
        None => Ok(()),
    }
}

fn io_error(path: &Path, e: &std::io::Error) -> FetchError {
    FetchError::Io {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

/// Most hosts tracked at once by [`Sites`]; idle ones are forgotten first.
const MAX_SITES: usize = 1024;

#[derive(Debug)]
struct SiteState {
    slots: Arc<Semaphore>,
    cool_until: Option<Instant>,
}

/// Per-host concurrency limit and cool-down, shared by one instance's
/// workers: politeness towards each site, and a pause for all downloads
/// from a site after it answered 429 or showed a bot check.
#[derive(Debug)]
pub struct Sites {
    per_site: usize,
    hosts: Mutex<HashMap<String, SiteState>>,
}

/// A slot at a site; released when dropped.
#[derive(Debug)]
pub struct SitePermit {
    _slot: OwnedSemaphorePermit,
    host: String,
}

impl SitePermit {
    /// The host this slot belongs to.
    pub fn host(&self) -> &str {
        &self.host
    }
}

impl Sites {
    /// At most `per_site` concurrent downloads per host (at least 1).
    pub fn new(per_site: usize) -> Self {
        Self {
            per_site: per_site.max(1),
            hosts: Mutex::new(HashMap::new()),
        }
    }

    /// Waits until `host` is not cooling down and has a free slot.
    pub async fn enter(&self, host: &str) -> SitePermit {
        let key = host.to_ascii_lowercase();
        loop {
            let (slots, cool_until) = {
                let mut hosts = self.lock();
                let state = self.state(&mut hosts, &key);
                (Arc::clone(&state.slots), state.cool_until)
            };
            if let Some(until) = cool_until.filter(|u| *u > Instant::now()) {
                tokio::time::sleep_until(until).await;
                continue;
            }
            let Ok(slot) = slots.acquire_owned().await else {
                // Semaphores here are never closed; should one be, start over
                // with a fresh entry rather than spin.
                self.lock().remove(&key);
                continue;
            };
            // A cool-down may have begun while this task waited for a slot.
            let cooling = self
                .lock()
                .get(&key)
                .and_then(|s| s.cool_until)
                .is_some_and(|u| u > Instant::now());
            if cooling {
                drop(slot);
                continue;
            }
            return SitePermit {
                _slot: slot,
                host: key,
            };
        }
    }

    /// Makes every `enter` for `host` wait at least `for_` from now.
    pub fn cool_down(&self, host: &str, for_: Duration) {
        let key = host.to_ascii_lowercase();
        let until = Instant::now() + for_;
        let mut hosts = self.lock();
        let state = self.state(&mut hosts, &key);
        state.cool_until = Some(state.cool_until.map_or(until, |u| u.max(until)));
        tracing::info!(host = %key, seconds = for_.as_secs(), "site cooling down");
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SiteState>> {
        // The map stays consistent even if a holder panicked: every update
        // is a single assignment.
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn state<'a>(&self, hosts: &'a mut HashMap<String, SiteState>, key: &str) -> &'a mut SiteState {
        if !hosts.contains_key(key) && hosts.len() >= MAX_SITES {
            // Forget hosts with no download running and no cool-down left;
            // if every host is busy the map grows past the bound for now,
            // since forgetting a busy host would lift its limit.
            let now = Instant::now();
            let per_site = self.per_site;
            hosts.retain(|_, s| {
                s.slots.available_permits() < per_site || s.cool_until.is_some_and(|u| u > now)
            });
        }
        hosts.entry(key.to_owned()).or_insert_with(|| SiteState {
            slots: Arc::new(Semaphore::new(self.per_site)),
            cool_until: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_ranges() {
        let strict = AddressPolicy::strict();
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.31.255.255",
            "192.168.0.1",
            "169.254.169.254",
            "168.63.129.16",
            "::ffff:168.63.129.16",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "fc00::1",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
        ] {
            let ip: IpAddr = ip.parse().expect("test address parses");
            assert!(strict.check(ip).is_err(), "{ip} must be blocked");
        }
        for ip in [
            "93.184.216.34",
            "8.8.8.8",
            "172.32.0.1",
            "168.63.129.17",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "2002:0808:0808::",
        ] {
            let ip: IpAddr = ip.parse().expect("test address parses");
            assert!(strict.check(ip).is_ok(), "{ip} must be allowed");
        }
    }

    #[test]
    fn allow_list() {
        let p = AddressPolicy::parse_allow(" 127.0.0.1/32 , ::1").expect("parses");
        assert!(p.check("127.0.0.1".parse().expect("ip")).is_ok());
        assert!(p.check("::ffff:127.0.0.1".parse().expect("ip")).is_ok());
        assert!(p.check("::1".parse().expect("ip")).is_ok());
        assert!(p.check("127.0.0.2".parse().expect("ip")).is_err());
        assert!(AddressPolicy::parse_allow("127.0.0.1/33").is_err());
        assert!(AddressPolicy::parse_allow("localhost").is_err());
        assert!(AddressPolicy::parse_allow("").is_ok());
    }

    #[test]
    fn sniffing() {
        assert!(sniff_not_media(b"  \n<!DOCTYPE HTML><html>").is_some());
        assert!(sniff_not_media(b"\xef\xbb\xbf<Html lang=en>").is_some());
        assert!(sniff_not_media(b"#EXTM3U\n#EXT-X-VERSION:3").is_some());
        assert!(sniff_not_media(b"ID3\x04\x00").is_none());
        assert!(sniff_not_media(b"").is_none());
        assert_eq!(
            not_media_type("Text/HTML; charset=utf-8"),
            Some("an HTML page")
        );
        assert!(not_media_type("audio/mpeg").is_none());
    }

    #[test]
    fn urls() {
        assert!(parse_url("-o/tmp/x").is_err());
        assert!(parse_url("http://a b/").is_err());
        assert!(parse_url("http://a/\n").is_err());
        assert!(parse_url("file:///etc/passwd").is_err());
        assert!(parse_url("https://example.com/a.mp3").is_ok());
        let u = Url::parse("https://user:secret@example.com/a/b.mp3?sig=abc#x").expect("url");
        let r = redact(&u);
        assert_eq!(r, "https://example.com/a/b.mp3");
    }

    #[test]
    fn retry_after() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
