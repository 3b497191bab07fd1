"""Prometheus metrics, one registry per agent so that several agents can share a process (tests)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class EventCounter:
    """A counter bumped once or more per event: a plain integer per label value, exported when
    metrics are scraped. prometheus_client's Counter takes a lock per increment, and at
    thousands of events per second those locks cost more than some stages do."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry, label: str = "") -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        # label value -> count; an unlabelled counter is exported (as 0) from the start
        self.values: Tally[str] = Tally() if label else Tally({"": 0})
        registry.register(self)

    def inc(self, amount: int = 1, label: str = "") -> None:
        self.values[label] += amount

    def describe(self) -> Iterator[Metric]:
        # the registry checks names against this: a second metric of the same name is refused
        yield CounterMetricFamily(self.name, self.documentation, labels=[self.label] if self.label else None)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label] if self.label else None)
        for label, value in self.values.items():
            family.add_metric([label] if self.label else [], float(value))
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_received = EventCounter("recsys_events_received", "Event messages received", r)
        self.events_applied = EventCounter("recsys_events_applied", "Events applied to state (once per event)", r)
        self.events_duplicate = Counter(
            "recsys_events_duplicate", "Events ignored as duplicates of an applied event id", registry=r
        )
        self.events_redelivered = Counter(
            "recsys_events_redelivered", "Redeliveries of already-applied messages", registry=r
        )
        self.events_rebuilt = Counter("recsys_events_rebuilt", "Events replayed from the stream at start", registry=r)
        self.dead_letters = Counter(
            "recsys_dead_letters", "Messages sent to the dead-letter subject", ["source"], registry=r
        )
        self.retries = Counter("recsys_message_retries", "Messages handed back for redelivery", registry=r)
        self.catalog_upserts = Counter("recsys_catalog_upserts", "Items upserted", registry=r)
        self.catalog_deletes = Counter("recsys_catalog_deletes", "Items deleted", registry=r)
        self.pushes = Counter("recsys_pushes", "Recommendation pushes published", registry=r)
        self.pushed_events = Counter(
            "recsys_pushed_events", "Events reflected by pushes (more than pushes when coalesced)", registry=r
        )
        self.requests = Counter("recsys_recommend_requests", "Pull requests for recommendations", ["via"], registry=r)
        self.plugin_failures = Counter(
            "recsys_plugin_failures",
            "Plugin calls that failed, timed out or ran slow",
            ["plugin", "hook", "kind"],
            registry=r,
        )
        self.apply_seconds = Histogram(
            "recsys_apply_seconds", "Time to validate and apply one event", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.recommend_seconds = Histogram(
            "recsys_recommend_seconds", "Time to compute one recommendation list", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.push_lag_seconds = Histogram(
            "recsys_push_lag_seconds",
            "From applying an event to publishing its push",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.push_batch_size = Histogram(
            "recsys_push_batch_size",
            "Users ranked together in one batch by the push worker",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.apply_batch_size = Histogram(
            "recsys_apply_batch_size",
            "Events fetched and applied together by the events consumer",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.users = Gauge("recsys_users", "Users held in memory", registry=r)
        self.items = Gauge("recsys_items", "Items in the catalog", registry=r)
        self.push_backlog = Gauge("recsys_push_backlog", "Users waiting for a push", registry=r)
        self.item_vectors = Gauge(
            "recsys_item_vectors", "Items with an embedding ready for content retrieval", registry=r
        )
        self.ws_sockets = Gauge("recsys_ws_sockets", "Websockets open", registry=r)
        self.ws_users = Gauge(
            "recsys_ws_users", "Users with an open websocket (one NATS subscription each)", registry=r
        )
        self.ws_pushes = Counter("recsys_ws_pushes", "Pushes sent on websockets", registry=r)
        self.ws_pushes_replaced = Counter(
            "recsys_ws_pushes_replaced", "Pushes a newer one replaced before a slow socket took them", registry=r
        )
        self.ws_refused = Counter(
            "recsys_ws_refused", "Websocket upgrades refused (token, origin, capacity, bus)", ["reason"], registry=r
        )
        self.ws_closed = Counter("recsys_ws_closed", "Websockets closed, by why", ["reason"], registry=r)
        # the process's CPU, memory and open files, and the garbage collector's passes
        ProcessCollector(registry=r)
        GCCollector(registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample, for health reports and tests."""
        sample = self.registry.get_sample_value(name, labels or None)
        return float(sample or 0.0)
