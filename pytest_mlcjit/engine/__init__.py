"""The engine: a request's policy, its cache and its backend together → a compiled library.

* :mod:`.jit`: :class:`~.jit.JIT`, the protocol (lookup → lock → look again → fetch or
  build → publish) and :func:`~.jit.jit` for plain Python;
* :mod:`.settings`: :class:`~.settings.Settings`, the option table;
* :mod:`.stats`: the accounting of a run; :mod:`.activity`: the jobs a run announces;
* :mod:`.schedule`: the compile order; :mod:`.failures`: what a failed compile says;
* :mod:`.model`: :class:`~.model.CompiledModel`, what a test receives.

No pytest here; importing this package imports none of its modules.
"""
