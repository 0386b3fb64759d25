"""Tests of llmcycle.stages.align.ppo: each piece of PPO math against values worked out by hand, the reference model,
masking, padding, checkpoints and resume, bad input, and end-to-end learning on tiny T5 and GPT-2 models."""
from __future__ import annotations

import math

import pytest
import torch

from llmcycle.core.errors import UserError
from llmcycle.stages.align.ppo import (AdaptiveKLController, FixedKLController, PPOSettings, PPOTrainer, Rollout,
                          end_at_eos, gae, kl_penalized_rewards, policy_loss, value_loss, whiten)
from tiny import make_gpt2, make_t5

# LoRA on lm_head too: the tiny models' output layers are where a token's probability can move quickly.
# (peft warns that lm_head is tied to the embeddings; the adapter never merges here, so that is harmless.)
pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
TARGETS = {"seq2seq": ["q", "v", "lm_head"], "causal": ["c_attn", "lm_head"]}
PROMPTS = ["summarize: the cat sat", "the quick brown fox", "translate English to German: hi",
           "question: what is two plus two?"]


def count_bangs(prompts, responses):
    return [float(r.count("!")) for r in responses]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo-models")
    return {"seq2seq": make_t5(root / "t5"), "causal": make_gpt2(root / "gpt2")}


def load(dirs, kind):
    from llmcycle.models.load import load_model

    return load_model(str(dirs[kind]), dtype="float32", device="cpu")


def lora_policy(dirs, kind, r=8):
    from peft import LoraConfig, get_peft_model

    from llmcycle.training.finetune import task_type

    model, tok = load(dirs, kind)
    torch.manual_seed(0)  # LoRA A's init
    cfg = LoraConfig(task_type=task_type(kind), r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS[kind])
    return get_peft_model(model, cfg), tok


def settings(**kw):
    base = dict(steps=4, batch_size=4, mini_batch_size=2, ppo_epochs=2, lr=1e-2, min_new_tokens=3, max_new_tokens=6)
    return PPOSettings(**{**base, **kw})


# ------------------------------------------------------------------------------------- the math
def test_kl_penalized_rewards_by_hand():
    scores = torch.tensor([1.0, -2.0])
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, -9.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = kl_penalized_rewards(scores, logp, ref, mask, kl_coef=0.1)
    # kl = logp - ref (0 where masked); reward = -0.1 * kl, plus the score on the last unmasked token
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -1.0], [0.5, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 0.1 + 1.0], [-0.05, 0.0 - 2.0, 0.0]]))


def test_gae_three_tokens_by_hand():
    rewards, values = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.5, 1.0, 1.5]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    # t=2: delta = 2 - 1.5 = 0.5 (episode ends: next value 0);   A2 = 0.5
    # t=1: delta = 0 + 0.9*1.5 - 1.0 = 0.35;                     A1 = 0.35 + 0.72*0.5 = 0.71
    # t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4;                      A0 = 1.4 + 0.72*0.71 = 1.9112
    assert torch.allclose(adv, torch.tensor([[1.9112, 0.71, 0.5]]))
    assert torch.allclose(ret, torch.tensor([[2.4112, 1.71, 2.0]]))


def test_gae_ignores_everything_after_the_response():
    rewards, values = torch.tensor([[1.0, 2.0, 5.0]]), torch.tensor([[0.5, 1.0, 9.0]])
    adv, ret = gae(rewards, values, torch.tensor([[1.0, 1.0, 0.0]]), gamma=0.9, lam=0.8)
    # t=1 is the last token: delta = 2 - 1 = 1, A1 = 1;  t=0: delta = 1 + 0.9*1 - 0.5 = 1.4, A0 = 1.4 + 0.72 = 2.12
    assert torch.allclose(adv, torch.tensor([[2.12, 1.0, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[2.62, 2.0, 0.0]]))


def test_whiten_by_hand():
    x, mask = torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    # mean 2, unbiased variance (1 + 0 + 1) / 2 = 1; the masked 100 plays no part
    assert torch.allclose(whiten(x, mask), torch.tensor([-1.0, 0.0, 1.0, 0.0]), atol=1e-6)
    assert torch.allclose(whiten(x, mask, shift_mean=False), torch.tensor([1.0, 2.0, 3.0, 0.0]), atol=1e-6)


def test_policy_loss_clips_on_both_sides():
    ratios = [1.5, 0.5, 1.1, 0.5, 1.5, 3.0]
    new = torch.tensor([math.log(r) for r in ratios], requires_grad=True)
    old = torch.zeros(6)
    adv = torch.tensor([1.0, -1.0, 2.0, 2.0, -1.0, 5.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    loss, clipfrac, approx_kl = policy_loss(new, old, adv, mask, cliprange=0.2)
    # per token max(-A*r, -A*clip(r, 0.8, 1.2)):
    #   r 1.5, A +1: max(-1.5, -1.2) = -1.2  clipped above   r 0.5, A -1: max(0.5, 0.8) = 0.8  clipped below
    #   r 1.1, A +2: -2.2 (inside the range)                 r 0.5, A +2: max(-1.0, -1.6) = -1.0  (pessimistic: no clip)
    #   r 1.5, A -1: max(1.5, 1.2) = 1.5  (no clip)           the 6th token is masked out
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2 - 1.0 + 1.5) / 5)
    assert clipfrac.item() == pytest.approx(2 / 5)
    assert approx_kl.item() == pytest.approx(0.5 * sum(math.log(r) ** 2 for r in ratios[:5]) / 5)
    loss.backward()
    # clipped tokens pass no gradient; an unclipped one gets d(-A*r)/dlogp / 5 = -A*r/5
    assert new.grad[0].item() == 0.0 and new.grad[1].item() == 0.0 and new.grad[5].item() == 0.0
    assert new.grad[3].item() == pytest.approx(-2.0 * 0.5 / 5)
    assert new.grad[4].item() == pytest.approx(1.0 * 1.5 / 5)


def test_value_loss_clipping_by_hand():
    old, new = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.5, 0.9, 0.5])
    returns, mask = torch.tensor([2.0, 0.0, 1.0]), torch.ones(3)
    loss, clipfrac = value_loss(new, old, returns, mask, cliprange_value=0.2)
    # 1.5 -> clipped 1.2: max((1.5-2)^2, (1.2-2)^2) = 0.64 (clip active); 0.9 inside: 0.81;
    # 0.5 -> clipped 0.8: max((0.5-1)^2, (0.8-1)^2) = 0.25 (the unclipped error is larger)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 0.25) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)


def test_kl_controllers_by_hand():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(9.0, 16)  # error 9/6 - 1 = 0.5, clipped to 0.2: x (1 + 0.2 * 16 / 10000)
    assert ctl.value == pytest.approx(0.2 * 1.00032)
    ctl.update(5.4, 100)  # error -0.1: x (1 - 0.1 * 100 / 10000)
    assert ctl.value == pytest.approx(0.2 * 1.00032 * 0.999)
    fixed = FixedKLController(0.3)
    fixed.update(100.0, 16)
    assert fixed.value == 0.3
    fixed.load_state_dict(ctl.state_dict())
    assert fixed.value == ctl.value


def test_end_at_eos_keeps_the_eos_and_masks_what_follows():
    response = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 4, 4, 4]])
    ids, mask = end_at_eos(response, eos_ids=[1], pad_id=0)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ids.tolist() == [[5, 1, 0, 0], [5, 6, 7, 8], [1, 0, 0, 0]]


# ------------------------------------------------------------------------------ policy and reference
def test_reference_is_the_adapter_disabled_base_and_the_base_never_changes(dirs):
    policy, tok = lora_policy(dirs, "seq2seq")
    base_before = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    trainer = PPOTrainer(policy, tok, "seq2seq", count_bangs, settings(steps=3))
    trainer.train(PROMPTS, progress=False)
    for n, p in policy.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n
    changed = [n for n, before in lora_before.items() if not torch.equal(dict(policy.named_parameters())[n], before)]
    assert changed == list(lora_before)  # every adapter weight moved

    roll = trainer.rollout(PROMPTS, step=99)
    with torch.no_grad():
        with trainer._reference() as ref:
            ref_logp, _, _ = trainer.forward(ref, roll, slice(None), values=False)
        base, _ = load(dirs, "seq2seq")  # the untouched model from disk
        base_logp, _, _ = trainer.forward(base, roll, slice(None), values=False)
        policy_logp, _, _ = trainer.forward(policy, roll, slice(None), values=False)
    m = roll.mask.bool()
    assert torch.allclose(ref_logp[m], base_logp[m], atol=1e-6)
    assert (policy_logp[m] - base_logp[m]).abs().max() > 1e-3  # the trained policy is not the reference


def test_full_policy_reference_is_a_frozen_copy(dirs):
    policy, tok = load(dirs, "causal")
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    trainer = PPOTrainer(policy, tok, None, count_bangs, settings(steps=2))
    assert trainer.kind == "causal" and trainer.ref_policy is not policy
    trainer.train(PROMPTS, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in trainer.ref_policy.named_parameters())
    assert not any(p.requires_grad for p in trainer.ref_policy.parameters())
    assert all(not torch.equal(p, before[n]) for n, p in policy.named_parameters())


def test_left_padding_does_not_change_causal_logprobs_or_values(dirs):
    policy, tok = lora_policy(dirs, "causal")
    trainer = PPOTrainer(policy, tok, "causal", count_bangs, settings())
    roll = trainer.rollout(PROMPTS, step=0)
    j = min(range(len(PROMPTS)), key=lambda i: int(roll.query_mask[i].sum()))  # the most padded row
    assert roll.query_mask[j, 0] == 0
    query = roll.query[j:j + 1][:, roll.query_mask[j].bool()]  # the prompt without its padding
    alone = Rollout(query, torch.ones_like(query), roll.response[j:j + 1], roll.mask[j:j + 1], roll.texts[j:j + 1])
    with torch.no_grad():
        lp_batch, v_batch, _ = trainer.forward(policy, roll, slice(None), values=True)
        lp_alone, v_alone, _ = trainer.forward(policy, alone, slice(None), values=True)
    m = roll.mask[j].bool()
    assert torch.allclose(lp_batch[j][m], lp_alone[0][m], atol=1e-5)
    assert torch.allclose(v_batch[j][m], v_alone[0][m], atol=1e-5)


@pytest.mark.parametrize("kind", ["seq2seq", "causal"])
def test_chunked_forward_with_reused_encoder_matches_one_batch(dirs, kind):
    """forward_all runs length-sorted chunks without all-padding columns and, for seq2seq, takes the
    encoder output computed for generation; the results must be those of one plain batched forward."""
    policy, tok = lora_policy(dirs, kind)
    trainer = PPOTrainer(policy, tok, kind, count_bangs, settings(steps=1))
    trainer.train(PROMPTS, progress=False)  # the adapter moves away from 0
    roll = trainer.rollout(PROMPTS[::-1], step=5)  # longest first is not index order, within chunks too
    assert (roll.encoder_hidden is not None) == (kind == "seq2seq")
    with torch.no_grad():
        whole = trainer.forward(policy, roll, slice(None), values=True, entropy=True)
        chunked = trainer.forward_all(policy, roll, values=True, entropy=True, reuse_encoder=kind == "seq2seq")
    m = roll.mask.bool()
    for a, b in zip(whole, chunked):
        assert torch.allclose(a[m], b[m], atol=1e-5)


def test_step_statistics_and_response_lengths(dirs):
    policy, tok = lora_policy(dirs, "seq2seq")
    trainer = PPOTrainer(policy, tok, "seq2seq", count_bangs, settings(min_new_tokens=2, max_new_tokens=5))
    lengths = {trainer.response_length(s) for s in range(40)}
    assert lengths <= {2, 3, 4, 5} and len(lengths) > 1
    logged = []
    trainer.train(PROMPTS, log=logged.append, progress=False)
    assert [s["step"] for s in logged] == [1, 2, 3, 4]
    keys = {"reward_mean", "reward_std", "score_mean", "kl", "kl_coef", "entropy", "clipfrac", "value_loss",
            "policy_loss", "approx_kl", "response_length", "seconds", "value_clipfrac"}
    assert keys <= set(logged[0])
    assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # LoRA B starts at 0: policy = reference
    for i, s in enumerate(logged):
        assert 1 <= s["response_length"] <= trainer.response_length(i)
        assert all(math.isfinite(v) for v in s.values())


# ------------------------------------------------------------------------------------ checkpoints
def trained_state(trainer):
    named = dict(trainer.policy.named_parameters())
    params = {n: p.detach().clone() for n, p in named.items() if p.requires_grad}
    params.update({f"value_head.{n}": p.detach().clone() for n, p in trainer.value_head.named_parameters()})
    return params


@pytest.mark.parametrize("kind, lora", [("seq2seq", True), ("causal", False)])
def test_resume_ends_where_an_uninterrupted_run_ends(dirs, tmp_path, kind, lora):
    make = (lambda: lora_policy(dirs, kind)) if lora else (lambda: load(dirs, kind))
    s = dict(adaptive_kl=True, kl_horizon=10, target_kl=0.5, checkpoint_every=2)  # the KL coefficient moves

    straight = PPOTrainer(*make(), kind, count_bangs, settings(steps=4, **s))
    full_history = straight.train(PROMPTS, progress=False)["history"]

    first = PPOTrainer(*make(), kind, count_bangs, settings(steps=2, **s))
    first.train(PROMPTS, checkpoint_dir=tmp_path, progress=False)
    ckpt = tmp_path / "step-2"
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "model" / "value_head.safetensors").is_file()
    assert (ckpt / "model" / ("adapter_model.safetensors" if lora else "policy.safetensors")).is_file()

    resumed = PPOTrainer(*make(), kind, count_bangs, settings(steps=4, **s))
    rewound = []
    result = resumed.train(PROMPTS, checkpoint_dir=tmp_path, resume=True, progress=False, on_resume=rewound.append)
    # the history (what the summary's first/last figures are computed from) covers every step,
    # the two before the checkpoint read back from it
    history = result["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4] and rewound == [2]
    assert result["resumed_from"]["step"] == 2 and result["resumed_from"]["checkpoint"].endswith("step-2")
    assert result["seconds"] >= sum(h["seconds"] for h in history)  # the first session's steps included
    for a, b in zip(full_history, history):
        assert a["score_mean"] == b["score_mean"] and a["kl"] == pytest.approx(b["kl"], abs=1e-5)
    assert resumed.kl_ctl.value == pytest.approx(straight.kl_ctl.value, rel=1e-9)
    assert straight.kl_ctl.value != pytest.approx(0.2)
    want, got = trained_state(straight), trained_state(resumed)
    assert want.keys() == got.keys()
    for n in want:
        assert torch.allclose(want[n], got[n], atol=1e-6), n
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-4"]


def test_resume_with_other_settings_is_refused(dirs, tmp_path):
    policy, tok = lora_policy(dirs, "seq2seq")
    PPOTrainer(policy, tok, "seq2seq", count_bangs, settings(steps=1)).train(PROMPTS, checkpoint_dir=tmp_path,
                                                                             progress=False)
    policy, tok = lora_policy(dirs, "seq2seq")
    other = PPOTrainer(policy, tok, "seq2seq", count_bangs, settings(steps=2, lr=5e-3))
    with pytest.raises(UserError, match="lr: 0.01 → 0.005"):
        other.train(PROMPTS, checkpoint_dir=tmp_path, resume=True, progress=False)


# ------------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_before_training(dirs):
    from pydantic import ValidationError

    policy, tok = lora_policy(dirs, "causal")
    with pytest.raises(UserError, match="batch_size 6 is not a multiple of mini_batch_size 4"):
        PPOTrainer(policy, tok, "causal", count_bangs, settings(batch_size=6, mini_batch_size=4))
    with pytest.raises(UserError, match="min_new_tokens 9 is more than max_new_tokens 6"):
        PPOTrainer(policy, tok, "causal", count_bangs, settings(min_new_tokens=9))
    with pytest.raises(UserError, match="no tokenizer"):
        PPOTrainer(policy, None, "causal", count_bangs, settings())
    with pytest.raises(UserError, match="kind 'seq2seq' given, but the policy is a causal model"):
        PPOTrainer(policy, tok, "seq2seq", count_bangs, settings())
    for bad in ({"steps": 0}, {"batch_size": 0}, {"lr": 0}, {"top_p": 1.5}, {"stepz": 3}):
        with pytest.raises(ValidationError):
            settings(**bad)

    trainer = PPOTrainer(policy, tok, "causal", count_bangs, settings())
    with pytest.raises(UserError, match="no prompts"):
        trainer.train([], progress=False)
    with pytest.raises(UserError, match="prompt 1 has .* over the context window of 128"):
        trainer.train(["hi", "the quick brown fox " * 40], progress=False)
    with pytest.raises(UserError, match="takes batch_size = 4 prompts, got 3"):
        trainer.step(PROMPTS[:3])
    short = PPOTrainer(policy, tok, "causal", lambda p, r: [1.0], settings())
    with pytest.raises(UserError, match="returned 1 scores for 4 responses"):
        short.step(PROMPTS)
    nan = PPOTrainer(policy, tok, "causal", lambda p, r: [float("nan")] * len(r), settings())
    with pytest.raises(UserError, match="not a finite number"):
        nan.step(PROMPTS)


# ------------------------------------------------------------------------------------ learning
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["seq2seq", "causal"])
def test_ppo_learns_to_say_the_rewarded_token_with_bounded_kl(dirs, kind):
    """Reward = number of '!' in an 8-token response; the untrained policy says it about once in 320
    tokens (score ~0.08). Measured with seeds 42, 1, 2, 3: with kl_coef 0.2 the score of the last 10
    of 50 steps is 1.5-3.9 and their KL per response 5-15 nats (at most 20 at any step); with kl_coef
    0.1 the KL runs to 31-35, near collapse (8 x ln 320 = 46 for a policy that only says '!')."""
    policy, tok = lora_policy(dirs, kind)
    s = PPOSettings(steps=50, batch_size=16, mini_batch_size=8, ppo_epochs=4, lr=3e-3, init_kl_coef=0.2,
                    adaptive_kl=False, min_new_tokens=8, max_new_tokens=8)
    history = PPOTrainer(policy, tok, kind, count_bangs, s).train(PROMPTS * 4, progress=False)["history"]
    mean = lambda key, rows: sum(h[key] for h in rows) / len(rows)  # noqa: E731
    first, last = mean("score_mean", history[:5]), mean("score_mean", history[-10:])
    assert first < 0.3
    assert last > 1.0 and last > 4 * first
    assert mean("kl", history[-10:]) < 25.0
    assert max(h["kl"] for h in history) < 35.0
