"""A pytest plugin for the mutation run (``bench/mutation.py``): import torchxrayvision once, up front.

mutmut forks every mutant's test process from one fork server that has collected the tests. MediScan imports
torchxrayvision lazily (the CLI's ``--help`` stays instant), so without this every mutant whose tests build a
model paid that import again -- about 7 s on a 2-core machine, more than most of those tests take. Loaded with
``-p mediscan.devtools.mutation_preload``, the import happens in the fork server and every fork inherits it.
It goes through :mod:`mediscan.core.model`'s own import, which keeps the warning filters torchxrayvision
would otherwise reset (tests that turn warnings into errors still see them). Nothing is computed here: torch
must not have run before the fork server forks.

The imported objects are then frozen (:func:`gc.freeze`): they live as long as the fork server, and pytest ends
every session with five full garbage collections (to surface unraisable exceptions), which walked all ~400,000
of them in every mutant -- about 1.8 s a mutant, a third of the run. Frozen, a collection skips them.
"""
from __future__ import annotations

import gc

from mediscan.core import model

model._import_xrv_models()      # noqa: SLF001 -- the one import path that keeps the warning filters
gc.freeze()
