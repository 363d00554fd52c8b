"""The scheduler's counters and latency histograms, and their Prometheus rendering (the server's /metrics)."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any


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


def render_metrics(engine: Any, http_requests: dict[tuple[str, int], int]) -> str:
    """Prometheus text exposition of the engine's and the server's HTTP counters (``/metrics``)."""
    e, m = engine, engine.metrics
    lines = ["# HELP mtnlg_http_requests_total HTTP requests by endpoint and status code.",
             "# TYPE mtnlg_http_requests_total counter"]
    for (path, status), count in sorted(http_requests.items()):
        lines.append(f'mtnlg_http_requests_total{{endpoint="{path}",status="{status}"}} {count}')
    lines += ["# HELP mtnlg_request_success_total Finished generation requests by finish reason.",
              "# TYPE mtnlg_request_success_total counter"]
    for reason in ("stop", "length", "abort"):
        lines.append(f'mtnlg_request_success_total{{finish_reason="{reason}"}} {m.requests_finished.get(reason, 0)}')
    lines += ["# HELP mtnlg_prompt_tokens_total Prompt tokens prefilled.", "# TYPE mtnlg_prompt_tokens_total counter",
              f"mtnlg_prompt_tokens_total {m.prompt_tokens}",
              "# HELP mtnlg_generation_tokens_total Tokens generated.",
              "# TYPE mtnlg_generation_tokens_total counter", f"mtnlg_generation_tokens_total {m.generation_tokens}",
              "# HELP mtnlg_num_requests_waiting Requests waiting for a KV-cache slot (queue depth).",
              "# TYPE mtnlg_num_requests_waiting gauge", f"mtnlg_num_requests_waiting {e.queue_depth}",
              "# HELP mtnlg_num_requests_running Requests in the running batch.",
              "# TYPE mtnlg_num_requests_running gauge", f"mtnlg_num_requests_running {e.num_running}",
              "# HELP mtnlg_kv_cache_slots KV-cache slots (the running-batch limit).",
              "# TYPE mtnlg_kv_cache_slots gauge", f"mtnlg_kv_cache_slots {e.num_slots}"]
    lines += m.render_extra()  # prefix-cache hit rate, request errors
    lines += m.ttft.render("mtnlg_time_to_first_token_seconds", "Time from arrival to the first token.")
    lines += m.itl.render("mtnlg_inter_token_latency_seconds", "Time between consecutive tokens of a request.")
    return "\n".join(lines) + "\n"
