//! Video and source identities. A video id is derived from its canonical
//! source, so the same video submitted twice (or found in two feeds) is one
//! video: `yt:<YouTube id>` for YouTube, else `url:` and a hash of the
//! normalised URL. Submit and discover compute it the same way, which is
//! how `vidpipe submit --wait` knows which id to watch.

use sha2::{Digest, Sha256};
use url::Url;

use crate::media::ytdlp::Ytdlp;

/// A URL that cannot be a video or source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad URL {url:?}: {reason}")]
pub struct BadUrl {
    /// The input as it may be shown: without credentials, query or
    /// fragment (which can hold tokens), truncated. This error reaches
    /// logs, events and dead letters.
    pub url: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Parses and normalises a submitted URL: http(s) only, no credentials,
/// no fragment, tracking parameters dropped, so that trivially different
/// spellings of one URL get one id.
pub fn normalise(input: &str) -> Result<Url, BadUrl> {
    let bad = |reason| BadUrl {
        url: shown(input),
        reason,
    };
    let trimmed = input.trim();
    if trimmed.starts_with('-') {
        return Err(bad("starts with '-'"));
    }
    if trimmed.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad("contains whitespace or control characters"));
    }
    let mut url = Url::parse(trimmed).map_err(|_| bad("not an absolute URL"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("only http and https URLs are accepted"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("credentials in URLs are not accepted"));
    }
    url.set_fragment(None);
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| !k.starts_with("utm_") && k != "fbclid" && k != "si")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if kept.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(kept);
    }
    Ok(url)
}

/// `input` with what may be secret left out: an http(s) URL as
/// [`redact`](crate::media::http::redact) shows it; anything else cut at
/// its query or fragment and with anything before an `@` (user
/// information) replaced.
fn shown(input: &str) -> String {
    if let Ok(url) = Url::parse(input.trim())
        && matches!(url.scheme(), "http" | "https")
        && url.has_host()
    {
        return crate::media::http::redact(&url);
    }
    let end = input.find(['?', '#']).unwrap_or(input.len());
    let mut s = &input[..end];
    let mut out = String::new();
    if let Some(at) = s.rfind('@') {
        if let Some(scheme) = s[..at].find("://") {
            out.push_str(&s[..scheme + 3]);
        }
        out.push('…');
        s = &s[at..];
    }
    out.push_str(s);
    out.chars().take(200).collect()
}

fn digest(prefix: &str, url: &Url) -> String {
    let hash = hex::encode(Sha256::digest(url.as_str().as_bytes()));
    format!("{prefix}:{}", &hash[..24])
}

/// The id of the video at `url` (normalised).
pub fn video_id(url: &Url) -> String {
    match Ytdlp::youtube_id(url) {
        Some(id) => format!("yt:{id}"),
        None => digest("url", url),
    }
}

/// The id of a subscription or of a submitted source (feed, channel).
pub fn source_id(url: &Url) -> String {
    digest("src", url)
}

/// What a submitted URL is taken for before anything is fetched: a source
/// id (`src:…`) for YouTube channels and playlists and for URLs that look
/// like feeds, else the id of the one video it names. Discovery refuses a
/// video id whose URL turns out to be a feed, naming the fix (`--feed`).
pub fn subject(url: &Url, feed: bool) -> String {
    let path = url.path().to_ascii_lowercase();
    let looks_like_feed = [".xml", ".rss", ".atom", "/feed", "/rss", "/feed/", "/rss/"]
        .iter()
        .any(|end| path.ends_with(end));
    let channel = Ytdlp::is_site_url(url) && Ytdlp::youtube_id(url).is_none();
    if feed || looks_like_feed || channel {
        source_id(url)
    } else {
        video_id(url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_video_one_id() {
        let a = normalise("https://Example.com:443/a.mp4?utm_source=x#t=3").unwrap();
        let b = normalise("https://example.com/a.mp4").unwrap();
        assert_eq!(a, b);
        assert_eq!(video_id(&a), video_id(&b));
        assert!(video_id(&a).starts_with("url:"));
        let c = normalise("https://example.com/b.mp4").unwrap();
        assert_ne!(video_id(&a), video_id(&c));
        let yt = normalise("https://www.youtube.com/watch?v=dQw4w9WgXcQ&si=abc").unwrap();
        let short = normalise("https://youtu.be/dQw4w9WgXcQ").unwrap();
        assert_eq!(video_id(&yt), "yt:dQw4w9WgXcQ");
        assert_eq!(video_id(&short), "yt:dQw4w9WgXcQ");
    }

    #[test]
    fn feeds_and_channels_are_sources() {
        let u = |s| normalise(s).unwrap();
        assert!(subject(&u("https://example.com/podcast.xml"), false).starts_with("src:"));
        assert!(subject(&u("https://example.com/blog/feed"), false).starts_with("src:"));
        assert!(subject(&u("https://www.youtube.com/@somechannel"), false).starts_with("src:"));
        assert!(subject(&u("https://example.com/talk.mp4"), false).starts_with("url:"));
        assert!(subject(&u("https://example.com/talk"), true).starts_with("src:"));
        assert_eq!(
            subject(&u("https://youtu.be/dQw4w9WgXcQ"), false),
            "yt:dQw4w9WgXcQ"
        );
    }

    #[test]
    fn hostile_urls_are_refused_with_a_reason() {
        for (input, reason) in [
            ("-o/tmp/x", "starts with '-'"),
            (
                "file:///etc/passwd",
                "only http and https URLs are accepted",
            ),
            ("http://a b/", "contains whitespace or control characters"),
            ("http://u:p@h/x", "credentials in URLs are not accepted"),
            ("not a url", "contains whitespace or control characters"),
            ("/relative", "not an absolute URL"),
        ] {
            assert_eq!(normalise(input).unwrap_err().reason, reason, "{input}");
        }
    }

    #[test]
    fn a_refused_url_is_shown_without_its_secrets() {
        for (input, expected) in [
            ("http://user:s3cret@h/x", "http://h/x"),
            ("ftp://h/x?token=s3cret", "ftp://h/x"),
            (
                "https://user:s3cret@exa mple.com/",
                "https://…@exa mple.com/",
            ),
            ("user:s3cret@host path", "…@host path"),
            ("-o/tmp/x", "-o/tmp/x"),
        ] {
            let err = normalise(input).unwrap_err();
            assert_eq!(err.url, expected, "{input}");
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
    }
}
