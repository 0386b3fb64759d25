"""The batched generation engine behind the inference server: concurrent requests share forward passes.

A worker thread owns the running sequences and one KV cache for all of them. Each turn of its loop:

1. sequences whose client went away leave the batch (their cache rows are dropped, so they stop costing
   compute);
2. waiting requests take the free slots (up to `max_batch_size` rows): a prefill pass per group of
   newcomers of similar length (causal: their left-padded prompts; seq2seq: the encoder and the first
   decoder step), whose cache is then merged into the running batch;
3. one decode step for every running row: each row's last token in, one new token out, chosen with that
   row's own temperature, top_p and seeded random stream.

A row ends on EOS, a stop string or max_tokens, and its slot goes to the next waiting request at the next
turn (continuous batching): a long request never holds short ones back, and a new request never waits
for a whole batch to finish.

Why an engine of our own? transformers 5 has continuous batching (`generate_batch`,
`init_continuous_batching`), but only for decoder-only models (paged attention); llmcycle serves
seq2seq models (T5) as much as causal ones. `model.generate` cannot take new rows mid-flight. This
engine works with the model's ordinary forward pass and DynamicCache, so it runs anything
`llmcycle.models.load.load_model` loads (LoRA adapters included).

Padding keeps every row aligned on the last column. Causal rows are left-padded (as in
llmcycle.models.generation) with explicit position ids, so a padded row computes exactly what it would alone.
A seq2seq row's decoder cache is left-padded too (T5's relative position bias only sees distances,
which padding on the left does not change); its encoder states are right-padded and masked.
"""
from __future__ import annotations

import logging
import secrets
import threading
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable

from llmcycle.core.errors import UserError

log = logging.getLogger("llmcycle.serve.app")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy (the most likely token)
    top_p: float = 1.0  # nucleus sampling; 1 = off
    seed: int | None = None  # None = a fresh random seed
    stop: tuple[str, ...] = ()  # the output ends before the first of these; never empty strings
    min_tokens: int = 0  # EOS is masked out until this many tokens exist (HF's min_new_tokens)
    ignore_eos: bool = False  # EOS does not end the row (vLLM's option): output is max_tokens long


class Sequence:
    """One generation: its prompt, settings and progress. Only the worker thread writes to it; the
    `listener(delta, done)` it was submitted with is called from the worker thread with each new piece
    of text (text that might become part of a stop string is held back until it is clear), or, when
    `stream` is False, once with the whole text at the end."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, listener: Callable[[str, bool], None],
                 stream: bool = True):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.listener = listener
        self.stream = stream
        self.token_ids: list[int] = []  # generated, EOS included
        self.text = ""  # the completion so far (final once finish_reason is set)
        self.sent = 0  # characters of text already given to the listener
        self.finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"
        self.error: BaseException | None = None
        self.cancelled = False
        self.rng = None  # torch.Generator, made at admission

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None or self.cancelled


def _held_back(text: str, stops) -> int:
    """Characters at the end of `text` that must not be sent yet: an incomplete UTF-8 character (the
    decoder shows it as one U+FFFD until its last byte arrives) or the start of a stop string."""
    hold = int(text.endswith("\ufffd"))
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


def _pad(t, width: int, dim: int, left: bool):
    """`t` zero-padded along `dim` to `width` (on the left or the right)."""
    import torch

    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    zeros = t.new_zeros(shape)
    return torch.cat([zeros, t] if left else [t, zeros], dim=dim)


def _merge_layers(cache_a, cache_b, width: int, left: bool) -> None:
    """Stack cache_b's rows under cache_a's, layer by layer, padding the sequence axis to `width`."""
    import torch

    for la, lb in zip(cache_a.layers, cache_b.layers):
        la.keys = torch.cat([_pad(la.keys, width, -2, left), _pad(lb.keys, width, -2, left)], dim=0)
        la.values = torch.cat([_pad(la.values, width, -2, left), _pad(lb.values, width, -2, left)], dim=0)


def _slice_layers(cache, rows=None, start: int = 0, end: int | None = None) -> None:
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        if rows is not None:
            k, v = k[rows], v[rows]
        layer.keys, layer.values = k[..., start:end, :], v[..., start:end, :]


def padded(prompts: list[list[int]], pad_id: int, *, left: bool, device):
    """(ids, attention mask) of token lists padded to one width: on the left for causal models (the
    next token is then at the last column for every row), on the right for an encoder."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        cols = slice(width - len(p), width) if left else slice(0, len(p))
        ids[i, cols] = torch.tensor(p, dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


class _CausalRows:
    """Cache and attention mask of decoder-only rows, left-padded to a common width."""

    def __init__(self, model, pad_id: int, keep_logits: bool):
        self.model, self.pad_id, self.keep_logits = model, pad_id, keep_logits
        self.cache = self.mask = self.positions = None

    def prefill(self, prompts: list[list[int]]):
        from transformers import DynamicCache

        ids, mask = padded(prompts, self.pad_id, left=True, device=self.model.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        extra = {"logits_to_keep": 1} if self.keep_logits else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=DynamicCache(), use_cache=True, **extra)
        self.cache, self.mask, self.positions = out.past_key_values, mask, mask.sum(-1)
        return out.logits[:, -1, :]

    def step(self, tokens):
        import torch

        mask = torch.cat([self.mask, self.mask.new_ones((len(tokens), 1))], dim=1)
        out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=self.positions[:, None],
                         past_key_values=self.cache, use_cache=True)
        self.mask, self.positions = mask, self.positions + 1
        return out.logits[:, -1, :]

    def merge(self, other: "_CausalRows") -> None:
        import torch

        width = max(self.mask.shape[1], other.mask.shape[1])
        _merge_layers(self.cache, other.cache, width, left=True)
        self.mask = torch.cat([_pad(self.mask, width, 1, True), _pad(other.mask, width, 1, True)])
        self.positions = torch.cat([self.positions, other.positions])

    def keep(self, rows) -> None:
        """Keep only `rows`, then drop leading columns that are padding in every remaining row."""
        mask = self.mask[rows]
        start = int(mask.any(0).int().argmax())
        _slice_layers(self.cache, rows, start)
        self.mask, self.positions = mask[:, start:], self.positions[rows]


class _DecoderPositions:
    """BART-style decoders embed absolute positions counted from the cache's length, the same for every
    row. A row that joined the batch later sits behind left padding, so its true position is smaller.
    While `current` holds each row's true position, a hook on the position embedding gives every row its
    own (one new token per row per step, as the engine decodes). T5's relative positions need none of this."""

    _by_model = None  # a WeakKeyDictionary: position embedding module -> its one hook object

    def __init__(self, embedding):
        self.current = None
        embedding.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        import torch.nn.functional as F

        if self.current is None:
            return None  # generate() and training: the module's own positions
        return F.embedding(self.current[:, None] + module.offset, module.weight)  # (rows, 1, width)

    @classmethod
    def of(cls, model):
        """The one hook object of this model's decoder, or None when it has no absolute positions."""
        import weakref

        embedding = getattr(model.get_decoder(), "embed_positions", None)
        if embedding is None or not hasattr(embedding, "offset") or not hasattr(embedding, "weight"):
            return None
        if cls._by_model is None:
            cls._by_model = weakref.WeakKeyDictionary()
        if embedding not in cls._by_model:
            cls._by_model[embedding] = cls(embedding)
        return cls._by_model[embedding]


class _Seq2SeqRows:
    """Encoder states (right-padded) and decoder cache (left-padded) of encoder-decoder rows."""

    def __init__(self, model, pad_id: int, prefix: list[int]):
        self.model, self.pad_id, self.prefix = model, pad_id, prefix
        self.cache = self.enc = self.enc_mask = self.dec_mask = None
        self.positions = _DecoderPositions.of(model)

    def prefill(self, prompts: list[list[int]]):
        import torch
        from transformers import DynamicCache, EncoderDecoderCache

        dev = self.model.device
        ids, mask = padded(prompts, self.pad_id, left=False, device=dev)
        self.enc = self.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        self.enc_mask = mask
        self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        self.dec_mask = mask.new_ones((len(prompts), 0))
        for token in self.prefix:  # the start token, then a forced first token where there is one
            logits = self.step(torch.full((len(prompts),), token, dtype=torch.long, device=dev))
        return logits

    def step(self, tokens):
        import torch
        from transformers.modeling_outputs import BaseModelOutput

        dec_mask = torch.cat([self.dec_mask, self.dec_mask.new_ones((len(tokens), 1))], dim=1)
        if self.positions is not None:
            self.positions.current = self.dec_mask.sum(1)  # tokens each row has: the new one's position
        try:
            out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=self.enc), attention_mask=self.enc_mask,
                             decoder_input_ids=tokens[:, None], decoder_attention_mask=dec_mask,
                             past_key_values=self.cache, use_cache=True)
        finally:
            if self.positions is not None:
                self.positions.current = None
        self.dec_mask = dec_mask
        return out.logits[:, -1, :]

    def merge(self, other: "_Seq2SeqRows") -> None:
        import torch

        dec_w = max(self.dec_mask.shape[1], other.dec_mask.shape[1])
        enc_w = max(self.enc_mask.shape[1], other.enc_mask.shape[1])
        _merge_layers(self.cache.self_attention_cache, other.cache.self_attention_cache, dec_w, left=True)
        _merge_layers(self.cache.cross_attention_cache, other.cache.cross_attention_cache, enc_w, left=False)
        self.dec_mask = torch.cat([_pad(self.dec_mask, dec_w, 1, True), _pad(other.dec_mask, dec_w, 1, True)])
        self.enc_mask = torch.cat([_pad(self.enc_mask, enc_w, 1, False), _pad(other.enc_mask, enc_w, 1, False)])
        self.enc = torch.cat([_pad(self.enc, enc_w, 1, False), _pad(other.enc, enc_w, 1, False)])

    def keep(self, rows) -> None:
        dec_mask, enc_mask = self.dec_mask[rows], self.enc_mask[rows]
        start = int(dec_mask.any(0).int().argmax())  # decoder padding is on the left
        end = enc_mask.shape[1] - int(enc_mask.any(0).flip(0).int().argmax())  # encoder padding on the right
        _slice_layers(self.cache.self_attention_cache, rows, start)
        _slice_layers(self.cache.cross_attention_cache, rows, 0, end)
        self.dec_mask, self.enc_mask = dec_mask[:, start:], enc_mask[:, :end]
        self.enc = self.enc[rows][:, :end]


def _prefill_groups(seqs: list[Sequence], waste: float = 1.25) -> list[list[Sequence]]:
    """Newcomers grouped for their prefill passes: longest first, a group closed when padding to its
    longest prompt would cost more than `waste` x its real tokens. Prefill is compute-bound already,
    so one pass over prompts of 30 and 110 tokens padded to 110 costs more than two passes."""
    groups: list[list[Sequence]] = []
    for seq in sorted(seqs, key=lambda s: -len(s.prompt_ids)):
        if groups:
            group = groups[-1]
            tokens = sum(len(s.prompt_ids) for s in group) + len(seq.prompt_ids)
            if (len(group) + 1) * len(group[0].prompt_ids) <= waste * tokens:
                group.append(seq)
                continue
        groups.append([seq])
    return groups


def _forward_model(model):
    """The module to call: a LoRA PeftModel runs through its base model, where the adapters are
    injected. Soft prompts (prompt tuning) prepend virtual tokens this engine's cache does not hold."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        if getattr(model, "active_peft_config", None) is not None and model.active_peft_config.is_prompt_learning:
            raise UserError("the inference server cannot serve soft-prompt (prompt_tuning) adapters yet; "
                            "serve a LoRA or fully fine-tuned model")
        return model.get_base_model()
    return model


class BatchEngine:
    """Runs many generations at once on one model. `submit` from any thread; a worker thread started by
    `start()` does all model work. With max_batch_size=1 it handles one request at a time."""

    def __init__(self, generator, max_batch_size: int = 16):
        import inspect

        if max_batch_size < 1:
            raise UserError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.gen = generator  # llmcycle.models.generation.Generator: tokenizer, pad/eos ids, window, decode
        self.kind = generator.kind
        self.model = _forward_model(generator.model)
        self.max_batch_size = max_batch_size
        self.eos_ids = list(generator.eos_ids)
        if self.kind == "seq2seq":
            prefix = generator.decoder_prefix
            self._new_rows = lambda: _Seq2SeqRows(self.model, generator.pad_id, prefix)
        else:
            keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
            self._new_rows = lambda: _CausalRows(self.model, generator.pad_id, keep)
        self._waiting: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._running: list[Sequence] = []  # worker thread only
        self._rows = None  # the running rows' tensors, aligned with _running
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Statistics for /metrics, written by the worker thread only.
        self.decode_steps = 0
        self.batch_sizes: Counter[int] = Counter()  # rows per decode step -> steps
        self.tokens_generated = 0
        self.cancelled = 0

    # -- the caller's side ----------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               listener: Callable[[str, bool], None] = lambda delta, done: None, stream: bool = True) -> Sequence:
        if not prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        seq = Sequence(prompt_ids, params, listener, stream)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            self._waiting.append(seq)
            self._cond.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop working on `seq` (its client went away): it leaves the queue, or the batch at the next step."""
        if seq.done:
            return
        seq.cancelled = True
        with self._cond:
            if seq in self._waiting:
                self._waiting.remove(seq)
                self.cancelled += 1
            self._cond.notify()

    def start(self) -> "BatchEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llmcycle-batch-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish every submitted sequence (drain), then end the worker thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- the worker's side -----------------------------------------------------------------------------
    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._waiting and not self._running and not self._stopping:
                        self._cond.wait()
                    if self._stopping and not self._waiting and not self._running:
                        return
                self.run_once()

    def run_once(self) -> None:
        """One turn: drop cancelled rows, admit waiting requests, one decode step. The worker calls it in
        a loop; tests call it directly to drive the engine step by step."""
        import torch

        try:
            with torch.inference_mode():
                self._drop_cancelled()
                self._admit()
                if self._running:
                    self._decode_step()
        except Exception as exc:  # noqa: BLE001 - a failed forward pass fails its requests, not the server
            log.exception("generation failed; failing the %d running request(s)", len(self._running))
            for seq in self._running:
                seq.error = exc
                self._notify(seq, "", True)
            self._running, self._rows = [], None

    def _drop_cancelled(self) -> None:
        keep = [i for i, s in enumerate(self._running) if not s.cancelled]
        if len(keep) < len(self._running):
            self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        import torch

        kept = set(keep)
        dropped = sum(s.cancelled and s.finish_reason is None for i, s in enumerate(self._running) if i not in kept)
        with self._cond:  # cancel() counts too, from another thread
            self.cancelled += dropped
        self._running = [self._running[i] for i in keep]
        if not self._running:
            self._rows = None
        else:
            self._rows.keep(torch.tensor(keep, dtype=torch.long, device=self.model.device))

    def _admit(self) -> None:
        import torch

        new: list[Sequence] = []
        with self._cond:
            while self._waiting and len(self._running) + len(new) < self.max_batch_size:
                new.append(self._waiting.popleft())
        for seq in new:
            seed = seq.params.seed if seq.params.seed is not None else secrets.randbits(63)
            seq.rng = torch.Generator(device=self.model.device).manual_seed(seed % 2**63)
        for group in _prefill_groups(new):
            rows = self._new_rows()
            try:
                logits = rows.prefill([s.prompt_ids for s in group])
            except Exception as exc:  # noqa: BLE001 - the running rows are untouched: fail only the newcomers
                log.exception("prefill failed; failing %d new request(s)", len(group))
                for seq in group:
                    seq.error = exc
                    self._notify(seq, "", True)
                continue
            if self._rows is None:
                self._rows = rows
            else:
                self._rows.merge(rows)
            self._running += group
            self._accept(group, logits)

    def _decode_step(self) -> None:
        import torch

        last = torch.tensor([s.token_ids[-1] for s in self._running], dtype=torch.long, device=self.model.device)
        logits = self._rows.step(last)
        self.decode_steps += 1
        self.batch_sizes[len(self._running)] += 1
        self._accept(self._running, logits)

    def _accept(self, seqs: list[Sequence], logits) -> None:
        """Choose each row's next token, then retire the rows that finished."""
        tokens = self._choose(logits, seqs)
        for seq, token in zip(seqs, tokens):
            self._advance(seq, token)
        keep = [i for i, s in enumerate(self._running) if not s.done]
        if len(keep) < len(self._running):
            self._keep(keep)

    def _choose(self, logits, seqs: list[Sequence]) -> list[int]:
        import torch

        logits = logits.float()
        masked = [i for i, s in enumerate(seqs) if len(s.token_ids) < s.params.min_tokens]
        if masked and self.eos_ids:
            rows, eos = torch.tensor(masked, device=logits.device), torch.tensor(self.eos_ids, device=logits.device)
            logits[rows[:, None], eos[None, :]] = float("-inf")
        chosen = logits.argmax(-1)
        sampled = [i for i, s in enumerate(seqs) if s.params.temperature > 0]
        if sampled:
            temps = torch.tensor([seqs[i].params.temperature for i in sampled], device=logits.device)
            probs = torch.softmax(logits[sampled] / temps[:, None], dim=-1)
            top_p = torch.tensor([seqs[i].params.top_p for i in sampled], device=logits.device)
            if any(seqs[i].params.top_p < 1 for i in sampled):
                # Nucleus: keep the most likely tokens until their mass reaches top_p (always the first).
                sorted_p, order = probs.sort(dim=-1, descending=True)
                sorted_p[(sorted_p.cumsum(-1) - sorted_p) > top_p[:, None]] = 0
                probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
            for row, i in enumerate(sampled):  # each request its own seeded stream
                chosen[i] = torch.multinomial(probs[row], 1, generator=seqs[i].rng)[0]
        return chosen.tolist()

    def _advance(self, seq: Sequence, token: int) -> None:
        seq.token_ids.append(token)
        self.tokens_generated += 1
        p = seq.params
        ended = token in self.eos_ids and not p.ignore_eos
        full = len(seq.token_ids) >= p.max_tokens
        if not (seq.stream or p.stop or ended or full):
            return  # nobody reads the text before the end: decode once, then
        text = self.gen.decode(seq.token_ids)
        cut = self.gen._first_stop(text, p.stop) if p.stop else None
        if cut is not None:
            seq.text, seq.finish_reason = text[:cut], "stop"
        elif ended or full:
            seq.text, seq.finish_reason = text, "stop" if ended else "length"
        else:
            seq.text = text
            ready = len(text) - _held_back(text, p.stop)
            if seq.stream and ready > seq.sent:
                self._notify(seq, text[seq.sent:ready], False)
            return
        self._notify(seq, seq.text[seq.sent:], True)

    def _notify(self, seq: Sequence, delta: str, done: bool) -> None:
        seq.sent += len(delta)
        try:
            seq.listener(delta, done)
        except Exception:  # noqa: BLE001 - the client's side is gone (e.g. its event loop closed)
            seq.cancelled = True
