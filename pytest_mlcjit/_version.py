"""The package's version: one place, read by the build (``pyproject.toml``), the package's
face, the ``--version`` of the command line and the metadata of every compile."""

__version__ = "0.1.0"
