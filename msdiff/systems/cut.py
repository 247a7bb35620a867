"""Old home of CUTSystem: the class_path `msdiff.systems.cut.CUTSystem` that configs and checkpoints
written before `msdiff.cut` existed name (a checkpoint stores it and is rebuilt from it)."""
from msdiff.cut.system import CUTSystem  # noqa: F401
