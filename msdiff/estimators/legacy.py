"""Estimator configs written before weighting and preconditioning were objects.

Checkpoints, inference files and run directories store the resolved config, whose estimator then
read `weighting: likelihood | simple`, `preconditioning: none | edm` and `sigma_data: 0.5`.
`upgrade_estimator_configs` rewrites those keys to today's class_path form so that such a file
still builds the same estimator:

    weighting: likelihood            ->  {class_path: msdiff.estimators.LikelihoodWeighting}
    weighting: simple                ->  {class_path: msdiff.estimators.SimpleWeighting}
    preconditioning: none            ->  {class_path: msdiff.estimators.ReferencePrecond}
    preconditioning: edm, sigma_data ->  {class_path: msdiff.estimators.EDMPrecond,
                                          init_args: {sigma_data: sigma_data}}

(`sigma_data` without EDM had no effect and is dropped). Any other value is left for the config
parser to reject with its own message.
"""
from __future__ import annotations

import copy
from typing import Any

_WEIGHTINGS = {"likelihood": "msdiff.estimators.LikelihoodWeighting", "simple": "msdiff.estimators.SimpleWeighting"}
_PRECONDITIONINGS = {"none": "msdiff.estimators.ReferencePrecond", "edm": "msdiff.estimators.EDMPrecond"}


def _upgrade_init_args(args: dict) -> None:
    weighting, pre = args.get("weighting"), args.get("preconditioning")
    if isinstance(weighting, str) and weighting in _WEIGHTINGS:
        args["weighting"] = {"class_path": _WEIGHTINGS[weighting]}
    if pre is None or (isinstance(pre, str) and pre in _PRECONDITIONINGS):
        sigma_data = args.pop("sigma_data", 0.5)
        if pre == "edm":
            args["preconditioning"] = {"class_path": _PRECONDITIONINGS[pre], "init_args": {"sigma_data": sigma_data}}
        elif pre == "none":
            args["preconditioning"] = {"class_path": _PRECONDITIONINGS[pre]}


def upgrade_estimator_configs(config: Any) -> Any:
    """A copy of `config` (any nested dict/list of a stored config) in which every
    `msdiff.estimators.*` entry written with the old string options is rewritten (module docstring);
    everything else is returned unchanged."""
    config = copy.deepcopy(config)
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            path, args = node.get("class_path"), node.get("init_args")
            if isinstance(path, str) and path.startswith("msdiff.estimators.") and isinstance(args, dict) \
                    and "sde" in args:  # an estimator, not one of its option objects
                _upgrade_init_args(args)
            stack.extend(node.values())
    return config
