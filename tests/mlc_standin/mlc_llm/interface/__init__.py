"""Python entry points of the stand-in, at the same import paths as the real ``mlc_llm``."""
