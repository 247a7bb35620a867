"""sample.py's metric plumbing by value (msdiff.sampling.loop/evaluate, msdiff.metrics): the
inpainting consistency of the draws is computed with the conditions' real masks (passed to
`update`), repeated over the K draws."""
from __future__ import annotations

import torch

from msdiff.metrics import ConditionalSampleMetrics
from msdiff.samplers import EulerMaruyama
from msdiff.tasks import Inpainting


def _setup(b=2, h=8, w=12):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(b, 3, h, w, generator=g) * 255).round() / 255  # already 8-bit: quantisation is exact
    mask = torch.ones(b, 1, h, w)
    mask[0, :, 2:6, 3:9] = 0
    mask[1, :, 0:4, 6:12] = 0
    task = Inpainting(0.25)
    y = task(x, mask=mask)
    # draw k: x outside the hole plus a known error on a known set of known pixels; noise in the hole
    draws = []
    for k in range(2):
        d = torch.where(mask.bool(), x, torch.rand(x.shape, generator=g))
        d[:, :, h - 1, 0] = (d[:, :, h - 1, 0] + (k + 1) * 20 / 255).clamp(0, 1)  # a known pixel of each image
        draws.append((d * 255).round() / 255)
    return x, y, mask, task, torch.stack(draws)


def _hand_consistency(draws, y, mask):
    vals = []
    for d in draws:
        err = ((d - y) ** 2 * mask).flatten(1).sum(1) / (3 * mask.flatten(1).sum(1))
        vals.append(10 * torch.log10(1 / err))
    return float(torch.cat(vals).double().mean())


def test_masked_consistency_uses_the_real_mask_for_every_draw():
    x, y, mask, task, draws = _setup()
    metrics = ConditionalSampleMetrics(task=task)
    metrics.update(draws, y, x, mask=mask)
    got = metrics.compute()["consistency"]
    want = _hand_consistency(draws, y, mask)
    assert abs(got - want) < 1e-4
    # a mask of ones (or another hole) would count the noise in the hole: a much lower value
    assert _hand_consistency(draws, y, torch.ones_like(mask)) < want - 10


class _System(torch.nn.Module):
    """The parts of a ScoreSystem a SamplingJob touches (its draws are replaced below)."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.ema, self.x_channels, self.estimator = torch.nn.Identity(), torch.nn.Module(), 3, None
        self.ema.net = self.net


def test_the_files_carry_the_batch_mask_to_the_consistency(tmp_path):
    """Draws written by a SamplingJob and evaluated from the files: the consistency uses each
    condition's real mask (from conditions/NAME.pt), for every draw."""
    from msdiff.sampling.evaluate import evaluate_dirs
    from msdiff.sampling.layout import TASK_FILE, tensor_bytes, write_files
    from msdiff.sampling.loop import SamplingJob
    from msdiff.sampling.output_dir import start_run
    from msdiff.sampling.plan import SamplingSettings

    x, y, mask, task, draws = _setup()
    data = [{"y": y[i], "x": x[i], "mask": mask[i], "index": i} for i in range(2)]
    settings = SamplingSettings(checkpoint="c", step=0, sampler=None, guidance=None, conditions=2, draws=2,
                                batch_size=2, seed=0, ema=True, source="split test", task=None, device="cpu")
    start_run(tmp_path, settings)
    write_files(tmp_path, {TASK_FILE: tensor_bytes(task)})
    job = SamplingJob(_System(), data, task, EulerMaruyama(1), None, settings, tmp_path, progress=False)
    job.draw = lambda yy, mm, indices, k: draws[k][indices]
    assert job.run() == 4
    assert len(list((tmp_path / "samples").glob("*.png"))) == 4
    got = evaluate_dirs([tmp_path], lambda t, k: ConditionalSampleMetrics(task=t, draws=k))
    assert abs(got["metrics"]["consistency"] - _hand_consistency(draws, y, mask)) < 1e-4
