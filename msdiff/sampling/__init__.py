"""The sample.py application: a checkpoint -> PNGs, grids and a metrics table.

(The checkpoint, its system, task and data come from `msdiff.run.TrainedRun`.)
* `conditions`: `FolderConditions` (`--input FOLDER`) through the task's condition protocol.
* `plan`: `SamplingSettings` (what defines the samples), fixed batches, `Shard` (`--shard i/N`).
* `manifest`: what is finished (per unit: files and digests, noise key, settings digest).
* `layout`: the output directory's files, written atomically.
* `loop`: `SamplingJob` (one process's share; every draw is `Guidance.sample`; stops on
  SIGUSR1/SIGTERM), `build_metrics`, `resolve_device`.
* `workers`: the processes of `--devices D`.
* `evaluate`: the metrics from the files of one or several directories (`--evaluate`).
* `flow`: the sample.py command once its system and conditions are built (`sample_and_evaluate`,
  `evaluate_only`, the settings and provenance records).
* `progress`: the planned-cost line, the time estimate and the bar over network evaluations.
* `output_dir`: the `--output_dir` rule (continue the same settings, refuse others) and the writability check.
* `report`: metrics.json / metrics.md and `software_version`.
* `inference_file`: the small `--export` file.

The modules import nothing from here; import them by their own names.
"""
