"""Support code of the stand-in (config base classes, auto-detection helpers)."""
