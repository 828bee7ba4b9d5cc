"""Model factories shipped with the plugin, for a first test without a model of your own:
``TVMModel("pytest_mlcjit.examples.mlp:build", config={"hidden": 128})`` (see
:mod:`pytest_mlcjit.examples.mlp`). A factory of your own is a module-level function just
like :func:`pytest_mlcjit.examples.mlp.build`."""
