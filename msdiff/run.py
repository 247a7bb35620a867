"""`TrainedRun`: a trained run's file turned back into live objects (layer 3, the front door).

    from msdiff.run import TrainedRun
    from msdiff.samplers import Heun

    run = TrainedRun.open("runs/quickstart/checkpoints/last.ckpt")
    x = run.sample(run.split("test")[0]["y"][None], Heun(steps=50))      # (draws, B, C, H, W) in [0, 1]

`TrainedRun.open(path)` reads the file once (`msdiff.checkpoint_file.load_checkpoint`: every
member's CRC-32 checked once, ``weights_only``, memory-mapped) and knows

* ``kind``: ``"score"`` (a train.py checkpoint of a `ScoreSystem`), ``"cut"`` (of a `CUTSystem`,
  also one saved before checkpoints carried the msdiff entry) or ``"export"`` (a ``sample.py
  --export`` inference file, `msdiff.sampling.inference_file`);
* ``step``: the optimizer step it was saved at (an export: the step of the checkpoint it came from),
  None when not recorded;
* ``config``: the resolved ``{"model", "data"}`` config it stores, with configs written before the
  estimators took typed options upgraded (`msdiff.estimators.legacy`): this is the one place that
  upgrade happens for stored runs.

Its builders: `system()` (a `ScoreSystem` in eval mode with the weights of that same read),
`cut_system()`, `task(override)` (built from the task's own config, not through the data module),
`split(name)` (the data module's split) and `sample(y, sampler)` (the draws sample.py makes for
conditions 0..B-1: the same noise streams, `msdiff.utils.example_noise`, so the same values).
Every error is a ValueError "--ckpt_path PATH: why" (the flag is `open`'s ``flag``).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import Dataset

import msdiff
from msdiff.checkpoint_file import CHECKPOINT_KEY, instantiate_config, load_checkpoint
from msdiff.cut.system import CUTSystem
from msdiff.data import ConditionalDataModule
from msdiff.estimators.legacy import upgrade_estimator_configs
from msdiff.guidance.base import Guidance, Unguided
from msdiff.resume_config import RUN_CONFIG_KEY
from msdiff.samplers import REFERENCE_SAMPLER, PredictorCorrector, Sampler
from msdiff.sampling.inference_file import INFERENCE_FORMAT
from msdiff.systems.score import ScoreSystem
from msdiff.tasks import Task
from msdiff.utils import example_noise

__all__ = ["TrainedRun", "RunKind", "RecordConfig", "reference_sampler"]

RunKind = Literal["score", "cut", "export"]
_EXPORT_META = ("format", "version", "global_step")  # entries of an inference file's config that are not config


class RecordConfig(pl.Callback):
    """Stores the run's resolved config (plain dicts, as train.py resolved it) in every checkpoint: its
    ``{"model", "data"}`` entries and the msdiff version under ``checkpoint["msdiff"]`` (what
    `TrainedRun` reads), the whole config under `msdiff.resume_config.RUN_CONFIG_KEY` (what a resume
    is judged against)."""

    def __init__(self, config: dict) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {"model": self.config["model"], "data": self.config.get("data"),
                                      "version": msdiff.__version__}
        checkpoint[RUN_CONFIG_KEY] = self.config


def reference_sampler() -> PredictorCorrector:
    """The MSDiff reference's sampler (`msdiff.samplers.REFERENCE_SAMPLER`: predictor-corrector, 1000
    steps, snr 0.15): `TrainedRun.sample`'s default, as sample.py's without --sampler."""
    return PredictorCorrector(**REFERENCE_SAMPLER["init_args"])


@dataclass
class TrainedRun:
    """One trained run's file (module doc); build it with `TrainedRun.open(path)`."""

    path: Path
    kind: RunKind
    step: Optional[int]
    config: dict
    flag: str = "--ckpt_path"
    _weights: dict = field(default_factory=dict, repr=False)  # the file's tensors (memory-mapped)
    _sampling_system: Optional[ScoreSystem] = field(default=None, repr=False)

    # ---- reading the file ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, flag: str = "--ckpt_path") -> "TrainedRun":
        """Read `path` once (integrity checked once) and tell its kind, step and config; ValueError
        "FLAG PATH: why" for a missing, corrupt or foreign file."""
        path = Path(path)
        obj = load_checkpoint(path, flag)
        entry = obj.get(CHECKPOINT_KEY)
        if isinstance(entry, dict) and entry.get("format") == INFERENCE_FORMAT:
            config = {k: v for k, v in entry.items() if k not in _EXPORT_META}
            step = entry.get("global_step")
            return cls(path, "export", None if step is None else int(step), upgrade_estimator_configs(config), flag,
                       {"net": obj["net"], "estimator": obj["estimator"]})
        if "state_dict" not in obj:
            raise ValueError(f"{flag} {path}: not an msdiff checkpoint (no 'msdiff' config entry); "
                             "expected a train.py checkpoint or a sample.py --export file")
        step = obj.get("global_step")
        step = None if step is None else int(step)
        if isinstance(entry, dict) and isinstance(entry.get("model"), dict):
            config = {k: v for k, v in entry.items() if k != "version"}
            kind: RunKind = "cut" if _is_cut_class(entry["model"].get("class_path")) else "score"
        elif "nce_layers" in (obj.get("hyper_parameters") or {}):  # a CUT checkpoint without the msdiff entry
            config = {"model": {"class_path": f"{CUTSystem.__module__}.{CUTSystem.__name__}",
                                "init_args": dict(obj["hyper_parameters"])}, "data": None}
            kind = "cut"
        else:
            raise ValueError(f"{flag} {path}: not an msdiff checkpoint (no 'msdiff' config entry); "
                             "expected a train.py checkpoint or a sample.py --export file")
        return cls(path, kind, step, upgrade_estimator_configs(config), flag, {"state_dict": obj["state_dict"]})

    def _where(self) -> str:
        return f"{self.flag} {self.path}"

    # ---- the systems ----------------------------------------------------------------------------------
    def system(self) -> ScoreSystem:
        """A new `ScoreSystem` (network, EMA, estimator incl. VS-CMDE's sigma_max_y) with the file's
        weights, in eval mode on the CPU (an export holds the EMA weights only: both copies get them)."""
        if self.kind == "cut":
            raise ValueError(f"{self._where()}: a CUT checkpoint (use cut_system(), or sample.py --input to translate)")
        system = instantiate_config(self.config["model"], ScoreSystem)
        if self.kind == "export":
            parts = [(system.ema.net, self._weights["net"]), (system.net, self._weights["net"]),
                     (system.estimator, self._weights["estimator"])]
        else:
            parts = [(system, self._weights["state_dict"])]
        return self._with_weights(system, parts)

    def cut_system(self) -> CUTSystem:
        """A new `CUTSystem` with the file's weights, in eval mode on the CPU (translate with
        ``.translate(x)``; the EMA generator when trained with one)."""
        if self.kind != "cut":
            raise ValueError(f"{self._where()}: not a CUT checkpoint (a {self.kind} file; use system())")
        system = instantiate_config(self.config["model"], CUTSystem)
        return self._with_weights(system, [(system, self._weights["state_dict"])])

    def _with_weights(self, system: pl.LightningModule, parts: list[tuple[torch.nn.Module, dict]]):
        """``system`` in eval mode after loading each (module, state dict) of ``parts`` (strictly);
        ValueError naming the file when the weights do not fit the stored config."""
        try:
            for module, state in parts:
                module.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{self._where()}: weights do not match the stored model config "
                             f"({str(e).splitlines()[0]})") from None
        return system.eval()

    # ---- the data -------------------------------------------------------------------------------------
    def _data_config(self, task: Optional[str] = None) -> dict:
        data = self.config.get("data")
        if not isinstance(data, dict) or "class_path" not in data:
            raise ValueError(f"{self._where()}: the file stores no data config (expected train.py's 'data' entry)")
        if task is None:
            return data
        data = copy.deepcopy(data)
        dataset = data.get("init_args", {}).get("dataset")
        if not isinstance(dataset, dict):
            raise ValueError("--task: the checkpoint's data config has no dataset to give a task to")
        dataset.setdefault("init_args", {})["task"] = _task_config(task)
        return data

    def task(self, override: Optional[str] = None) -> Optional[Task]:
        """The run's task (its forward operator, consistency and condition protocol), built from the
        task's own config; ``override`` (sample.py's --task: a class path or a JSON {class_path,
        init_args}) replaces it. A dataset that defines its task itself (the Gaussian field's exact
        problem, Edges2Shoes' edges) is asked for it when its config names none."""
        if override is not None:
            cfg = _task_config(override)
            return _build_task(cfg, f"--task {override}")
        dataset = self._data_config().get("init_args", {}).get("dataset") or {}
        cfg = (dataset.get("init_args") or {}).get("task")
        if isinstance(cfg, dict):
            return _build_task(cfg, f"{self._where()}: the stored task")
        try:  # the dataset's own task: build its test dataset (the data module builds no split)
            dm = instantiate_config(self._data_config(), pl.LightningDataModule)
            return dm.dataset("test").task
        except (OSError, ValueError) as e:
            raise ValueError(f"{self._where()}: the task comes from the run's dataset, which cannot be built here "
                             f"({str(e).splitlines()[0]}); pass --task CLASS") from None

    def split(self, name: str, task: Optional[str] = None) -> Dataset:
        """The data module's split ``name`` ("train", "val" or "test", with the run's val/test
        sizes); ``task`` (as in `task`) replaces the dataset's task, so that y is measured by it."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"--split {name}: expected train, val or test")
        if task is not None:
            _build_task(_task_config(task), f"--task {task}")  # its own error before the data module's
        dm = instantiate_config(self._data_config(task), pl.LightningDataModule)
        if not isinstance(dm, ConditionalDataModule):
            raise ValueError(f"{self._where()}: data module {type(dm).__name__} has no split(name); expected "
                             "msdiff.data.ConditionalDataModule")
        return dm.split(name)

    # ---- sampling -------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, y: Tensor, sampler: Optional[Sampler] = None, *, draws: int = 1, seed: int = 0,
               guidance: Optional[Guidance] = None, mask: Optional[Tensor] = None, task: Optional[Task] = None) -> Tensor:
        """Samples x ~ p(x | y) for the conditions y (B, C_y, H, W), with the EMA network, as a
        (draws, B, C_x, H, W) tensor in [0, 1] on y's device. Draw k of row i uses the noise stream
        of (seed, i, k), as sample.py does for condition i: the rows of sample.py's first batch.
        ``sampler`` defaults to `reference_sampler()`; ``guidance`` (default: none) may use the task
        (default: the run's; e.g. `task("msdiff.tasks.Inpainting")` for AGG zero-shot) and ``mask``
        (inpainting's known pixels), as sample.py's --guidance does."""
        if draws < 1:
            raise ValueError(f"draws={draws}: expected a positive integer")
        if self._sampling_system is None:
            self._sampling_system = self.system()
        system = self._sampling_system.to(y.device)
        sampler = reference_sampler() if sampler is None else sampler
        task = self.task() if guidance is not None and task is None else task
        guidance = Unguided() if guidance is None else guidance
        y = y.float()
        rows = range(y.shape[0])
        out = [guidance.sample(system.estimator, system.ema.net, y, sampler, system.x_channels,
                               generator=example_noise(seed, rows, k, y.device), task=task, mask=mask)
               for k in range(draws)]
        return torch.stack(out).clamp(0.0, 1.0)


def _is_cut_class(class_path: Optional[str]) -> bool:
    """Whether a stored model class path names `CUTSystem` (also its older path msdiff.systems.cut)."""
    return isinstance(class_path, str) and class_path.rpartition(".")[2] == CUTSystem.__name__


def _task_config(option: str) -> dict:
    """sample.py's --task value (a class path or a JSON {class_path, init_args}) as a config dict."""
    try:
        return json.loads(option) if option.lstrip().startswith("{") else {"class_path": option}
    except json.JSONDecodeError as e:
        raise ValueError(f"--task {option}: not valid JSON ({e.msg})") from None


def _build_task(cfg: dict, where: str) -> Task:
    """The task of config ``cfg``; ValueError "WHERE: cause" (jsonargparse's own message, e.g. an
    unknown class with its "did you mean") on failure."""
    from msdiff.cli import jsonargparse_cause

    try:
        return instantiate_config(cfg, Task)
    except Exception as e:
        text = str(e).strip()
        cause = jsonargparse_cause(text) or (text.splitlines() or [type(e).__name__])[0]
        cause = cause[len("obj"):].lstrip(".:").lstrip() if cause.startswith("obj") else cause  # instantiate_config's key
        raise ValueError(f"{where}: {cause}") from None
