"""Example model factories for pytest-mlcjit.

Each submodule exposes a ``build(**config)`` factory that returns
``(nn_module, export_spec)``: a ``tvm.relax.frontend.nn.Module`` and the spec dict to
pass to ``nn_module.export_tvm(spec=export_spec)``.

The submodules import TVM at module level, so this package deliberately imports none
of them: importing ``examples.models`` stays cheap, and only the process that actually
compiles a model (``examples.models.mlp`` / ``examples.models.transformer``) pays for
importing TVM.
"""
