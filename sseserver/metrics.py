"""Metrics: counters and histograms, and a pure renderer of the Prometheus text exposition format 0.0.4.

Owns: the HTTP status counter, the Histogram type, and render() (families -> text). Counters that other parts
already keep (published events in the bouncer, deliveries and drops in each writer) are read from them when
rendering, never kept twice.
Must not know: sockets, HTTP routing.
"""

import bisect
import math
import threading

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Publish-to-write latency buckets, in seconds: from sub-millisecond fan-out to a struggling 10 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Cumulative-on-render histogram with fixed bucket bounds. Not thread-safe: its owner serialises observe()
    (delivery.FirstWrites holds a lock) and hands out merged() copies to read."""

    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds=LATENCY_BUCKETS):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    @staticmethod
    def merged(histograms: list["Histogram"], bounds=LATENCY_BUCKETS) -> "Histogram":
        result = Histogram(bounds)
        for histogram in histograms:
            result.counts = [a + b for a, b in zip(result.counts, histogram.counts)]
            result.total += histogram.total
            result.count += histogram.count
        return result


class StatusCounter:
    """HTTP responses by status code, counted from many request threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[int, int] = {}

    def add(self, status: int) -> None:
        with self._lock:
            self._counts[status] = self._counts.get(status, 0) + 1

    def snapshot(self) -> dict[int, int]:
        with self._lock:
            return dict(self._counts)


class Family:
    """One metric family: a name, its type and help, and samples (labels, value) or a histogram."""

    __slots__ = ("name", "kind", "help", "samples", "histogram")

    def __init__(self, name: str, kind: str, help_text: str, samples=(), histogram: Histogram | None = None):
        self.name, self.kind, self.help = name, kind, help_text
        self.samples = list(samples)
        self.histogram = histogram


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape_label(str(value))}"' for key, value in labels.items()) + "}"


def render(families: list[Family]) -> str:
    """The text exposition format 0.0.4: HELP and TYPE once per family, then its samples."""
    lines = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        if family.histogram is not None:
            histogram, cumulative = family.histogram, 0
            for bound, count in zip(list(histogram.bounds) + [math.inf], histogram.counts):
                cumulative += count
                lines.append(f'{family.name}_bucket{{le="{_number(float(bound))}"}} {cumulative}')
            lines.append(f"{family.name}_sum {_number(float(histogram.total))}")
            lines.append(f"{family.name}_count {histogram.count}")
        for labels, value in family.samples:
            lines.append(f"{family.name}{_labels(labels)} {_number(value)}")
    return "\n".join(lines) + "\n"
