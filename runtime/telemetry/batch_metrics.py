"""Prometheus families of the Batch API (`llm_batch_*`): lines queued, waiting, running and
answered, and batches finished. Lines are counted where they happen (the process that queued,
ran or answered them), so the sums over workers and replicas are the batch totals."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

LINE_STATES = ("queued", "succeeded", "failed")
FINAL_STATUSES = ("completed", "failed", "expired", "cancelled")


class BatchMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.lines = Counter(
            "llm_batch_lines_total",
            "Batch lines queued, and answered (state=succeeded: 2xx, failed: any other).",
            ("state",),
            registry=registry,
        )
        self.running = Gauge(
            "llm_batch_lines_running",
            "Batch lines running on a model now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.waiting = Gauge(
            "llm_batch_lines_waiting",
            "Batch lines on the queue that no worker has taken yet (the queue's own count).",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.batches = Counter(
            "llm_batches_total",
            "Batches finished, by their final status.",
            ("status",),
            registry=registry,
        )
        for state in LINE_STATES:  # 0 from the start: no batch yet is not no data
            self.lines.labels(state)
        for status in FINAL_STATUSES:
            self.batches.labels(status)

    def queued(self, lines: int) -> None:
        self.lines.labels("queued").inc(lines)

    def line_running(self, delta: int) -> None:
        self.running.inc(delta)

    def line_answered(self, ok: bool) -> None:
        self.lines.labels("succeeded" if ok else "failed").inc()

    def finished(self, status: str) -> None:
        self.batches.labels(status).inc()
