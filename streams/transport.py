"""recstream's Faust app: a tunable fetch wait, a flush that drains, and true changelog ends.

Three changes to Faust's aiokafka driver, each for a measured or tested reason:

- **Fetch wait.** The driver fixes the consumer's fetch wait at 1,500 ms. Apache Kafka answers a
  waiting fetch as soon as data arrives, so the value rarely matters there; the embedded broker
  holds an empty fetch for the whole wait, which added up to 1.5 s per hop. Measured on the
  embedded broker (2-core machine): one message's consume latency was 382 ms with a 1,500 ms
  wait, 12 ms with 100 ms and 2-5 ms with 10 ms.
- **Flush before commit.** Faust flushes its producer buffer (table changelog writes and
  ``send_soon`` outputs) before it commits consumer offsets, but its flush returns after any
  0.1 s in which no message left the buffer, full or not. Under load an offset could then be
  committed before the state write it depends on was sent, and a ``kill -9`` at that moment lost
  the write (found by ``tests/test_reliability.py``). :class:`DrainingBuffer` waits until the
  buffer is empty, for at most :data:`FLUSH_DEADLINE_S`.
- **Changelog ends.** A restarting worker rebuilds its tables by reading each changelog partition
  up to its high watermark. The embedded broker reports the high watermark as one past the
  *first* offset of the partition's last record batch, not past its last record, so recovery
  stopped short and missed the newest state of some keys. When an ``end_probe`` is given, the
  reported ends are checked by reading from one before each of them, and raised to one past the
  last record found. Against Apache Kafka the probe reads one record per partition and changes
  nothing.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import faust
from confluent_kafka import Consumer, TopicPartition
from faust.transport.drivers import aiokafka as driver
from faust.transport.producer import ProducerBuffer
from faust.types import TP

from infra.kafka import consumer_config
from infra.settings import KafkaSettings

EndProbe = Callable[[Mapping[TP, int]], dict[TP, int]]
PROBE_WAIT_S = 0.5


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    fetch_max_wait_ms = 1500

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = self.fetch_max_wait_ms  # aiokafka reads it in start()
        return consumer


#: How long a flush waits for the producer buffer to empty before it lets the commit go on.
FLUSH_DEADLINE_S = 2.0


class DrainingBuffer(ProducerBuffer):
    """Faust's producer buffer with a :meth:`flush` that waits until nothing is pending, for at
    most :data:`FLUSH_DEADLINE_S` (an unbounded wait can hold the consumer's fetcher, which
    awaits a commit every ``broker_commit_every`` messages)."""

    async def flush(self) -> None:
        deadline = time.monotonic() + FLUSH_DEADLINE_S
        while self.size and self.state == "running" and time.monotonic() < deadline:
            self.message_sent.clear()
            try:
                await asyncio.wait_for(self.message_sent.wait(), timeout=0.1)
            except TimeoutError:
                continue  # the sender is slow, not done: keep waiting
        if self.size:  # stopping, or past the deadline: Faust's own flush
            await super().flush()


class _DrainingProducer(driver.Producer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        buffer = DrainingBuffer(loop=self.loop, beacon=self.beacon)
        buffer.app = self.app
        self.buffer = buffer


def read_true_ends(kafka: KafkaSettings, reported: Mapping[TP, int]) -> dict[TP, int]:
    """``reported`` end offsets, each raised to one past the last record actually there."""
    ends = dict(reported)
    starts = [TopicPartition(tp.topic, tp.partition, end - 1) for tp, end in ends.items() if end]
    if not starts:
        return ends
    group = f"recstream-end-probe-{uuid.uuid4().hex}"
    probe = Consumer(consumer_config(kafka, group, **{"enable.auto.commit": False}))
    try:
        probe.assign(starts)
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            batch = probe.consume(1000, timeout=PROBE_WAIT_S)
            if not batch:
                break
            for msg in batch:
                if msg.error() is None:
                    tp = TP(msg.topic() or "", msg.partition() or 0)
                    ends[tp] = max(ends[tp], (msg.offset() or 0) + 1)
    finally:
        probe.close()
    return ends


def _transport_class(fetch_max_wait_ms: int, end_probe: EndProbe | None) -> type[driver.Transport]:
    thread = type("ConsumerThread", (_ConsumerThread,), {"fetch_max_wait_ms": fetch_max_wait_ms})

    class TunedConsumer(driver.Consumer):
        def _new_consumer_thread(self) -> Any:
            return thread(self, loop=self.loop, beacon=self.beacon)

        async def highwaters(self, *partitions: TP) -> Mapping[TP, int]:
            reported = await super().highwaters(*partitions)
            if end_probe is None:
                return reported
            return await asyncio.to_thread(end_probe, reported)

    class TunedTransport(driver.Transport):
        Consumer = TunedConsumer
        Producer = _DrainingProducer

    return TunedTransport


class TunedApp(faust.App):
    """``faust.App`` with a configurable consumer fetch wait, a draining producer flush and,
    given an ``end_probe``, changelog ends checked against the records really there."""

    def __init__(
        self,
        *args: Any,
        fetch_max_wait_ms: int = 1500,
        end_probe: EndProbe | None = None,
        **kwargs: Any,
    ) -> None:
        self._transport_cls = _transport_class(fetch_max_wait_ms, end_probe)
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> Any:
        return self._transport_cls(self.conf.broker_consumer, self)
