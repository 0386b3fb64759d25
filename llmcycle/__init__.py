"""llmcycle: the generative-AI project lifecycle, from scope to a served, augmented model, in one tool."""

__version__ = "0.1.0"
