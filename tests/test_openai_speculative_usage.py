"""The HTTP API's usage.speculative block (issue 18: MTP acceptance in usage): summed over a response's requests,
absent when no speculative step ran."""

from __future__ import annotations

from longcat_service.outputs import RequestMetrics, RequestOutput
from longcat_service.server.openai_api.protocol import speculative_usage


def _out(steps: int, drafts: int, accepted: int) -> RequestOutput:
    return RequestOutput("r", [1, 2], [], metrics=RequestMetrics(num_spec_steps=steps, num_draft_tokens=drafts,
                                                                 num_accepted_tokens=accepted))


def test_speculative_usage_sums_requests_and_derives_rates():
    usage = speculative_usage([_out(10, 30, 21), _out(5, 15, 3)])
    assert (usage.draft_tokens, usage.accepted_draft_tokens) == (45, 24)
    assert usage.acceptance_rate == 24 / 45
    assert usage.mean_accepted_length == (24 + 15) / 15  # accepted drafts + one target token per step


def test_no_speculative_steps_no_block():
    assert speculative_usage([_out(0, 0, 0)]) is None
    assert speculative_usage([]) is None
