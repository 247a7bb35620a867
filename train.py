#!/usr/bin/env python
"""Train a conditional score model (or any msdiff LightningModule) from a config.

    python train.py --config sr8x_cmde.yaml [--trainer.max_steps N] [--trainer.devices 2 --trainer.strategy ddp]
    python train.py --config quickstart.yaml --print_config

A bare config name resolves to configs/. The run lives in ``<trainer.default_root_dir>/<name>``
(``name`` defaults to the config's file name): TensorBoard events, ``config.yaml`` and
``checkpoints/last.ckpt``. Re-running the same command continues that run from ``last.ckpt``;
``--ckpt_path PATH`` resumes from a given checkpoint instead.

Exit status: 0 done (also when a signal arrives after the last step); 2 user error (one line on
stderr names the problem); 74 environment error (disk full, read-only file system, permission
denied, a data-loader worker killed from outside: one line names the path or worker);
75 (``msdiff.callbacks.PREEMPTED_EXIT_CODE``) stopped by SIGUSR1/SIGTERM after saving ``last.ckpt``
(and requeued under SLURM); 130 interrupted (Ctrl-C). See README "Reliability".
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

if __name__ == "__main__":  # before torch is imported: keep freed CPU memory in-process (msdiff/malloc.py)
    from msdiff.malloc import use_caching_malloc

    use_caching_malloc()
    from msdiff.signals import install_preemption_handlers

    install_preemption_handlers()  # from the first line: a signal during start-up or restore exits 75

from msdiff.cli import experiment_name, resolve_config_argv, run_entry_point

#: the experiments a bare --config name resolves to: the clone's configs/ (also when msdiff is installed)
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _check_resumable(ckpt_path: Path, model, what: str, verify: bool) -> dict:
    """The checkpoint (memory-mapped); ValueError unless its weights fit ``model`` (same keys and shapes)."""
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
    return ckpt


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


def derive_network_shape(cfg, given: Callable[[], Any]) -> None:
    """Fill in the network values that other keys of a ScoreSystem config determine, in place:

    * ``net.image_size`` = the dataset's ``image_size`` (when the dataset has one);
    * ``net.out_channels`` = ``estimator.out_channels(x_channels, y_channels)`` (CDE predicts the
      score of x alone, CDiffE/CMDE/VS-CMDE the joint score of (x, y)), with y_channels =
      ``net.in_channels - model.x_channels``.

    A value the config and the command line leave out is filled in; a value they give must agree
    (ValueError naming both keys). ``given()`` returns the same command parsed without defaults
    (jsonargparse's ``parse_args(..., defaults=False)``): what the user wrote, asked only when a
    value disagrees. jsonargparse's ``link_arguments`` cannot target the init_args of
    a class_path value nested in another one (net inside model: the link is dropped silently), and
    its dumps leave linked values out; this keeps both the run's config.yaml and the checkpoint's
    config complete."""
    model = cfg.get("model")
    args = model.get("init_args") if model is not None else None
    if args is None or args.get("net") is None or args.get("estimator") is None or "x_channels" not in args:
        return
    net = args.net.init_args
    dataset = ((cfg.get("data") or {}).get("init_args") or {}).get("dataset")
    size = dataset.init_args.get("image_size") if dataset is not None and dataset.get("init_args") else None
    def written(key: str) -> bool:
        net_given = (((given().get("model") or {}).get("init_args") or {}).get("net") or {}).get("init_args") or {}
        return key in net_given

    if size is not None and "image_size" in net:
        _set_derived(args.net, "image_size", size, "data.init_args.dataset.init_args.image_size", written)
    if "out_channels" in net and "in_channels" in net:
        x_channels = int(args.x_channels)
        y_channels = int(net.in_channels) - x_channels
        if y_channels < 1:
            raise ValueError(f"model.init_args.net.init_args.in_channels={net.in_channels}: expected x_channels "
                             f"({x_channels}) + the condition's channels, i.e. more than {x_channels}")
        from msdiff.checkpoint_file import instantiate_config
        from msdiff.estimators import ConditionalEstimator

        from msdiff.cli import exception_chain, failing_key

        try:
            estimator = instantiate_config(args.estimator.as_dict(), ConditionalEstimator)  # cheap: no network
        except ValueError as e:  # a constructor's check: name the key it came from
            key = failing_key({"estimator": args.estimator.as_dict()}, e, "model.init_args.") or "model.init_args.estimator"
            raise ValueError(f"{key}: {str(exception_chain(e)[-1]).strip()}") from None
        _set_derived(args.net, "out_channels", estimator.out_channels(x_channels, y_channels),
                     f"{type(estimator).__name__}.out_channels(x_channels={x_channels}, y_channels={y_channels})", written)


def _set_derived(net_cfg, key: str, value: int, source: str, written: Callable[[str], bool]) -> None:
    current = net_cfg.init_args.get(key)
    if current is not None and current != value and written(key):
        raise ValueError(f"model.init_args.net.init_args.{key}={current}: disagrees with {source} = {value}; "
                         f"leave {key} out of the config (it is derived)")
    net_cfg.init_args[key] = value


def _print_config_flag(args: list[str]) -> tuple[list[str], Optional[str]]:
    """Take ``--print_config[=skip_null]`` out of ``args``: train.py prints the config itself, after
    :func:`derive_network_shape` (jsonargparse would print it before)."""
    rest, flag = [], None
    for a in args:
        if a == "--print_config" or a.startswith("--print_config="):
            flag = a.partition("=")[2]
            if flag not in ("", "skip_null"):
                raise ValueError(f"--print_config={flag}: expected no value or skip_null")
        else:
            rest.append(a)
    return rest, flag


def build_cli(args: Optional[list[str]], default_name: str = "run", instantiate: bool = True):
    """Parse train.py's command line ``args`` (no program name; None: ``sys.argv``) into a
    LightningCLI whose config has the derived network values filled in; ``instantiate=False``
    builds no model, data or trainer."""
    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from msdiff.callbacks import AtomicCheckpointIO, Checkpointing, Preemption
    from msdiff.config_file import install_yaml_loader
    from msdiff.train_feedback import StepProgressBar, StepsTrainer
    from msdiff.user_paths import check_dir_path, expand_path

    install_yaml_loader()  # every config file and piece: bounded size and expansion, no key twice

    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")  # main(argv) in tests
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

        def before_instantiate_classes(self) -> None:
            command = list(sys.argv[1:] if args is None else args)
            derive_network_shape(self.config, lambda: self.parser.parse_args(command, defaults=False))

        def instantiate_classes(self) -> None:
            if not instantiate:
                return
            from argparse import ArgumentError

            from msdiff.cli import failing_key

            try:
                super().instantiate_classes()
            except (ValueError, TypeError) as e:  # a constructor's check: name the config key it came from
                if isinstance(e, ArgumentError):
                    raise
                import yaml

                resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
                key = failing_key({k: resolved.get(k) for k in ("model", "data")}, e)
                if key is None:
                    raise
                from msdiff.cli import exception_chain

                root = exception_chain(e)[-1]
                raise ValueError(f"{key}: {str(root).strip()}") from None

        def run_dir(self) -> Path:
            """<root>/<name>, $VARs and ~ expanded, checked as a folder to write (README "Reliability")."""
            root = expand_path(self._get(self.config, "trainer.default_root_dir") or "runs",
                               "--trainer.default_root_dir")
            check_dir_path(root, "--trainer.default_root_dir")
            name = self._get(self.config, "name")
            run_name = expand_path(name or default_name, "--name")
            if Path(run_name).is_absolute() or ".." in Path(run_name).parts:
                raise ValueError(f"--name {name}: expected a name inside --trainer.default_root_dir ({root}), "
                                 "not an absolute path or one with '..'")
            return check_dir_path(Path(root) / run_name,
                                  "--name" if name else f"the run name {default_name} (from --config)")

        def instantiate_trainer(self, **kwargs: Any):
            run_dir = self.run_dir()
            ckpt_cb = self._get(self.config_init, "checkpoint")
            if ckpt_cb.dirpath is None:
                ckpt_cb.dirpath = str(run_dir / "checkpoints")
            else:
                ckpt_cb.dirpath = str(check_dir_path(expand_path(ckpt_cb.dirpath, "--checkpoint.dirpath"),
                                                     "--checkpoint.dirpath"))
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

    return TrainCLI(
        model_class=None, datamodule_class=None, subclass_mode_model=True, subclass_mode_data=True,
        trainer_class=StepsTrainer,  # issue 14: `limit_val_batches: 1` is one batch, not 1.0 = all
        run=False, save_config_callback=None, seed_everything_default=0,
        parser_kwargs={"exit_on_error": False, "allow_abbrev": False}, args=args,
        trainer_defaults={"default_root_dir": "runs", "enable_checkpointing": False,
                          "check_val_every_n_epoch": None},
    )


_parsers: list = []  # the parser resolved_config built first (building one costs a second)


def resolved_config(config, *overrides) -> dict:
    """The effective config of ``train.py --config CONFIG OVERRIDES...`` as a dict: pieces inlined,
    defaults and derived network values filled in, nothing instantiated (what ``--print_config``
    prints). ``config`` is a path or a name in configs/ (as for ``--config``)."""
    import yaml

    args = ["--config", resolve_config_argv(["train.py", "--config", str(config)], CONFIG_DIR)[2], *map(str, overrides)]
    if _parsers:
        cfg = _parsers[0].parse_args(args)
        derive_network_shape(cfg, lambda: _parsers[0].parse_args(args, defaults=False))
    else:
        cli = build_cli(args, instantiate=False)
        _parsers.append(cli.parser)
        cfg = cli.config
    return yaml.safe_load(_parsers[0].dump(cfg, skip_unset=False))


def main(argv: Optional[list[str]] = None) -> int:
    """Run train.py with ``argv`` (default: ``sys.argv``, rewritten in place so DDP ranks re-run the
    resolved command). Returns the exit status; raises user errors (see ``run_entry_point``)."""
    args = resolve_config_argv(None if argv is None else ["train.py", *argv], CONFIG_DIR)
    default_name = experiment_name(args) or "run"
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # the EMA copy is eval by design
    from msdiff.train_feedback import quiet_lightning

    quiet_lightning()  # issue 14: no tips, limit/interval notices, "0 Total Flops", pytree warning

    import yaml
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

    from msdiff.callbacks import PREEMPTED_EXIT_CODE

    cli_args, print_flag = _print_config_flag(list(args[1:]))
    if print_flag is not None:
        cli = build_cli(cli_args, default_name, instantiate=False)
        print(cli.parser.dump(cli.config, skip_unset=print_flag == "skip_null"), end="")
        raise SystemExit(0)
    cli = build_cli(None if argv is None and cli_args == sys.argv[1:] else cli_args, default_name)
    model, trainer = cli.model, cli.trainer
    run_dir = cli.run_dir()
    dump = cli.parser.dump(cli.config, skip_unset=False)
    cfg = yaml.safe_load(dump)
    from msdiff.run import RecordConfig
    from msdiff.train_feedback import ValidationRecord

    record = ValidationRecord()
    trainer.callbacks += [RecordConfig(cfg), record]  # what rebuilds the run, and what a resume is judged against

    import torch

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cli.config.get("tf32"))

    # ---- reliability (issue 17): one writer, trusted checkpoints, explicit config changes ----------
    from msdiff import signals
    from msdiff.callbacks import Preempted, is_final_step
    from msdiff.checkpoint_file import remove_stale_temporaries, resume_checkpoint
    from msdiff.resume_config import ApplyLearningRate, check_resume_changes, recorded_config_note, trained_config
    from msdiff.run_lock import RunLock
    from msdiff.user_paths import expand_path

    last = Path(cli._get(cli.config_init, "checkpoint").last_path)
    lock = RunLock(run_dir, last.parent) if rank_zero_only.rank == 0 and not trainer.fast_dev_run else None
    if lock is not None:
        lock.acquire()  # one writer per run directory and per checkpoint folder
    try:
        ckpt_path = cli.config.get("ckpt_path")
        ckpt_path = expand_path(ckpt_path, "--ckpt_path") if ckpt_path else ckpt_path
        if lock is not None:
            remove_stale_temporaries(last.parent)  # left by a SIGKILL during a save
        what, verify = "--ckpt_path", True  # a given file is CRC-checked below, last.ckpt by resume_checkpoint
        if not ckpt_path and last.is_file() and not trainer.fast_dev_run:
            chosen, warning = resume_checkpoint(last)  # previous.ckpt when last.ckpt is corrupt
            if warning:
                rank_zero_warn_line(f"train.py: warning: {warning}")
            ckpt_path, what, verify = str(chosen), f"{chosen.name} of run {run_dir}", False
        if ckpt_path:
            ckpt = _check_resumable(Path(ckpt_path), model, what, verify)
            trained = trained_config(ckpt, run_dir)
            own = Path(os.path.abspath(ckpt_path)).is_relative_to(os.path.abspath(run_dir))
            edited = recorded_config_note(run_dir, ckpt) if own else None
            if edited and not trainer.fast_dev_run:
                rank_zero_warn_line(f"train.py: {edited}")
            if trained is not None and not trainer.fast_dev_run:
                step = ckpt.get("global_step")
                note = check_resume_changes(trained, cfg, run_dir, int(step) if step is not None else None,
                                            Path(ckpt_path))
                if note:
                    rank_zero_warn_line(f"train.py: {note}")
            del ckpt
            lr = (cfg.get("model") or {}).get("init_args", {}).get("lr")
            if isinstance(lr, (int, float)):
                trainer.callbacks.append(ApplyLearningRate(lr))
            rank_zero_info(f"resuming from {ckpt_path}")
        if rank_zero_only.rank == 0 and not trainer.fast_dev_run:
            run_dir.mkdir(parents=True, exist_ok=True)
            _save_run_config(run_dir, dump)

        try:
            trainer.fit(model, datamodule=cli.datamodule, ckpt_path=ckpt_path, weights_only=True)
        except Preempted:  # left the last validation early when the run is complete: exit 0
            return 0 if is_final_step(trainer) else PREEMPTED_EXIT_CODE
        except SystemExit:  # Lightning turns Ctrl-C into exit(1)
            if signals.interrupted():
                raise KeyboardInterrupt from None
            raise
        except Exception as e:
            raise_naming_log_folder(e, trainer)
            raise
        if cli._get(cli.config_init, "preemption").triggered:
            return PREEMPTED_EXIT_CODE
        if trainer.fast_dev_run:
            return 0
        note = final_validation(trainer, model, cli.datamodule, record)
        if rank_zero_only.rank == 0:
            print("\n".join(what_next(run_dir, last, trainer.global_step, model, cli.datamodule, cfg, record, note)), flush=True)
        return 0
    finally:
        if lock is not None:
            lock.release()


def raise_naming_log_folder(e: Exception, trainer) -> None:
    """Re-raise an environment error that names no file (a buffered write flushed by TensorBoard's
    writer thread or by a logger's file object) as one naming the logger's folder; else return."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from msdiff.cli import environment_error

    env = environment_error(e)
    if env is not None and env.filename is None and isinstance(trainer.logger, (TensorBoardLogger, CSVLogger)):
        where = f"{Path(trainer.logger.log_dir)} (the logger's files)"
        raise OSError(env.errno, env.strerror or str(env), where) from None


def final_validation(trainer, model, datamodule, record) -> Optional[str]:
    """Validate once more when the run ended between validations (e.g. a run shorter than
    ``val_check_interval``), so that its last step has a grid and val/* scalars; returns why there
    are none when validation is off."""
    if record.step == trainer.global_step:
        return None
    if not trainer.limit_val_batches:
        return "none: validation is off (trainer.limit_val_batches 0), so no grid and no val/* scalars"
    trainer.validate(model, datamodule=datamodule, verbose=False)
    return None if record.step == trainer.global_step else "none: the data module has no validation batches"


def _command_path(path: str | Path) -> str:
    """``path`` relative to the working directory when below it (as a user would type it)."""
    import os

    path, cwd = Path(os.path.abspath(path)), Path(os.path.abspath(Path.cwd()))  # (symlinks kept: a venv's python)
    return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)


def what_next(run_dir: Path, last: Path, step: int, model, datamodule, cfg: dict, record,
              note: Optional[str]) -> list[str]:
    """The closing lines of a finished run (`msdiff.train_feedback.closing_lines`): run directory,
    checkpoint, the TensorBoard command, a sample.py command that works as printed (a CUT run:
    translating the data's test folder of domain A, with FID against B; the embedded procedural
    domains are first written to RUN/test_images/{A,B}), the last validation."""
    import shlex
    import shutil

    from msdiff.cut.system import CUTSystem
    from msdiff.train_feedback import closing_lines

    found = shutil.which("python")
    python = "python" if found and Path(found).resolve() == Path(sys.executable).resolve() else _command_path(sys.executable)
    sample = [python, _command_path(Path(__file__).resolve().parent / "sample.py"), "--ckpt_path", str(last)]
    data = (cfg.get("data") or {}).get("init_args") or {}
    iterations = None
    if isinstance(model, CUTSystem):
        root = data.get("root")
        a, b = (f"{root}/testA", f"{root}/testB") if root else _write_test_domains(datamodule, run_dir / "test_images")
        sample += ["--input", str(a), "--target", str(b), "--output_dir", str(run_dir / "translated")]
        iterations = model.iteration()
    else:
        sample += ["--output_dir", str(run_dir / "samples"), "--num_images", "16", "--draws", "2", "--sampler", "HeunPC"]
    return closing_lines(str(run_dir), str(last), step, f"tensorboard --logdir {shlex.quote(str(run_dir))}",
                         shlex.join(sample), record, note, iterations)


def _write_test_domains(datamodule, folder: Path) -> tuple[Path, Path]:
    """The CUT data module's test images of domains A and B as PNGs in folder/A and folder/B."""
    from msdiff.images import write_png

    for name, domain in zip("AB", datamodule.domains("test")):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(len(domain)):
            write_png(domain[i], folder / name / f"{i:05d}.png")
    return folder / "A", folder / "B"


def rank_zero_warn_line(line: str) -> None:
    """Print one line on stderr from rank 0 only."""
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    run_entry_point(main, prog="train.py")
