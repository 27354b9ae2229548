"""Streamed text with stop strings never shows text that the final output withdraws: at every point the deltas
so far are a prefix of the final text, and all of them together equal it. The stop strings are chosen to straddle a
token boundary whose first character the detokenizer has already released, so only the output processor's
holdback keeps it back (a stop string starting with a held-back character would pass without any holdback)."""

from __future__ import annotations

import pytest

from longcat_service.client import LongCatClient
from longcat_service.engine.async_engine import AsyncEngine
from longcat_service.engine.engine_args import EngineArgs
from longcat_service.server.app import ServerConfig
from longcat_service.server.background import BackgroundServer
from tests.engine_utils import PROMPTS, greedy, make_engine, run_to_completion


def boundary_stops(chunks: list[str], full: str) -> list[tuple[str, int]]:
    """(stop, cut) pairs: two characters around the end of a streamed chunk, first occurring exactly there, so the
    first character had been streamed (not held back) when the stream had no stop string."""
    stops, seen = [], 0
    for chunk in chunks[:-1]:
        seen += len(chunk)
        if chunk and seen < len(full):
            stop = full[seen - 1 : seen + 1]
            clean = "\ufffd" not in stop  # U+FFFD stands for bytes of a character that may still be completed
            if clean and full.find(stop) == seen - 1 and stop not in [s for s, _ in stops]:
                stops.append((stop, seen - 1))
    return stops


def assert_never_withdrawn(deltas: list[str], final_text: str) -> None:
    shown = ""
    for d in deltas:
        shown += d
        assert final_text.startswith(shown), f"streamed {shown!r}, but the final text is {final_text!r}"
    assert shown == final_text


@pytest.fixture(scope="module")
def engine():
    return make_engine()


def test_engine_stream_with_stop_string_never_withdraws_text(engine):
    final, stream = run_to_completion(engine, {"base": (PROMPTS[0], greedy(12))})
    full = final["base"].outputs[0].text
    stops = boundary_stops([o.outputs[0].text_delta for o in stream], full)
    assert len(stops) >= 2, f"need stop strings straddling released chunk ends in {full!r}"
    for stop, cut in stops:
        final, stream = run_to_completion(engine, {stop: (PROMPTS[0], greedy(12, stop=[stop]))})
        comp = final[stop].outputs[0]
        assert (comp.finish_reason, comp.stop_reason, comp.text) == ("stop", stop, full[:cut])
        assert_never_withdrawn([o.outputs[0].text_delta for o in stream], comp.text)


def test_engine_stream_with_several_stop_strings_never_withdraws_text(engine):
    final, stream = run_to_completion(engine, {"base": (PROMPTS[2], greedy(12))})
    full = final["base"].outputs[0].text
    stops = boundary_stops([o.outputs[0].text_delta for o in stream], full)
    assert stops, f"need a stop string straddling a released chunk end in {full!r}"
    stop, cut = stops[-1]
    longer = stop + "\x00never"  # a longer stop string that never matches widens the holdback, never narrows it
    final, stream = run_to_completion(engine, {"two": (PROMPTS[2], greedy(12, stop=[longer, stop]))})
    comp = final["two"].outputs[0]
    assert (comp.stop_reason, comp.text) == (stop, full[:cut])
    assert_never_withdrawn([o.outputs[0].text_delta for o in stream], comp.text)


@pytest.fixture(scope="module")
def client():
    engine_args = EngineArgs(device="cpu", dtype="float32", max_num_seqs=8)
    with BackgroundServer(lambda: AsyncEngine(engine_args), ServerConfig(port=0)) as srv:
        with LongCatClient(srv.address, timeout=120) as c:
            yield c


def test_grpc_stream_with_stop_string_never_withdraws_text(client):
    prompt = "The number 5 is"
    with client.generate_stream(prompt, max_tokens=16, temperature=0.0, ignore_eos=True) as stream:
        chunks = [c.text for c in stream]
    full = "".join(chunks)
    stops = boundary_stops(chunks, full)
    assert stops, f"need a stop string straddling a released chunk end in {full!r}"
    for stop, cut in stops[:4]:
        with client.generate_stream(prompt, max_tokens=16, temperature=0.0, ignore_eos=True, stop=[stop]) as stream:
            got = list(stream)
        assert got[-1].finished and got[-1].finish_reason == "stop"
        assert_never_withdrawn([c.text for c in got], full[:cut])
