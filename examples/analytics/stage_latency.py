#!/usr/bin/env python3
"""Per-stage latency and failures from vidpipe's lifecycle events.

A third-party consumer of the `vidpipe.events` topic: it reads the topic from
the beginning up to its current end (read_committed, so it sees exactly what
the pipeline committed), decodes each record with the writer's Avro schema
from the schema registry (Confluent wire format), and prints, per stage:

  * latency percentiles (p50, p90, p99, max, nearest-rank) and the count of
    the `duration_ms` of SUCCEEDED events: how long one record took in the
    stage, retries included;
  * counts of FAILED (gave up: dead-lettered) and RETRIED events.

It never joins a consumer group that matters (a random group id, nothing
committed), so it can run next to the pipeline at any time.

Settings come from arguments, else from the same VIDPIPE_* variables as
vidpipe itself, else from the local stack's env file (.stack/env). With an
empty registry URL the records are taken to be in Avro single-object
encoding (vidpipe's encoding without a registry), decoded with
schemas/lifecycle_event.avsc.

    python stage_latency.py                       # topic vidpipe.events
    python stage_latency.py --prefix staging.     # topic staging.events
    python stage_latency.py --topic my.events --json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext
import fastavro
import fastavro.schema

REPO = Path(__file__).resolve().parents[2]
SCHEMA_FILE = REPO / "schemas" / "lifecycle_event.avsc"
# The pipeline's stages in order; other stage names (custom processors) follow.
STAGES = ["discover", "download", "extract-audio", "transcribe", "summarize"]
PERCENTILES = [50, 90, 99]


class Usage(Exception):
    """Bad input or an unreachable service: printed as one line, exit 2."""


def stack_env() -> dict[str, str]:
    """The local stack's settings ($VIDPIPE_STACK_DIR/env or <repo>/.stack/env):
    KEY=VALUE lines, parsed and never executed."""
    stack = os.environ.get("VIDPIPE_STACK_DIR") or str(REPO / ".stack")
    path = Path(stack) / "env"
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and key.startswith("VIDPIPE_"):
                out[key] = value
    return out


def setting(arg: str | None, name: str, default: str) -> str:
    """An argument, else the environment, else the stack's env file, else the default."""
    if arg is not None:
        return arg
    if name in os.environ:
        return os.environ[name]
    return stack_env().get(name, default)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Per-stage latency percentiles and failure counts from vidpipe's events topic."
    )
    p.add_argument("--topic", help="the events topic (default: PREFIX + 'events')")
    p.add_argument("--prefix", help="topic prefix (default: $VIDPIPE_TOPIC_PREFIX or 'vidpipe.')")
    p.add_argument("--brokers", help="Kafka bootstrap servers (default: $VIDPIPE_KAFKA_BROKERS)")
    p.add_argument(
        "--registry",
        help="Confluent-compatible schema registry URL, '' for single-object encoding "
        "(default: $VIDPIPE_SCHEMA_REGISTRY_URL)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="give up if the end of the topic is not reached within this many seconds (default 300)",
    )
    args = p.parse_args(argv)
    prefix = setting(args.prefix, "VIDPIPE_TOPIC_PREFIX", "vidpipe.")
    args.topic = args.topic or f"{prefix}events"
    args.brokers = setting(args.brokers, "VIDPIPE_KAFKA_BROKERS", "127.0.0.1:9092")
    args.registry = setting(
        args.registry, "VIDPIPE_SCHEMA_REGISTRY_URL", "http://127.0.0.1:8081/apis/ccompat/v7"
    )
    if args.timeout <= 0:
        p.error("--timeout must be positive")
    return args


class Decoder:
    """Confluent wire format (magic byte 0, schema id) through the registry,
    or Avro single-object encoding (C3 01, fingerprint) with our schema file."""

    def __init__(self, registry_url: str, topic: str):
        self.topic = topic
        self.avro = None
        if registry_url:
            self.avro = AvroDeserializer(SchemaRegistryClient({"url": registry_url}))
        self.schema = fastavro.parse_schema(json.loads(SCHEMA_FILE.read_text()))
        # Single-object header: C3 01 and the schema's CRC-64-AVRO
        # fingerprint (fastavro gives its bytes in the spec's little-endian order).
        canonical = fastavro.schema.to_parsing_canonical_form(self.schema)
        self.header = b"\xc3\x01" + bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))

    def decode(self, payload: bytes) -> dict:
        if payload[:1] == b"\x00" and self.avro is not None:
            return self.avro(payload, SerializationContext(self.topic, MessageField.VALUE))
        if payload[:10] == self.header:
            return fastavro.schemaless_reader(io.BytesIO(payload[10:]), self.schema, self.schema)
        if payload[:2] == b"\xc3\x01":
            # A newer writer schema: without a registry there is no way to
            # look it up (vidpipe itself keeps every version compiled in).
            raise ValueError(f"single-object record of another schema than {SCHEMA_FILE.name}")
        raise ValueError(f"unknown encoding (first bytes {payload[:2].hex()})")


def read_events(args: argparse.Namespace) -> tuple[list[dict], int]:
    """Every committed event from the beginning to the end of each partition
    as it is when reached; and how many records could not be decoded."""
    consumer = Consumer(
        {
            "bootstrap.servers": args.brokers,
            "group.id": f"vidpipe-analytics-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            # A wrong address should fail in seconds, not hang.
            "socket.connection.setup.timeout.ms": 10000,
        }
    )
    try:
        try:
            meta = consumer.list_topics(args.topic, timeout=15)
        except KafkaException as e:
            raise Usage(f"Kafka is not reachable at {args.brokers}: {e}") from e
        topic = meta.topics.get(args.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            reason = topic.error if topic is not None and topic.error else "no such topic"
            raise Usage(f"cannot read topic {args.topic!r} at {args.brokers}: {reason}")
        partitions = sorted(topic.partitions)
        consumer.assign([TopicPartition(args.topic, p, OFFSET_BEGINNING) for p in partitions])
        decoder = Decoder(args.registry, args.topic)
        open_partitions = set(partitions)
        events: list[dict] = []
        undecodable = 0
        deadline = time.monotonic() + args.timeout
        while open_partitions:
            if time.monotonic() > deadline:
                raise Usage(
                    f"the end of {args.topic} was not reached within {args.timeout:g}s "
                    f"(partitions still open: {sorted(open_partitions)})"
                )
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    open_partitions.discard(msg.partition())
                    continue
                raise Usage(f"reading {args.topic}: {err}")
            payload = msg.value()
            try:
                events.append(decoder.decode(payload or b""))
            except Exception as e:  # a foreign or empty record: counted, not fatal
                undecodable += 1
                if undecodable <= 3:
                    print(
                        f"warning: record {msg.partition()}/{msg.offset()} not decodable: {e}",
                        file=sys.stderr,
                    )
        return events, undecodable
    finally:
        consumer.close()


def percentile(ordered: list[int], p: float) -> int:
    """Nearest-rank percentile of a sorted, non-empty list."""
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summarise(events: list[dict]) -> dict:
    durations: dict[str, list[int]] = defaultdict(list)
    kinds: dict[str, Counter] = defaultdict(Counter)
    for e in events:
        stage, kind = e["stage"], e["kind"]
        kinds[stage][kind] += 1
        if kind == "SUCCEEDED" and e.get("duration_ms") is not None:
            durations[stage].append(int(e["duration_ms"]))
    stages = [s for s in STAGES if s in kinds] + sorted(s for s in kinds if s not in STAGES)
    out = []
    for stage in stages:
        row: dict = {
            "stage": stage,
            "count": len(durations[stage]),
            "failed": kinds[stage]["FAILED"],
            "retried": kinds[stage]["RETRIED"],
        }
        ordered = sorted(durations[stage])
        for p in PERCENTILES:
            row[f"p{p}_ms"] = percentile(ordered, p) if ordered else None
        row["max_ms"] = ordered[-1] if ordered else None
        out.append(row)
    return {"events": len(events), "stages": out}


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def ms(v: int | None) -> str:
    return "-" if v is None else f"{v / 1000:.3f}s"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        events, undecodable = read_events(args)
    except Usage as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = summarise(events)
    report["topic"] = args.topic
    report["undecodable"] = undecodable
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.topic}: {report['events']} events, {undecodable} undecodable\n")
    print("latency per stage (SUCCEEDED events, nearest-rank percentiles)")
    print(
        table(
            ["stage", "count", "p50", "p90", "p99", "max"],
            [
                [r["stage"], str(r["count"]), ms(r["p50_ms"]), ms(r["p90_ms"]), ms(r["p99_ms"]), ms(r["max_ms"])]
                for r in report["stages"]
            ],
        )
    )
    print("\nfailures per stage (FAILED = gave up, dead-lettered; RETRIED = will try again)")
    print(
        table(
            ["stage", "failed", "retried"],
            [[r["stage"], str(r["failed"]), str(r["retried"])] for r in report["stages"]],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
