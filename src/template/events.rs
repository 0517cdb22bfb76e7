//! The Avro datum of a lifecycle event, written directly.
//!
//! The runner writes two events per record (`started`, `succeeded`), and
//! apache-avro's schema-aware serializer looks every field up by name and
//! hashes its position, which made encoding them cost about a fifth of all
//! the work the template did per record of a trivial stage. This writes the
//! same bytes straight from the struct, for the schema this binary ships
//! (`schemas/lifecycle_event.avsc`): the tests compare it with apache-avro's
//! output, so a change of the schema that this file does not follow fails
//! them. The framing (registry id or single-object header) is the codec's.

use crate::records::{EventKind, LifecycleEvent};

/// Appends `event`'s datum (no framing) in the layout of
/// `schemas/lifecycle_event.avsc`.
pub fn write_datum(event: &LifecycleEvent, out: &mut Vec<u8>) {
    string(out, &event.meta.video_id);
    long(out, event.meta.generation);
    string(out, &event.meta.trace_id);
    string(out, &event.stage);
    long(
        out,
        match event.kind {
            EventKind::Started => 0,
            EventKind::Succeeded => 1,
            EventKind::Retried => 2,
            EventKind::Failed => 3,
        },
    );
    long(out, i64::from(event.attempt));
    long(out, event.at);
    // Unions ["null", T]: branch 0 is null, branch 1 carries the value.
    match event.duration_ms {
        None => long(out, 0),
        Some(ms) => {
            long(out, 1);
            long(out, ms);
        }
    }
    optional_string(out, event.error_class.as_deref());
    optional_string(out, event.error.as_deref());
    string(out, &event.input_topic);
    long(out, i64::from(event.input_partition));
    long(out, event.input_offset);
}

/// Avro `int` and `long`: zig-zag, then a base-128 varint.
fn long(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    loop {
        let byte = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    long(out, s.len() as i64);
    out.extend_from_slice(s.as_bytes());
}

fn optional_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => long(out, 0),
        Some(s) => {
            long(out, 1);
            string(out, s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{Meta, Record};
    use apache_avro::Schema;
    use apache_avro::writer::datum::GenericDatumWriter;

    fn events() -> Vec<LifecycleEvent> {
        let base = LifecycleEvent {
            meta: Meta {
                video_id: "yt:abc".into(),
                generation: 1,
                trace_id: "0123456789abcdef".into(),
            },
            stage: "download".into(),
            kind: EventKind::Started,
            attempt: 1,
            at: 1_700_000_000_000,
            duration_ms: None,
            error_class: None,
            error: None,
            input_topic: "vidpipe.video.discovered".into(),
            input_partition: 0,
            input_offset: 0,
        };
        let mut all = vec![base.clone()];
        for (i, kind) in [EventKind::Succeeded, EventKind::Retried, EventKind::Failed]
            .into_iter()
            .enumerate()
        {
            all.push(LifecycleEvent {
                kind,
                attempt: i as i32 + 2,
                duration_ms: Some(63 + i as i64 * 1_000_000_007),
                error_class: (i > 0).then(|| "retryable:http_503".into()),
                error: (i > 1).then(|| "éè ✓ \u{0} a long message ".repeat(20)),
                input_partition: 1 << (10 * i),
                input_offset: i64::MAX - i as i64,
                ..base.clone()
            });
        }
        all.push(LifecycleEvent {
            meta: Meta {
                video_id: String::new(),
                generation: -1,
                trace_id: "x".repeat(300),
            },
            attempt: i32::MAX,
            at: i64::MIN,
            duration_ms: Some(-1),
            input_partition: -1,
            input_offset: -64,
            ..base
        });
        all
    }

    #[test]
    fn same_bytes_as_apache_avro() {
        let schema = Schema::parse_str(LifecycleEvent::SCHEMA).unwrap();
        let writer = GenericDatumWriter::builder(&schema).build().unwrap();
        for event in events() {
            let expected = writer.write_ser_to_vec(&event).unwrap();
            let mut ours = Vec::new();
            write_datum(&event, &mut ours);
            assert_eq!(ours, expected, "{event:?}");
        }
    }
}
