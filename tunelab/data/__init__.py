"""Data layer: read sources, normalise formats, render with the chat template, batch."""
