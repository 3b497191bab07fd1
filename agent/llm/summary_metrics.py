"""The slow path's Prometheus metrics (``recsys_summar*``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PromCounter

from agent.serving.metrics import EventCounter


class SummaryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.summaries = PromCounter("recsys_summaries", "Profiles written, by source", ["source"], registry=r)
        self.llm_errors = PromCounter(
            "recsys_summary_llm_errors", "LLM calls that gave no usable profile", ["kind"], registry=r
        )
        # one per event: a plain count, exported when scraped
        self.requests = EventCounter(
            "recsys_summary_requests", "Refresh requests, by what became of them", r, label="outcome"
        )
        self.pending = Gauge("recsys_summary_pending", "Users waiting for a summary worker", registry=r)
        self.tracked = Gauge("recsys_summary_tracked", "Users with events not summarised yet", registry=r)
        self.in_flight = Gauge("recsys_summary_in_flight", "Summaries being written", registry=r)
        self.breaker_open = Gauge("recsys_summary_breaker_open", "1 while the LLM circuit breaker is open", registry=r)
        self.llm_seconds = Histogram(
            "recsys_summary_llm_seconds",
            "Latency of successful LLM calls",
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
            registry=r,
        )
        self.wait_seconds = Histogram(
            "recsys_summary_wait_seconds",
            "From becoming due to a worker starting the summary",
            buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300),
            registry=r,
        )
