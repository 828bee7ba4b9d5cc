"""Small utilities of the standard library's kind: file-system primitives (:mod:`.fs`)."""
