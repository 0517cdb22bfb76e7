//! Just enough of the WAV and FLAC headers to tell a service what it gets
//! (Google needs the encoding and sample rate) and how long it is (for
//! services that do not say). No decoding.

/// Encoding of an audio file as far as the ASR services care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    /// WAV holding 16-bit signed little-endian PCM.
    Linear16,
    /// WAV holding something else (8-bit, 24-bit, float, compressed).
    OtherWav,
    /// FLAC.
    Flac,
}

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AudioInfo {
    pub(crate) encoding: Encoding,
    pub(crate) sample_rate: u32,
    pub(crate) channels: u16,
    /// Length in milliseconds, if the header allows computing it.
    pub(crate) duration_ms: Option<i64>,
}

/// Reads a WAV or FLAC header from the first bytes of a file of `file_len`
/// bytes. `None` for anything else or a header that does not parse.
pub(crate) fn parse_header(head: &[u8], file_len: u64) -> Option<AudioInfo> {
    if head.starts_with(b"RIFF") && head.get(8..12) == Some(b"WAVE") {
        parse_wav(head, file_len)
    } else if head.starts_with(b"fLaC") {
        parse_flac(head)
    } else {
        None
    }
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn parse_wav(head: &[u8], file_len: u64) -> Option<AudioInfo> {
    // Chunks follow the 12-byte RIFF header: id, little-endian size, data
    // padded to an even length. `fmt ` comes before `data`.
    let mut at = 12;
    let mut format: Option<(u16, u16, u32, u16)> = None;
    while at + 8 <= head.len() {
        let id = &head[at..at + 4];
        let size = le_u32(head, at + 4)?;
        let body = at + 8;
        match id {
            b"fmt " => {
                let tag = le_u16(head, body)?;
                let channels = le_u16(head, body + 2)?;
                let rate = le_u32(head, body + 4)?;
                let bits = le_u16(head, body + 14)?;
                // WAVE_FORMAT_EXTENSIBLE keeps the real tag in its sub-format.
                let tag = if tag == 0xFFFE {
                    le_u16(head, body + 24).unwrap_or(tag)
                } else {
                    tag
                };
                format = Some((tag, channels, rate, bits));
            }
            b"data" => {
                let (tag, channels, rate, bits) = format?;
                // Streamed WAVs (ffmpeg writing to a pipe) leave the size at
                // 0 or 0xFFFFFFFF: the data then runs to the end of the file.
                let declared = u64::from(size);
                let rest = file_len.saturating_sub(body as u64);
                let data_len = if declared == 0 || declared == u64::from(u32::MAX) {
                    rest
                } else {
                    declared.min(rest)
                };
                let bytes_per_second =
                    u64::from(rate) * u64::from(channels) * u64::from(bits.div_ceil(8));
                let duration_ms = (bytes_per_second > 0)
                    .then(|| i64::try_from(data_len * 1000 / bytes_per_second).ok())
                    .flatten();
                let encoding = if tag == 1 && bits == 16 {
                    Encoding::Linear16
                } else {
                    Encoding::OtherWav
                };
                return Some(AudioInfo {
                    encoding,
                    sample_rate: rate,
                    channels,
                    duration_ms,
                });
            }
            _ => {}
        }
        at = body
            .checked_add(usize::try_from(size).ok()?)?
            .checked_add(size as usize % 2)?;
    }
    None
}

fn parse_flac(head: &[u8]) -> Option<AudioInfo> {
    // "fLaC", then metadata blocks; STREAMINFO is first: a 4-byte block
    // header, 2+2 bytes block sizes, 3+3 bytes frame sizes, then 20 bits
    // sample rate, 3 bits channels-1, 5 bits bits-per-sample-1, 36 bits
    // total samples.
    let info = head.get(8..8 + 34)?;
    if head.get(4)? & 0x7F != 0 {
        return None;
    }
    let packed = u64::from_be_bytes(info.get(10..18)?.try_into().ok()?);
    let sample_rate = (packed >> 44) as u32;
    let channels = ((packed >> 41) & 0x7) as u16 + 1;
    let total_samples = packed & 0xF_FFFF_FFFF;
    let duration_ms = (sample_rate > 0 && total_samples > 0)
        .then(|| i64::try_from(total_samples * 1000 / u64::from(sample_rate)).ok())
        .flatten();
    Some(AudioInfo {
        encoding: Encoding::Flac,
        sample_rate,
        channels,
        duration_ms,
    })
}

/// How many bytes of a file [`parse_header`] wants: WAVs from some tools
/// put a `LIST` chunk of a few hundred bytes before the data.
pub(crate) const HEADER_BYTES: usize = 8192;

/// Reads the header of the file at `path` (best effort: `None` when the file
/// cannot be read or is neither WAV nor FLAC).
pub(crate) async fn probe(path: &std::path::Path) -> Option<AudioInfo> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path).await.ok()?;
    let len = file.metadata().await.ok()?.len();
    let mut head = Vec::with_capacity(HEADER_BYTES);
    (&mut file)
        .take(HEADER_BYTES as u64)
        .read_to_end(&mut head)
        .await
        .ok()?;
    parse_header(&head, len)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A 16-bit PCM WAV of `samples` zero samples.
    pub(crate) fn wav(rate: u32, channels: u16, samples: u32) -> Vec<u8> {
        let data_len = samples * u32::from(channels) * 2;
        let mut w = Vec::new();
        w.extend_from_slice(b"RIFF");
        w.extend_from_slice(&(36 + data_len).to_le_bytes());
        w.extend_from_slice(b"WAVEfmt ");
        w.extend_from_slice(&16u32.to_le_bytes());
        w.extend_from_slice(&1u16.to_le_bytes());
        w.extend_from_slice(&channels.to_le_bytes());
        w.extend_from_slice(&rate.to_le_bytes());
        w.extend_from_slice(&(rate * u32::from(channels) * 2).to_le_bytes());
        w.extend_from_slice(&(channels * 2).to_le_bytes());
        w.extend_from_slice(&16u16.to_le_bytes());
        // A LIST chunk before the data, as ffmpeg writes one.
        w.extend_from_slice(b"LIST");
        w.extend_from_slice(&3u32.to_le_bytes());
        w.extend_from_slice(b"abc\0");
        w.extend_from_slice(b"data");
        w.extend_from_slice(&data_len.to_le_bytes());
        w.resize(w.len() + data_len as usize, 0);
        w
    }

    #[test]
    fn wav_headers_give_encoding_rate_and_duration() {
        let w = wav(16_000, 1, 24_000);
        let info = parse_header(&w, w.len() as u64).expect("parses");
        assert_eq!(info.encoding, Encoding::Linear16);
        assert_eq!(info.sample_rate, 16_000);
        assert_eq!(info.channels, 1);
        assert_eq!(info.duration_ms, Some(1500));
    }

    #[test]
    fn streamed_wav_sizes_run_to_the_end_of_the_file() {
        let mut w = wav(16_000, 1, 32_000);
        let data_size_at = w.len() - 64_000 - 4;
        w[data_size_at..data_size_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let info = parse_header(&w, w.len() as u64).expect("parses");
        assert_eq!(info.duration_ms, Some(2000));
    }

    #[test]
    fn flac_streaminfo_gives_rate_and_duration() {
        let mut f = b"fLaC".to_vec();
        f.extend_from_slice(&[0x80, 0, 0, 34]); // last block, STREAMINFO, 34 bytes
        f.extend_from_slice(&[0x10, 0, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        // 16000 Hz, 1 channel (stored as 0), 16 bits, 48000 samples.
        let packed: u64 = (16_000u64 << 44) | (15 << 36) | 48_000;
        f.extend_from_slice(&packed.to_be_bytes());
        f.extend_from_slice(&[0; 16]);
        let info = parse_header(&f, f.len() as u64).expect("parses");
        assert_eq!(info.encoding, Encoding::Flac);
        assert_eq!(info.sample_rate, 16_000);
        assert_eq!(info.channels, 1);
        assert_eq!(info.duration_ms, Some(3000));
    }

    #[test]
    fn other_files_are_not_audio() {
        assert_eq!(parse_header(b"ID3\x04junk", 9), None);
        assert_eq!(parse_header(b"RIFF\0\0\0\0WAVE", 12), None);
    }
}
