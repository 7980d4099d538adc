"""The package's version, in a module of its own: what reads it (``machine.py``, ``--version``,
``setup.py``) need not import the package root."""

__version__ = "0.1.0"
