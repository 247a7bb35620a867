"""Speed, memory and accuracy studies of msdiff, run from the repository root as
``python -m benchmarks.<name>`` (e.g. ``python -m benchmarks.run --quick``). They are clients of the
library: a trained run is opened with `msdiff.run.TrainedRun`, samplers and guidance are library
classes, and results go to runs/benchmarks/ unless a script is told ``--update-results``."""
