"""Models: Hugging Face loading, adapter and int8 folders, models built from scratch, embeddings, generation."""
