"""The optimize stage: quantize, distill, prune or export a model and measure its cost."""
