"""Batched text generation shared by evaluation, the lifecycle stages and the inference server.

Why not call `model.generate` once per prompt (the course notebook's way)? Each call runs the model on
one row, so the hardware idles; batching many prompts into one call is several times faster. Batching
needs padding, and padding is where results silently change, so this module:

* sorts prompts by token length (longest first) so each batch holds similar lengths and pads little,
  then restores the caller's order;
* pads causal (decoder-only) models on the LEFT, so every row's last prompt token sits at the end and
  the new tokens follow it directly; transformers derives position ids from the attention mask, so a
  left-padded row is computed exactly like the same prompt alone (tests check token-for-token equality
  with one-by-one generation, greedy and beam search);
* never truncates a prompt: a prompt that does not fit the context window is an error the caller fixes.

torch and transformers are imported inside functions so that importing llmcycle stays fast.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pydantic import Field, ValidationError, field_validator

from llmcycle.core.configbase import Section, describe_error
from llmcycle.core.errors import UserError, suggest
from llmcycle.data.encoding import end_of_turn_id
from llmcycle.data.prompting import encode_prompt, uses_chat_template
from llmcycle.models.hub import context_window as window_of
from llmcycle.models.hub import decoder_prefix, model_kind


class GenerationConfig(Section):
    max_new_tokens: int = Field(64, ge=1, description="Most tokens generated per prompt.")
    do_sample: bool = Field(False, description="Sample from the distribution (temperature, top_k, top_p) "
                            "instead of taking the most likely token (greedy, or beam search).")
    num_beams: int = Field(1, ge=1, description="Beams for beam search; 1 = no beam search.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature: >1 flatter, <1 sharper "
                               "(only with do_sample).")
    top_k: int | None = Field(None, ge=0, description="Sample only among the k most likely tokens; "
                              "null or 0 = no top-k filtering (only with do_sample).")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling: sample among the most "
                                "likely tokens whose probabilities sum to top_p; null = off (only with "
                                "do_sample).")
    repetition_penalty: float = Field(1.0, gt=0, description="Divide the scores of tokens already in the "
                                      "prompt or output by this (>1 discourages repetition, 1 = off).")
    no_repeat_ngram_size: int = Field(0, ge=0, description="Never repeat an n-gram of this many tokens "
                                      "within an output (3 is usual for summaries; 0 = off).")
    stop: list[str] = Field([], description="Stop sequences: generation of a prompt ends when its output "
                            "contains one; the output is cut before it.")
    seed: int = Field(0, description="Random seed for sampling. Results are reproducible for the same "
                      "seed, prompts and batch settings; changing batch_size or max_batch_tokens can "
                      "change sampled outputs (each batch draws from its own seeded stream).")
    batch_size: int = Field(16, ge=1, description="Prompts per generate call (when max_batch_tokens is "
                            "not set).")
    max_batch_tokens: int | None = Field(None, ge=1, description="Cut batches by a token budget instead of "
                                         "batch_size: rows x num_beams x (padded prompt length, plus "
                                         "max_new_tokens for causal models) <= this. A prompt over the "
                                         "budget on its own gets a batch to itself.")

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        # An empty stop string matches at position 0 and would erase every output.
        if any(s == "" for s in v):
            raise ValueError("stop sequences must not be empty strings")
        return v

    @classmethod
    def from_dict(cls, d: dict | None, where: str) -> "GenerationConfig":
        """Validate generation parameters given outside the project file (a request, a stage's options).
        Unknown keys are errors naming the nearest valid key: a silently dropped `tok_k` would quietly
        sample with the wrong settings."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise UserError(f"{where}: generation parameters must be a mapping, got {type(d).__name__}")
        try:
            return cls.model_validate(d)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
            if err["type"] == "extra_forbidden":
                hint = suggest(key, list(cls.model_fields)) or f" (valid: {', '.join(cls.model_fields)})"
                raise UserError(f"{where}: unknown generation parameter '{key}'{hint}{more}") from None
            raise UserError(f"{where}: generation parameter '{key}': {describe_error(err)}{more}") from None


@dataclass
class GenerationResult:
    text: str  # the completion only: special tokens skipped, cut before the first stop sequence
    prompt_tokens: int
    completion_tokens: int  # tokens generated, including an EOS and any tokens after a stop sequence
    finish_reason: str  # "stop" (EOS or a stop sequence) or "length" (max_new_tokens reached)
    token_ids: list[int] = field(default_factory=list)  # the generated ids, EOS included


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return [int(i) for i in x] if isinstance(x, (list, tuple)) else [int(x)]


def configured_eos(model, tokenizer) -> tuple[list[int], str]:
    """The model's end-of-sequence ids and where they were found: its config, then its generation config,
    then its tokenizer (a warm-started BERT encoder-decoder sets [SEP] in the config; its tokenizer has
    no eos_token)."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    sources = (("config.json eos_token_id", getattr(config, "eos_token_id", None)),
               ("generation_config.json eos_token_id",
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)),
               ("the tokenizer's eos_token", tokenizer.eos_token_id))
    return next(((_as_list(v), where) for where, v in sources if _as_list(v)), ([], "nowhere"))


def target_end_id(model, tokenizer, kind: str) -> tuple[int, str]:
    """(the token training targets end with, why): the chat template's end-of-turn token for chat models,
    else the model's configured eos id. Refused, with the fix, when the model has neither."""
    if uses_chat_template(tokenizer, kind):
        eot = end_of_turn_id(tokenizer)
        if eot is not None:
            return eot, f"the chat template's end of turn {tokenizer.convert_ids_to_tokens(eot)!r}"
    ids, where = configured_eos(model, tokenizer)
    if not ids:
        raise UserError("the model has no end-of-sequence token (config.json and generation_config.json set no "
                        "eos_token_id, the tokenizer no eos_token), so it could not learn to stop; set "
                        "eos_token_id in the model's config.json (e.g. the [SEP] id) or an eos_token in its "
                        "tokenizer_config.json")
    return ids[0], f"{where} {tokenizer.convert_ids_to_tokens(ids[0])!r}"


def stop_ids(model, tokenizer, kind: str) -> list[int]:
    """Every id generation stops on: the generation config's eos ids (Llama 3 lists <|eot_id|> and
    <|end_of_text|>), the config's and tokenizer's, and a chat model's end-of-turn token."""
    gen_cfg = getattr(model, "generation_config", None)
    ids = _as_list(getattr(gen_cfg, "eos_token_id", None)) + configured_eos(model, tokenizer)[0]
    ids += _as_list(tokenizer.eos_token_id)
    if uses_chat_template(tokenizer, kind):
        ids += _as_list(end_of_turn_id(tokenizer))
    return list(dict.fromkeys(ids))


class Generator:
    """Generates with one model and tokenizer; holds no per-call state, so one instance can serve many
    calls (the tokenizer is never mutated after __init__, which matters for a threaded server)."""

    def __init__(self, model, tokenizer, context_window: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.kind = model_kind(model.config)
        self.eos_ids = stop_ids(model, tokenizer, self.kind)
        if tokenizer.pad_token is None:
            if not self.eos_ids:
                raise UserError("the tokenizer has no pad token and the model no eos token; batching needs one")
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(self.eos_ids[0])  # masked out anyway
        self.pad_id = int(tokenizer.pad_token_id)
        self.window = window_of(model.config, tokenizer, context_window)

    # -- preparing inputs ---------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt (a chat model's through its template, as fine-tuning encodes them),
        never truncated."""
        if uses_chat_template(self.tokenizer, self.kind) or any(hasattr(p, "messages") for p in prompts):
            ids = [encode_prompt(self.tokenizer, p, self.kind) for p in prompts]
        else:
            ids = self.tokenizer([str(p) for p in prompts], add_special_tokens=True)["input_ids"]
        out = []
        for i, row in enumerate(ids):
            if not row and self.kind == "causal":
                # A causal model needs at least one token to continue from; BOS is what it saw first in
                # pretraining, and what transformers uses when generate gets no input at all.
                bos = self.tokenizer.bos_token_id
                if bos is None:
                    raise UserError(f"prompt {i} is empty and the tokenizer has no BOS token to start from")
                row = [int(bos)]
            out.append(list(row))
        return out

    def check_lengths(self, lengths: list[int], cfg: GenerationConfig) -> None:
        for i, n in enumerate(lengths):
            if n > self.window:
                raise UserError(f"prompt {i} has {n} tokens, more than the model's context window of "
                                f"{self.window} tokens; shorten or split it (prompts are not truncated)")
            if self.kind == "causal" and n + cfg.max_new_tokens > self.window:
                raise UserError(f"prompt {i} has {n} tokens; with max_new_tokens {cfg.max_new_tokens} that is "
                                f"{n + cfg.max_new_tokens} tokens, more than the model's context window of "
                                f"{self.window} tokens; shorten the prompt or lower max_new_tokens")

    def plan_batches(self, lengths: list[int], cfg: GenerationConfig) -> list[list[int]]:
        """Prompt indices grouped into batches, longest prompts first. Within a batch the first prompt is
        the longest, so the padded size is rows x that length."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep input order
        extra = cfg.max_new_tokens if self.kind == "causal" else 0
        batches: list[list[int]] = []
        for i in order:
            if batches:
                cur = batches[-1]
                if cfg.max_batch_tokens is None:
                    fits = len(cur) < cfg.batch_size
                else:
                    cost = (len(cur) + 1) * cfg.num_beams * (lengths[cur[0]] + extra)
                    fits = cost <= cfg.max_batch_tokens
                if fits:
                    cur.append(i)
                    continue
            batches.append([i])
        return batches

    def _tensors(self, rows: list[list[int]]):
        """Padded input ids and attention mask. Padding is done here rather than by flipping
        tokenizer.padding_side, which would race between threads sharing the tokenizer."""
        import torch

        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            # Causal: left padding, so generation continues right after each prompt's last token.
            # Seq2seq: the encoder reads the prompt, the decoder starts fresh; right padding is standard.
            sl = slice(width - len(r), width) if self.kind == "causal" else slice(0, len(r))
            ids[j, sl] = torch.tensor(r, dtype=torch.long)
            mask[j, sl] = 1
        return ids.to(self.model.device), mask.to(self.model.device)

    def generate_kwargs(self, cfg: GenerationConfig) -> dict:
        """Arguments for model.generate. Sampling settings are passed explicitly (top_k 0 and top_p 1 when
        unset) so this config, not a generation_config.json shipped with the model, decides how to sample."""
        kw = dict(max_new_tokens=cfg.max_new_tokens + self.forced_tokens, num_beams=cfg.num_beams, do_sample=cfg.do_sample,
                  repetition_penalty=cfg.repetition_penalty, no_repeat_ngram_size=cfg.no_repeat_ngram_size,
                  use_cache=True, pad_token_id=self.pad_id, eos_token_id=self.eos_ids or None,
                  num_return_sequences=1)
        if cfg.do_sample:
            kw.update(temperature=cfg.temperature, top_k=cfg.top_k or 0,
                      top_p=1.0 if cfg.top_p is None else cfg.top_p)
        if cfg.stop:
            # transformers' StopStringCriteria matches on token strings (handles a stop string split across
            # tokens); it needs the tokenizer. The text is cut again after decoding.
            kw.update(stop_strings=list(cfg.stop), tokenizer=self.tokenizer)
        return kw

    # -- reading outputs ----------------------------------------------------------------------------
    def finish(self, generated: list[int], prompt_len: int, cfg: GenerationConfig) -> GenerationResult:
        """A result from one row of generated ids (prompt already removed). A row that finished before
        the longest row of its batch is followed by padding, which must not count as generated."""
        ids, reason = list(generated), None
        eos = set(self.eos_ids)
        cut = next((k for k, t in enumerate(ids) if t in eos), None)
        if cut is not None:  # EOS ends a row; what follows is padding
            ids, reason = ids[:cut + 1], "stop"
        text = self.decode(ids)
        if self._first_stop(text, cfg.stop) is not None:
            # The tokens generated are those up to the one completing the stop sequence; what follows is
            # padding (which, where pad = eos, looked like a generated EOS above). Binary search for the
            # shortest prefix whose text holds a stop sequence.
            lo, hi = 1, len(ids)
            while lo < hi:
                mid = (lo + hi) // 2
                if self._first_stop(self.decode(ids[:mid]), cfg.stop) is None:
                    lo = mid + 1
                else:
                    hi = mid
            ids, reason = ids[:lo], "stop"
            text = self.decode(ids)
            text = text[:self._first_stop(text, cfg.stop)]
        elif cfg.stop and cut is None and ids and ids[-1] == self.pad_id:
            # Padded without EOS or a stop sequence in the completion: transformers' stop criterion ended
            # the row on a stop sequence that began inside the prompt. (Padding is not stripped otherwise:
            # a model may really generate the pad token, as T5's pad is also its decoder start token.)
            while ids and ids[-1] == self.pad_id:
                ids.pop()
            reason, text = "stop", self.decode(ids)
        if reason is None:
            reason = "length" if len(ids) >= cfg.max_new_tokens else "stop"
        return GenerationResult(text=text, prompt_tokens=prompt_len, completion_tokens=len(ids),
                                finish_reason=reason, token_ids=ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @staticmethod
    def _first_stop(text: str, stops: list[str]) -> int | None:
        hits = [p for p in (text.find(s) for s in stops) if p >= 0]
        return min(hits) if hits else None

    @property
    def decoder_prefix(self) -> list[int]:
        """What a seq2seq decoder reads before its first output (models.decoder_prefix)."""

        return decoder_prefix(self.model)

    @property
    def forced_tokens(self) -> int:
        """Tokens `generate` forces after a seq2seq decoder's start token (a warm start's [MASK], BART's
        BOS); they count in its max_new_tokens but are not output."""
        return len(self.decoder_prefix) - 1 if self.kind == "seq2seq" else 0

    def _completions(self, out, prompt_width: int) -> list[list[int]]:
        # Causal output = padded prompt + new tokens; seq2seq output = the decoder prefix (start token, and
        # a forced first token where the model has one) + new tokens.
        start = prompt_width if self.kind == "causal" else 1 + self.forced_tokens
        return out[:, start:].tolist()

    # -- the entry point ------------------------------------------------------------------------------
    def generate(self, prompts: list[str], cfg: GenerationConfig | None = None,
                 progress: Callable[[int], None] | None = None) -> list[GenerationResult]:
        """One result per prompt, in the input order. `progress(n)` is called after each batch with the
        number of prompts done so far. With do_sample, each batch b is seeded with a seed derived from
        (cfg.seed, b), so results repeat for the same inputs and batch settings."""
        cfg = cfg or GenerationConfig()
        plan = self.plan(prompts, cfg)
        return self.run_plan(plan, range(len(plan.batches)), cfg, progress) if prompts else []

    def plan(self, prompts: list[str], cfg: GenerationConfig) -> "Plan":
        """The prompts encoded and checked, and their batches (generate runs them all; a data-parallel
        evaluation gives each process every world-th batch, so each batch is the one a single process runs)."""
        if isinstance(prompts, str):  # a bare string would be generated for character by character
            raise TypeError("prompts must be a list of strings, not a string")
        encoded = self.encode(prompts) if prompts else []
        lengths = [len(r) for r in encoded]
        if prompts:
            self.check_lengths(lengths, cfg)
        return Plan(encoded, lengths, self.plan_batches(lengths, cfg) if prompts else [])

    def run_plan(self, plan: "Plan", batch_numbers, cfg: GenerationConfig,
                 progress: Callable[[int], None] | None = None) -> list[GenerationResult | None]:
        """The results of the batches numbered `batch_numbers` of `plan`, at their prompts' places (None
        elsewhere)."""
        import torch

        encoded, lengths = plan.encoded, plan.lengths
        kw = self.generate_kwargs(cfg)
        results: list[GenerationResult | None] = [None] * len(encoded)
        done = 0
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.inference_mode(), torch.random.fork_rng(devices=devices, enabled=cfg.do_sample):
            # fork_rng: seeding for sampling must not disturb the caller's random stream (e.g. training).
            for b in batch_numbers:
                batch = plan.batches[b]
                if cfg.do_sample:
                    torch.manual_seed((cfg.seed * 1_000_003 + b) % 2**63)
                ids, mask = self._tensors([encoded[i] for i in batch])
                out = self.model.generate(input_ids=ids, attention_mask=mask, **kw)
                for i, row in zip(batch, self._completions(out, ids.shape[1])):
                    results[i] = self.finish(row, lengths[i], cfg)
                done += len(batch)
                if progress is not None:
                    progress(done)
        return results


@dataclass
class Plan:
    """A generation's prompts as token ids, their lengths, and their batches (prompt indices)."""
    encoded: list[list[int]]
    lengths: list[int]
    batches: list[list[int]]


def generate_one_by_one(model, tokenizer, prompts: list[str], cfg: GenerationConfig | None = None
                        ) -> list[GenerationResult]:
    """The reference: one model.generate call per prompt, no padding at all (the course notebook's loop,
    with the same settings and output handling). Used by tests to check batching changes nothing, and by
    the benchmark as the baseline. With do_sample, prompt i is seeded with (cfg.seed, i)."""
    import torch

    cfg = cfg or GenerationConfig()
    gen = Generator(model, tokenizer)
    encoded = gen.encode(prompts)
    gen.check_lengths([len(r) for r in encoded], cfg)
    kw = gen.generate_kwargs(cfg)
    results = []
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.inference_mode(), torch.random.fork_rng(devices=devices, enabled=cfg.do_sample):
        for i, row in enumerate(encoded):
            if cfg.do_sample:
                torch.manual_seed((cfg.seed * 1_000_003 + i) % 2**63)
            ids = torch.tensor([row], dtype=torch.long, device=model.device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
            results.append(gen.finish(gen._completions(out, ids.shape[1])[0], len(row), cfg))
    return results
