"""Resuming a run with a changed config, explicitly (train.py).

A resumed run restores the optimizer and scheduler from the checkpoint, so a changed learning rate
on the command line used to be recorded in ``config-1.yaml`` but never applied. Now the new resolved
config is compared with the one the checkpoint was trained with (:func:`trained_config`): every
checkpoint stores its run's resolved config (`msdiff.run.RecordConfig`), so a deleted or hand-edited
``config.yaml``, or a second run pointed at the same ``--checkpoint.dirpath``, is judged against what
the weights actually ran with; older checkpoints fall back to their stored model/data over the run's
newest ``config*.yaml``:

* keys of :data:`RESUMABLE` take effect and are listed in one line (``--trainer.max_steps``, the
  logging / validation / checkpoint intervals, workers, devices, the validation sampler, speed
  switches, and the learning rate, which :class:`ApplyLearningRate` writes into the restored
  optimizer and scheduler);
* any other change (network, estimator and its SDEs, data, task, optimizer settings that the
  restored state would silently override, seed, precision) is refused with one line naming the keys,
  unless the user starts a new run (``--name``).

Keys missing from the recorded config (parameters added by a newer msdiff) are not compared.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl

#: Dotted config keys (a key or any key below it) that may change when a run is resumed.
RESUMABLE = (
    "name", "ckpt_path", "config", "checkpoint", "preemption", "tf32",
    "trainer.max_steps", "trainer.max_epochs", "trainer.min_steps", "trainer.min_epochs", "trainer.max_time",
    "trainer.log_every_n_steps", "trainer.val_check_interval", "trainer.check_val_every_n_epoch",
    "trainer.limit_val_batches", "trainer.num_sanity_val_steps", "trainer.devices", "trainer.num_nodes",
    "trainer.strategy", "trainer.accelerator", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.logger", "trainer.callbacks", "trainer.profiler", "trainer.default_root_dir",
    "data.init_args.num_workers", "data.init_args.pin_memory", "data.init_args.persistent_workers",
    "data.init_args.val_batch_size",
    "model.init_args.lr", "model.init_args.sampler", "model.init_args.sample_grid_size",
    "model.init_args.compile", "model.init_args.channels_last",
)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of nested dicts (lists are leaves)."""
    if not isinstance(cfg, dict):
        return {prefix: cfg}
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def is_resumable(key: str) -> bool:
    return any(key == r or key.startswith(r + ".") for r in RESUMABLE)


def changed_keys(recorded: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """{key: (recorded value, new value)} of the leaves that differ; keys absent from ``recorded``
    are skipped (new parameters), keys absent from ``new`` count as changed."""
    old, cur = flatten(recorded), flatten(new)
    missing = object()
    diff = {}
    for k in sorted(set(old) | set(cur)):
        if k not in old:
            continue
        a, b = old[k], cur.get(k, missing)
        if a != b:
            diff[k] = (a, "<absent>" if b is missing else b)
    return diff


def recorded_config_path(run_dir: str | Path) -> Optional[Path]:
    """The newest ``config.yaml`` / ``config-K.yaml`` of a run (what it last ran with), or None."""
    run_dir = Path(run_dir)
    files = [p for p in run_dir.glob("config*.yaml") if re.fullmatch(r"config(-\d+)?\.yaml", p.name)]
    if not files:
        return None
    return max(files, key=lambda p: int(p.stem.split("-")[1]) if "-" in p.stem else 0)


#: checkpoint entry holding the resolved config of the run that wrote it (plain YAML values)
RUN_CONFIG_KEY = "msdiff_run_config"


def trained_config(ckpt: dict, run_dir: str | Path) -> Optional[dict]:
    """The config ``ckpt`` was trained with, or None when unknown: the checkpoint's own
    :data:`RUN_CONFIG_KEY`; for checkpoints written before it, the run's newest ``config*.yaml``
    with the checkpoint's stored model and data (``msdiff`` entry) over it."""
    from msdiff.checkpoint_file import CHECKPOINT_KEY
    from msdiff.config_file import load_config_file

    stored = ckpt.get(RUN_CONFIG_KEY)
    if isinstance(stored, dict):
        return stored
    path = recorded_config_path(run_dir)
    recorded = load_config_file(path, "the run's recorded config") if path is not None else None
    cfg = dict(recorded) if isinstance(recorded, dict) else {}
    parts = ckpt.get(CHECKPOINT_KEY)
    if isinstance(parts, dict):
        cfg.update({k: parts[k] for k in ("model", "data") if parts.get(k) is not None})
    return cfg or None


def recorded_config_note(run_dir: str | Path, ckpt: dict) -> Optional[str]:
    """A warning when the run's newest ``config*.yaml`` is broken or disagrees with the config stored
    in the run's own checkpoint ``ckpt`` on a key that cannot change on resume (edited by hand): the
    checkpoint's config is what a resume is judged against. None when they agree, when there is no
    such file, or for a checkpoint without a stored config."""
    from msdiff.config_file import ConfigFileError, load_config_file

    stored, path = ckpt.get(RUN_CONFIG_KEY), recorded_config_path(run_dir)
    if not isinstance(stored, dict) or path is None:
        return None
    try:
        recorded = load_config_file(path)
    except ConfigFileError as e:
        return f"warning: {e}; ignored: a resume is judged against the config stored in its checkpoint"
    diff = changed_keys(recorded, stored) if isinstance(recorded, dict) else {"": (recorded, stored)}
    diff = {k: v for k, v in diff.items() if not is_resumable(k)}
    if not diff:
        return None
    keys = ", ".join(k for k in list(diff)[:4] if k) or "its content"
    return (f"warning: {path} differs from the config stored in the checkpoint ({keys}; edited by hand?); "
            "the checkpoint's config is what counts: change settings on the command line")


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def check_resume_changes(recorded: dict, new: dict, run_dir: Path, step: Optional[int],
                         ckpt: Optional[Path] = None) -> Optional[str]:
    """None when nothing changed; the one line listing the changed resumable keys; ValueError naming
    the keys that define the model (they cannot change on resume). ``ckpt`` is named when it lies
    outside ``run_dir`` (a shared or given checkpoint)."""
    from msdiff.estimators.legacy import upgrade_estimator_configs

    diff = changed_keys(upgrade_estimator_configs(recorded), new)  # runs recorded before typed estimator options
    refused = [k for k in diff if not is_resumable(k)]
    at = f" at step {step}" if step is not None else ""
    if ckpt is not None and Path(run_dir) not in Path(ckpt).parents:
        at += f" from {ckpt}"
    if refused:
        listed = ", ".join(f"{k} ({_short(diff[k][0])} -> {_short(diff[k][1])})" for k in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise ValueError(f"resuming run {run_dir}{at}: these keys cannot change on resume: {listed}{more}; "
                         "restore them, or start a new run with --name NEW_NAME")
    shown = {k: v for k, v in diff.items() if k not in ("config", "ckpt_path")}
    if not shown:
        return None
    return f"resuming run {run_dir}{at} with changed settings: " + ", ".join(
        f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in shown.items())


class ApplyLearningRate(pl.Callback):
    """Set the learning rate ``lr`` in the optimizers and schedulers after a checkpoint restored them
    (Lightning restores ``param_groups`` with the old lr). Scheduled learning rates keep their
    schedule: each group's lr and ``initial_lr`` and each scheduler's ``base_lrs`` are scaled by
    lr / old initial lr, which is what a run started with ``lr`` has at this step."""

    def __init__(self, lr: float) -> None:
        self.lr = float(lr)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                old = float(group.get("initial_lr", group["lr"]))
                if old != self.lr and old > 0:
                    group["lr"] = group["lr"] * (self.lr / old)
                    if "initial_lr" in group:
                        group["initial_lr"] = self.lr
        for cfg in trainer.lr_scheduler_configs:
            sched = cfg.scheduler
            base = getattr(sched, "base_lrs", None)
            if base:
                sched.base_lrs = [self.lr for _ in base]
            last = getattr(sched, "_last_lr", None)
            if last:
                sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
