"""Root conftest: its presence makes this directory the rootdir that pytest puts on
``sys.path``, so ``examples.models.mlp:build`` is importable by the tests, the examples and
(through the test process's ``sys.path``) the compile subprocess."""
