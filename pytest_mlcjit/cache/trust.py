"""Trust: loading a library runs its code, so the cache refuses directories and files that
another user could have written, unless told otherwise (``--mlc-jit-allow-untrusted-cache``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pytest_mlcjit.errors import UntrustedCacheError

ALLOW_HINT = "Pass --mlc-jit-allow-untrusted-cache if you trust it."


class Trust:
    """Checks ownership and permissions; remembers the directories it has passed."""

    def __init__(self, root: Path, *, allow_untrusted: bool) -> None:
        self.root = root
        self.allow_untrusted = allow_untrusted
        self._trusted_dirs: set[Path] = set()

    def check_dir(self, path: Path) -> None:
        """UntrustedCacheError if ``path`` is owned by another user (not root) or writable by
        others without the sticky bit."""
        if self.allow_untrusted or path in self._trusted_dirs:
            return
        st = path.stat()
        what = "cache directory" if path == self.root else "directory"
        if hasattr(os, "getuid") and st.st_uid not in (os.getuid(), 0):
            raise UntrustedCacheError(
                f"{what} {path} is owned by uid {st.st_uid}, not by you "
                f"(uid {os.getuid()}); loading its libraries would run their code. {ALLOW_HINT}"
            )
        others_write = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if others_write and not st.st_mode & stat.S_ISVTX:
            raise UntrustedCacheError(
                f"{what} {path} is writable by other users "
                f"(mode {stat.filemode(st.st_mode)}); loading its libraries would run their "
                "code. Fix its permissions (chmod go-w) or pass --mlc-jit-allow-untrusted-cache."
            )
        self._trusted_dirs.add(path)

    def check_tree(self, control: Path) -> None:
        """The root, the control directory and its sub-directories."""
        if self.allow_untrusted:
            return
        self.check_dir(self.root)
        if control.is_dir():
            self.check_dir(control)
            for sub in control.iterdir():
                if sub.is_dir():
                    self.check_dir(sub)

    def check_owner(self, path: Path, st: os.stat_result) -> None:
        """Refuse an entry file another user created (possible in a sticky directory)."""
        if self.allow_untrusted or not hasattr(os, "getuid"):
            return
        if st.st_uid not in (os.getuid(), 0):
            raise UntrustedCacheError(
                f"{path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()}); "
                f"loading it would run its code. {ALLOW_HINT}"
            )
