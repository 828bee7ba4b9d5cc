"""Recorded inputs: what a factory really used, and cheap checks that it is unchanged.

This is ccache's *direct mode* for Python factories, split by concern:

* :mod:`.paths`: where a file lives (stdlib, installed, local) and its recorded form;
* :mod:`.record`: the recorder, in the compile child; :mod:`.hooks`: what it observes
  with (the audit hook, the ``os.stat`` wrappers, the recording ``os.environ``);
  :mod:`.observe`: listings, probes, environment variables, what cannot be followed;
* :mod:`.sources`: local modules compiled from their source in the compile child;
* :mod:`.closure`: a factory's local imports, found without running it (a CI key);
* :mod:`.explicit`: files named by the spec (read by C code, invisible to the hook);
* :mod:`.check`: what changed since an entry was built, in the test process.

A recorded state is a small JSON dict (:meth:`.record.InputRecorder.result`); a later lookup
asks an :class:`.check.InputChecker` what changed since. Only the standard library is
imported by this package.
"""
