"""Padding-free packing (llmcycle/training/batches.py pack, llmcycle/training/packing.py): one row of
concatenated examples gives exactly the padded batch's loss and gradients, and the probe says which
models (and loss functions) keep the examples apart."""
import pytest
import torch
import torch.nn.functional as F

from llmcycle.training.batches import collate, pack
from llmcycle.training.packing import packing_supported
from tiny import make_chat_model, make_gpt2


def _sum_loss(model, batch, kind, use_cache=False, positions=True):
    """loop.sum_loss's causal loss with the forward a packed batch needs: position_ids passed, cache off.
    use_cache / positions switch those off, to show the probe noticing."""
    assert kind == "causal"
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch.get("position_ids") if positions else None, use_cache=use_cache).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


def _features(lengths, prompts, seed=0):
    """Causal features of the given lengths, -100 on each one's first `prompt` tokens (0: no prompt,
    so the first label is a real token, the case pack's label boundary is for)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (n, p) in enumerate(zip(lengths, prompts)):
        ids = torch.randint(10, 250, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:], "index": i})
    return out


LENGTHS, PROMPTS = [9, 4, 15, 7], [5, 0, 11, 0]
FEATURES = _features(LENGTHS, PROMPTS)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _load(make_chat_model(tmp_path_factory.mktemp("llama"), "llama3"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return _load(make_gpt2(tmp_path_factory.mktemp("gpt2")))


def test_pack_by_hand():
    features = [{"input_ids": [11, 12, 13], "labels": [-100, 12, 13], "index": 0},
                {"input_ids": [21, 22], "labels": [21, 22], "index": 1}]
    batch = pack(features, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: see pack
    assert all(t.shape == (1, 5) and t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # 21 would be predicted from 13, the previous example's last token: not a target
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22]]
    padded = pack(features, pad_id=0, multiple=4)  # a trailing pad segment, its own sequence
    assert padded["input_ids"].tolist() == [[11, 12, 13, 21, 22, 0, 0, 0]]
    assert padded["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert padded["labels"].tolist() == [[-100, 12, 13, -100, 22, -100, -100, -100]]


@pytest.mark.parametrize("multiple", [1, 8])
def test_packed_loss_and_gradients_equal_the_padded_batchs(llama, multiple):
    model = llama
    model.train()
    grads = []
    for batch in (collate(FEATURES, 0), pack(FEATURES, 0, multiple)):
        model.zero_grad()
        loss, n = _sum_loss(model, batch, "causal")
        loss.backward()
        grads.append((loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (padded, n_padded, g_padded), (packed, n_packed, g_packed) = grads
    assert n_packed == n_padded == sum(n - max(p, 1) for n, p in zip(LENGTHS, PROMPTS))
    assert packed.item() == pytest.approx(padded.item(), rel=1e-5)
    for name, grad in g_padded.items():
        assert torch.allclose(g_packed[name], grad, atol=1e-5), name
    model.zero_grad()


def test_probe_says_llama_and_gpt2_keep_packed_examples_apart(llama, gpt2):
    # transformers 5.x builds GPT-2's mask with create_causal_mask too, and its learned position
    # embeddings read position_ids, so GPT-2 packs as exactly as Llama
    llama.train()
    assert packing_supported(llama, FEATURES, 0, _sum_loss)
    assert llama.training  # the probe puts the mode back
    assert packing_supported(gpt2, FEATURES, 0, _sum_loss)


def test_probe_says_no_when_examples_see_each_other(llama):
    state = torch.get_rng_state()
    # with the cache on (config.use_cache is) transformers skips packed-sequence detection: no boundaries
    assert not packing_supported(llama, FEATURES, 0, lambda m, b, k: _sum_loss(m, b, k, use_cache=True))
    # without position_ids the packed row is one long sequence
    assert not packing_supported(llama, FEATURES, 0, lambda m, b, k: _sum_loss(m, b, k, positions=False))
    # a loss that needs an attention_mask fails on the packed batch: a "no", not an error
    assert not packing_supported(llama, FEATURES, 0, lambda m, b, k: _sum_loss(m, {**b, "x": b["attention_mask"]}, k))
    assert not packing_supported(llama, FEATURES[:1], 0, _sum_loss)  # one example proves nothing
    assert torch.equal(torch.get_rng_state(), state)
