"""Fine-tuning machinery shared by the stages that train: settings, batches, the loop, checkpoints."""
