//! Avro encoding of record values, in one of two framings:
//!
//! - with a schema registry: the Confluent wire format (magic byte 0, the
//!   4-byte schema id, the Avro datum). Writers register their schema under
//!   the subject `<topic>-value` (TopicNameStrategy), so the registry's
//!   compatibility rules guard every change. Readers fetch the writer's
//!   schema by id (cached) and resolve it to their own.
//! - without one: Avro single-object encoding (`C3 01`, the schema's 8-byte
//!   Rabin fingerprint, the datum), with the writer schema looked up among
//!   the schemas compiled into this binary.
//!
//! Either way a reader decodes with schema resolution, so a record written
//! with an older or newer compatible schema still reads.
//!
//! Schemas are parsed and resolved once, not per record: every parsed schema
//! is interned for the life of the process (one copy per distinct schema
//! text), so that encoders and decoders keep ready-made Avro writers and
//! readers that borrow it. A record written with the reader's own schema
//! (the usual case) is deserialised straight from its bytes; only one
//! written with another schema goes through Avro's generic value and schema
//! resolution.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use apache_avro::Schema;
use apache_avro::headers::{HeaderBuilder, RabinFingerprintHeader};
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;
use schema_registry_converter::async_impl::schema_registry::{
    SrSettings, get_schema_by_id, post_schema,
};
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::records::ALL_SCHEMAS;

/// Why a value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A schema in this binary or from the registry does not parse.
    #[error("invalid Avro schema: {0}")]
    Schema(String),
    /// The registry refused or could not be reached.
    #[error("schema registry: {0}")]
    Registry(String),
    /// The bytes are not a framed Avro record of a known schema.
    #[error("undecodable record: {0}")]
    Undecodable(String),
    /// The value does not fit its schema.
    #[error("cannot encode record: {0}")]
    Encode(String),
}

impl CodecError {
    /// Whether trying again later could help (the registry was unreachable),
    /// as opposed to bad bytes or schemas.
    pub fn is_retryable(&self) -> bool {
        matches!(self, CodecError::Registry(_))
    }
}

enum Framing {
    Registry {
        settings: SrSettings,
        /// Writer schemas by registry id; they never change for an id.
        by_id: Mutex<HashMap<u32, &'static Schema>>,
    },
    SingleObject {
        /// Writer schemas by their single-object header.
        by_header: Mutex<HashMap<[u8; 10], &'static Schema>>,
    },
}

/// Encoder and decoder factory shared by a process.
pub struct Codec {
    framing: Framing,
}

/// Encodes values of one schema for one topic.
#[derive(Clone)]
pub struct Encoder {
    /// Resolved once; writing a record only serialises it.
    writer: Arc<GenericDatumWriter<'static>>,
    header: Arc<[u8]>,
}

/// Decodes values into one reader schema.
#[derive(Clone)]
pub struct Decoder {
    codec: Arc<Codec>,
    reader: &'static Schema,
    /// How records of each writer schema are read, by the address of the
    /// interned writer schema; bounded like the interned schemas.
    readings: Arc<Mutex<HashMap<usize, Arc<Reading>>>>,
}

/// A ready datum reader for one writer schema.
enum Reading {
    /// The writer schema is the reader's: deserialise straight from bytes.
    Same(GenericDatumReader<'static>),
    /// Another schema: read a generic value, resolve it to the reader's.
    Resolve(GenericDatumReader<'static>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn parse(schema: &str) -> Result<Schema, CodecError> {
    Schema::parse_str(schema).map_err(|e| CodecError::Schema(e.to_string()))
}

/// The process's one parsed copy of a schema text. Readers and writers
/// borrow it for as long as they live, which is why it is never freed:
/// their number is bounded by the distinct schemas a process uses (its own
/// and those the registry serves for the records it reads).
fn intern(text: &str) -> Result<&'static Schema, CodecError> {
    static INTERNED: OnceLock<Mutex<HashMap<String, &'static Schema>>> = OnceLock::new();
    let interned = INTERNED.get_or_init(Default::default);
    if let Some(schema) = lock(interned).get(text) {
        return Ok(schema);
    }
    let parsed = parse(text)?;
    Ok(lock(interned)
        .entry(text.to_string())
        .or_insert_with(|| Box::leak(Box::new(parsed))))
}

fn single_object_header(schema: &Schema) -> [u8; 10] {
    let h = RabinFingerprintHeader::from_schema(schema).build_header();
    let mut out = [0u8; 10];
    out.copy_from_slice(&h[..10]);
    out
}

impl Codec {
    /// A codec using the registry at `url` (a Confluent-compatible base URL)
    /// or, when `None`, single-object encoding.
    pub fn new(registry_url: Option<&str>) -> Result<Arc<Self>, CodecError> {
        let framing = match registry_url {
            Some(url) => Framing::Registry {
                settings: SrSettings::new_builder(url.to_string())
                    .set_timeout(std::time::Duration::from_secs(10))
                    .build()
                    .map_err(|e| CodecError::Registry(e.to_string()))?,
                by_id: Mutex::new(HashMap::new()),
            },
            None => {
                let mut by_header = HashMap::new();
                for s in ALL_SCHEMAS {
                    let schema = intern(s)?;
                    by_header.insert(single_object_header(schema), schema);
                }
                Framing::SingleObject {
                    by_header: Mutex::new(by_header),
                }
            }
        };
        Ok(Arc::new(Self { framing }))
    }

    /// An encoder for values of `schema` on `topic`; registers the schema
    /// under `<topic>-value` when a registry is configured (an incompatible
    /// change is refused here, at startup, not per record).
    pub async fn encoder(&self, topic: &str, schema: &str) -> Result<Encoder, CodecError> {
        let parsed = intern(schema)?;
        let header: Vec<u8> = match &self.framing {
            Framing::Registry { settings, by_id } => {
                let name = parsed.name().map(|n| n.fullname(None));
                let registered = post_schema(
                    settings,
                    format!("{topic}-value"),
                    SuppliedSchema::new(name, SchemaType::Avro, schema.to_string()),
                )
                .await
                .map_err(|e| CodecError::Registry(e.to_string()))?;
                lock(by_id).insert(registered.id, parsed);
                let mut h = vec![0u8];
                h.extend_from_slice(&registered.id.to_be_bytes());
                h
            }
            Framing::SingleObject { by_header } => {
                let h = single_object_header(parsed);
                lock(by_header).insert(h, parsed);
                h.to_vec()
            }
        };
        let writer = GenericDatumWriter::builder(parsed)
            .build()
            .map_err(|e| CodecError::Schema(e.to_string()))?;
        Ok(Encoder {
            writer: Arc::new(writer),
            header: header.into(),
        })
    }

    /// A decoder into `schema`. Its writer schemas are found per record.
    pub fn decoder(self: &Arc<Self>, schema: &str) -> Result<Decoder, CodecError> {
        let reader = intern(schema)?;
        if let Framing::SingleObject { by_header } = &self.framing {
            lock(by_header)
                .entry(single_object_header(reader))
                .or_insert(reader);
        }
        Ok(Decoder {
            codec: self.clone(),
            reader,
            readings: Arc::default(),
        })
    }

    async fn writer_schema(&self, bytes: &[u8]) -> Result<(&'static Schema, usize), CodecError> {
        match &self.framing {
            Framing::Registry { settings, by_id } => {
                if bytes.len() < 5 || bytes[0] != 0 {
                    return Err(CodecError::Undecodable(
                        "not in the Confluent wire format (magic byte 0 and a schema id)".into(),
                    ));
                }
                let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
                if let Some(s) = lock(by_id).get(&id) {
                    return Ok((s, 5));
                }
                let fetched = get_schema_by_id(id, settings).await.map_err(|e| {
                    if e.retriable {
                        CodecError::Registry(e.to_string())
                    } else {
                        CodecError::Undecodable(format!("schema id {id}: {e}"))
                    }
                })?;
                let schema = intern(&fetched.schema)?;
                lock(by_id).insert(id, schema);
                Ok((schema, 5))
            }
            Framing::SingleObject { by_header } => {
                if bytes.len() < 10 || bytes[0] != 0xC3 || bytes[1] != 0x01 {
                    return Err(CodecError::Undecodable(
                        "not in Avro single-object encoding (marker C3 01)".into(),
                    ));
                }
                let mut h = [0u8; 10];
                h.copy_from_slice(&bytes[..10]);
                lock(by_header).get(&h).map(|s| (*s, 10)).ok_or_else(|| {
                    CodecError::Undecodable(format!(
                        "unknown schema fingerprint {}",
                        hex::encode(&h[2..])
                    ))
                })
            }
        }
    }
}

impl Encoder {
    /// Frames a datum that `write` appends (for a record type with a
    /// hand-written encoding of this encoder's schema, see
    /// [`super::events`]).
    pub fn frame(&self, write: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.header.len() + 128);
        out.extend_from_slice(&self.header);
        write(&mut out);
        out
    }

    /// Frames and encodes one value; fails if it does not fit the schema.
    pub fn encode<T: Serialize>(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::with_capacity(self.header.len() + 128);
        out.extend_from_slice(&self.header);
        self.writer
            .write_ser(&mut out, value)
            .map_err(|e| CodecError::Encode(e.to_string()))?;
        Ok(out)
    }
}

impl Decoder {
    /// Decodes one framed value, resolving its writer schema to ours.
    pub async fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        let (writer, skip) = self.codec.writer_schema(bytes).await?;
        let reading = self.reading(writer)?;
        let mut body = &bytes[skip..];
        let undecodable = |e: apache_avro::Error| CodecError::Undecodable(e.to_string());
        let decoded = match &*reading {
            Reading::Same(reader) => reader.read_deser::<T>(&mut body).map_err(undecodable)?,
            Reading::Resolve(reader) => {
                let value = reader.read_value(&mut body).map_err(undecodable)?;
                apache_avro::from_value::<T>(&value).map_err(undecodable)?
            }
        };
        if !body.is_empty() {
            return Err(CodecError::Undecodable(format!(
                "{} trailing bytes after the record",
                body.len()
            )));
        }
        Ok(decoded)
    }

    /// The datum reader for records written with `writer`, built on first
    /// use.
    fn reading(&self, writer: &'static Schema) -> Result<Arc<Reading>, CodecError> {
        let key = writer as *const Schema as usize;
        if let Some(r) = lock(&self.readings).get(&key) {
            return Ok(r.clone());
        }
        let bad = |e: apache_avro::Error| CodecError::Schema(e.to_string());
        // Canonical forms ignore docs, defaults and aliases, which do not
        // change the bytes: equal forms read alike without resolution.
        let same = std::ptr::eq(writer, self.reader)
            || writer.canonical_form() == self.reader.canonical_form();
        let reading = Arc::new(if same {
            Reading::Same(GenericDatumReader::builder(writer).build().map_err(bad)?)
        } else {
            Reading::Resolve(
                GenericDatumReader::builder(writer)
                    .reader_schema(self.reader)
                    .build()
                    .map_err(bad)?,
            )
        });
        lock(&self.readings).insert(key, reading.clone());
        Ok(reading)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{LifecycleEvent, Meta, Record, VideoDiscovered};

    fn discovered() -> VideoDiscovered {
        VideoDiscovered {
            meta: Meta::new("yt:abc"),
            url: "https://example.org/v".into(),
            title: Some("A title".into()),
            source_url: None,
            published_at: Some(1_700_000_000_000),
        }
    }

    #[tokio::test]
    async fn single_object_round_trip() {
        let codec = Codec::new(None).unwrap();
        let enc = codec.encoder("t", VideoDiscovered::SCHEMA).await.unwrap();
        let record = discovered();
        let bytes = enc.encode(&record).unwrap();
        assert_eq!(&bytes[..2], &[0xC3, 0x01]);
        let dec = codec.decoder(VideoDiscovered::SCHEMA).unwrap();
        assert_eq!(dec.decode::<VideoDiscovered>(&bytes).await.unwrap(), record);
    }

    #[tokio::test]
    async fn events_and_dead_letters_round_trip_straight_from_bytes() {
        use crate::records::{DEAD_LETTER_SCHEMA, DeadLetter, EventKind};
        let codec = Codec::new(None).unwrap();
        let event = LifecycleEvent {
            meta: Meta::new("yt:abc"),
            stage: "download".into(),
            kind: EventKind::Retried,
            attempt: 2,
            at: 1_700_000_000_000,
            duration_ms: Some(12),
            error_class: Some("retryable:http_503".into()),
            error: None,
            input_topic: "vidpipe.video.discovered".into(),
            input_partition: 3,
            input_offset: 42,
        };
        let enc = codec.encoder("e", LifecycleEvent::SCHEMA).await.unwrap();
        let dec = codec.decoder(LifecycleEvent::SCHEMA).unwrap();
        // Twice: the second read uses the cached reader.
        for _ in 0..2 {
            let bytes = enc.encode(&event).unwrap();
            assert_eq!(dec.decode::<LifecycleEvent>(&bytes).await.unwrap(), event);
        }
        let letter = DeadLetter {
            video_id: None,
            stage: "download".into(),
            topic: "t".into(),
            partition: 1,
            offset: 7,
            key: Some(b"k\0\xff".to_vec()),
            payload: None,
            error_class: "undecodable".into(),
            error: "bad".into(),
            attempts: 1,
            at: 1,
        };
        let enc = codec.encoder("d", DEAD_LETTER_SCHEMA).await.unwrap();
        let dec = codec.decoder(DEAD_LETTER_SCHEMA).unwrap();
        let bytes = enc.encode(&letter).unwrap();
        assert_eq!(dec.decode::<DeadLetter>(&bytes).await.unwrap(), letter);
    }

    #[tokio::test]
    async fn every_schema_parses() {
        for s in ALL_SCHEMAS {
            parse(s).unwrap();
        }
        let _ = Codec::new(None).unwrap();
        let _ = LifecycleEvent::SCHEMA;
    }

    #[tokio::test]
    async fn garbage_and_truncation_are_undecodable_not_panics() {
        let codec = Codec::new(None).unwrap();
        let dec = codec.decoder(VideoDiscovered::SCHEMA).unwrap();
        for bad in [&b""[..], b"hello", &[0xC3, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 9]] {
            let err = dec.decode::<VideoDiscovered>(bad).await.unwrap_err();
            assert!(matches!(err, CodecError::Undecodable(_)), "{err}");
        }
        let enc = codec.encoder("t", VideoDiscovered::SCHEMA).await.unwrap();
        let bytes = enc.encode(&discovered()).unwrap();
        let err = dec
            .decode::<VideoDiscovered>(&bytes[..bytes.len() - 3])
            .await
            .unwrap_err();
        assert!(matches!(err, CodecError::Undecodable(_)), "{err}");
    }

    #[tokio::test]
    async fn a_newer_writer_with_a_defaulted_field_still_reads() {
        let newer = VideoDiscovered::SCHEMA.replacen(
            r#"{"name": "url", "type": "string"},"#,
            r#"{"name": "url", "type": "string"}, {"name": "lang", "type": "string", "default": "en"},"#,
            1,
        );
        assert_ne!(newer, VideoDiscovered::SCHEMA);
        let codec = Codec::new(None).unwrap();
        let enc = codec.encoder("t", &newer).await.unwrap();
        #[derive(Serialize)]
        struct Newer {
            meta: Meta,
            url: String,
            lang: String,
            title: Option<String>,
            source_url: Option<String>,
            published_at: Option<i64>,
        }
        let d = discovered();
        let bytes = enc
            .encode(&Newer {
                meta: d.meta.clone(),
                url: d.url.clone(),
                lang: "fr".into(),
                title: d.title.clone(),
                source_url: None,
                published_at: d.published_at,
            })
            .unwrap();
        let dec = codec.decoder(VideoDiscovered::SCHEMA).unwrap();
        assert_eq!(dec.decode::<VideoDiscovered>(&bytes).await.unwrap(), d);
    }
}
