"""The dashboard (`llmcycle ui`): a JSON API and a static page."""
