"""msdiff: conditional score-based diffusion models (CDE, CDiffE, CMDE, VS-CMDE) and guided samplers.

The core (SDEs, networks, estimators, samplers, guidance) is plain PyTorch; only `msdiff.data`,
`msdiff.systems` and `msdiff.callbacks` import Lightning.
"""

__version__ = "0.1.0"
