"""LightningModules (layer 3): `score.ScoreSystem` for the conditional score models and
`cut.CUTSystem` for CUT/FastCUT. Only the entry points and tests import this package."""
