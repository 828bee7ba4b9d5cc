"""Example models and numpy references used by the pytest-mlcjit example tests."""
