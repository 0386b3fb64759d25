"""Pruning for `llmcycle optimize` (method: prune): remove the weights that matter least.

    structure: unstructured   the `sparsity` share of smallest-magnitude weights of every Linear /
                              Conv1D layer (or of all of them together, scope: global) set to zero,
                              with torch.nn.utils.prune, then made permanent. The output layer
                              (tied to the input embeddings in T5 and GPT-2) is left dense. Zeros
                              in a dense file take as much space as other numbers: the model gets
                              sparser, not smaller, unless a sparse runtime uses them.
    structure: heads          whole attention heads. T5: removed, so the model gets smaller and
                              `num_heads` in its config drops; T5 shares one relative position bias
                              across a stack's layers, so the same heads go in every self-attention
                              layer of a stack. GPT-2: its config ties the head size to the width, so
                              heads cannot be removed and still reload; they are zeroed instead, and
                              the summary says so (structure_removed: false).
    structure: ffn            whole feed-forward channels (rows of the input projection and the
                              matching columns of the output projection), removed; `d_ff` / `n_inner`
                              in the config drops.

Importance is magnitude: the L2 norm of a head's query, key, value and output slices; for an FFN
channel, the product of its input and output weight norms. Structured sparsity is the share of heads
or channels removed per layer (rounded; at least one always stays). An optional recovery fine-tune
(`recovery_steps`) trains the pruned model on the project's data with the answer-only cross-entropy;
for unstructured pruning and GPT-2's zeroed heads the pruning masks stay on during it, so pruned
weights remain exactly zero.
"""
from __future__ import annotations

from pathlib import Path

from llmcycle.core.errors import UserError
from llmcycle.models.folders import load_source, save_folder, source_facts
from llmcycle.models.hub import context_window, model_kind, resolve_device
from llmcycle.stages.optimize.distill import (
    cross_entropy_loss,
    fit_steps,
    training_features,
)


def _count(n: int, sparsity: float) -> int:
    """How many of n units to remove: round(sparsity * n), leaving at least one."""
    return min(n - 1, round(sparsity * n))


def _keep(scores, drop: int) -> list[int]:
    """Indices of the len(scores) - drop highest scores, in their original order (ties: lower index kept)."""
    values = [float(v) for v in (scores.detach().tolist() if hasattr(scores, "detach") else scores)]
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return sorted(order[:len(values) - drop])


# ----------------------------------------------------------------------------------- unstructured
def prunable_layers(model) -> list[tuple[str, object]]:
    """(name, module) of every Linear / Conv1D layer except the output layer."""
    import torch
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings()
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not output]


def prune_unstructured(model, sparsity: float, scope: str = "layer") -> list[tuple[str, object]]:
    """Attach L1-magnitude pruning masks (weight = weight_orig * mask); returns the pruned layers."""
    import torch.nn.utils.prune as tp

    layers = prunable_layers(model)
    if scope == "global":
        tp.global_unstructured([(m, "weight") for _, m in layers], pruning_method=tp.L1Unstructured,
                               amount=sparsity)
    else:
        for _, m in layers:
            tp.l1_unstructured(m, "weight", amount=sparsity)
    return layers


def make_permanent(model) -> int:
    """Fold every pruning mask into its weight (drops weight_orig / the mask); returns how many."""
    import torch.nn.utils.prune as tp

    folded = 0
    for module in model.modules():
        for hook in [h for h in module._forward_pre_hooks.values() if isinstance(h, tp.BasePruningMethod)]:
            tp.remove(module, hook._tensor_name)
            folded += 1
    return folded


def zero_share(layers) -> tuple[int, int]:
    """(zeros, total) over the layers' weights."""
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    return zeros, sum(m.weight.numel() for _, m in layers)


# ------------------------------------------------------------------------------------ structured
def _rows(linear, index):
    """A Linear keeping only the output rows in `index`."""
    import torch

    new = torch.nn.Linear(linear.in_features, len(index), bias=linear.bias is not None,
                          device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[index])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[index])
    return new


def _columns(linear, index):
    """A Linear keeping only the input columns in `index`."""
    import torch

    new = torch.nn.Linear(len(index), linear.out_features, bias=linear.bias is not None,
                          device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, index])
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def _t5_attentions(model) -> list[tuple[str, object]]:
    return [(name, m) for name, m in model.named_modules()
            if all(hasattr(m, a) for a in ("q", "k", "v", "o", "n_heads", "key_value_proj_dim"))]


def _head_scores(attn):
    n, d = attn.n_heads, attn.key_value_proj_dim
    score = sum(lin.weight.reshape(n, d, -1).norm(dim=(1, 2)) for lin in (attn.q, attn.k, attn.v))
    return score + attn.o.weight.reshape(-1, n, d).norm(dim=(0, 2))


def remove_t5_heads(model, sparsity: float) -> dict:
    """Remove the least important heads of every T5 attention (same count everywhere, as the config
    has one num_heads; same heads across a stack's self-attention layers, which share one bias)."""
    import torch

    attentions = _t5_attentions(model)
    n = model.config.num_heads
    drop = _count(n, sparsity)
    groups: dict[str, list] = {}
    for name, attn in attentions:
        key = name.split(".block.")[0] + " self-attention" if name.endswith("SelfAttention") else name
        groups.setdefault(key, []).append(attn)
    removed = {}
    for key, members in groups.items():
        keep = _keep(sum(_head_scores(a) for a in members), drop)
        removed[key] = [h for h in range(n) if h not in keep]
        for attn in members:
            d = attn.key_value_proj_dim
            index = [h * d + j for h in keep for j in range(d)]
            attn.q, attn.k, attn.v = _rows(attn.q, index), _rows(attn.k, index), _rows(attn.v, index)
            attn.o = _columns(attn.o, index)
            if getattr(attn, "has_relative_attention_bias", False):
                old = attn.relative_attention_bias
                attn.relative_attention_bias = torch.nn.Embedding(old.num_embeddings, len(keep),
                                                                  device=old.weight.device, dtype=old.weight.dtype)
                with torch.no_grad():
                    attn.relative_attention_bias.weight.copy_(old.weight[:, keep])
            attn.n_heads, attn.inner_dim = len(keep), len(keep) * d
    model.config.num_heads = n - drop
    return {"heads_before": n, "heads_after": n - drop, "removed_heads": removed, "structure_removed": True}


def zero_gpt2_heads(model, sparsity: float) -> dict:
    """Zero the least important heads of every GPT-2 attention layer through pruning masks (kept on
    during a recovery fine-tune): their query, key and value columns and output-projection rows."""
    import torch
    import torch.nn.utils.prune as tp

    zeroed = {}
    for name, attn in model.named_modules():
        if not (hasattr(attn, "c_attn") and hasattr(attn, "head_dim")) or getattr(attn, "is_cross_attention", False):
            continue
        n, d, width = attn.num_heads, attn.head_dim, attn.embed_dim
        w = attn.c_attn.weight  # Conv1D: (in, out); out = [q | k | v]
        score = sum(w[:, part * width:(part + 1) * width].reshape(width, n, d).norm(dim=(0, 2)) for part in range(3))
        score = score + attn.c_proj.weight.reshape(n, d, -1).norm(dim=(1, 2))
        keep = _keep(score, _count(n, sparsity))
        gone = [h for h in range(n) if h not in keep]
        columns = torch.ones(3 * width, device=w.device, dtype=w.dtype)
        rows = torch.ones(width, 1, device=w.device, dtype=w.dtype)
        for h in gone:
            for part in range(3):
                columns[part * width + h * d: part * width + (h + 1) * d] = 0
            rows[h * d:(h + 1) * d] = 0
        tp.custom_from_mask(attn.c_attn, "weight", columns.expand_as(w).clone())
        tp.custom_from_mask(attn.c_attn, "bias", columns.clone())
        tp.custom_from_mask(attn.c_proj, "weight", rows.expand_as(attn.c_proj.weight).clone())
        zeroed[name] = gone
    n = model.config.n_head
    return {"heads_before": n, "heads_after": n - _count(n, sparsity), "zeroed_heads": zeroed,
            "structure_removed": False}


def remove_ffn_channels(model, sparsity: float) -> dict:
    """Remove the least important feed-forward channels of every layer (T5 DenseReluDense / gated,
    GPT-2 MLP); the config's d_ff / n_inner becomes the kept count."""
    import torch

    arch = model.config.model_type
    before = after = None
    removed = {}
    for name, m in model.named_modules():
        if arch in ("t5", "mt5") and hasattr(m, "wo") and (hasattr(m, "wi") or hasattr(m, "wi_0")):
            inputs = ["wi"] if hasattr(m, "wi") else ["wi_0", "wi_1"]
            score = m.wo.weight.norm(dim=0)
            for attr in inputs:
                score = score * getattr(m, attr).weight.norm(dim=1)
            before = m.wo.in_features
            keep = _keep(score, _count(before, sparsity))
            for attr in inputs:
                setattr(m, attr, _rows(getattr(m, attr), keep))
            m.wo = _columns(m.wo, keep)
        elif arch == "gpt2" and hasattr(m, "c_fc") and hasattr(m, "c_proj"):
            before = m.c_fc.nf
            keep = _keep(m.c_fc.weight.norm(dim=0) * m.c_proj.weight.norm(dim=1), _count(before, sparsity))
            with torch.no_grad():  # Conv1D weights are (in, out)
                m.c_fc.weight = torch.nn.Parameter(m.c_fc.weight[:, keep].clone())
                m.c_fc.bias = torch.nn.Parameter(m.c_fc.bias[keep].clone())
                m.c_proj.weight = torch.nn.Parameter(m.c_proj.weight[keep, :].clone())
            m.c_fc.nf = m.c_proj.nx = len(keep)
        else:
            continue
        after = len(keep)
        removed[name] = len([i for i in range(before) if i not in set(keep)])
    if after is None:
        raise UserError(f"optimize: no feed-forward layers found in model type '{arch}'")
    if arch == "gpt2":
        model.config.n_inner = after
    else:
        model.config.d_ff = after
    return {"channels_before": before, "channels_after": after, "removed_channels": removed,
            "structure_removed": True}


def prune_structured(model, structure: str, sparsity: float) -> dict:
    arch = model.config.model_type
    if arch not in ("t5", "mt5", "gpt2"):
        raise UserError(f"optimize: structured pruning ({structure}) supports t5 and gpt2 models, not model "
                        f"type '{arch}'; use structure: unstructured")
    if structure == "ffn":
        return remove_ffn_channels(model, sparsity)
    return zero_gpt2_heads(model, sparsity) if arch == "gpt2" else remove_t5_heads(model, sparsity)


# --------------------------------------------------------------------------------------- the stage
def optimize(cfg, source_path: str, dest: Path, train, template: str, *, info: dict, opts: dict, gen_cfg,
             task: str, log=None, progress: bool = True, system: str | None = None) -> dict:
    """Prune the source as cfg says, optionally fine-tune to recover, save at dest; facts for the summary."""

    device = resolve_device(opts.get("device", "auto"))
    model, tok, merged = load_source(source_path, dtype="float32", device=device,
                                     trust_remote_code=opts.get("trust_remote_code", False))
    facts = {**source_facts(model, merged), "structure": cfg.structure, "sparsity_target": cfg.sparsity}
    layers = None
    if cfg.structure == "unstructured":
        layers = prune_unstructured(model, cfg.sparsity, cfg.scope)
        facts["scope"] = cfg.scope
    else:
        facts.update(prune_structured(model, cfg.structure, cfg.sparsity))
    if cfg.recovery_steps:
        kind = model_kind(model.config)
        window = context_window(model.config, tok, opts.get("context_window"))
        encoded = training_features(train, template, model, tok, kind, window, system)
        stats = fit_steps(model, encoded.features, tok.pad_token_id, cross_entropy_loss(kind),
                          steps=cfg.recovery_steps, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed, log=log,
                          log_every=cfg.log_every, progress=progress, label="recovery")
        facts.update({f"recovery_{k}": v for k, v in stats.items()})
    make_permanent(model)
    if layers is not None:
        zeros, total = zero_share(layers)
        facts.update(sparsity=zeros / total, pruned_weights=total, zero_weights=zeros)
    save_folder(model, tok, dest, info)
    return facts
