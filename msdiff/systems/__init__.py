"""LightningModules (layer 3): `score.ScoreSystem` for the conditional score models (CUT/FastCUT's
`CUTSystem` lives in `msdiff.cut.system`; `msdiff.systems.cut` re-exports it for the class_path that
earlier configs and checkpoints name). Only the entry points and tests import this package."""
