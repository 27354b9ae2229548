"""How a request's HTTP response ends, the same for chat and text completions: a non-streaming response collects
the outputs and turns a deadline or an engine failure into its error status; a stream (already 200 by then) sends
the optional usage event and `[DONE]`, or an error event in their place, and closes the request either way."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from fastapi.sse import format_sse_event

from longcat_service.server.openai_api.errors import ApiError
from longcat_service.server.openai_api.generation import Generation

DONE = format_sse_event(data_str="[DONE]")


def raise_for_outcome(outcome: str, gen: Generation) -> None:
    """After gen.close(outcome): a request that ended at its deadline or in an engine error is an error."""
    if outcome == "deadline":
        raise gen.recorded(ApiError(504, f"deadline (timeout_ms) passed after {gen.num_tokens} output token(s)",
                                    outcome="deadline", headers={"x-should-retry": "false"}))
    if outcome == "error":
        raise gen.recorded(ApiError(500, "the engine failed while generating"))


async def collect_non_streaming(gen: Generation, outputs):
    """A non-streaming response's outputs (the awaitable `outputs`), with the request closed and its outcome
    recorded; a deadline or engine error raises its ApiError, a disconnect closes the request as cancelled."""
    try:
        result = await gen.until_disconnect(outputs)
    except ApiError as e:
        await gen.close(e.outcome)
        raise gen.recorded(e) from None
    except BaseException:
        await gen.close("cancelled")
        raise
    outcome = gen.final_outcome()
    await gen.close(outcome)
    raise_for_outcome(outcome, gen)
    return result


async def stream_events(gen: Generation, events: AsyncIterator[bytes],
                        usage_event: Callable[[], bytes | None]) -> AsyncIterator[bytes]:
    """`events` (the chunks), then usage_event() when it gives one, then [DONE]; a deadline or engine failure sends
    an error event instead of the last two. A client that goes away closes the request as cancelled."""
    try:
        async with aclosing(events):
            async for event in events:
                yield event
        outcome = gen.final_outcome()
        raise_for_outcome(outcome, gen)
        usage = usage_event()
        if usage is not None:
            yield usage
        yield DONE
        await gen.close(outcome)
    except ApiError as e:
        await gen.close(e.outcome)
        yield format_sse_event(data_str=e.body().model_dump_json())
    finally:
        await gen.close("cancelled")
