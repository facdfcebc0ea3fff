"""The library version: a leaf module, so the pruner and the checkpoint writers read it without importing the
package ``__init__`` (which imports them), and ``setup.cfg`` reads it without importing torch."""

__version__ = "0.1.0"
