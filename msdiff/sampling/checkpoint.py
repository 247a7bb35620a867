"""Rebuilding what sample.py samples from (layer 3, Lightning): the system, its data and its task.

* `load_system(ckpt_path)`: a train.py checkpoint (`msdiff.systems.score.load_score_system`) or an
  inference file (`msdiff.sampling.inference_file`), as a `ScoreSystem` in eval mode plus its
  stored {"model", "data"} config; `trained_step` is the optimizer step it was saved at.
* `build_data(cfg, split, task)`: the checkpoint's `ConditionalDataModule`, its split and its task
  (`.split(name)`, `.task`), with `--task` replacing the task.
"""
from __future__ import annotations

import copy
import json
from typing import Optional

import lightning.pytorch as pl
from torch.utils.data import Dataset

from msdiff.checkpoint_file import CHECKPOINT_KEY, instantiate_config, load_checkpoint
from msdiff.data import ConditionalDataModule
from msdiff.sampling.inference_file import is_inference_file
from msdiff.systems.score import ScoreSystem, load_score_system
from msdiff.tasks import Task

__all__ = ["load_system", "trained_step", "build_data"]


def load_system(ckpt_path: str) -> tuple[ScoreSystem, dict]:
    """(ScoreSystem in eval mode, its {"model", "data"} config) from a train.py checkpoint or an
    inference file; ValueError naming the file when it is neither."""
    obj = load_checkpoint(ckpt_path)  # CRC-32 of every member, weights_only; "--ckpt_path PATH: why"
    if is_inference_file(obj):
        cfg = {k: v for k, v in obj["msdiff"].items() if k not in ("format", "version", "global_step")}
        system = instantiate_config(cfg["model"], ScoreSystem)
        try:
            system.ema.net.load_state_dict(obj["net"])
            system.net.load_state_dict(obj["net"])  # the file holds the EMA weights only
            system.estimator.load_state_dict(obj["estimator"])
        except RuntimeError as e:
            raise ValueError(f"--ckpt_path {ckpt_path}: weights do not match the stored config "
                             f"({str(e).splitlines()[0]})") from None
        system.msdiff_config = cfg
        return system.eval(), cfg
    if not (isinstance(obj.get(CHECKPOINT_KEY), dict) and "state_dict" in obj):
        raise ValueError(f"--ckpt_path {ckpt_path}: not an msdiff checkpoint (no 'msdiff' config entry); "
                         "expected a train.py checkpoint or a sample.py --export file")
    del obj
    system = load_score_system(ckpt_path, map_location="cpu")
    return system.eval(), system.msdiff_config


def trained_step(ckpt_path: str) -> Optional[int]:
    """The optimizer step a train.py checkpoint (its "global_step") or an inference file (the step of
    the checkpoint it was exported from, when recorded) was saved at; None if not recorded."""
    obj = load_checkpoint(ckpt_path, verify=False)
    step = obj.get("global_step")
    if step is None and isinstance(obj.get(CHECKPOINT_KEY), dict):
        step = obj[CHECKPOINT_KEY].get("global_step")
    return None if step is None else int(step)


def build_data(cfg: dict, split: Optional[str], task: Optional[str] = None) -> tuple[Optional[Dataset], Optional[Task]]:
    """(the `split` dataset or None, the task) of the checkpoint's data module (`ConditionalDataModule`).

    `task` replaces the dataset's task: a class path (`msdiff.tasks.Inpainting`) or a JSON
    {"class_path", "init_args"} dict, e.g. for AGG solving another inverse problem zero-shot."""
    data_cfg = cfg.get("data")
    if not isinstance(data_cfg, dict) or "class_path" not in data_cfg:
        raise ValueError("--ckpt_path: the checkpoint stores no data config (expected train.py's 'data' entry)")
    if task is not None:
        data_cfg = copy.deepcopy(data_cfg)
        try:
            task_cfg = json.loads(task) if task.lstrip().startswith("{") else {"class_path": task}
        except json.JSONDecodeError as e:
            raise ValueError(f"--task {task}: not valid JSON ({e.msg})") from None
        dataset_cfg = data_cfg.get("init_args", {}).get("dataset")
        if not isinstance(dataset_cfg, dict):
            raise ValueError("--task: the checkpoint's data config has no dataset to give a task to")
        dataset_cfg.setdefault("init_args", {})["task"] = task_cfg
        _check_task(task, task_cfg)
    dm = instantiate_config(data_cfg, pl.LightningDataModule)
    if not isinstance(dm, ConditionalDataModule):
        raise ValueError(f"--ckpt_path: data module {data_cfg['class_path']} has no split(name); expected "
                         "msdiff.data.ConditionalDataModule")
    if split is not None and split not in ("train", "val", "test"):
        raise ValueError(f"--split {split}: expected train, val or test")
    if split is not None:
        return dm.split(split), dm.task
    try:  # --input: only the task is needed; datasets of files build it without their files if they can
        return None, dm.task
    except (OSError, ValueError) as e:
        task_cfg = data_cfg.get("init_args", {}).get("dataset", {}).get("init_args", {}).get("task")
        if isinstance(task_cfg, dict):
            return None, instantiate_config(task_cfg, Task)
        raise ValueError(f"--input: the task comes from the checkpoint's data set, which cannot be built here "
                         f"({str(e).splitlines()[0]}); pass --task CLASS") from None


def _check_task(option: str, task_cfg: dict) -> None:
    """ValueError naming --task with jsonargparse's real cause (e.g. a misspelled class, with a
    "did you mean") instead of the data module's nested report."""
    from msdiff.cli import jsonargparse_cause

    try:
        instantiate_config(task_cfg, Task)
    except Exception as e:
        text = str(e).strip()
        cause = jsonargparse_cause(text) or (text.splitlines() or [type(e).__name__])[0]
        cause = cause[len("obj"):].lstrip(".:").lstrip() if cause.startswith("obj") else cause  # instantiate_config's key
        raise ValueError(f"--task {option}: {cause}") from None
