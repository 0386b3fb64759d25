"""Augmentation: retrieval (RAG), program-aided answers (PAL) in a sandbox, and the tool agent."""
