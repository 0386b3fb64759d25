"""The lifecycle stages, one module or folder each; they hand work on only through the run store."""
