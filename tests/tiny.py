"""Tiny models and tokenizers built in code, so tests need neither the network nor a model cache.

The tokenizer is byte-level BPE: it encodes any text (no unknown tokens) and decodes it back exactly, so
tests of training, generation and evaluation can round-trip arbitrary strings.
"""
from __future__ import annotations

from pathlib import Path

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "summarize: the cat sat on the mat and looked at the dog",
    "translate English to German: the house is wonderful",
    "a tiny model for tests learns nothing useful but runs fast",
    "question: what is two plus two? answer: four",
    "Hello, world! 0123456789 .,;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~`",
]
PAD, EOS, UNK, BOS = "<pad>", "</s>", "<unk>", "<s>"


def make_tokenizer(dir, kind: str = "seq2seq", texts=None, vocab_size: int = 320):
    """Train a byte-level BPE tokenizer and save it to `dir` (created); returns the folder.

    seq2seq: T5-style, pad id 0, eos id 1, eos appended to every encoded text.
    causal: GPT-2-style, eos (= bos) and unk but deliberately no pad token, like real GPT-2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind not in ("seq2seq", "causal"):
        raise ValueError(f"kind must be seq2seq or causal, not {kind!r}")
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    specials = [PAD, EOS, UNK] if kind == "seq2seq" else [EOS, UNK]
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts or CORPUS), trainer=trainer)
    if kind == "seq2seq":
        eos_id = tok.token_to_id(EOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, eos_id)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=UNK)
    fast.save_pretrained(str(dir))
    return dir


def _vocab(dir) -> tuple[int, int | None, int]:
    """(vocab size, pad id or None, eos id) of the tokenizer saved in `dir`."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(dir) / "tokenizer.json"))
    return tok.get_vocab_size(with_added_tokens=True), tok.token_to_id(PAD), tok.token_to_id(EOS)


def make_t5(dir, tokenizer: bool = True, seed: int = 0):
    """A T5 with d_model 16 and 2+2 layers (a few thousand parameters) saved to `dir`; returns the folder."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    dir = Path(dir)
    make_tokenizer(dir, "seq2seq")
    size, pad, eos = _vocab(dir)
    if not tokenizer:
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (dir / f).unlink(missing_ok=True)
    config = T5Config(vocab_size=size, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
                      num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                      dropout_rate=0.0, pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad)
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(str(dir))
    return dir


def make_gpt2(dir, tokenizer: bool = True, seed: int = 0, n_positions: int = 128):
    """A GPT-2 with n_embd 16 and 2 layers saved to `dir`; returns the folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    dir = Path(dir)
    make_tokenizer(dir, "causal")
    size, _, eos = _vocab(dir)
    if not tokenizer:
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (dir / f).unlink(missing_ok=True)
    config = GPT2Config(vocab_size=size, n_embd=16, n_layer=2, n_head=2, n_positions=n_positions,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(str(dir))
    return dir


BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_bert(dir, seed: int = 0, labels: list[str] | None = None, num_labels: int | None = None,
              texts=None, hidden: int = 32, initializer_range: float = 0.02):
    """A BERT with 2 layers of width `hidden` and a byte-level BPE tokenizer that wraps texts in
    [CLS] ... [SEP], saved to `dir`; returns the folder. Without labels / num_labels: the bare encoder
    (like all-MiniLM-L6-v2, no classification head); with them: a sequence classifier (random head)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, BertModel, PreTrainedTokenizerFast

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=BERT_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts or CORPUS), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(str(dir))
    config = BertConfig(vocab_size=tok.get_vocab_size(with_added_tokens=True), hidden_size=hidden,
                        num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        pad_token_id=tok.token_to_id("[PAD]"), initializer_range=initializer_range)
    torch.manual_seed(seed)
    if labels is None and num_labels is None:
        BertModel(config).save_pretrained(str(dir))
        return dir
    if labels is not None:
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    else:
        config.num_labels = num_labels
    BertForSequenceClassification(config).save_pretrained(str(dir))
    return dir


DOCS = {"tower.txt": "The Eiffel Tower in Paris was finished in 1889 and is 330 metres tall.",
        "oslo.md": "# Oslo\nOslo is the capital of Norway, at the head of the Oslofjord.",
        "leave.txt": "Employees get twenty-five days of paid annual leave each year."}


def make_doc_index(root):
    """Three short documents under root/docs and their llmcycle index (the offline MiniLM) in root/index."""
    from llmcycle.augment.index import build_index

    (root / "docs").mkdir(parents=True, exist_ok=True)
    for name, text in DOCS.items():
        (root / "docs" / name).write_text(text, encoding="utf-8")
    build_index([root / "docs"], root / "index", progress=False)
    return root / "index"


# -- chat models ----------------------------------------------------------------------------------------
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT_STYLES = {
    # specials, bos, eos of an instruct release, eos of a base release, pad, template
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", None, LLAMA3_TEMPLATE),
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>",
               "<|endoftext|>", CHATML_TEMPLATE),
}


def make_chat_model(dir, style: str = "llama3", base_release: bool = False, seed: int = 0, texts=None):
    """A tiny chat model saved to `dir`: llama3 (Llama-3 architecture with grouped-query attention,
    byte-level BPE, the Llama-3 chat template, no pad token) or chatml (Qwen2 architecture, ChatML
    template, <|endoftext|> pads). base_release: the tokenizer's eos is the end-of-text token while the
    template's turns end with <|eot_id|> / <|im_end|>, as in Llama-3 and Qwen2 base releases."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers import Qwen2Config, Qwen2ForCausalLM

    specials, bos, eot, text_end, pad, template = CHAT_STYLES[style]
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts or CORPUS), trainer=trainer)
    eos = text_end if base_release else eot
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    fast.chat_template = template
    fast.save_pretrained(str(dir))
    ids = {t: tok.token_to_id(t) for t in specials}
    common = dict(vocab_size=tok.get_vocab_size(with_added_tokens=True), hidden_size=16, intermediate_size=32,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=ids[eos], bos_token_id=ids.get(bos), pad_token_id=ids.get(pad),
                  tie_word_embeddings=False)
    torch.manual_seed(seed)
    if style == "llama3":
        model = LlamaForCausalLM(LlamaConfig(head_dim=4, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    # An instruct release lists both end tokens for generation; a base release only its end of text.
    stops = [ids[text_end]] if base_release else [ids[text_end], ids[eot]]
    model.generation_config = GenerationConfig(bos_token_id=ids.get(bos), eos_token_id=stops,
                                               pad_token_id=ids.get(pad))
    model.save_pretrained(str(dir))
    return dir
