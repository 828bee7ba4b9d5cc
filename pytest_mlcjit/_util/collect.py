"""The hand-off between ``pytest-mlcjit key|explain`` (:mod:`pytest_mlcjit.cli.requests`)
and the pytest plugin they load into a ``--collect-only`` run
(:mod:`pytest_mlcjit.plugin.collect`): named here, so that neither imports the other."""

#: The pytest plugin that writes what the collected tests request (``-p`` this).
PLUGIN = "pytest_mlcjit.plugin.collect"
#: Where it writes the requests, as JSON.
OUT_ENV = "PYTEST_MLCJIT_COLLECT_OUT"
#: Set: it also says how a READONLY run would find each library.
STATUS_ENV = "PYTEST_MLCJIT_COLLECT_STATUS"
