"""Records from the project's data, and prompts built from them (templates, shots, fitting a window)."""
