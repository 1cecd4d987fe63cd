"""``GET /metrics`` read back as numbers, for the tests' assertions and the benchmarks' figures.

The gateway writes its Prometheus text with prometheus-client (docs/api.md
§4, ``GET /metrics``); reading it with the same library's parser keeps
escaping, ``+Inf``, ``NaN`` and the ``_total``/``_created`` samples right
without a parser of our own.
"""

from __future__ import annotations

from typing import TypeAlias

from prometheus_client.parser import text_string_to_metric_families

# A sample's name (``iot_refused_total``, ``..._bucket``) and its labels.
MetricKey: TypeAlias = tuple[str, frozenset[tuple[str, str]]]


class Metrics(dict[MetricKey, float]):
    """Every sample of one scrape: ``{(name, frozenset(labels.items())): value}``."""

    def value(self, name: str, /, **labels: str) -> float:
        """The sample ``name`` with exactly these labels (KeyError naming its neighbours)."""
        key = (name, frozenset(labels.items()))
        try:
            return self[key]
        except KeyError:
            near = sorted(render(k) for k in self if k[0] == name)
            raise KeyError(
                f"{render(key)} is not in /metrics" + (f" (it has {near})" if near else "")
            ) from None

    def flat(self) -> dict[str, float]:
        """``{"name{label=\\"value\\"}": value}``, as the exposition spells each sample."""
        return {render(key): value for key, value in self.items()}


def parse_metrics(text: str) -> Metrics:
    """Parse Prometheus text exposition into ``Metrics``."""
    out = Metrics()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
    return out


def render(key: MetricKey) -> str:
    """One key in the exposition's spelling, labels sorted (``le`` last, as histograms put it)."""
    name, labels = key
    if not labels:
        return name
    ordered = sorted(labels, key=lambda kv: (kv[0] == "le", kv[0]))
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in ordered)
    return f"{name}{{{inner}}}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
