"""The upstream producer simulator: realistic Avro PaymentInitiated events.

Upstream services retry: `duplicate_rate` of the events re-send an earlier request (same
payment_id, idempotency key and payload, a new event_id), and `conflict_rate` reuse an
earlier idempotency key with a different amount. Generation is seeded, so a run can be
reproduced exactly.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer

from paysaga.domain.idempotency import scope_key
from paysaga.schemas.codec import AvroCodec
from paysaga.streams.app.topics import Topics

CURRENCIES = (("USD", 60), ("EUR", 20), ("GBP", 8), ("JPY", 6), ("BHD", 3), ("CHF", 3))
COUNTRIES = ("US", "DE", "FR", "GB", "JP", "BH", "CH", "NL", "ES", "IT")
TOKEN_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
BINS = ("411111", "510510", "378282", "601100", "353011")
#: Typical ticket sizes in major units, per currency (JPY tickets are larger numbers).
MAJOR_RANGE = {"JPY": (100, 60_000), "BHD": (1, 400)}


@dataclass(frozen=True)
class UpstreamConfig:
    count: int
    seed: int = 42
    duplicate_rate: float = 0.05
    conflict_rate: float = 0.01
    merchants: int = 20
    manual_capture_rate: float = 0.1
    #: Share of requests that run the ORDER saga (inventory and shipping around payment).
    order_rate: float = 0.3
    #: The record key: "payment" (payment_id, what most producers would pick) or "scope"
    #: (`domain.idempotency.scope_key` of merchant and idempotency key). Keyed by scope and
    #: placed by murmur2 (aiokafka's default, as Java's), a request lands where paysaga
    #: decides it and skips the intake repartition hop (README, "Sizing").
    key: str = "payment"
    #: Share of requests with a currency that is not ISO 4217 ("ZZZ"): bad input, which
    #: intake sends to the DLQ with its reason (the demo shows it; 0 draws nothing, so the
    #: sequence of a seed is the same as without the option).
    invalid_rate: float = 0.0


def _amount(rng: random.Random, currency: str, exponent: int) -> int:
    low, high = MAJOR_RANGE.get(currency, (1, 500))
    return rng.randint(low, high) * 10**exponent + rng.randint(0, 10**exponent - 1)


def generate(cfg: UpstreamConfig, now_ms: Callable[[], int] | None = None) -> Iterator[dict]:
    """Yield PaymentInitiated dicts (Avro-ready) including retries and conflicts."""
    from paysaga.domain.money import currency_exponent

    rng = random.Random(cfg.seed)
    clock = now_ms or (lambda: int(time.time() * 1000))
    codes, weights = zip(*CURRENCIES, strict=True)
    sent: list[dict] = []
    for i in range(cfg.count):
        roll = rng.random()
        if sent and roll < cfg.duplicate_rate:
            again = dict(rng.choice(sent))
            again["event_id"] = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            again["occurred_at"] = clock()
            yield again
            continue
        if sent and roll < cfg.duplicate_rate + cfg.conflict_rate:
            clash = dict(rng.choice(sent))
            clash["event_id"] = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            clash["payment_id"] = f"pay_{cfg.seed}_{i:09d}"
            clash["amount_minor"] = clash["amount_minor"] + 100
            clash["occurred_at"] = clock()
            yield clash
            continue
        currency = rng.choices(codes, weights)[0]
        country = rng.choice(COUNTRIES)
        merchant = f"m_{rng.randrange(cfg.merchants):03d}"
        customer = f"c_{rng.randrange(100_000):06d}"
        event = {
            "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "occurred_at": clock(),
            "payment_id": f"pay_{cfg.seed}_{i:09d}",
            "correlation_id": f"ord_{cfg.seed}_{i:09d}",
            "causation_id": None,
            "idempotency_key": f"idem_{cfg.seed}_{i:09d}",
            "merchant_id": merchant,
            "customer_id": customer,
            "order_id": f"ord_{cfg.seed}_{i:09d}",
            "amount_minor": _amount(rng, currency, currency_exponent(currency)),
            "currency": currency,
            # Letters and digits: a hex token can be 16 digits that pass Luhn, i.e. a PAN.
            "card_token": "tok_" + "".join(rng.choices(TOKEN_ALPHABET, k=20)),
            "card_bin": rng.choice(BINS),
            "card_last4": f"{rng.randrange(10_000):04d}",
            "country": country,
            "capture_mode": "MANUAL" if rng.random() < cfg.manual_capture_rate else "AUTOMATIC",
            "ip_address": f"203.0.113.{rng.randrange(1, 255)}",
            "device_id": f"dev_{rng.getrandbits(32):08x}",
            "customer_email_hash": f"{rng.getrandbits(128):032x}",
            "customer_age_days": rng.randrange(0, 3650),
            "is_first_purchase": rng.random() < 0.2,
            "shipping_country": country,
            "billing_country": country if rng.random() < 0.9 else rng.choice(COUNTRIES),
            "description": f"order {i}",
            "metadata": {"channel": rng.choice(("web", "ios", "android"))},
            "saga": "PAYMENT",
            "items": [],
        }
        if rng.random() < cfg.order_rate:
            event["saga"] = "ORDER"
            event["items"] = [
                {"sku": f"sku_{rng.randrange(500):04d}", "quantity": rng.randint(1, 3)}
                for _ in range(rng.randint(1, 3))
            ]
        if cfg.invalid_rate and rng.random() < cfg.invalid_rate:
            yield {**event, "currency": "ZZZ"}  # never repeated as a retry or a conflict
            continue
        sent.append(event)
        if len(sent) > 10_000:
            sent.pop(rng.randrange(len(sent)))
        yield event


class Progress:
    """A one-line progress bar on a TTY, a line every few seconds otherwise."""

    def __init__(self, total: int, label: str, out: Any = sys.stderr) -> None:
        self.total, self.label, self.out = total, label, out
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.started = self.last = time.monotonic()

    def update(self, done: int, extra: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        frac = done / self.total if self.total else 0.0
        bar = "#" * int(frac * 30)
        line = f"{self.label} [{bar:<30}] {done}/{self.total} {rate:,.0f}/s {extra}"
        print(
            ("\r" + line) if self.tty else line,
            end="" if self.tty else "\n",
            file=self.out,
            flush=True,
        )

    def close(self, done: int, extra: str = "") -> None:
        self.update(done, extra, force=True)
        if self.tty:
            print(file=self.out)


def upstream_producer(bootstrap: str) -> AIOKafkaProducer:
    """The producer an upstream service would use: idempotent, acks=all, 5 ms linger."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_batch_size=256 * 1024,
    )


def upstream_key(cfg: UpstreamConfig, event: dict[str, Any]) -> bytes:
    """The record key upstream gives `event` (`UpstreamConfig.key`)."""
    if cfg.key == "scope":
        return scope_key(event["merchant_id"], event["idempotency_key"]).encode()
    if cfg.key != "payment":
        raise ValueError(f"unknown upstream key {cfg.key!r} (payment or scope)")
    return str(event["payment_id"]).encode()


async def produce(
    bootstrap: str,
    codec: AvroCodec,
    cfg: UpstreamConfig,
    rate: float = 0.0,
    topic: str = Topics().initiated,
    progress: bool = True,
    producer: AIOKafkaProducer | None = None,
) -> int:
    """Send `cfg.count` events at `rate`/s (0: as fast as possible); return how many.

    With `producer` (started, and left running), sends through it: the benchmark's latency
    phase keeps one warm producer, so its own start-up is not measured as pipeline latency.
    """
    own = producer is None
    if producer is None:
        producer = upstream_producer(bootstrap)
        await producer.start()
    bar = Progress(cfg.count, "produce") if progress else None
    sent = 0
    started = time.monotonic()
    try:
        pending = []
        for event in generate(cfg):
            value = codec.encode("PaymentInitiated", event)
            fut = await producer.send(topic, value=value, key=upstream_key(cfg, event))
            pending.append(fut)
            sent += 1
            if rate > 0:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            if len(pending) >= 1000:
                await asyncio.gather(*pending)
                pending.clear()
            if bar:
                bar.update(sent)
        await asyncio.gather(*pending)
    finally:
        if own:
            await producer.stop()
    if bar:
        bar.close(sent)
    return sent


async def bulk_produce(bootstrap: str, topic: str, records: Iterable[tuple[bytes, bytes, int]],
                       total: int, label: str) -> None:  # fmt: skip
    """Write `records` (key, value, partition) to `topic` as fast as the broker takes them,
    with a progress bar: the benchmarks' data sets (acks=1, large batches, no idempotence)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20,
                                max_batch_size=512 * 1024, acks=1)  # fmt: skip
    await producer.start()
    bar = Progress(total, label)
    try:
        pending, n = [], 0
        for key, value, part in records:
            pending.append(await producer.send(topic, value, key=key, partition=part))
            n += 1
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
                bar.update(n)
        await asyncio.gather(*pending)
        bar.close(n)
    finally:
        await producer.stop()
