"""Pre-warmed compile workers: a compile that pays neither interpreter start-up nor
``import tvm``, and is still a process of its own.

A compile used to start a new interpreter (two, counting the launcher) and import TVM,
1.5 to 2 s, for a compile that can take 0.2 s. Here each test process keeps one
*zygote*: a process started on the first compile (``python -m pytest_mlcjit.compiler.warm.zygote``)
that imports TVM, nothing else, and then only forks. A compile whose command is
``python -m MODULE ARGS`` (both backends' are) is served by a fork of it::

    test process ──control socket──> zygote (TVM imported; never imports user code)
         │                             └─ fork: launcher (its own session; child subreaper)
         └──one socket per compile──────────┘ └─ fork: the compile (its own process group):
                                                  the request's environment, sys.path, cwd
                                                  and umask; stdout and stderr into the
                                                  launcher's pipe; runpy.run_module(MODULE)

What the fresh subprocess guaranteed (:mod:`.._launcher`) holds:

* **Isolation.** Every compile is a new fork of a zygote that has imported TVM and
  nothing else: a module global it sets, a TVM function it monkeypatches, a crash,
  ``SystemExit``, ``os._exit`` or an out-of-memory kill touch only that compile's process.
* **Fresh factory.** The zygote never imports user modules, and the compile invalidates
  the import caches: the factory module is imported anew by every compile, so an edited
  factory is seen within the same run.
* **The test process's view.** The compile gets the request's environment (``os.environ``
  replaced), the ``sys.path`` that a fresh ``python -m`` with that environment would have
  (its ``PYTHONPATH`` carries the test process's ``sys.path``: :func:`..launch.child_env`),
  and the test process's working directory and umask. A request whose environment differs
  from the zygote's in a variable that can change how TVM imports (:data:`IMPORT_ENV`)
  gets a new zygote started with it.
* **Logged.** Everything the compile prints goes through the launcher into the log,
  bounded as :class:`..proctree.BoundedLog` bounds it.
* **Killed whole.** The launcher is a child subreaper: on a stop (the test process shuts
  its end of the compile's socket, on a timeout or an interrupt; or SIGTERM) it SIGKILLs
  every descendant, reaps them, reports and exits.
* **Dies with the test process.** When the test process dies, however, the kernel closes
  its sockets: each launcher sees its socket close and kills its tree; the zygote sees
  its control socket close (it also gets SIGKILL from ``PR_SET_PDEATHSIG``, set from a
  thread that lives as long as the process). The compile itself dies with its launcher
  (``PR_SET_PDEATHSIG``).
* **Replaced.** A zygote that dies (killed, out of memory) is replaced on the next
  compile; the compiles it served go on, since they do not depend on it.

The launcher and the compile rename themselves (``/proc/PID/cmdline``, what ``ps``
shows) to the command they run. Elsewhere than Linux, with ``--mlc-jit-compile-workers
=off``, or when the zygote cannot start or would fork with Python threads running, the
compile runs in a fresh subprocess as before (:meth:`..launch.Builds.run_logged`).

The package is split by process: :mod:`.protocol` (the frames on the sockets), :mod:`.client`
(the test process's side), :mod:`.zygote` (the zygote, its launchers and their compiles).
"""
