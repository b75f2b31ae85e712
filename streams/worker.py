"""Run one Faust worker of a given role in this process until SIGINT/SIGTERM."""

from __future__ import annotations

import sys
from functools import partial

import structlog

from infra.kafka import provision_topics, wait_for_broker
from infra.settings import Settings
from streams.services import Services
from streams.store import keyed_stores, reconcile
from streams.topology import Role, build_topology
from streams.transport import changelog_ends

log = structlog.get_logger(__name__)
SWITCH_INTERVAL_S = 0.0005
#: How long a starting worker waits for a broker before it stops with one line naming the address.
BROKER_WAIT_S = 10.0


def run_worker(settings: Settings, role: Role) -> int:
    """Provision topics, build the role's topology and run it; returns the exit code."""
    import faust

    wait_for_broker(settings.kafka, BROKER_WAIT_S)  # BrokerUnreachable: one line, exit 1
    provision_topics(settings.kafka)
    # The ranking thread is CPU-bound; the event loop makes many short socket calls, and after
    # each it waits for the GIL. At the default 5 ms switch interval it waits most of that time.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    services = Services(settings)
    topo = build_topology(settings, role, services)
    reconcile(keyed_stores(topo.app), partial(changelog_ends, settings.kafka))
    log.info(
        "worker_starting",
        role=role,
        broker=settings.kafka.bootstrap_servers,
        agents=sorted(topo.agents),
    )
    if topo.heap is not None:
        settled = topo.heap.settle()  # what the start loaded stays out of the collector's scans
        log.info("heap_settled", frozen=settled.frozen, ms=round(settled.seconds * 1000, 1))
    worker = faust.Worker(
        topo.app, loglevel=settings.log_level.upper(), quiet=True, override_logging=False
    )
    try:
        worker.execute_from_commandline()
    except SystemExit as stop:
        return int(stop.code or 0)
    finally:
        services.close()
        log.info("worker_stopped", role=role)
    return 0
