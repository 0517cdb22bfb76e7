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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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
        by_id: Mutex<HashMap<u32, Arc<Schema>>>,
    },
    SingleObject {
        /// Writer schemas by their single-object header.
        by_header: Mutex<HashMap<[u8; 10], Arc<Schema>>>,
    },
}

/// Encoder and decoder factory shared by a process.
pub struct Codec {
    framing: Framing,
}

/// Encodes values of one schema for one topic.
#[derive(Clone)]
pub struct Encoder {
    schema: Arc<Schema>,
    header: Arc<[u8]>,
}

/// Decodes values into one reader schema.
#[derive(Clone)]
pub struct Decoder {
    codec: Arc<Codec>,
    reader: Arc<Schema>,
}

fn parse(schema: &str) -> Result<Schema, CodecError> {
    Schema::parse_str(schema).map_err(|e| CodecError::Schema(e.to_string()))
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
                    let schema = parse(s)?;
                    by_header.insert(single_object_header(&schema), Arc::new(schema));
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
        let parsed = parse(schema)?;
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
                by_id
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(registered.id, Arc::new(parsed.clone()));
                let mut h = vec![0u8];
                h.extend_from_slice(&registered.id.to_be_bytes());
                h
            }
            Framing::SingleObject { by_header } => {
                let h = single_object_header(&parsed);
                by_header
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(h, Arc::new(parsed.clone()));
                h.to_vec()
            }
        };
        Ok(Encoder {
            schema: Arc::new(parsed),
            header: header.into(),
        })
    }

    /// A decoder into `schema`. Its writer schemas are found per record.
    pub fn decoder(self: &Arc<Self>, schema: &str) -> Result<Decoder, CodecError> {
        let reader = parse(schema)?;
        if let Framing::SingleObject { by_header } = &self.framing {
            by_header
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(single_object_header(&reader))
                .or_insert_with(|| Arc::new(reader.clone()));
        }
        Ok(Decoder {
            codec: self.clone(),
            reader: Arc::new(reader),
        })
    }

    async fn writer_schema(&self, bytes: &[u8]) -> Result<(Arc<Schema>, usize), CodecError> {
        match &self.framing {
            Framing::Registry { settings, by_id } => {
                if bytes.len() < 5 || bytes[0] != 0 {
                    return Err(CodecError::Undecodable(
                        "not in the Confluent wire format (magic byte 0 and a schema id)".into(),
                    ));
                }
                let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
                if let Some(s) = by_id.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
                    return Ok((s.clone(), 5));
                }
                let fetched = get_schema_by_id(id, settings).await.map_err(|e| {
                    if e.retriable {
                        CodecError::Registry(e.to_string())
                    } else {
                        CodecError::Undecodable(format!("schema id {id}: {e}"))
                    }
                })?;
                let schema = Arc::new(parse(&fetched.schema)?);
                by_id
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, schema.clone());
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
                by_header
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&h)
                    .map(|s| (s.clone(), 10))
                    .ok_or_else(|| {
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
    /// Frames and encodes one value; fails if it does not fit the schema.
    pub fn encode<T: Serialize>(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        let writer = GenericDatumWriter::builder(&self.schema)
            .build()
            .map_err(|e| CodecError::Encode(e.to_string()))?;
        let datum = writer
            .write_ser_to_vec(value)
            .map_err(|e| CodecError::Encode(e.to_string()))?;
        let mut out = Vec::with_capacity(self.header.len() + datum.len());
        out.extend_from_slice(&self.header);
        out.extend_from_slice(&datum);
        Ok(out)
    }
}

impl Decoder {
    /// Decodes one framed value, resolving its writer schema to ours.
    pub async fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        let (writer, skip) = self.codec.writer_schema(bytes).await?;
        let mut body = &bytes[skip..];
        let value = GenericDatumReader::builder(&writer)
            .reader_schema(&self.reader)
            .build()
            .map_err(|e| CodecError::Undecodable(e.to_string()))?
            .read_value(&mut body)
            .map_err(|e| CodecError::Undecodable(e.to_string()))?;
        if !body.is_empty() {
            return Err(CodecError::Undecodable(format!(
                "{} trailing bytes after the record",
                body.len()
            )));
        }
        apache_avro::from_value::<T>(&value).map_err(|e| CodecError::Undecodable(e.to_string()))
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
