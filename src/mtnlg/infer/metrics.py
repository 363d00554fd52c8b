"""The scheduler's counters and latency histograms (rendered by the server at /metrics)."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field


class Histogram:
    """A Prometheus-style cumulative histogram (thread-safe enough: appends under the GIL)."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, help_: str) -> list[str]:
        lines = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        total = 0
        for b, c in zip(self.buckets, self.counts):
            total += c
            lines.append(f'{name}_bucket{{le="{b}"}} {total}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines += [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return lines


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class EngineMetrics:
    """Requests, tokens, TTFT / inter-token latency, failures and the prefix cache."""

    requests_finished: dict[str, int] = field(default_factory=dict)  # finish_reason -> count
    prompt_tokens: int = 0
    generation_tokens: int = 0
    request_errors: int = 0  # requests failed by an exception (finish_reason "abort"); the engine goes on
    prefix_cache_queries: int = 0  # prompt tokens admitted
    prefix_cache_hits: int = 0  # of those, tokens whose keys and values were reused from an earlier request
    ttft: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def render_extra(self) -> list[str]:
        """Prometheus lines for the prefix cache and request errors (the server appends them to /metrics)."""
        return ["# HELP mtnlg_prefix_cache_hit_rate Fraction of admitted prompt tokens served from the prefix cache.",
                "# TYPE mtnlg_prefix_cache_hit_rate gauge", f"mtnlg_prefix_cache_hit_rate {self.prefix_cache_hit_rate}",
                "# HELP mtnlg_prefix_cache_hit_tokens_total Prompt tokens whose KV was reused.",
                "# TYPE mtnlg_prefix_cache_hit_tokens_total counter",
                f"mtnlg_prefix_cache_hit_tokens_total {self.prefix_cache_hits}",
                "# HELP mtnlg_prefix_cache_query_tokens_total Prompt tokens looked up in the prefix cache.",
                "# TYPE mtnlg_prefix_cache_query_tokens_total counter",
                f"mtnlg_prefix_cache_query_tokens_total {self.prefix_cache_queries}",
                "# HELP mtnlg_request_errors_total Requests failed by an error (the others went on).",
                "# TYPE mtnlg_request_errors_total counter", f"mtnlg_request_errors_total {self.request_errors}"]
