"""Seconds per GRPO step: llmcycle's GroupTrainer vs TRL's GRPOTrainer (causal), and our seq2seq GRPO vs our PPO.

1. causal: a GPT-2-shaped model built here (random weights from --seed; width --width, --layers layers,
   the byte-level BPE of tests/tiny.py, 320 tokens), loaded twice from the same folder, once per side,
   each wrapped in the same LoRA adapter (r 8, alpha 16, no dropout, on c_attn / c_proj / c_fc, drawn
   after torch.manual_seed(--seed) on both sides, so both start from identical weights). One step =
   --prompts prompts x --group completions sampled at temperature 1 (top-k / top-p off), at most
   --new-tokens each; reward = rewards.combine of exact_answer (the same function on both sides,
   references = the `answer` column for TRL); advantages relative to the group (mean, std); one
   optimizer step over all completions (llmcycle: mini_batch_size = prompts x group; TRL:
   per_device_train_batch_size = generation_batch_size = prompts x group, num_iterations 1); the k3 KL
   to the reference (the adapter-disabled base) with beta 0.04 on both, so both run the reference
   pass; clip 0.2; token-level mean loss (TRL's default `dapo`); Adam(W) lr --lr, no weight decay,
   constant schedule, fused, grad-norm clip 1.0; float32 on the CPU, --threads torch threads.
     llmcycle  GroupTrainer.step(prompts, references), timed around the call (its own `seconds`)
     trl       GRPOTrainer.train() with max_steps = warm-up + timed steps, each step timed by a
               TrainerCallback from on_step_begin to on_step_end (generation, rewards, reference pass,
               loss, backward, clip, optimizer step; not the data loader or logging between steps)
   TRL's own logging is off (report_to none, logging_strategy no, log_completions off, no tqdm,
   save_strategy no, gradient checkpointing off, bf16 off, shuffle_dataset off so both sides see the
   same prompts in the same order). What TRL still does that llmcycle does not: it computes the
   per-token entropy in the training forward (a metric it always records) and gathers its metrics
   with .item() calls; llmcycle decodes and scores the same way but also counts truncated
   completions. Both run in one process and take turns: TRL's callback runs llmcycle's steps between
   TRL's, in the order T O O T T O O T ... (ABBA), so a drift in machine load falls on both alike.
   Sampling differs between the two sides (different random streams), so completions would end at EOS
   at different lengths (with these random weights about 1 in 8 ends early, at a different point on
   each side); since neither trainer has a knob for a minimum length (TRL could take min_new_tokens
   through generation_kwargs, llmcycle's GRPO cannot), EOS is made unreachable in the weights both
   sides load (build_gpt2), so every completion is exactly --new-tokens long on both sides and the
   work per step is the same; the mean completion lengths are reported to show it (--natural-eos
   keeps EOS as drawn).

2. seq2seq: the tiny T5 of tests/tiny.py (make_t5, d_model 16, 2+2 layers), LoRA (r 8, alpha 16) on
   q / k / v / o / wi / wo, our GRPO step (--prompts x --group completions) vs our PPO step
   (PPOTrainer, batch --prompts x --group prompts, one completion each, min_new_tokens =
   max_new_tokens = --new-tokens), ppo_epochs 1 / epochs 1, one mini-batch of all completions, same
   lr, KL weight 0.04 (PPO: fixed init_kl_coef), the same reward; steps alternate G P P G ...

    .venv/bin/python benchmarks/grpo_step.py [--steps 20] [--warmup 2] [--width 128] [--layers 4] [--threads 1]

Prints exactly one JSON line (warnings go to stderr).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))  # tiny.py: the tokenizer and T5 the tests use
SPECS = {"answer": {"kind": "exact_answer"}}
CAUSAL_TARGETS = ["c_attn", "c_proj", "c_fc"]  # TRL refuses an adapter on lm_head (its fused head)
SEQ2SEQ_TARGETS = ["q", "k", "v", "o", "wi", "wo"]
BETA, CLIP = 0.04, 0.2


# ------------------------------------------------------------------------------------------ shared
def reward(prompts: list[str], completions: list[str], references: list[str]):
    """llmcycle's reward: exact_answer through rewards.combine, as the align stage calls it."""
    from llmcycle.stages.align import rewards as rw

    return rw.combine(SPECS, prompts, completions, references)


def exact_answer(prompts, completions, answer, **_):
    """TRL's reward function: the very same call, references from the dataset's `answer` column."""
    return reward(prompts, completions, answer)[0]


def questions(n: int, seed: int) -> tuple[list[str], list[str]]:
    """n arithmetic prompts of varied length and their answers."""
    rng = random.Random(seed)
    prompts, answers = [], []
    for _ in range(n):
        a, b = rng.randint(1, 10 ** rng.randint(1, 4)), rng.randint(1, 99)
        prompts.append(f"question: what is {a} plus {b}? answer:")
        answers.append(str(a + b))
    return prompts, answers


def build_gpt2(out: Path, width: int, layers: int, heads: int, positions: int, seed: int,
               eos_reachable: bool) -> dict:
    """tests/tiny.py's causal tokenizer and a GPT-2 of the given shape, random init from seed. Unless
    eos_reachable, EOS can never be sampled: the final layer norm's coordinate 0 is pinned to 1 (weight 0,
    bias 1) and EOS's (tied) embedding row is -100 there, 0 elsewhere, so its logit is always -100 while
    every other token's is as drawn. LoRA (on the blocks' linear layers) cannot change either, so every
    completion of both sides is exactly max_new_tokens long. (EOS as an input is only the left padding,
    which attention masks out.)"""
    import torch
    from tiny import _vocab, make_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    make_tokenizer(out, "causal")
    size, _, eos = _vocab(out)
    config = GPT2Config(vocab_size=size, n_embd=width, n_layer=layers, n_head=heads, n_positions=positions,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    if not eos_reachable:
        with torch.no_grad():
            model.transformer.ln_f.weight[0], model.transformer.ln_f.bias[0] = 0.0, 1.0
            model.transformer.wte.weight[eos] = 0.0
            model.transformer.wte.weight[eos, 0] = -100.0
    model.save_pretrained(str(out))
    return {"arch": "gpt2", "width": width, "layers": layers, "heads": heads, "vocab": size, "positions": positions,
            "params": sum(p.numel() for p in model.parameters()), "init": f"random, seed {seed}",
            "eos": "as drawn" if eos_reachable else "unreachable (logit -100): fixed-length completions"}


def lora(model, kind: str, targets: list[str], seed: int):
    """The adapter both sides get (what tests/stages/test_grpo.py's policy_of builds)."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, lora_config(kind, targets))


def lora_config(kind: str, targets: list[str]):
    from peft import LoraConfig

    from llmcycle.training.finetune import task_type

    return LoraConfig(task_type=task_type(kind), r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)


def timed(fn):
    """(result, wall seconds, CPU seconds of this process) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def summary(rows: list[dict]) -> dict:
    wall, cpu = [r["wall"] for r in rows], [r["cpu"] for r in rows]
    return {"s_per_step": round(statistics.mean(wall), 4), "s_median": round(statistics.median(wall), 4),
            "cpu_s_per_step": round(statistics.mean(cpu), 4), "wall_s": [round(x, 3) for x in wall],
            "completion_length": round(statistics.mean(r["length"] for r in rows), 2)}


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


# ------------------------------------------------------------------------------------------ causal
def causal(args, tmp: Path) -> tuple[dict, dict]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from llmcycle.models.load import load_model
    from llmcycle.stages.align.grpo import GroupSettings, GroupTrainer

    model_dir = tmp / "gpt2"
    facts = build_gpt2(model_dir, args.width, args.layers, args.heads, args.positions, args.seed, args.natural_eos)
    total = args.warmup + args.steps
    per_step = args.prompts * args.group
    prompts, answers = questions(total * args.prompts, args.seed)

    # llmcycle
    model, tok = load_model(str(model_dir), dtype="float32", device="cpu")
    facts["attn_implementation"] = model.config._attn_implementation
    policy = lora(model, "causal", CAUSAL_TARGETS, args.seed)
    ours = GroupTrainer(policy, tok, "causal", reward, GroupSettings(
        steps=10 ** 6, batch_size=args.prompts, group_size=args.group, mini_batch_size=per_step, epochs=1, lr=args.lr,
        beta=BETA, cliprange=CLIP, scale_rewards=True, max_new_tokens=args.new_tokens, temperature=1.0, top_k=0,
        top_p=1.0, seed=args.seed, grad_clip=1.0))
    facts["trainable_params"] = sum(p.numel() for p in policy.parameters() if p.requires_grad)

    def our_step(i: int) -> dict:
        batch = slice(i * args.prompts, (i + 1) * args.prompts)
        stats, wall, cpu = timed(lambda: ours.step(prompts[batch], answers[batch]))
        return {"wall": wall, "cpu": cpu, "length": stats["completion_length"], "own_seconds": stats["seconds"]}

    # TRL, on the same weights (the same folder), the same adapter (drawn after set_seed(seed) in TRL)
    trl_model, trl_tok = load_model(str(model_dir), dtype="float32", device="cpu")
    config = GRPOConfig(
        output_dir=str(tmp / "trl"), per_device_train_batch_size=per_step, gradient_accumulation_steps=1,
        generation_batch_size=per_step, num_generations=args.group, num_iterations=1,
        max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=BETA, epsilon=CLIP,
        loss_type="dapo", scale_rewards="group", learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused", max_steps=total, use_cpu=True, bf16=False,
        fp16=False, gradient_checkpointing=False, report_to="none", logging_strategy="no", save_strategy="no",
        disable_tqdm=True, log_completions=False, shuffle_dataset=False, seed=args.seed, dataloader_num_workers=0,
        disable_dropout=True)
    our_rows, trl_rows = [], []

    class Interleave(TrainerCallback):
        """Times TRL's steps and runs llmcycle's between them: T O O T T O O T ..."""

        trainer = None

        def on_step_begin(self, args_, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args_, state, control, **kw):
            wall, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
            length = self.trainer._metrics["train"]["completions/mean_length"][-1]
            trl_rows.append({"wall": wall, "cpu": cpu, "length": length})
            if state.global_step % 2 == 1:  # after an odd TRL step, two of ours
                for _ in range(2):
                    if len(our_rows) < total:
                        our_rows.append(our_step(len(our_rows)))

    callback = Interleave()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trl = GRPOTrainer(model=trl_model, reward_funcs=[exact_answer], args=config,
                          train_dataset=Dataset.from_dict({"prompt": prompts, "answer": answers}),
                          processing_class=trl_tok, peft_config=lora_config("causal", CAUSAL_TARGETS),
                          callbacks=[callback])
        callback.trainer = trl
        same_start = all(torch.equal(a, b) for a, b in zip(
            [p for n, p in sorted(policy.named_parameters())], [p for n, p in sorted(trl.model.named_parameters())]))
        with contextlib.redirect_stdout(sys.stderr):  # TRL prints its run's metrics at the end
            trl.train()
    while len(our_rows) < total:  # an odd step count leaves ours one short
        our_rows.append(our_step(len(our_rows)))
    mine, theirs = summary(our_rows[args.warmup:]), summary(trl_rows[args.warmup:])
    import trl as trl_pkg

    return {
        "llmcycle_s_per_step": mine["s_per_step"], "trl_s_per_step": theirs["s_per_step"],
        "ratio_llmcycle_vs_trl": ratio(mine["s_per_step"], theirs["s_per_step"]),
        "ratio_median": ratio(mine["s_median"], theirs["s_median"]),
        "ratio_cpu_time": ratio(mine["cpu_s_per_step"], theirs["cpu_s_per_step"]),
        "goal": "<= 1.1",
        "completion_length_llmcycle": mine["completion_length"], "completion_length_trl": theirs["completion_length"],
        "length_ratio": ratio(mine["completion_length"], theirs["completion_length"]),
        "same_initial_weights": same_start,
        "llmcycle": mine, "trl": theirs, "trl_version": trl_pkg.__version__,
    }, facts


# ----------------------------------------------------------------------------------------- seq2seq
def seq2seq(args, tmp: Path) -> tuple[dict, dict]:
    from tiny import make_t5

    from llmcycle.models.load import load_model
    from llmcycle.stages.align.grpo import GroupSettings, GroupTrainer
    from llmcycle.stages.align.ppo import PPOSettings, PPOTrainer

    model_dir = make_t5(tmp / "t5", seed=args.seed)
    total = args.warmup + args.steps
    per_step = args.prompts * args.group
    g_prompts, g_answers = questions(total * args.prompts, args.seed)
    p_prompts, p_answers = questions(total * per_step, args.seed + 1)
    answer_of = dict(zip(p_prompts, p_answers))

    model, tok = load_model(str(model_dir), dtype="float32", device="cpu")
    facts = {"arch": "t5 (tests/tiny.py make_t5)", "d_model": model.config.d_model, "layers": "2+2",
             "vocab": model.config.vocab_size, "params": sum(p.numel() for p in model.parameters())}
    grpo = GroupTrainer(lora(model, "seq2seq", SEQ2SEQ_TARGETS, args.seed), tok, "seq2seq", reward, GroupSettings(
        steps=10 ** 6, batch_size=args.prompts, group_size=args.group, mini_batch_size=per_step, epochs=1, lr=args.lr,
        beta=BETA, cliprange=CLIP, max_new_tokens=args.new_tokens, temperature=1.0, top_k=0, top_p=1.0, seed=args.seed,
        grad_clip=1.0))
    model2, tok2 = load_model(str(model_dir), dtype="float32", device="cpu")
    ppo = PPOTrainer(lora(model2, "seq2seq", SEQ2SEQ_TARGETS, args.seed), tok2, "seq2seq",
                     lambda ps, texts: reward(ps, texts, [answer_of[p] for p in ps])[0], PPOSettings(
                         steps=10 ** 6, batch_size=per_step, mini_batch_size=per_step, ppo_epochs=1, lr=args.lr,
                         init_kl_coef=BETA, adaptive_kl=False, cliprange=CLIP, min_new_tokens=args.new_tokens,
                         max_new_tokens=args.new_tokens, temperature=1.0, top_k=0, top_p=1.0, seed=args.seed,
                         grad_clip=1.0))

    def grpo_step(i):
        batch = slice(i * args.prompts, (i + 1) * args.prompts)
        stats, wall, cpu = timed(lambda: grpo.step(g_prompts[batch], g_answers[batch]))
        return {"wall": wall, "cpu": cpu, "length": stats["completion_length"]}

    def ppo_step(i):
        stats, wall, cpu = timed(lambda: ppo.step(p_prompts[i * per_step:(i + 1) * per_step]))
        return {"wall": wall, "cpu": cpu, "length": stats["response_length"]}

    rows = {"grpo": [], "ppo": []}
    for i in range(total):  # G P P G G P P G ...
        for name in (("grpo", "ppo") if i % 2 == 0 else ("ppo", "grpo")):
            rows[name].append((grpo_step if name == "grpo" else ppo_step)(i))
    g, p = summary(rows["grpo"][args.warmup:]), summary(rows["ppo"][args.warmup:])
    return {"grpo_s_per_step": g["s_per_step"], "ppo_s_per_step": p["s_per_step"],
            "ratio_grpo_vs_ppo": ratio(g["s_per_step"], p["s_per_step"]),
            "ratio_median": ratio(g["s_median"], p["s_median"]),
            "ratio_cpu_time": ratio(g["cpu_s_per_step"], p["cpu_s_per_step"]),
            "completion_length_grpo": g["completion_length"], "completion_length_ppo": p["completion_length"],
            "completions_per_step": per_step, "grpo": g, "ppo": p}, facts


# -------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per GRPO step")
    ap.add_argument("--group", type=int, default=4, help="G: completions per prompt")
    ap.add_argument("--new-tokens", type=int, default=32, help="max new tokens (TRL: max_completion_length)")
    ap.add_argument("--width", type=int, default=128, help="the causal model's n_embd")
    ap.add_argument("--layers", type=int, default=4, help="the causal model's layers")
    ap.add_argument("--heads", type=int, default=4, help="the causal model's attention heads")
    ap.add_argument("--positions", type=int, default=128, help="the causal model's n_positions")
    ap.add_argument("--natural-eos", action="store_true", help="keep the causal model's EOS as drawn (completions "
                    "then end at different lengths on the two sides); default: EOS unreachable, fixed lengths")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (both sides share the process)")
    ap.add_argument("--only", choices=["causal", "seq2seq"], help="run one comparison")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for key, value in (("TRANSFORMERS_VERBOSITY", "error"), ("TOKENIZERS_PARALLELISM", "false"),
                       ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                       ("TRL_EXPERIMENTAL_SILENCE", "1")):
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    out = {"benchmark": "grpo_step"}
    load_before, t0 = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        if args.only in (None, "causal"):
            out["causal"], models["causal"] = causal(args, Path(tmp))
        if args.only in (None, "seq2seq"):
            out["seq2seq"], models["seq2seq"] = seq2seq(args, Path(tmp))
    out["model"] = models
    out["settings"] = {"prompts_per_step": args.prompts, "group_size": args.group,
                       "completions_per_step": args.prompts * args.group, "max_new_tokens": args.new_tokens,
                       "timed_steps_per_side": args.steps, "warmup_steps": args.warmup, "lr": args.lr, "beta": BETA,
                       "clip": CLIP, "temperature": 1.0, "policy": "LoRA r 8 alpha 16 (reference: adapters disabled)",
                       "optimizer_steps_per_step": 1, "seed": args.seed, "order": "ABBA, one process"}
    out["torch_threads"] = torch.get_num_threads()
    out["versions"] = {"torch": torch.__version__}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    out["load_avg_before"] = round(load_before[0], 2)
    out["load_avg_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
