"""Command-line entry points of the stand-in (only ``compile`` exists)."""
