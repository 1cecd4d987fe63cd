"""Prometheus metrics for ``GET /metrics``, through prometheus-client.

prometheus-client is the reference implementation of the text format and
its histograms; writing our own exposition would be code to maintain for no
gain. Each gateway gets its own ``CollectorRegistry`` so several gateways (in
tests, in one process) never share counters.

Counters kept by the device side (frames, CRC errors, ...) are read at scrape
time by a custom collector instead of being incremented per frame.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PIPELINE_SAMPLE = 64  # iot_frame_to_dashboard_seconds observes 1 message in this many


class _Snapshot(Collector):
    """Reads live counters (device links, storage) when Prometheus scrapes."""

    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self.read = read

    def collect(self) -> Iterable[Metric]:
        return self.read()


class Metrics:
    """Every metric of one gateway."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.devices_online = Gauge("iot_devices_online", "Devices online now", registry=r)
        self.dashboards = Gauge("iot_dashboards", "Dashboards connected now", registry=r)
        # Counted as a plain int and read at scrape time: a prometheus-client
        # Counter.inc() takes a lock, which is 1 us a message on the hot path.
        self.telemetry_in = 0
        self.add_snapshot(
            lambda: [
                counter(
                    "iot_telemetry_messages",
                    "Telemetry messages received from devices",
                    self.telemetry_in,
                )
            ]
        )
        self.telemetry_dropped = Counter(
            "iot_telemetry_dropped",
            "Telemetry messages dropped for dashboards that read too slowly",
            registry=r,
        )
        self.command_results = Counter(
            "iot_command_results", "Command statuses reported, by status", ["status"], registry=r
        )
        self.queued_command_results = Counter(
            "iot_queued_command_results",
            "Final results of commands that went through the offline queue, by status",
            ["status"],
            registry=r,
        )
        for status in ("acked", "nacked", "timeout", "expired"):
            self.queued_command_results.labels(status)  # each series exists from the start
        self.refused = Counter(
            "iot_refused", "Requests or connections refused by a limit", ["limit"], registry=r
        )
        self.slow_dashboards_closed = Counter(
            "iot_slow_dashboards_closed",
            "Dashboards closed because their socket did not drain for 30 s",
            registry=r,
        )
        self.storage_batch = Histogram(
            "iot_storage_batch_seconds",
            "Time to commit one storage batch",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.pipeline_latency = Histogram(
            "iot_frame_to_dashboard_seconds",
            "From a device frame decoded to its telemetry queued for dashboards "
            f"(1 message in {PIPELINE_SAMPLE})",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
            registry=r,
        )
        self.send_latency = Histogram(
            "iot_frame_to_dashboard_send_seconds",
            "From a device frame decoded to its telemetry written to a dashboard socket",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )

    def observe_pipeline(self, seconds: float) -> None:
        """Record the in-gateway latency of one telemetry message."""
        self.pipeline_latency.observe(max(seconds, 0.0))

    def count_telemetry(self) -> bool:
        """Count one routed telemetry message; True if its latency should be observed.

        The latency histogram takes one message in ``PIPELINE_SAMPLE``: a
        distribution needs no more, and observing each message cost as much
        as decoding its body.
        """
        self.telemetry_in += 1
        return not self.telemetry_in % PIPELINE_SAMPLE

    def add_snapshot(self, read: Callable[[], Iterable[Metric]]) -> None:
        """Register a function that yields metric families at scrape time."""
        self.registry.register(_Snapshot(read))

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


def counter(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> Metric:
    """A counter family with one sample (for snapshot collectors)."""
    fam = CounterMetricFamily(name, doc, labels=list(labels or {}))
    fam.add_metric(list((labels or {}).values()), value)
    return fam


def counters(name: str, doc: str, label: str, values: dict[str, float]) -> Metric:
    """A counter family with one sample per value of ``label``."""
    fam = CounterMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        fam.add_metric([key], value)
    return fam


def gauge(name: str, doc: str, value: float) -> Metric:
    """A gauge family with one sample (for snapshot collectors)."""
    return GaugeMetricFamily(name, doc, value=value)
