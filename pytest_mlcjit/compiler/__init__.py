"""Building libraries: the backends that key and compile a spec (:mod:`.backends`), the
toolchain fingerprint (:mod:`.toolchain`), and running each compile in a process of its
own (:mod:`.launch`, its launcher :mod:`._launcher` and :mod:`.proctree`, and the warm
compile workers, :mod:`.warm`). No pytest here; importing this package imports nothing.
"""
