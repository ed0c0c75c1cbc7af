"""Prometheus text-format metrics for the server, named like vLLM's (`vllm:` -> `ernie45:`).

Gauges and token counters come from the engine's `stats()` (refreshed by the engine thread after every
step); latency histograms are observed by the engine thread as outputs leave `step()`. No
prometheus_client dependency: the exposition format is a few lines of text.
"""

from __future__ import annotations

import bisect
import threading

# Bucket edges (seconds) copied from vLLM's metrics so dashboards built for vLLM read ours.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: le buckets, +Inf, _sum, _count)."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # last slot: above every edge (+Inf only)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, labels: str) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for edge, c in zip(self.buckets, self.counts):
            running += c
            out.append(f'{self.name}_bucket{{{labels},le="{edge}"}} {running}')
        out.append(f'{self.name}_bucket{{{labels},le="+Inf"}} {self.count}')
        out.append(f"{self.name}_sum{{{labels}}} {self.sum}")
        out.append(f"{self.name}_count{{{labels}}} {self.count}")
        return out


class ServerMetrics:
    """All server metrics; thread-safe (observed in the engine thread, rendered in the HTTP loop)."""

    def __init__(self, model_name: str):
        self.labels = f'model_name="{_escape(model_name)}"'
        self._lock = threading.Lock()
        self.ttft = Histogram("ernie45:time_to_first_token_seconds", "Time to first token, seconds.", TTFT_BUCKETS)
        self.itl = Histogram("ernie45:inter_token_latency_seconds", "Time between two output steps of a "
                             "request, seconds.", ITL_BUCKETS)
        self.e2e = Histogram("ernie45:e2e_request_latency_seconds", "Request latency from arrival to its last "
                             "token, seconds.", E2E_BUCKETS)
        self.finished: dict[str, int] = {}  # finish reason -> count
        self.rejected: dict[str, int] = {}  # HTTP status -> count of refused requests

    def observe_ttft(self, s: float) -> None:
        with self._lock:
            self.ttft.observe(s)

    def observe_itl(self, s: float) -> None:
        with self._lock:
            self.itl.observe(s)

    def observe_finished(self, reason: str, e2e_s: float) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.e2e.observe(e2e_s)

    def observe_rejected(self, status: int) -> None:
        with self._lock:
            self.rejected[str(status)] = self.rejected.get(str(status), 0) + 1

    def render(self, stats: dict) -> str:
        """The whole exposition text; `stats` is the engine's last `stats()` dict."""
        lb = self.labels
        used, total = stats.get("kv_blocks_used", 0), stats.get("kv_blocks_total", 0)
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, value: float) -> None:
            lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name}{{{lb}}} {value}"])

        metric("ernie45:num_requests_running", "gauge", "Requests in the running batch.",
               stats.get("num_running", 0))
        metric("ernie45:num_requests_waiting", "gauge", "Requests waiting to be scheduled.",
               stats.get("num_waiting", 0))
        metric("ernie45:kv_cache_blocks_used", "gauge", "Paged KV-cache blocks in use.", used)
        metric("ernie45:kv_cache_blocks_total", "gauge", "Paged KV-cache blocks in the pool.", total)
        metric("ernie45:kv_cache_usage_perc", "gauge", "KV-cache usage, 1 = full.", used / total if total else 0.0)
        metric("ernie45:prompt_tokens_total", "counter", "Prompt tokens processed.",
               stats.get("prompt_tokens_total", 0))
        metric("ernie45:generation_tokens_total", "counter", "Tokens generated.",
               stats.get("generation_tokens_total", 0))
        metric("ernie45:prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
               stats.get("prefix_cache_hit_tokens", 0))
        metric("ernie45:num_preemptions_total", "counter", "Requests preempted for KV space.",
               stats.get("num_preemptions", 0))
        metric("ernie45:spec_decode_num_draft_tokens_total", "counter", "Speculative draft tokens verified.",
               stats.get("spec_draft_tokens", 0))
        metric("ernie45:spec_decode_num_accepted_tokens_total", "counter", "Speculative draft tokens accepted.",
               stats.get("spec_accepted_tokens", 0))
        metric("ernie45:spec_decode_num_verifications_total", "counter",
               "Verification steps (one sequence, one step); accepted / verifications + 1 = mean accepted length.",
               stats.get("spec_verify_steps", 0))
        if "spec_drafting" in stats:  # speculative_adaptive: which mode runs, and the steps of each
            metric("ernie45:spec_decode_drafting", "gauge",
                   "1 while the adaptive engine drafts, 0 while it decodes plainly.", int(stats["spec_drafting"]))
            metric("ernie45:spec_decode_drafting_steps_total", "counter", "Engine steps run drafting (adaptive).",
                   stats["spec_steps_drafting"])
            metric("ernie45:spec_decode_plain_steps_total", "counter", "Engine steps run without drafts (adaptive).",
                   stats["spec_steps_plain"])
        if "backend" in stats:  # which kernels run the model (ernie45.accel): an info metric, the name as a label
            lines += ["# HELP ernie45:backend_info The acceleration backend the engine runs.",
                      "# TYPE ernie45:backend_info gauge",
                      f'ernie45:backend_info{{{lb},backend="{_escape(stats["backend"])}"}} 1']
        with self._lock:
            lines += ["# HELP ernie45:request_success_total Finished requests by finish reason.",
                      "# TYPE ernie45:request_success_total counter"]
            for reason, c in sorted(self.finished.items()):
                lines.append(f'ernie45:request_success_total{{{lb},finished_reason="{_escape(reason)}"}} {c}')
            lines += ["# HELP ernie45:request_rejected_total Requests refused before admission, by status.",
                      "# TYPE ernie45:request_rejected_total counter"]
            for status, c in sorted(self.rejected.items()):
                lines.append(f'ernie45:request_rejected_total{{{lb},status="{status}"}} {c}')
            for h in (self.ttft, self.itl, self.e2e):
                lines += h.render(lb)
        return "\n".join(lines) + "\n"


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name (labels dropped, buckets keep `le`) -> value; for tests and the benchmark."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, value = line.rsplit(" ", 1)
        name = name_labels.split("{", 1)[0]
        if 'le="' in name_labels:
            name += "[" + name_labels.split('le="', 1)[1].split('"', 1)[0] + "]"
        elif "finished_reason=" in name_labels or "status=" in name_labels:
            name += "[" + name_labels.rsplit('="', 1)[1].split('"', 1)[0] + "]"
        out[name] = float(value)
    return out
