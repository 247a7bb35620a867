#!/usr/bin/env python
"""Train a conditional score model (or any msdiff LightningModule) from a config.

    python train.py --config sr8x_cmde.yaml [--trainer.max_steps N] [--trainer.devices 2 --trainer.strategy ddp]
    python train.py --config quickstart.yaml --print_config

A bare config name resolves to configs/. The run lives in ``<trainer.default_root_dir>/<name>``
(``name`` defaults to the config's file name): TensorBoard events, ``config.yaml`` and
``checkpoints/last.ckpt``. Re-running the same command continues that run from ``last.ckpt``;
``--ckpt_path PATH`` resumes from a given checkpoint instead.

Exit status: 0 done; 2 user error (one line on stderr names the problem); 74 environment error
(disk full, read-only file system, permission denied: one line names the path);
75 (``msdiff.callbacks.PREEMPTED_EXIT_CODE``) stopped by SIGUSR1/SIGTERM after saving ``last.ckpt``
(and requeued under SLURM); 130 interrupted (Ctrl-C). See README "Reliability".
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

if __name__ == "__main__":  # before torch is imported: keep freed CPU memory in-process (msdiff/malloc.py)
    from msdiff.malloc import use_caching_malloc

    use_caching_malloc()
    from msdiff.signals import install_preemption_handlers

    install_preemption_handlers()  # from the first line: a signal during start-up or restore exits 75

from msdiff.cli import experiment_name, resolve_config_argv, run_entry_point


def _check_resumable(ckpt_path: Path, model, what: str, verify: bool) -> None:
    """Raise ValueError unless the checkpoint's weights fit ``model`` (same keys and shapes)."""
    from msdiff.checkpoint_file import load_checkpoint

    ckpt = load_checkpoint(ckpt_path, what, verify=verify)  # memory-mapped: only the shapes are read
    state = ckpt.get("state_dict")
    if state is None:
        raise ValueError(f"{what} {ckpt_path}: not a Lightning checkpoint (no state_dict)")
    mine = model.state_dict()
    stored = (ckpt.get("msdiff") or {}).get("model", {}).get("class_path", "?")
    ours = f"{type(model).__module__}.{type(model).__qualname__}"
    for k, v in mine.items():
        if k not in state or tuple(state[k].shape) != tuple(v.shape):
            got = "missing" if k not in state else f"shape {tuple(state[k].shape)}"
            raise ValueError(f"{what} {ckpt_path}: checkpoint of a different model ({stored}): '{k}' is {got}, "
                             f"this config ({ours}) expects shape {tuple(v.shape)}")
    extra = sorted(set(state) - set(mine))
    if extra:
        raise ValueError(f"{what} {ckpt_path}: checkpoint of a different model ({stored}): unexpected weight "
                         f"'{extra[0]}' for this config ({ours})")


def _save_run_config(run_dir: Path, text: str) -> None:
    """Write the resolved config as run_dir/config.yaml; a resume with a different config keeps the
    earlier files and adds config-1.yaml, config-2.yaml, ..."""
    from msdiff.callbacks import atomic_write

    path, k = run_dir / "config.yaml", 0
    while path.exists():
        if path.read_text() == text:
            return
        k += 1
        path = run_dir / f"config-{k}.yaml"
    atomic_write(path, lambda f: f.write(text.encode()))


def main(argv: Optional[list[str]] = None) -> int:
    """Run train.py with ``argv`` (default: ``sys.argv``, rewritten in place so DDP ranks re-run the
    resolved command). Returns the exit status; raises user errors (see ``run_entry_point``)."""
    args = resolve_config_argv(None if argv is None else ["train.py", *argv])
    default_name = experiment_name(args) or "run"
    import warnings

    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # the EMA copy is eval by design
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")  # main(argv) in tests
    from msdiff.train_feedback import StepProgressBar, StepsTrainer, quiet_lightning

    quiet_lightning()  # issue 14: no tips, limit/interval notices, "0 Total Flops", pytree warning

    import yaml
    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

    from msdiff.callbacks import PREEMPTED_EXIT_CODE, AtomicCheckpointIO, Checkpointing, Preemption

    class TrainCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--name", type=Optional[str], default=None,
                                help="run name: the run lives in <trainer.default_root_dir>/<name> (default: config file name)")
            parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                                help="resume from this checkpoint (default: the run's checkpoints/last.ckpt if present)")
            parser.add_argument("--tf32", type=bool, default=True,
                                help="TF32 tensor cores for float32 matmuls and convolutions on NVIDIA GPUs (2.5x "
                                     "faster than plain fp32 on an H100); false: full fp32")
            parser.add_lightning_class_args(Checkpointing, "checkpoint")
            parser.add_lightning_class_args(Preemption, "preemption")

        def run_dir(self) -> Path:
            root = self._get(self.config, "trainer.default_root_dir") or "runs"
            return Path(root) / (self._get(self.config, "name") or default_name)

        def instantiate_trainer(self, **kwargs: Any):
            run_dir = self.run_dir()
            ckpt_cb = self._get(self.config_init, "checkpoint")
            if ckpt_cb.dirpath is None:
                ckpt_cb.dirpath = str(run_dir / "checkpoints")
            trainer_cfg = self._get(self.config_init, "trainer", default={})
            if trainer_cfg.get("logger") in (None, True):
                kwargs["logger"] = TensorBoardLogger(save_dir=str(run_dir.parent), name=run_dir.name, version="",
                                                     default_hp_metric=False)
            plugins = trainer_cfg.get("plugins") or []
            plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
            plugins.append(AtomicCheckpointIO())
            if SLURMEnvironment.detect():  # our Preemption callback replaces Lightning's requeue
                plugins.append(SLURMEnvironment(auto_requeue=False))
            kwargs["plugins"] = plugins
            kwargs["default_root_dir"] = str(run_dir)
            if trainer_cfg.get("enable_progress_bar") is not False:  # issue 14: progress over max_steps
                callbacks = trainer_cfg.get("callbacks") or []
                callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
                if not any(isinstance(c, ProgressBar) for c in callbacks):
                    kwargs["callbacks"] = [*callbacks, StepProgressBar()]
            return super().instantiate_trainer(**kwargs)

    cli = TrainCLI(
        model_class=None, datamodule_class=None, subclass_mode_model=True, subclass_mode_data=True,
        trainer_class=StepsTrainer,  # issue 14: `limit_val_batches: 1` is one batch, not 1.0 = all
        run=False, save_config_callback=None, seed_everything_default=0,
        parser_kwargs={"exit_on_error": False, "allow_abbrev": False}, args=None if argv is None else args[1:],
        trainer_defaults={"default_root_dir": "runs", "enable_checkpointing": False,
                          "check_val_every_n_epoch": None},
    )
    model, trainer = cli.model, cli.trainer
    run_dir = cli.run_dir()
    dump = cli.parser.dump(cli.config, skip_none=False)
    cfg = yaml.safe_load(dump)
    if hasattr(model, "msdiff_config"):
        model.msdiff_config = {"model": cfg["model"], "data": cfg.get("data")}

    import torch

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cli.config.get("tf32"))

    # ---- reliability (issue 17): one writer, trusted checkpoints, explicit config changes ----------
    from msdiff import signals
    from msdiff.callbacks import Preempted
    from msdiff.checkpoint_file import remove_stale_temporaries, resume_checkpoint
    from msdiff.resume_config import ApplyLearningRate, check_resume_changes, recorded_config_path
    from msdiff.run_lock import RunLock

    lock = RunLock(run_dir) if rank_zero_only.rank == 0 and not trainer.fast_dev_run else None
    if lock is not None:
        lock.acquire()
    try:
        ckpt_path = cli.config.get("ckpt_path")
        last = Path(cli._get(cli.config_init, "checkpoint").last_path)
        if lock is not None:
            remove_stale_temporaries(last.parent)  # left by a SIGKILL during a save
        what, verify = "--ckpt_path", True  # a given file is CRC-checked below, last.ckpt by resume_checkpoint
        if not ckpt_path and last.is_file() and not trainer.fast_dev_run:
            chosen, warning = resume_checkpoint(last)  # previous.ckpt when last.ckpt is corrupt
            if warning:
                rank_zero_warn_line(f"train.py: warning: {warning}")
            ckpt_path, what, verify = str(chosen), f"{chosen.name} of run {run_dir}", False
        recorded = recorded_config_path(run_dir)
        if ckpt_path:
            _check_resumable(Path(ckpt_path), model, what, verify)
            if recorded is not None and not trainer.fast_dev_run:
                from msdiff.checkpoint_file import checkpoint_step

                note = check_resume_changes(yaml.safe_load(recorded.read_text()) or {}, cfg, run_dir,
                                            checkpoint_step(ckpt_path))
                if note:
                    rank_zero_warn_line(f"train.py: {note}")
            lr = (cfg.get("model") or {}).get("init_args", {}).get("lr")
            if isinstance(lr, (int, float)):
                trainer.callbacks.append(ApplyLearningRate(lr))
            rank_zero_info(f"resuming from {ckpt_path}")
        if rank_zero_only.rank == 0 and not trainer.fast_dev_run:
            run_dir.mkdir(parents=True, exist_ok=True)
            _save_run_config(run_dir, dump)

        try:
            trainer.fit(model, datamodule=cli.datamodule, ckpt_path=ckpt_path, weights_only=True)
        except Preempted:
            return PREEMPTED_EXIT_CODE
        except SystemExit:  # Lightning turns Ctrl-C into exit(1)
            if signals.interrupted():
                raise KeyboardInterrupt from None
            raise
        if cli._get(cli.config_init, "preemption").triggered:
            return PREEMPTED_EXIT_CODE
        return 0
    finally:
        if lock is not None:
            lock.release()


def rank_zero_warn_line(line: str) -> None:
    """Print one line on stderr from rank 0 only."""
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    run_entry_point(main, prog="train.py")
