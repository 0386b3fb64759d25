"""`python -m llmcycle` is the `llmcycle` command."""
from llmcycle.cli import entry

entry()
