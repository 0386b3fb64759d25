"""The inference server's GET /metrics: counters and histograms in Prometheus' text format.

Written by hand (a few lines; prometheus_client would be one more dependency). llmcycle.serve.app counts
every response through `Metrics.middleware`, every answered request through `Metrics.finished`, and
reads the batching engines' own counters when rendering.
"""
from __future__ import annotations

import time


def _labels(**kw) -> str:
    esc = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in kw.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"


class _Histogram:
    def __init__(self, buckets: tuple):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float, times: int = 1) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += times
        self.sum += value * times
        self.count += times

    def lines(self, name: str, labels: dict) -> list[str]:
        out = [f"{name}_bucket{_labels(**labels, le=f'{b:g}')} {c}" for b, c in zip(self.buckets, self.counts)]
        return out + [f"{name}_bucket{_labels(**labels, le='+Inf')} {self.count}",
                      f"{name}_sum{_labels(**labels)} {self.sum:.6f}", f"{name}_count{_labels(**labels)} {self.count}"]


class Metrics:
    """Counters and histograms for GET /metrics, written in Prometheus' text format by hand (a few
    lines; prometheus_client would be one more dependency)."""

    SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
    ROWS = (1, 2, 4, 8, 16, 32, 64, 128)
    ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

    def __init__(self):
        import threading
        from collections import Counter

        self.lock = threading.Lock()
        self.requests: Counter = Counter()  # (endpoint, status) -> responses
        self.tokens: Counter = Counter()  # (model, "prompt" | "completion") -> tokens of answered requests
        self.latency: dict[tuple, _Histogram] = {}  # (endpoint, model) -> seconds to the last token
        self.first_token: dict[tuple, _Histogram] = {}

    def middleware(self, app):
        """ASGI middleware counting every response by endpoint and status (499: the client left first)."""
        async def count(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            status = [499]

            async def watch(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await app(scope, receive, watch)
            except Exception:
                status[0] = 500
                raise
            finally:
                path = scope["path"]
                path = path if path in self.ENDPOINTS else "/v1/models" if path.startswith("/v1/models/") else "other"
                with self.lock:
                    self.requests[(path, status[0])] += 1
        return count

    def finished(self, endpoint: str, model: str, job) -> None:
        usage, key = job.usage(), (endpoint, model)
        with self.lock:
            self.tokens[(model, "prompt")] += usage["prompt_tokens"]
            self.tokens[(model, "completion")] += usage["completion_tokens"]
            self.latency.setdefault(key, _Histogram(self.SECONDS)).observe(time.perf_counter() - job.start)
            if job.first_token is not None:
                self.first_token.setdefault(key, _Histogram(self.SECONDS)).observe(job.first_token)

    def render(self, served: dict) -> str:
        out: list[str] = []

        def head(name, kind, text):
            out.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}"])

        with self.lock:
            head("llmcycle_requests_total", "counter", "HTTP responses, by endpoint and status.")
            for (path, status), n in sorted(self.requests.items()):
                out.append(f"llmcycle_requests_total{_labels(endpoint=path, status=status)} {n}")
            head("llmcycle_tokens_total", "counter", "Tokens of answered requests: prompt and completion.")
            for (model, kind), n in sorted(self.tokens.items()):
                out.append(f"llmcycle_tokens_total{_labels(model=model, kind=kind)} {n}")
            for name, data, text in (
                    ("llmcycle_request_duration_seconds", self.latency, "Request latency, to the last token."),
                    ("llmcycle_time_to_first_token_seconds", self.first_token, "Time to the first text.")):
                head(name, "histogram", text)
                for (endpoint, model), hist in sorted(data.items()):
                    out.extend(hist.lines(name, {"endpoint": endpoint, "model": model}))
        engines = [(name, s.engine) for name, s in served.items()]
        for name, kind, text, value in (
                ("llmcycle_generated_tokens_total", "counter", "Tokens generated by the engine (those of "
                 "cancelled requests included).", lambda e: e.tokens_generated),
                ("llmcycle_cancelled_sequences_total", "counter", "Sequences dropped because their client left.",
                 lambda e: e.cancelled),
                ("llmcycle_queue_depth", "gauge", "Sequences waiting for a batch slot.", lambda e: e.waiting),
                ("llmcycle_running_sequences", "gauge", "Sequences in the running batch.", lambda e: e.running)):
            head(name, kind, text)
            out.extend(f"{name}{_labels(model=m)} {value(e)}" for m, e in engines)
        head("llmcycle_batch_size", "histogram", "Rows per decode forward pass.")
        for m, e in engines:
            hist = _Histogram(self.ROWS)
            for size, steps in sorted(dict(e.batch_sizes).items()):
                hist.observe(size, steps)
            out.extend(hist.lines("llmcycle_batch_size", {"model": m}))
        return "\n".join(out) + "\n"
