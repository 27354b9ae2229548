"""Prometheus metrics for the server (one registry per server, so several can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# Outcome labels of longcat_requests_total (Generate calls). Only "error" is a server fault (alert on it):
#   ok           finished (length, stop, eos)
#   cancelled    the client cancelled the call or went away, or stopped the request with Abort
#   deadline     the call's deadline (gRPC deadline or timeout_ms) passed
#   invalid      INVALID_ARGUMENT or ALREADY_EXISTS: a bad request, including a body that is not protobuf
#   rejected     not admitted: overloaded (RESOURCE_EXHAUSTED) or the server is loading or draining (UNAVAILABLE)
#   slow_reader  the client stopped reading the stream for --slow-reader-timeout-s (UNAVAILABLE)
#   shutdown     still running when the drain grace (--drain-grace-s) ended (UNAVAILABLE)
#   error        the engine failed or is unhealthy (INTERNAL / UNAVAILABLE)
OUTCOMES = ("ok", "cancelled", "deadline", "invalid", "rejected", "slow_reader", "shutdown", "error")


class ServerMetrics:
    def __init__(self, engine, admission):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("longcat_requests", "Generate calls by outcome", ["outcome"], registry=r)
        self.time_to_first_token = Histogram(
            "longcat_time_to_first_token_seconds", "Call start to first streamed token", buckets=_LATENCY_BUCKETS,
            registry=r)
        self.time_per_output_token = Histogram(
            "longcat_time_per_output_token_seconds", "Mean time per output token after the first, per request",
            buckets=_TPOT_BUCKETS, registry=r)
        self.output_tokens = Counter("longcat_output_tokens", "Output tokens streamed (rate() = tokens/s)", registry=r)
        self.prompt_tokens = Counter("longcat_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.spec_draft_tokens = Counter("longcat_spec_draft_tokens", "MTP draft tokens verified", registry=r)
        self.spec_accepted_tokens = Counter("longcat_spec_accepted_tokens", "MTP draft tokens accepted "
                                            "(rate ratio to longcat_spec_draft_tokens = acceptance)", registry=r)
        self.spec_acceptance_rate = Histogram(
            "longcat_spec_acceptance_rate", "Per request: accepted / verified MTP draft tokens",
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0), registry=r)
        self.spec_mean_accepted_length = Histogram(
            "longcat_spec_mean_accepted_length", "Per request: tokens emitted per speculative step",
            buckets=(1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0), registry=r)
        Gauge("longcat_queued_requests", "Admitted requests waiting for their first token",
              registry=r).set_function(lambda: admission.queued_requests)
        Gauge("longcat_queued_prompt_tokens", "Prompt tokens of queued requests",
              registry=r).set_function(lambda: admission.queued_tokens)
        Gauge("longcat_engine_waiting_requests", "Requests in the engine's waiting queue",
              registry=r).set_function(lambda: engine.load().num_waiting)
        Gauge("longcat_running_requests", "Requests the engine is running",
              registry=r).set_function(lambda: engine.load().num_running)
        Gauge("longcat_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use",
              registry=r).set_function(lambda: engine.load().kv_cache_usage)
        r.register(_ExpertLoadCollector(engine))
        r.register(_EpOverflowCollector(engine))
        for outcome in OUTCOMES:  # export zeros so that rate() works from the first scrape
            self.requests.labels(outcome)
        self._http = None

    def record_speculation(self, m) -> None:
        """A finished request's speculative-decoding totals (outputs.RequestMetrics); nothing without drafts."""
        if not m.num_draft_tokens:
            return
        self.spec_draft_tokens.inc(m.num_draft_tokens)
        self.spec_accepted_tokens.inc(m.num_accepted_tokens)
        self.spec_acceptance_rate.observe(m.spec_acceptance_rate)
        self.spec_mean_accepted_length.observe(m.spec_mean_accepted_length)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the /metrics HTTP endpoint; returns the bound port (useful with port 0)."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _ExpertLoadCollector:
    """longcat_expert_routed_tokens_total{expert}: routed slots per expert summed over the MoE layers, when the
    engine collects them (--collect-expert-load); the input of `python -m longcat_service.distributed.eplb`."""

    def __init__(self, engine):
        self.engine = engine

    def describe(self):
        return []

    def collect(self):
        counts = getattr(self.engine.load(), "expert_tokens", None)
        if not counts:
            return
        family = CounterMetricFamily("longcat_expert_routed_tokens", "Slots routed to each expert (all MoE layers)",
                                     labels=["expert"])
        for expert, count in enumerate(counts):
            family.add_metric([str(expert)], count)
        yield family


class _EpOverflowCollector:
    """longcat_ep_capacity_overflow_total: under expert parallelism, CUDA-graph decode steps whose fixed-capacity
    all-to-all overflowed and that ran again eagerly (distributed/ep_static_dispatch.py); absent without EP."""

    def __init__(self, engine):
        self.engine = engine

    def describe(self):
        return []

    def collect(self):
        count = getattr(self.engine.load(), "ep_capacity_overflows", None)
        if count is None:
            return
        family = CounterMetricFamily("longcat_ep_capacity_overflow", "EP decode steps re-run eagerly because a "
                                     "fixed-capacity all-to-all buffer overflowed")
        family.add_metric([], count)
        yield family
