"""Padding-free packing of causal fine-tuning batches (batches.pack), used only where a check on the
first examples shows the packed batch gives exactly the padded batch's loss.

The check runs the real loss function rather than trusting a list of architectures: whether the
example boundaries hold depends on the model's code (its mask built from position_ids), on the
transformers version, on adapters (prompt tuning prepends tokens and drops position_ids) and on the
loss function forwarding position_ids with the cache off. Seq2seq models are never packed.
"""
from __future__ import annotations

from llmcycle.training.batches import collate, pack

PROBE_EXAMPLES = 4  # a few different lengths are enough to expose a missing boundary


def packing_supported(model, features: list[dict], pad_id: int, loss, rtol: float = 1e-5) -> bool:
    """Whether `loss` (training.loop.sum_loss, passed in: loop imports this module) gives the same
    summed loss, within `rtol`, and the same scored-token count on the packed batch of the first few
    causal features as on their padded batch. Run in eval mode (no dropout: no random number drawn)
    without gradients or autocast, the training mode put back; an error in the packed forward
    (a model that takes no position_ids, a loss that wants an attention_mask) means not supported.
    Float32 weights agree to ~1e-7 when the boundaries hold; a model whose examples see each other is
    off by far more on real weights (7e-5 to 8e-4 relative even on the tests' tiny random models)."""
    import torch

    sample = features[:PROBE_EXAMPLES]
    if len(sample) < 2:
        return False  # one example packs to its own padded row: nothing would be learned about the model
    device = next(model.parameters()).device
    padded, packed = ({k: v.to(device) for k, v in batch.items()}
                      for batch in (collate(sample, pad_id), pack(sample, pad_id)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            padded_loss, padded_n = loss(model, padded, "causal")
            try:
                packed_loss, packed_n = loss(model, packed, "causal")
            except Exception:  # noqa: BLE001 - padding works (just shown), so a packed failure means "no"
                return False
    finally:
        model.train(was_training)
    return packed_n == padded_n and bool(torch.allclose(packed_loss, padded_loss, rtol=rtol, atol=0.0))
