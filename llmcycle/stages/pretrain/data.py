"""Data side of `llmcycle pretrain`: tokenizer training, packing, T5 span corruption or BART-style
denoising, batching.

Kept apart from llmcycle/stages/pretrain/stage.py (model + training loop) so each part stays readable and can be
tested on its own. Heavy imports (tokenizers, transformers, torch) happen inside the functions.

Two ways to turn documents into training examples:
  packed  - all documents are tokenized, joined with EOS between them and cut into equal blocks, so
            every example in every batch has the same length and no compute is spent on padding;
  padded  - one example per document (truncated), each batch padded to its longest example; padding
            positions are masked (attention_mask 0, labels -100) but still cost compute.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llmcycle.core.errors import UserError

T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5's sentencepiece vocabulary
N_SENTINELS = 100
SENTINELS = [f"<extra_id_{i}>" for i in range(N_SENTINELS)]
GPT_EOS = "<|endoftext|>"
GPT_PAD = "<pad>"
IGNORE = -100  # label value the Hugging Face losses skip


# ----------------------------------------------------------------------------------------- corpus
def load_corpus(paths: list[str], project_dir: Path) -> list[str]:
    """Documents from text files: .jsonl -> the `text` field of each line, anything else -> one
    document per non-empty line. Paths are relative to the project directory."""
    docs: list[str] = []
    for name in paths:
        path = (Path(project_dir) / name).resolve()
        if not path.is_file():
            raise UserError(f"pretrain corpus file not found: {path}")
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                if path.suffix == ".jsonl":
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as exc:
                        raise UserError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({exc})") from None
                    if not isinstance(text, str):
                        raise UserError(f"{path}:{lineno}: 'text' must be a string")
                    docs.append(text)
                else:
                    docs.append(line.rstrip("\n"))
    return docs


# -------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], cfg, out_dir: Path | None = None):
    """Train a tokenizer on `texts` and return it as a transformers PreTrainedTokenizerFast.

    The result is always a `tokenizers` fast tokenizer, which AutoTokenizer.from_pretrained loads back
    without any conversion step.

    t5:  a Unigram model trained by sentencepiece (deterministic), run by `tokenizers` with a Metaspace
         pre-tokenizer as sentencepiece does; <pad>=0 </s>=1 <unk>=2, sentinels <extra_id_0..99> for
         span corruption, a post-processor appending </s>.
    gpt: byte-level BPE (GPT-2 style, never produces <unk>), <|endoftext|> as bos and eos, plus <pad>.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise UserError("cannot train a tokenizer: the pretraining corpus is empty")
    if cfg.architecture == "t5":
        # Nmt maps control whitespace (newlines, tabs) to spaces as sentencepiece's nmt_nfkc rule does.
        normalizer = normalizers.Sequence(
            [normalizers.Nmt(), normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
        )
        # The pieces come from sentencepiece's trainer: tokenizers' UnigramTrainer gives a different
        # vocabulary in every process (hash-map order), which would make pretraining unrepeatable.
        pieces = _sentencepiece_pieces([normalizer.normalize_str(t) for t in texts],
                                       cfg.vocab_size - len(SENTINELS))
        tok = Tokenizer(models.Unigram(pieces, unk_id=2))
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        tok.add_special_tokens(T5_SPECIALS + SENTINELS)
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
        )
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=tok, model_max_length=cfg.seq_len, pad_token="<pad>", eos_token="</s>",
            unk_token="<unk>", additional_special_tokens=SENTINELS,
        )
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size, special_tokens=[GPT_EOS, GPT_PAD],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=tok, model_max_length=cfg.seq_len, bos_token=GPT_EOS, eos_token=GPT_EOS,
            unk_token=GPT_EOS, pad_token=GPT_PAD,
        )
    if out_dir is not None:
        wrapped.save_pretrained(str(out_dir))
    return wrapped


def _sentencepiece_pieces(texts: list[str], vocab_size: int) -> list[tuple[str, float]]:
    """(piece, log-probability) pairs of a Unigram model trained by sentencepiece, deterministically.
    Ids 0, 1, 2 are <pad>, </s>, <unk>, as in T5."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=max(vocab_size, 8),
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        hard_vocab_limit=False,  # a small corpus may not support the requested size: use what it has
        max_sentence_length=1 << 16, num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]


def sentinel_ids(tokenizer) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(SENTINELS)
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise UserError("the tokenizer has no <extra_id_N> sentinel tokens, which T5 span corruption needs")
    return ids


def encode_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids per document, without special tokens (callers add EOS where they need it)."""
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return [e.ids for e in encoded]


# --------------------------------------------------------------------------------- span corruption
def _noise_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a raw segment of `length` tokens. The one place these counts
    are computed, so the length arithmetic below and the mask always agree exactly."""
    length = max(length, 2)
    n_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    n_spans = max(int(round(n_noise / mean_span_length)), 1)
    # every noise span needs a kept run before it (see random_spans_noise_mask)
    n_spans = min(n_spans, length - n_noise)
    return n_noise, n_spans


def corrupted_lengths(raw_length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(input length, target length) after corrupting `raw_length` tokens: the input keeps the
    non-noise tokens plus one sentinel per span plus EOS; the target is sentinel+span per span plus EOS."""
    n_noise, n_spans = _noise_counts(raw_length, noise_density, mean_span_length)
    return raw_length - n_noise + n_spans + 1, n_noise + n_spans + 1


def raw_length_for(input_length: int, noise_density: float, mean_span_length: float,
                   sentinel_per_span: bool = True) -> tuple[int, int]:
    """The longest raw block whose corrupted input fits in `input_length` tokens, and its span
    corruption target length (T5's `compute_input_and_target_lengths`). sentinel_per_span False
    (denoising, one mask token for all spans) lifts the limit of 100 spans per block. The input
    length grows by 0 or 1 per raw token
    (a token is either kept or noise; a new span only starts when a noise token is added), so the
    longest fitting block gives an input of exactly `input_length` tokens."""
    raw = 1
    while corrupted_lengths(raw + 1, noise_density, mean_span_length)[0] <= input_length:
        raw += 1
    inp, tgt = corrupted_lengths(raw, noise_density, mean_span_length)
    if inp != input_length:  # only possible for extreme noise settings on very short sequences
        raise UserError(
            f"cannot make span-corrupted inputs of exactly {input_length} tokens with noise_density "
            f"{noise_density} and mean_span_length {mean_span_length}"
        )
    n_spans = _noise_counts(raw, noise_density, mean_span_length)[1]
    if sentinel_per_span and n_spans > N_SENTINELS:
        raise UserError(
            f"seq_len {input_length} needs {n_spans} noise spans per example but there are only "
            f"{N_SENTINELS} sentinel tokens; lower seq_len or raise mean_span_length"
        )
    return raw, tgt


def random_spans_noise_mask(length: int, noise_density: float, mean_span_length: float, rng) -> np.ndarray:
    """Boolean mask, True = noise, with exactly round(length*noise_density) noise tokens split into
    exactly round(noise/mean_span_length) spans (as in T5's random_spans_noise_mask).

    Noise tokens and non-noise tokens are each cut into n_spans non-empty runs at random points;
    the runs are then interleaved non-noise, noise, non-noise, noise, ... so every noise span is
    preceded by kept text and the counts are exact (a per-token coin flip would make them vary,
    and with them the example length)."""
    n_noise, n_spans = _noise_counts(length, noise_density, mean_span_length)
    n_keep = max(length, 2) - n_noise

    def segment(n_items: int, n_segments: int) -> np.ndarray:
        # choose n_segments-1 distinct cut points among the n_items-1 gaps -> n_segments non-empty runs
        cuts = np.sort(rng.choice(n_items - 1, size=n_segments - 1, replace=False)) + 1
        return np.diff(np.concatenate([[0], cuts, [n_items]]))

    noise_lens = segment(n_noise, n_spans)
    keep_lens = segment(n_keep, n_spans)
    mask = np.zeros(max(length, 2), dtype=bool)
    pos = 0
    for k, n in zip(keep_lens, noise_lens):
        pos += k
        mask[pos:pos + n] = True
        pos += n
    return mask[:length]


def span_corrupt(tokens, noise_density: float, mean_span_length: float, sentinels: list[int],
                 eos_id: int, rng) -> tuple[list[int], list[int]]:
    """T5 span corruption of one token sequence: each noise span is replaced in the input by the
    next sentinel (<extra_id_0>, <extra_id_1>, ...); the target lists each sentinel followed by the
    tokens it replaced. Both end with EOS."""
    tokens = np.asarray(tokens)
    if len(tokens) < 2:  # nothing to hide: predict just EOS
        return [*tokens.tolist(), eos_id], [eos_id]
    mask = random_spans_noise_mask(len(tokens), noise_density, mean_span_length, rng)
    inputs: list[int] = []
    targets: list[int] = []
    span = -1
    prev = False
    for tok, is_noise in zip(tokens.tolist(), mask.tolist()):
        if is_noise:
            if not prev:  # a new span starts
                span += 1
                inputs.append(sentinels[span])
                targets.append(sentinels[span])
            targets.append(tok)
        else:
            inputs.append(tok)
        prev = is_noise
    return inputs + [eos_id], targets + [eos_id]


def denoise(tokens, noise_density: float, mean_span_length: float, mask_id: int, eos_id: int,
            rng) -> tuple[list[int], list[int]]:
    """BART's text infilling on one token sequence: the same random spans as span_corrupt, each
    replaced in the input by the single mask token; the target is the whole original sequence. Both
    end with EOS. Inputs are exactly as long as span_corrupt's, so the packed block sizes carry over."""
    tokens = np.asarray(tokens)
    if len(tokens) < 2:
        return [*tokens.tolist(), eos_id], [*tokens.tolist(), eos_id]
    mask = random_spans_noise_mask(len(tokens), noise_density, mean_span_length, rng)
    starts = mask & ~np.concatenate([[False], mask[:-1]])  # first token of each noise span
    inputs = np.where(starts, mask_id, tokens)[~mask | starts]
    return [*inputs.tolist(), eos_id], [*tokens.tolist(), eos_id]


# ------------------------------------------------------------------------------------- datasets
class PretrainDataset:
    """The fixed list of raw token sequences of one run, and how each becomes a training example.

    Raw sequences are built once (deterministically from the texts). For T5 the noise mask is drawn
    when an example is requested, from a generator seeded by (seed, epoch, index): each epoch sees a
    fresh corruption, yet any batch can be rebuilt exactly on resume without saving RNG state."""

    def __init__(self, cfg, tokenizer, texts: list[str]):
        self.arch = cfg.architecture
        self.packing = cfg.packing
        self.seed = cfg.seed
        self.noise_density = cfg.noise_density
        self.mean_span_length = cfg.mean_span_length
        self.objective = cfg.objective
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        self.sentinels = sentinel_ids(tokenizer) if self.arch == "t5" else []
        docs = [d for d in encode_documents(tokenizer, texts) if d]
        if not docs:
            raise UserError("the pretraining corpus has no tokens")
        if self.arch == "t5":
            raw_len, self.target_len = raw_length_for(cfg.seq_len, cfg.noise_density, cfg.mean_span_length,
                                                      sentinel_per_span=self.objective == "span_corruption")
            if self.objective == "denoising":
                self.target_len = raw_len + 1  # the whole block back, then EOS
        else:
            raw_len, self.target_len = cfg.seq_len, cfg.seq_len
        self.raw_len = raw_len
        if self.packing:
            # one token stream, EOS between documents, cut into equal blocks; the tail that does not
            # fill a whole block is dropped (at most one block's worth of tokens)
            stream = np.fromiter((t for d in docs for t in (*d, self.eos)), dtype=np.int64)
            n_blocks = len(stream) // raw_len
            if n_blocks == 0:
                raise UserError(
                    f"the pretraining corpus has {len(stream)} tokens, fewer than one packed block of "
                    f"{raw_len}; add text or lower seq_len"
                )
            self.items = [stream[i * raw_len:(i + 1) * raw_len] for i in range(n_blocks)]
        else:
            # one example per document; GPT documents end with EOS so the model learns to stop
            if self.arch == "t5":
                self.items = [np.asarray(d[:raw_len]) for d in docs]
            else:
                self.items = [np.asarray((d + [self.eos])[:raw_len]) for d in docs]

    def __len__(self) -> int:
        return len(self.items)

    def example(self, index: int, epoch: int) -> tuple[list[int], list[int]]:
        """(input ids, labels) of item `index` in `epoch`."""
        toks = self.items[index]
        if self.arch == "gpt":
            ids = toks.tolist()
            return ids, ids  # the model shifts labels internally
        rng = np.random.default_rng([self.seed, epoch, index])
        if self.objective == "denoising":
            return denoise(toks, self.noise_density, self.mean_span_length, self.sentinels[0], self.eos, rng)
        return span_corrupt(toks, self.noise_density, self.mean_span_length, self.sentinels, self.eos, rng)

    def order(self, epoch: int) -> np.ndarray:
        """The shuffled item order of an epoch, seeded by (seed, epoch) so a resumed run replays it."""
        return np.random.default_rng([self.seed, epoch, 7919]).permutation(len(self.items))

    def batch(self, indices, epoch: int) -> dict:
        return collate([self.example(int(i), epoch) for i in indices], self.arch, self.pad)


def collate(examples: list[tuple[list[int], list[int]]], arch: str, pad_id: int) -> dict:
    """Tensors for a batch, padded on the right to the longest example (a no-op for packed blocks,
    which all have the same length). Padding: input pad_id + attention_mask 0, labels -100."""
    import torch

    n = len(examples)
    in_len = max(len(x) for x, _ in examples)
    input_ids = torch.full((n, in_len), pad_id, dtype=torch.long)
    attention = torch.zeros((n, in_len), dtype=torch.long)
    for r, (x, _) in enumerate(examples):
        input_ids[r, :len(x)] = torch.tensor(x, dtype=torch.long)
        attention[r, :len(x)] = 1
    if arch == "gpt":
        labels = input_ids.masked_fill(attention == 0, IGNORE)
    else:
        lab_len = max(len(y) for _, y in examples)
        labels = torch.full((n, lab_len), IGNORE, dtype=torch.long)
        for r, (_, y) in enumerate(examples):
            labels[r, :len(y)] = torch.tensor(y, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def batch_token_counts(batch: dict, arch: str) -> tuple[int, int]:
    """(useful tokens, total positions) the model processes for `batch`.

    Useful = non-padding positions: encoder inputs + decoder positions (one per real label) for T5,
    the input positions for GPT (its labels are the same tokens, shifted inside the model). Total
    counts padding too, so 1 - useful/total is the fraction of compute spent on padding."""
    useful = int(batch["attention_mask"].sum())
    total = batch["input_ids"].numel()
    if arch == "t5":
        useful += int((batch["labels"] != IGNORE).sum())
        total += batch["labels"].numel()
    return useful, total


def useful_tokens(batch: dict, arch: str) -> int:
    """Non-padding input + label tokens in `batch` (see batch_token_counts)."""
    return batch_token_counts(batch, arch)[0]
