"""The OpenAI-compatible server: protocol, batching engine, app, augmentation, metrics."""
