"""The lifecycle report (HTML and Markdown) and its plots."""
