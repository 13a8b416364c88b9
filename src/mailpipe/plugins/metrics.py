"""Per plugin and hook counters in /metrics, read from the executor's plain counters at
scrape time (a plugin call itself touches no Prometheus object)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from mailpipe.plugins.manager import PluginManager

COUNTERS = ("executions", "successes", "failures", "timeouts", "recoveries")


class PluginCollector:
    def __init__(self, manager: PluginManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        labels = ["plugin", "hook"]
        counters = {
            name: CounterMetricFamily(f"mailpipe_plugin_{name}",
                                      f"Plugin hook calls: {name}", labels=labels)
            for name in COUNTERS
        }
        seconds = CounterMetricFamily("mailpipe_plugin_call_seconds",
                                      "Time spent in plugin hook calls", labels=labels)
        p99 = GaugeMetricFamily("mailpipe_plugin_call_p99_seconds",
                                "p99 of the last 1024 calls of each plugin hook", labels=labels)
        enabled = GaugeMetricFamily("mailpipe_plugin_enabled",
                                    "1 while the plugin's circuit breaker is closed",
                                    labels=["plugin", "kind"])
        for entry in list(self.manager.entries):
            enabled.add_metric([entry.name, entry.plugin.kind], 0 if entry.open else 1)
            for hook, stats in list(entry.stats.items()):
                key = [entry.name, hook]
                for name in COUNTERS:
                    counters[name].add_metric(key, getattr(stats, name))
                seconds.add_metric(key, stats.seconds)
                p99.add_metric(key, stats.as_dict()["p99_ms"] / 1000)
        yield from counters.values()
        yield seconds
        yield p99
        yield enabled
