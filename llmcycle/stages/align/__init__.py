"""The align stage: reward models, PPO, and DPO / ORPO on preference pairs."""
