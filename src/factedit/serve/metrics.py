"""The service's Prometheus metrics, on a registry of its own (two apps in one process, as in
the tests, do not share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServeMetrics:
    """Counters and gauges the engine and the HTTP layer update; `registry` is exported."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.edits = Counter("factedit_edits", "Edits committed (ledger rows written).",
                             registry=r)
        self.edit_failures = Counter("factedit_edit_failures",
                                     "Edit or removal jobs that failed and were rolled back.",
                                     registry=r)
        self.removals = Counter("factedit_removals", "Edits removed (rolled back).", registry=r)
        self.rejected = Counter("factedit_rejected", "Requests refused before any work.",
                                ["reason"], registry=r)
        self.live_edits = Gauge("factedit_live_edits", "Edits live in the served model.",
                                registry=r)
        self.generation = Gauge("factedit_state_generation",
                                "Generation of the committed editing state.", registry=r)
        self.edit_queue_depth = Gauge("factedit_edit_queue_depth",
                                      "Edit and removal jobs waiting for the editor worker.",
                                      registry=r)
        self.generation_pending = Gauge("factedit_generation_pending",
                                        "Generation requests admitted and not finished.",
                                        registry=r)
        self.request_seconds = Histogram("factedit_request_seconds",
                                         "HTTP request latency by route and status code.",
                                         ["route", "code"], buckets=LATENCY_BUCKETS, registry=r)
        self.edit_seconds = Histogram("factedit_edit_job_seconds",
                                      "Edit job time from enqueue to ledger commit.",
                                      buckets=LATENCY_BUCKETS, registry=r)
