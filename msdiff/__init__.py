"""msdiff: conditional score-based diffusion models (CDE, CDiffE, CMDE, VS-CMDE) and guided samplers.

The core (SDEs, tasks, the Gaussian field, datasets, networks, estimators, samplers, guidance,
metrics) is plain PyTorch and imports no Lightning; Lightning belongs to the application layer
above it (the data module, the systems, the callbacks, the modules only the entry points use) and
to the entry points train.py and sample.py. docs/architecture.md states the layers and the import
rules (checked by tests/test_import_rules.py); the facts
the docstrings cite are in docs/reference.md.
"""

__version__ = "0.1.0"
