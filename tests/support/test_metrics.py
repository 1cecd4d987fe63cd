"""The ``/metrics`` reader, on text written by prometheus-client as the gateway writes it."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tests.support.metrics import parse_metrics


def exposition() -> str:
    registry = CollectorRegistry()
    Gauge("iot_dashboards", "Dashboards", registry=registry).set(3)
    refused = Counter("iot_refused", "Refusals", ["limit"], registry=registry)
    refused.labels("max_dashboards").inc(21)
    refused.labels('odd "one"\\').inc()
    Counter("iot_frames_in", "Frames", registry=registry).inc(7)
    Histogram("iot_batch_seconds", "Batches", buckets=(0.1, 1.0), registry=registry).observe(0.5)
    return generate_latest(registry).decode()


def test_samples_by_name_and_labels() -> None:
    m = parse_metrics(exposition())
    assert m.value("iot_dashboards") == 3.0
    assert m.value("iot_refused_total", limit="max_dashboards") == 21.0
    assert m.value("iot_refused_total", limit='odd "one"\\') == 1.0
    assert m.value("iot_frames_in_total") == 7.0
    assert m.value("iot_batch_seconds_bucket", le="0.1") == 0.0
    assert m.value("iot_batch_seconds_bucket", le="1.0") == 1.0
    assert m.value("iot_batch_seconds_bucket", le="+Inf") == 1.0
    assert m.value("iot_batch_seconds_count") == 1.0
    assert m[("iot_refused_total", frozenset({("limit", "max_dashboards")}))] == 21.0


def test_a_missing_sample_names_what_there_is() -> None:
    m = parse_metrics(exposition())
    with pytest.raises(KeyError, match=r'iot_refused_total\{limit="origin"\}.*max_dashboards'):
        m.value("iot_refused_total", limit="origin")
    with pytest.raises(KeyError, match="iot_nothing"):
        m.value("iot_nothing")


def test_flat_keys_are_spelt_as_in_the_exposition() -> None:
    text = exposition()
    flat = parse_metrics(text).flat()
    assert flat["iot_dashboards"] == 3.0
    assert flat['iot_refused_total{limit="max_dashboards"}'] == 21.0
    assert flat['iot_batch_seconds_bucket{le="+Inf"}'] == 1.0
    # Every sample line of the text, under the name it has there.
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            assert flat[name] == float(value), name
