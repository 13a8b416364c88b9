"""Prometheus metrics of one mailpipe process, kept in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """Every metric mailpipe exports; one instance per process (tests make their own)."""

    def watch_plugins(self, manager: object) -> None:
        """Export the plugins' counters (read at scrape time) from now on."""
        from mailpipe.plugins.metrics import PluginCollector

        if not getattr(self, "_plugins_watched", False):
            self.registry.register(PluginCollector(manager))  # type: ignore[arg-type]
            self._plugins_watched = True

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.emails_accepted = Counter(
            "mailpipe_emails_accepted", "Emails answered 250", ["server"], registry=r
        )
        self.emails_rejected = Counter(
            "mailpipe_emails_rejected",
            "Emails answered with an error (size, sink failure, shutdown)",
            ["server", "reason"],
            registry=r,
        )
        self.bytes_received = Counter(
            "mailpipe_bytes_received", "Message bytes received", ["server"], registry=r
        )
        self.connections_active = Gauge(
            "mailpipe_connections_active", "Open SMTP connections", ["server"], registry=r
        )
        self.connections_total = Counter(
            "mailpipe_connections", "SMTP connections accepted", ["server"], registry=r
        )
        self.connections_refused = Counter(
            "mailpipe_connections_refused",
            "SMTP connections refused with 421 (reason: max_connections, max_connections_per_ip)",
            ["server", "reason"],
            registry=r,
        )
        self.connections_timed_out = Counter(
            "mailpipe_connections_timed_out",
            "SMTP connections closed with 421 for a slow client (reason: read_timeout for an idle"
            " client or a command line not done in time, data_rate for a body too slow)",
            ["server", "reason"],
            registry=r,
        )
        self.protocol_violations = Counter(
            "mailpipe_protocol_violations", "Tolerated protocol violations", ["server"], registry=r
        )
        self.sink_latency = Histogram(
            "mailpipe_sink_latency_seconds",
            "Time a sink took to accept an event",
            ["sink"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sink_failures = Counter(
            "mailpipe_sink_failures", "Events a sink failed to accept", ["sink"], registry=r
        )
        self.sink_results = Counter(
            "mailpipe_sink_results",
            "Sink answers other than accepted (counted by mailpipe_sink_latency_seconds_count):"
            " tempfail, reject, ignored (a failure its policy let pass)",
            ["sink", "result"],
            registry=r,
        )
        self.parse_latency = Histogram(
            "mailpipe_parse_latency_seconds",
            "Time to turn a received message into an event",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.workers = Gauge("mailpipe_workers", "Worker processes in the pool", registry=r)
        self.worker_exec = Histogram(
            "mailpipe_worker_exec_seconds",
            "Time a worker took to answer one email",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.worker_wait = Histogram(
            "mailpipe_worker_wait_seconds",
            "Time a session waited for a free worker (only when none was free)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.worker_restarts = Counter(
            "mailpipe_worker_restarts", "Workers replaced (died, recycled, supervised)", registry=r
        )
        self.worker_execs = Gauge(
            "mailpipe_worker_execs", "Emails handled by each live worker", ["pid"], registry=r
        )
        self.worker_errors = Counter(
            "mailpipe_worker_errors", "Error frames answered by workers", registry=r
        )
        self.worker_poison = Counter(
            "mailpipe_worker_poison_emails",
            "Emails given up (451) after every worker tried asked to stop on them",
            registry=r,
        )
        p = ["pipeline"]
        self.jobs_pushed = Counter("mailpipe_jobs_pushed", "Jobs handed to the pusher", p,
                                   registry=r)
        self.jobs_confirmed = Counter("mailpipe_jobs_confirmed", "Jobs the broker confirmed",
                                      p, registry=r)
        self.jobs_push_failed = Counter("mailpipe_jobs_push_failed", "Jobs whose push failed",
                                        p, registry=r)
        self.jobs_batch_size = Histogram(
            "mailpipe_jobs_batch_size", "Jobs per pushed batch", p,
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000), registry=r,
        )
        self.jobs_push_latency = Histogram(
            "mailpipe_jobs_push_latency_seconds", "Time from a batch's push to its confirmation",
            p, buckets=LATENCY_BUCKETS, registry=r,
        )
        self.jobs_consumed = Counter("mailpipe_jobs_consumed", "Jobs delivered to consumers",
                                     p, registry=r)
        self.jobs_acked = Counter("mailpipe_jobs_acked", "Jobs acked", p, registry=r)
        self.jobs_nacked = Counter("mailpipe_jobs_nacked", "Jobs nacked and requeued", p,
                                   registry=r)
        self.jobs_dead = Counter("mailpipe_jobs_dead_lettered", "Jobs dead-lettered", p,
                                 registry=r)
        self.jobs_depth = Gauge("mailpipe_jobs_queue_depth", "Jobs waiting in the pipeline", p,
                                registry=r)
        self.store_messages = Gauge(
            "mailpipe_store_messages", "Messages held in the store", registry=r
        )
