"""Kafka client configuration (plain, TLS, SASL) and idempotent topic provisioning.

confluent-kafka is used by producers, consumers and admin; Faust (aiokafka) gets the same settings
through :func:`faust_broker_options`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import structlog

from infra.settings import KafkaSettings
from schemas.topics import ALL_TOPICS, TopicSpec

log = structlog.get_logger(__name__)


#: librdkafka's own log lines go here; :func:`infra.logs.configure_logging` keeps it quiet
#: unless the log level is debug (connection failures surface as our own one-line errors).
RDKAFKA_LOGGER = logging.getLogger("recstream.librdkafka")


class BrokerUnreachable(RuntimeError):
    """No broker answered at the configured address."""


def confluent_config(kafka: KafkaSettings, **extra: Any) -> dict[str, Any]:
    """librdkafka configuration for a producer, consumer or admin client."""
    conf: dict[str, Any] = {
        "bootstrap.servers": kafka.bootstrap_servers,
        "security.protocol": kafka.security_protocol,
        "logger": RDKAFKA_LOGGER,
    }
    if kafka.sasl_mechanism:
        conf["sasl.mechanism"] = kafka.sasl_mechanism
    if kafka.sasl_username:
        conf["sasl.username"] = kafka.sasl_username
    if kafka.sasl_password is not None:
        conf["sasl.password"] = kafka.sasl_password.get_secret_value()
    if kafka.ssl_cafile:
        conf["ssl.ca.location"] = str(kafka.ssl_cafile)
    if kafka.ssl_certfile:
        conf["ssl.certificate.location"] = str(kafka.ssl_certfile)
    if kafka.ssl_keyfile:
        conf["ssl.key.location"] = str(kafka.ssl_keyfile)
    conf.update(extra)
    return conf


def producer_config(kafka: KafkaSettings, **extra: Any) -> dict[str, Any]:
    """Producer configuration: idempotent, and keys hashed like the Java client and Faust.

    ``murmur2_random`` puts a key on the same partition Faust's tables expect, so per-user state is
    co-partitioned with the user's events whichever client published them.
    """
    return confluent_config(
        kafka, **{"partitioner": "murmur2_random", "enable.idempotence": True, **extra}
    )


def consumer_config(kafka: KafkaSettings, group_id: str, **extra: Any) -> dict[str, Any]:
    """Consumer configuration with the session timeout that keeps group joins quick."""
    return confluent_config(
        kafka,
        **{
            "group.id": group_id,
            "session.timeout.ms": kafka.session_timeout_ms,
            "fetch.wait.max.ms": kafka.fetch_max_wait_ms,
            "auto.offset.reset": "earliest",
            **extra,
        },
    )


def faust_broker_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments for ``faust.App`` that reach the same cluster the same way."""
    import ssl

    import faust

    urls = ";".join(f"kafka://{hp.strip()}" for hp in kafka.bootstrap_servers.split(","))
    options: dict[str, Any] = {"broker": urls, "producer_linger": kafka.producer_linger_ms / 1000}
    context = None
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(
            cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None
        )
        if kafka.ssl_certfile:
            context.load_cert_chain(
                str(kafka.ssl_certfile), str(kafka.ssl_keyfile) if kafka.ssl_keyfile else None
            )
    if kafka.security_protocol.startswith("SASL"):
        password = kafka.sasl_password.get_secret_value() if kafka.sasl_password else ""
        options["broker_credentials"] = faust.SASLCredentials(
            username=kafka.sasl_username or "",
            password=password,
            mechanism=kafka.sasl_mechanism or "PLAIN",
            ssl_context=context,
        )
    elif context is not None:
        options["broker_credentials"] = faust.SSLCredentials(context)
    return options


def wait_for_broker(kafka: KafkaSettings, timeout_s: float = 10.0) -> None:
    """Return once a broker answers a metadata request, else :class:`BrokerUnreachable`."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(confluent_config(kafka, **{"socket.connection.setup.timeout.ms": 2000}))
    try:
        admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise BrokerUnreachable(
            f"no Kafka broker answered at {kafka.bootstrap_servers} within {timeout_s:g} s"
        ) from exc


def provision_topics(
    kafka: KafkaSettings, specs: Iterable[TopicSpec] = ALL_TOPICS, timeout_s: float = 15.0
) -> list[str]:
    """Create the topics that do not exist yet; return the names created (idempotent)."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    wait_for_broker(kafka, timeout_s)
    admin = AdminClient(confluent_config(kafka))
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    wanted = [
        NewTopic(s.name, kafka.partitions, kafka.replication_factor, config=s.config())
        for s in specs
        if s.name not in existing
    ]
    created = []
    for name, future in admin.create_topics(wanted).items() if wanted else []:
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    if created:
        log.info("topics_created", topics=created, partitions=kafka.partitions)
    return created


def group_progress(
    kafka: KafkaSettings, group_id: str, topic: str, timeout_s: float = 5.0
) -> tuple[int, int]:
    """(offsets ``group_id`` has committed on ``topic``, end offsets of ``topic``), summed."""
    from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(confluent_config(kafka))
    meta = admin.list_topics(topic, timeout=timeout_s).topics[topic]
    parts = [TopicPartition(topic, p) for p in meta.partitions]
    request = [ConsumerGroupTopicPartitions(group_id, parts)]
    committed = admin.list_consumer_group_offsets(request)[group_id].result(timeout=timeout_s)
    done = sum(max(tp.offset, 0) for tp in committed.topic_partitions)
    probe = Consumer(confluent_config(kafka, **{"group.id": f"{group_id}-lag-probe"}))
    try:
        end = sum(probe.get_watermark_offsets(tp, timeout=timeout_s)[1] for tp in parts)
    finally:
        probe.close()
    return done, end


def consumer_lag(kafka: KafkaSettings, group_id: str, topic: str, timeout_s: float = 5.0) -> int:
    """Messages on ``topic`` that consumer group ``group_id`` has not committed yet."""
    done, end = group_progress(kafka, group_id, topic, timeout_s)
    return max(end - done, 0)
