"""Batched token sampling on device tensors, vLLM semantics.

Order per row: logit_bias, min_tokens mask (EOS and stop ids), repetition penalty (prompt + output tokens),
frequency / presence penalties (output tokens), then greedy argmax (temperature 0) or temperature, top-k,
top-p, min-p and a draw. Logprobs are the RAW log-softmax of the model logits (vLLM's default
"raw_logprobs"): they describe the model, not the processed distribution the token was drawn from.

A row whose processed logits are not finite (a NaN or +inf anywhere, or every token masked to -inf) samples
no token: `collect` returns NONFINITE_TOKEN for it, and the engine fails that request alone with a clear
error; its device-side token (the input of a chained decode step) is 0, so the next step stays in range.

A request with a seed draws from its own torch.Generator (seed + sample index), so its tokens do not depend on
what else is in the batch; unseeded rows share the engine's generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longcat_service.layers.host_to_device import to_device
from longcat_service.outputs import Logprob
from longcat_service.sampling_params import SamplingParams

_NEG_INF = float("-inf")
NONFINITE_TOKEN = -1  # collect()'s token for a row whose logits were not finite


@dataclass
class SamplingRow:
    """What the sampler needs to know about one row of logits."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None  # per-request seed
    # 1 when the row's last output token is still on the device (a chained decode step): its value comes in
    # Sampler.launch's `pending_tokens`; counts (min_tokens) and penalties include it
    num_pending: int = 0


@dataclass
class SampledBatch:
    """A launched sampling: device tensors until Sampler.collect reads them back."""

    tokens: torch.Tensor  # [M] long, always a valid id (0 for a non-finite row)
    logprob_ns: list[int | None]  # per row: the top-n asked for, None = no logprobs
    chosen: torch.Tensor | None = None  # [M] raw logprob of the drawn token
    top_ids: torch.Tensor | None = None  # [M, max n]
    top_vals: torch.Tensor | None = None
    finite: torch.Tensor | None = None  # [M] bool: False where the row's logits were not finite (no real token)
    # on CUDA: the tensors above copied to pinned host memory, and the event that says the copies are done.
    # A plain .tolist() would be stream-ordered behind every step queued after this one (async scheduling
    # queues the next step before reading this one back), so collect waits on this event instead.
    host: dict[str, torch.Tensor] | None = None
    ready: torch.cuda.Event | None = None

    def start_readback(self) -> None:
        if not self.tokens.is_cuda:
            return
        names = ("tokens", "finite", "chosen", "top_ids", "top_vals")
        self.host = {n: getattr(self, n).to("cpu", non_blocking=True) for n in names if getattr(self, n) is not None}
        self.ready = torch.cuda.Event()
        self.ready.record()

    def wait(self) -> None:
        """Block until this step's read-back copies are done (no-op on CPU)."""
        if self.ready is not None:
            self.ready.synchronize()

    def fetched(self, name: str) -> torch.Tensor | None:
        """The host copy of tensor `name` (waits for this step's copies only), or the tensor itself on CPU."""
        if self.ready is None:
            return getattr(self, name)
        self.ready.synchronize()
        return self.host.get(name)


class Sampler:
    def __init__(self, vocab_size: int, eos_token_id: int | None, device: torch.device | str, seed: int = 0):
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def make_generator(self, seed: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed % 2**64)
        return g

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[list[int], list[Logprob | None]]:
        """logits: fp32 [M, vocab] -> (token id per row, Logprob per row or None when not asked)."""
        return self.collect(self.launch(logits, rows))

    @torch.inference_mode()
    def launch(self, logits: torch.Tensor, rows: list[SamplingRow],
               pending_tokens: torch.Tensor | None = None) -> SampledBatch:
        """Enqueue the sampling of every row on the device; nothing is read back (no host sync).
        pending_tokens: [M] device tensor, the not-yet-read last token of the rows with num_pending == 1."""
        if logits.shape[0] != len(rows):
            raise ValueError(f"logits has {logits.shape[0]} rows for {len(rows)} sampling rows")
        if any(r.num_pending for r in rows) and (pending_tokens is None or pending_tokens.shape[0] != len(rows)):
            raise ValueError("rows with a pending token need pending_tokens with one entry per row")
        logits = logits.float()
        ns = [r.params.logprobs for r in rows]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(n is not None for n in ns) else None
        # _process edits rows in place only for logit_bias / min_tokens: copy the logits (a view of the CUDA graph's
        # output buffer, [M, vocab] fp32: 34 MB at batch 64) only then
        in_place = any(self._edits_in_place(r) for r in rows)
        processed = self._process(logits.clone() if in_place else logits, rows, pending_tokens)
        # amax propagates NaN: one reduction finds NaN, +inf and rows with every token masked (-inf)
        finite = torch.isfinite(processed.amax(dim=-1))
        tokens = torch.where(finite, self._draw(processed, rows), 0)
        out = SampledBatch(tokens, ns, finite=finite)
        if raw_logprobs is not None:
            max_n = max(n or 0 for n in ns)
            out.chosen = raw_logprobs.gather(1, out.tokens[:, None])[:, 0]
            if max_n > 0:
                out.top_vals, out.top_ids = raw_logprobs.topk(max_n, dim=-1)
        out.start_readback()
        return out

    @staticmethod
    def collect(s: SampledBatch) -> tuple[list[int], list[Logprob | None]]:
        """Wait for a launched sampling and read it back: the step's one device -> host copy (plus logprobs).
        A row whose logits were not finite gets NONFINITE_TOKEN and no logprob."""
        token_list = s.fetched("tokens").tolist()
        finite = s.fetched("finite").tolist() if s.finite is not None else [True] * len(token_list)
        token_list = [tok if ok else NONFINITE_TOKEN for tok, ok in zip(token_list, finite, strict=True)]
        chosen = s.fetched("chosen").tolist() if s.chosen is not None else None
        top_ids = s.fetched("top_ids").tolist() if s.top_ids is not None else None
        top_vals = s.fetched("top_vals").tolist() if s.top_vals is not None else None
        logprobs: list[Logprob | None] = []
        for i, n in enumerate(s.logprob_ns):
            if n is None or token_list[i] == NONFINITE_TOKEN:
                logprobs.append(None)
                continue
            top = dict(zip(top_ids[i][:n], top_vals[i][:n], strict=True)) if n else {}
            top[token_list[i]] = chosen[i]
            logprobs.append(Logprob(token_list[i], chosen[i], top))
        return token_list, logprobs

    def plain_greedy(self, params: SamplingParams, num_output_tokens: int) -> bool:
        """True when, from now on, a request's token is exactly the argmax of the raw logits and nothing but the
        token is asked of the sampler: greedy (temperature below GREEDY_TEMPERATURE_EPS; top-k/p, min-p and the
        seed do not change an argmax), no logprobs, no logit_bias, no repetition / frequency / presence penalty,
        and min_tokens masking nothing (reached at num_output_tokens, which only grows, or no stop id / EOS to
        mask). Such rows need no host-built sampler tensors (speculative decoding's device-side greedy step)."""
        p = params
        return (p.greedy and p.logprobs is None and not p.logit_bias and p.repetition_penalty == 1.0
                and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0
                and not self._min_tokens_bans(p, num_output_tokens))

    def plain_sampled(self, params: SamplingParams, num_output_tokens: int) -> bool:
        """True when a request's token is drawn from its raw logits through temperature, top-k, top-p and min-p only:
        sampled (not greedy), with or without a seed, and nothing else asked (as plain_greedy: no logprobs,
        logit_bias, penalties, and min_tokens masking nothing). Speculative decoding's device-side step handles such
        rows (spec_sampled.py; a seeded row's randomness there is a hash of its seed and token position,
        engine/seeded_draws.py)."""
        p = params
        return (not p.greedy and p.logprobs is None and not p.logit_bias
                and p.repetition_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0
                and not self._min_tokens_bans(p, num_output_tokens))

    # ---- logits processing ---------------------------------------------------------------------
    def _banned_for_min_tokens(self, row: SamplingRow) -> list[int]:
        """Token ids masked while the row is below min_tokens (stop ids, and EOS unless ignored)."""
        return self._min_tokens_bans(row.params, len(row.output_token_ids) + row.num_pending)

    def _min_tokens_bans(self, p: SamplingParams, num_output_tokens: int) -> list[int]:
        if num_output_tokens >= p.min_tokens:
            return []
        banned = list(p.stop_token_ids)
        if self.eos_token_id is not None and not p.ignore_eos:
            banned.append(self.eos_token_id)
        return banned

    def _edits_in_place(self, row: SamplingRow) -> bool:
        return bool(row.params.logit_bias) or bool(self._banned_for_min_tokens(row))

    def _process(self, logits: torch.Tensor, rows: list[SamplingRow], pending: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """Edits `logits` in place for logit_bias / min_tokens (the caller passes a copy then); the penalties
        return new tensors."""
        for i, row in enumerate(rows):
            p = row.params
            if p.logit_bias:
                ids = to_device(list(p.logit_bias), torch.long, logits.device)
                vals = to_device(list(p.logit_bias.values()), logits.dtype, logits.device)
                logits[i].index_add_(0, ids, vals)
            banned = self._banned_for_min_tokens(row)
            if banned:
                logits[i].index_fill_(0, to_device(banned, torch.long, logits.device), _NEG_INF)
        if any(r.params.repetition_penalty != 1.0 for r in rows):
            logits = self._repetition_penalty(logits, rows, pending)
        if any(r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0 for r in rows):
            counts = self._token_counts([r.output_token_ids for r in rows], logits.device, rows, pending)
            freq = self._column([r.params.frequency_penalty for r in rows], logits)
            pres = self._column([r.params.presence_penalty for r in rows], logits)
            logits = logits - freq * counts - pres * (counts > 0).to(logits.dtype)
        return logits

    def _repetition_penalty(self, logits: torch.Tensor, rows: list[SamplingRow], pending) -> torch.Tensor:
        token_lists = [r.prompt_token_ids + r.output_token_ids for r in rows]
        seen = self._token_counts(token_lists, logits.device, rows, pending) > 0
        penalty = self._column([r.params.repetition_penalty for r in rows], logits).expand_as(logits)
        # a tiny penalty must not overflow a positive logit to +inf (that row would fail as non-finite)
        scaled = torch.where(logits > 0, (logits / penalty).clamp(max=torch.finfo(logits.dtype).max), logits * penalty)
        return torch.where(seen, scaled, logits)

    def _token_counts(self, token_lists: list[list[int]], device: torch.device, rows: list[SamplingRow],
                      pending: torch.Tensor | None) -> torch.Tensor:
        """[M, vocab] occurrence counts, each row's pending (device-side) token included; padding goes to an
        extra column that is dropped."""
        width = max((len(t) for t in token_lists), default=0)
        # host staging on the CPU, counts in fp32 on the device, whatever torch's default device and dtype are
        padded = torch.full((len(token_lists), max(width, 1)), self.vocab_size, dtype=torch.long, device="cpu")
        for i, t in enumerate(token_lists):
            if t:
                padded[i, : len(t)] = torch.tensor(t, dtype=torch.long, device="cpu")
        counts = torch.zeros(len(token_lists), self.vocab_size + 1, dtype=torch.float32, device=device)
        counts.scatter_add_(1, to_device(padded, torch.long, device),
                            torch.ones(padded.shape, dtype=torch.float32, device=device))
        if any(r.num_pending for r in rows):
            has = to_device([float(r.num_pending) for r in rows], torch.float32, device)
            ids = pending.to(device=device, dtype=torch.long).clamp(0, self.vocab_size)  # rows without one add 0
            counts.scatter_add_(1, ids[:, None], has[:, None])
        return counts[:, : self.vocab_size]

    @staticmethod
    def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
        return to_device(values, like.dtype, like.device)[:, None]

    # ---- drawing -------------------------------------------------------------------------------
    def _draw(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        argmax = logits.argmax(dim=-1)
        if all(r.params.greedy for r in rows):  # decided on the host: no read-back of a device flag
            return argmax
        greedy = to_device([r.params.greedy for r in rows], torch.bool, logits.device)
        probs = self._sampling_probs(logits, rows)
        # exponential race: argmax(p / E) with E ~ Exp(1) draws from p without a host sync
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, row in enumerate(rows):
            if row.generator is not None:
                noise[i].exponential_(generator=row.generator)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(greedy, argmax, sampled)

    def _sampling_probs(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Processed logits -> the (unnormalised) probabilities a sampled row draws from: temperature, top-k,
        softmax, top-p, min-p (greedy rows at temperature 1; callers take their argmax instead)."""
        temps = self._column([r.params.temperature if not r.params.greedy else 1.0 for r in rows], logits)
        # the safe form of logits / T: shifted by the row max first (softmax does not change), every value is <= 0,
        # so a small T can only push a value to -inf (probability 0), never to +inf or NaN
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / temps
        logits = self._top_k(logits, [r.params.top_k for r in rows])
        probs = torch.softmax(logits, dim=-1)
        return self._top_p_min_p(probs, rows)

    @torch.inference_mode()
    def probabilities(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """fp32 [M, vocab] raw logits -> [M, vocab] the exact distribution launch() draws each row's token from,
        after every sampling option (logit_bias, min_tokens, penalties, temperature, top-k/p, min-p); a greedy
        row is a point mass at its argmax; a row with non-finite logits is all NaN. Speculative decoding's rejection
        sampler verifies drafts with it."""
        if logits.shape[0] != len(rows):
            raise ValueError(f"logits has {logits.shape[0]} rows for {len(rows)} sampling rows")
        logits = logits.float()
        in_place = any(self._edits_in_place(r) for r in rows)
        processed = self._process(logits.clone() if in_place else logits, rows)
        point = torch.zeros_like(processed).scatter_(1, processed.argmax(dim=-1, keepdim=True), 1.0)
        if all(r.params.greedy for r in rows):
            probs = point
        else:
            probs = self._sampling_probs(processed, rows)
            probs = probs / probs.sum(dim=-1, keepdim=True)
            greedy = to_device([r.params.greedy for r in rows], torch.bool, logits.device)
            probs = torch.where(greedy[:, None], point, probs)
        # a row whose processed logits are not finite (launch() fails its request) comes back all NaN
        finite = torch.isfinite(processed.amax(dim=-1))
        return torch.where(finite[:, None], probs, float("nan"))

    @staticmethod
    def _top_k(logits: torch.Tensor, top_ks: list[int]) -> torch.Tensor:
        vocab = logits.shape[-1]
        ks = [k if 0 < k < vocab else vocab for k in top_ks]
        if all(k == vocab for k in ks):
            return logits
        k_max = max(ks)
        kth = logits.topk(k_max, dim=-1).values  # [M, k_max], descending
        idx = to_device(ks, torch.long, logits.device)[:, None] - 1
        threshold = kth.gather(1, idx)
        return logits.masked_fill(logits < threshold, _NEG_INF)

    def _top_p_min_p(self, probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        top_ps = [r.params.top_p for r in rows]
        min_ps = [r.params.min_p for r in rows]
        if any(p < 1.0 for p in top_ps):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it already does
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            drop_sorted = mass_before >= self._column(top_ps, probs)
            drop_sorted[:, 0] = False
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
        if any(p > 0.0 for p in min_ps):
            threshold = self._column(min_ps, probs) * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)
        return probs
