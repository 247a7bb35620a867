"""sample.py's metric plumbing by value (msdiff.sampling.loop, msdiff.metrics): the inpainting
consistency of the draws is computed with the batch's real mask (passed to `update`), repeated over
the K draws."""
from __future__ import annotations

import torch

from msdiff.metrics import ConditionalSampleMetrics
from msdiff.samplers import EulerMaruyama
from msdiff.sampling.loop import SamplingModule
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


def test_predict_step_passes_the_batch_mask_to_the_consistency(tmp_path):
    x, y, mask, task, draws = _setup()
    metrics = ConditionalSampleMetrics(task=task)
    module = SamplingModule(system=None, sampler=EulerMaruyama(1), guidance=None, metrics=metrics, task=task,
                            out=tmp_path, draws=2, seed=0, use_ema=False, total=2, keep_raw=False)
    module.draw = lambda yy, mm, indices, k: draws[k]
    for sub in ("samples", "grids"):
        (tmp_path / sub).mkdir()
    module.predict_step({"y": y, "x": x, "mask": mask, "index": torch.tensor([0, 1])}, 0)
    got = metrics.compute()
    assert abs(got["consistency"] - _hand_consistency(draws, y, mask)) < 1e-4
    assert len(list((tmp_path / "samples").glob("*.png"))) == 4
