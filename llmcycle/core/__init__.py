"""The bottom layer: errors, config base classes, the run store, files, progress bars, memory, safe text."""
