"""The sample.py application: a checkpoint -> PNGs, grids and a metrics table.

(The checkpoint, its system, task and data come from `msdiff.run.TrainedRun`.)
* `conditions`: `FolderConditions` (`--input FOLDER`) through the task's condition protocol.
* `loop`: `SamplingModule` (Lightning predict loop; every draw is `Guidance.sample`), `RankShard`,
  `run_sampling`, `build_metrics`, `resolve_device`.
* `progress`: the planned-cost line, the time estimate and the bar over network evaluations.
* `output_dir`: the non-empty `--output_dir` rule and the writability check.
* `report`: metrics.json / metrics.md and `software_version`.
* `inference_file`: the small `--export` file.

The modules import nothing from here; import them by their own names.
"""
