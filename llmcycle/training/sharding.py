"""Sharded data parallelism: FSDP2 (`torch.distributed.fsdp.fully_shard`) and its distributed checkpoints.

`parallelism: {strategy: fsdp}` under torchrun splits every parameter, its gradient and its AdamW state
across the processes (each rank keeps about 1/world of each tensor along its first dimension). Before a
block's forward and backward the block's parameters are all-gathered, and afterwards freed again
(`reshard_after_forward`); gradients are reduce-scattered, so each rank updates only its shard.

Why torch's fully_shard directly and not accelerate's FSDP2 plugin: accelerate (1.15) turns FSDP on only
for GPU-like distributed types; under torchrun on CPUs it stays MULTI_CPU and wraps the model in DDP, so
the same code could not be built and tested here and carried unchanged to GPUs. fully_shard is the
engine the plugin calls anyway (and torchtitan's).

Checkpoints go through `torch.distributed.checkpoint` (DCP): each rank writes its own shards and rank 0 the
metadata, so no rank ever holds the whole model or optimizer to save it, and a checkpoint written by N
processes loads on M (DCP reshards on load), including into a plain unsharded model (M = 1, no torchrun).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from llmcycle.core import ranks
from llmcycle.core.configbase import Section
from llmcycle.core.errors import UserError

SHARDS = "dcp"  # a sharded checkpoint's folder of DCP shards (beside state.json and trainer_state.pt)


class ParallelismConfig(Section):
    """`parallelism:` of a tune variant or a pretrain variant: how several processes share the work."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every process holds the whole model and averages gradients; fsdp: parameters, "
        "gradients and optimizer state are sharded across the processes (FSDP2). Both need torchrun for "
        "more than one process")
    reshard_after_forward: bool = Field(
        True, description="fsdp: free each block's gathered parameters after its forward (gathered again for "
        "backward): least memory; false keeps them until backward, one all-gather less per block and step")
    cpu_offload: bool = Field(
        False, description="fsdp on GPUs: keep the parameter shards, gradients and optimizer state in CPU "
        "memory and move each block to the GPU only while it computes")
    mixed_precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="fsdp: bf16 computes in bfloat16 with float32 shards and gradient reduction; "
        "auto is bf16 on GPUs that have it, fp32 on CPUs")
    shard_size: int | None = Field(
        None, ge=1, description="fsdp: shard within groups of this many processes and replicate across the "
        "groups (HSDP; e.g. the GPUs of one node); default: all processes form one group")


def sharded(cfg) -> bool:
    par = getattr(cfg, "parallelism", None)
    return par is not None and par.strategy == "fsdp"


def check_launch(cfg, key: str, method: str = "full") -> None:
    """Refuse what sharding cannot do, before anything loads: fsdp outside torchrun, a shard_size the
    world size is not a multiple of, methods other than full and lora."""
    if not sharded(cfg):
        return
    par = cfg.parallelism
    if "RANK" not in os.environ:
        raise UserError(f"{key}.parallelism.strategy: fsdp shards the model over processes started by torchrun: "
                        "launch it as `torchrun --nproc_per_node N -m llmcycle ...` (N processes on this "
                        "machine), or set strategy: ddp")
    if method not in ("full", "lora"):
        raise UserError(f"{key}.parallelism.strategy: fsdp shards full fine-tuning and LoRA, not method {method}; "
                        "use strategy: ddp")
    if getattr(cfg, "bits", None):
        raise UserError(f"{key}.parallelism.strategy: fsdp does not shard {cfg.bits}-bit quantized weights; "
                        "remove bits or use strategy: ddp")
    world = ranks.world_size()
    if par.shard_size and world % par.shard_size:
        raise UserError(f"{key}.parallelism.shard_size: {par.shard_size} does not divide the {world} processes "
                        f"into whole shard groups; use a divisor of {world}")


def compute_dtype(par: ParallelismConfig, device):
    """The dtype blocks compute in under FSDP's mixed precision (None: float32, no policy)."""
    import torch

    on_gpu = getattr(device, "type", str(device)) == "cuda"
    bf16 = par.mixed_precision == "bf16" or (par.mixed_precision == "auto" and on_gpu
                                             and torch.cuda.is_bf16_supported())
    return torch.bfloat16 if bf16 else None


def block_classes(model) -> set[str]:
    """The class names of the model's repeated blocks (transformers' _no_split_modules: T5Block,
    LlamaDecoderLayer, GPT2Block, ...): each becomes its own FSDP unit, gathered only while it computes."""
    inner = model
    while True:
        names = getattr(inner, "_no_split_modules", None)
        if names:
            return set(names)
        nxt = getattr(inner, "base_model", None) or getattr(inner, "model", None)
        if nxt is None or nxt is inner:
            return set()
        inner = nxt


def shard(model, par: ParallelismConfig, device):
    """fully_shard each block, then the rest (embeddings, head, norms) as the root unit; returns the model,
    now holding DTensor shards. Tied weights (T5's shared embedding and head) stay in the root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    import torch

    world = ranks.world_size()
    ranks.ensure_group()
    device_type = getattr(device, "type", str(device))
    size = par.shard_size or world
    mesh = (init_device_mesh(device_type, (world // size, size), mesh_dim_names=("replicate", "shard"))
            if size < world else init_device_mesh(device_type, (world,)))
    options: dict = {"mesh": mesh, "reshard_after_forward": par.reshard_after_forward}
    dtype = compute_dtype(par, device)
    if dtype is not None:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    if par.cpu_offload and device_type == "cuda":
        options["offload_policy"] = CPUOffloadPolicy()
    names = block_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise UserError(f"parallelism.strategy fsdp: found no repeated blocks to shard in "
                        f"{type(model).__name__} (its _no_split_modules is empty); use strategy: ddp")
    if device_type == "cuda":
        model.to(device)
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def local_numel(tensors) -> int:
    """Elements this rank holds of `tensors` (a DTensor's local shard, a plain tensor whole)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() for t in tensors)


def _optimizer_tensors(optimizer) -> list:
    """The optimizer's per-parameter state tensors (AdamW's moments; not its scalar step counters)."""
    import torch

    return [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]


def local_bytes(model, optimizer) -> dict:
    """What this rank holds of parameters, gradients and optimizer state, in bytes."""
    def size(ts):
        return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in ts)

    params = list(model.parameters())
    return {"params": size(params), "grads": size([p.grad for p in params if p.grad is not None]),
            "optimizer": size(_optimizer_tensors(optimizer))}


def sharding_facts(model, optimizer, par: ParallelismConfig) -> dict:
    """What a run's summary says of its sharding: this rank's share of the parameters and the optimizer
    state (counted after the first step, when AdamW's moments exist)."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    state = _optimizer_tensors(optimizer)
    return {"strategy": par.strategy, "world_size": ranks.world_size(), "shard_size": par.shard_size
            or ranks.world_size(), "params": total, "rank0_params": local_numel(params),
            "rank0_optimizer_state": local_numel(state), "reshard_after_forward": par.reshard_after_forward,
            "mixed_precision": par.mixed_precision}


def full_state_dict(model, trainable_only: bool = False) -> dict:
    """Every weight whole, on every rank (an all-gather: collective, every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if trainable_only:
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in keep}
    return state


def _states(model, optimizer, trainable_only: bool) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(model)
    if trainable_only:  # adapters: the frozen base comes from the base model, not the checkpoint
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        weights = {k: v for k, v in weights.items() if k in keep}
    return {"model": weights, "optim": get_optimizer_state_dict(model, optimizer)}


def save_shards(folder: Path, model, optimizer, trainable_only: bool) -> None:
    """Each rank writes its shards of the weights and the optimizer state into `folder` (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_states(model, optimizer, trainable_only), checkpoint_id=str(folder))


def load_shards(folder: Path, model, optimizer, trainable_only: bool, where: Path) -> None:
    """The weights and optimizer state of `folder` into `model` and `optimizer`, sharded or not and on any
    number of processes; a checkpoint of another model is a UserError naming what does not match."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from torch.distributed.checkpoint.api import CheckpointException

    states = _states(model, optimizer, trainable_only)
    try:
        dcp.load(states, checkpoint_id=str(folder))
    # DCP wraps each rank's error in a CheckpointException, a BaseException (not an Exception)
    except (CheckpointException, Exception) as exc:  # noqa: BLE001 - any failure: the shards do not fit
        failures = getattr(exc, "failures", None)
        first = next(iter(failures.values()), None) if failures else None
        reason = " ".join(str(first[0] if first else exc).split())[:300]  # (exception, traceback) pairs
        raise UserError(f"cannot resume from {where}: its sharded weights do not fit this model ({reason}); "
                        "resume with the model config it was saved with, or start a fresh run") from None
    set_model_state_dict(model, states["model"], options=StateDictOptions(strict=not trainable_only))
    set_optimizer_state_dict(model, optimizer, states["optim"])


def load_plain_optimizer(model, optimizer, saved: dict) -> None:
    """An unsharded checkpoint's optimizer state (torch's, keyed by parameter position in the groups)
    into the sharded `optimizer`: keyed by parameter name instead, which both layouts share."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {"state": {order[i]: s for i, s in saved["state"].items()},
               "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
