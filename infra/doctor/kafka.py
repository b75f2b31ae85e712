"""The doctor's Kafka checks: the broker answers, and every declared topic exists as configured.

Read-only: no topic is created or altered; a fix names the command that would do it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from infra.doctor.findings import _SEVERITY, Finding, Status, _short
from infra.kafka import confluent_config
from infra.settings import KafkaSettings
from schemas.topics import ALL_TOPICS, TopicSpec


@dataclass(frozen=True, slots=True)
class Cluster:
    """What the broker check learnt, for the topic check: an admin client and the topic metadata."""

    admin: Any  # confluent_kafka.admin.AdminClient
    topics: Mapping[str, Any]  # name -> confluent_kafka.admin.TopicMetadata


def _broker_fix(code: int | None, kafka: KafkaSettings) -> str:
    from confluent_kafka import KafkaError

    if code == KafkaError._RESOLVE:
        return "the host name does not resolve: check RECSTREAM_BOOTSTRAP_SERVERS"
    if code == KafkaError._SSL:
        return (
            "TLS failed: check RECSTREAM_KAFKA__SSL_CAFILE / SSL_CERTFILE / SSL_KEYFILE and that "
            "the listener speaks TLS"
        )
    if code == KafkaError._INVALID_ARG:
        return "librdkafka refused the settings: check the RECSTREAM_KAFKA__* values and files"
    if code == KafkaError._AUTHENTICATION:
        return "check RECSTREAM_KAFKA__SASL_MECHANISM, SASL_USERNAME and SASL_PASSWORD"
    return (
        f"start the broker (`recstream up` runs the embedded one on 127.0.0.1:9092) or point "
        f"RECSTREAM_BOOTSTRAP_SERVERS at a running one (security protocol "
        f"{kafka.security_protocol})"
    )


def _unreachable(
    kafka: KafkaSettings, errors: list[Any], timeout: float | None
) -> tuple[Finding, None]:
    """The broker finding when no broker answered: the first reason librdkafka gave, if any."""
    from confluent_kafka import KafkaError

    causes = [e for e in errors if e.code() != KafkaError._ALL_BROKERS_DOWN] or errors
    why = re.sub(r"^\S+/\S+: | \(after \d+ms in state \w+\)$", "", causes[0].str())
    message = f"no Kafka broker answered at {kafka.bootstrap_servers}"
    if timeout is not None:
        message += f" within {timeout:g} s"
    if timeout is None or causes is not errors:
        message += f": {why}"
    return Finding("broker", Status.FAIL, message, _broker_fix(causes[0].code(), kafka)), None


def check_broker(kafka: KafkaSettings, timeout: float) -> tuple[Finding, Cluster | None]:
    """A metadata request to the configured bootstrap servers, with the configured security."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    address = kafka.bootstrap_servers
    errors: list[KafkaError] = []
    setup_ms = max(1000, int(timeout * 1000))
    extra = {"socket.connection.setup.timeout.ms": setup_ms, "error_cb": errors.append}
    try:
        admin = AdminClient(confluent_config(kafka, **extra))
    except KafkaException as exc:  # a configuration librdkafka refuses (a missing CA file...)
        message = f"cannot connect to {address}: {exc.args[0].str()}"
        return Finding("broker", Status.FAIL, message, _broker_fix(exc.args[0].code(), kafka)), None
    start = time.perf_counter()
    deadline = start + timeout
    while True:  # short rounds, so a refused connection is reported at once, not at the timeout
        try:
            metadata = admin.list_topics(
                timeout=max(0.01, min(0.5, deadline - time.perf_counter()))
            )
            break
        except KafkaException as exc:
            admin.poll(0)  # delivers librdkafka's errors, which say why (refused, TLS, SASL...)
            timed_out = time.perf_counter() >= deadline
            if timed_out or any(e.code() == KafkaError._ALL_BROKERS_DOWN for e in errors):
                return _unreachable(kafka, errors or [exc.args[0]], timeout if timed_out else None)
    elapsed_ms = (time.perf_counter() - start) * 1000
    message = (
        f"{address} answered in {elapsed_ms:.0f} ms (brokers: {len(metadata.brokers)}, "
        f"{len(metadata.topics)} topics, {kafka.security_protocol})"
    )
    return Finding("broker", Status.OK, message), Cluster(admin, metadata.topics)


def _missing_fix(missing: list[TopicSpec], kafka: KafkaSettings) -> str:
    first = missing[0]
    more = " (likewise for each missing topic)" if len(missing) > 1 else ""
    return (
        f"start a worker once (`recstream worker` creates missing topics), or: kafka-topics.sh "
        f"--bootstrap-server {kafka.bootstrap_servers} --create --topic {first.name} "
        f"--partitions {kafka.partitions} --replication-factor {kafka.replication_factor} "
        f"--config cleanup.policy={first.cleanup}{more}"
    )


def _partition_problem(spec: TopicSpec, count: int, wanted: int) -> tuple[Status, str, str]:
    said = f"{spec.name} has {count} partitions, RECSTREAM_KAFKA__PARTITIONS is {wanted}"
    if spec.internal:
        return (
            Status.FAIL,
            f"{said}: the worker's tables and item notices assume {wanted}",
            f"set RECSTREAM_KAFKA__PARTITIONS={count} on every worker, or (workers stopped and "
            f"caught up) delete {spec.name} and let `recstream worker` create it again",
        )
    return (
        Status.WARN,
        f"{said} (the worker re-keys its inputs, so this works)",
        f"set RECSTREAM_KAFKA__PARTITIONS={count} to match the cluster",
    )


def _cleanup_problems(
    cluster: Cluster, specs: list[TopicSpec], kafka: KafkaSettings, timeout: float
) -> list[tuple[Status, str, str]]:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import ConfigResource, ResourceType

    if not specs:
        return []
    resources = [ConfigResource(ResourceType.TOPIC, s.name) for s in specs]
    problems = []
    for spec, future in zip(specs, cluster.admin.describe_configs(resources).values(), strict=True):
        try:
            entry = future.result(timeout=timeout).get("cleanup.policy")
        except (KafkaException, TimeoutError) as exc:
            problems.append(
                (Status.WARN, f"{spec.name}: cleanup policy not read: {_short(exc)}", "")
            )
            continue
        actual = entry.value if entry is not None else "delete"
        if ("compact" in actual.split(",")) == (spec.cleanup == "compact"):
            continue
        why = (
            "the catalogue is deleted after retention, so a rebuilt worker forgets items"
            if spec.cleanup == "compact"
            else f"compaction keeps only the latest message per {spec.key}"
        )
        problems.append(
            (
                Status.FAIL,
                f"{spec.name} has cleanup.policy={actual}, expected {spec.cleanup}: {why}",
                f"kafka-configs.sh --bootstrap-server {kafka.bootstrap_servers} --alter "
                f"--entity-type topics --entity-name {spec.name} "
                f"--add-config cleanup.policy={spec.cleanup}",
            )
        )
    return problems


def check_topics(kafka: KafkaSettings, cluster: Cluster | None, timeout: float) -> Finding:
    """Every topic of schemas/topics.py exists, with the configured partitions and cleanup."""
    if cluster is None:
        return Finding("topics", Status.SKIP, "not checked: no broker answered")
    missing = [s for s in ALL_TOPICS if s.name not in cluster.topics]
    present = [s for s in ALL_TOPICS if s.name in cluster.topics]
    problems: list[tuple[Status, str, str]] = []
    if missing:
        names = ", ".join(s.name for s in missing)
        problems.append((Status.FAIL, f"missing: {names}", _missing_fix(missing, kafka)))
    for spec in present:
        count = len(cluster.topics[spec.name].partitions)
        if count != kafka.partitions:
            problems.append(_partition_problem(spec, count, kafka.partitions))
    problems += _cleanup_problems(cluster, present, kafka, timeout)
    if not problems:
        return Finding(
            "topics",
            Status.OK,
            f"all {len(ALL_TOPICS)} topics exist with {kafka.partitions} partition(s) and "
            "their declared cleanup policy",
        )
    worst = max((p[0] for p in problems), key=_SEVERITY.__getitem__)
    fixes = dict.fromkeys(fix for _, _, fix in problems if fix)
    return Finding("topics", worst, "; ".join(p[1] for p in problems), "; ".join(fixes))
