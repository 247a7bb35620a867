"""Old home of UnpairedDataModule: the class_path `msdiff.unpaired.UnpairedDataModule` that configs and
checkpoints written before `msdiff.cut` existed name."""
from msdiff.cut.data import UnpairedDataModule  # noqa: F401
