"""Guidance through sample.py: a score-wrapping guidance (PAG) end to end, AGG for zero-shot inverse
problems (`--guidance AGG --guidance.consistency true`) and its wiring of the task's operator."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sample  # noqa: E402
from conftest import run_sample, sample_pngs  # noqa: E402
from msdiff.guidance.losses import ConsistencyLoss, MSELoss  # noqa: E402
from msdiff.guidance import AGG, Guidance  # noqa: E402
from msdiff.tasks import Inpainting, SuperResolution  # noqa: E402


run, pngs = run_sample, sample_pngs


def test_every_guidance_is_a_guidance_choice_and_help_lists_them(capsys):
    from msdiff.cli import subclass_names

    assert subclass_names(Guidance) == ["AGG", "ASAG", "CFG", "PAG", "SEG", "Unguided"]
    text = " ".join(sample.build_parser().format_help().split())
    for name in ("msdiff.guidance.AGG", "msdiff.guidance.PAG", "msdiff.samplers.Heun",
                 "msdiff.samplers.PredictorCorrector", "--sampler.help", "--guidance.help", "--config"):
        assert name in text
    with pytest.raises(SystemExit):
        sample.parse(["--sampler.help", "Heun"])
    assert "--sampler.steps STEPS" in capsys.readouterr().out


def test_pag_scale_zero_equals_no_guidance_end_to_end(tiny_score_checkpoint, tmp_path):
    # 4 training steps leave the zero-initialised attention output projection at ~1e-5, where
    # perturbing attention changes nothing visible: give the middle attention real weights
    ckpt = torch.load(tiny_score_checkpoint, weights_only=True)
    g = torch.Generator().manual_seed(0)
    for k, v in ckpt["state_dict"].items():
        if k.endswith("mid.attn.proj_out.weight"):
            ckpt["state_dict"][k] = 0.5 * torch.randn(v.shape, generator=g)
    torch.save(ckpt, tmp_path / "attn.ckpt")
    common = ["--ckpt_path", tmp_path / "attn.ckpt", "--num_images", 2, "--draws", 1, "--sampler", "EulerMaruyama",
              "--sampler.steps", 2]
    run(*common, "--output_dir", tmp_path / "plain")
    run(*common, "--output_dir", tmp_path / "zero", "--guidance", "PAG", "--guidance.scale", 0)
    run(*common, "--output_dir", tmp_path / "pag", "--guidance", "PAG", "--guidance.scale", 3)
    plain, zero = pngs(tmp_path / "plain"), pngs(tmp_path / "zero")
    assert len(plain) == 2 and all(np.array_equal(plain[n], zero[n]) for n in plain)
    # the PNGs of a 4-step model saturate at 0/255; compare the raw draws of sample.py's own draw()
    from msdiff.guidance.attention import PAG
    from msdiff.samplers import EulerMaruyama
    from msdiff.run import TrainedRun
    from msdiff.sampling.loop import SamplingJob
    from msdiff.sampling.plan import SamplingSettings

    trained = TrainedRun.open(tmp_path / "attn.ckpt")
    system, dataset, task = trained.system(), trained.split("test"), trained.task()
    y = torch.stack([dataset[i]["y"] for i in range(2)])
    draw = {}
    for name, guidance in (("plain", None), ("zero", PAG(scale=0.0)), ("pag", PAG(scale=3.0))):
        settings = SamplingSettings(checkpoint="c", step=0, sampler=None, guidance=None, conditions=2, draws=1,
                                    batch_size=2, seed=0, ema=True, source="split test", task=None, device="cpu")
        module = SamplingJob(system, dataset, task, EulerMaruyama(2), guidance, settings, tmp_path, progress=False)
        with torch.no_grad():
            draw[name] = module.draw(y, None, [0, 1], 0)
    assert torch.equal(draw["plain"], draw["zero"]) and not torch.allclose(draw["plain"], draw["pag"])
    result = json.loads((tmp_path / "pag" / "metrics.json").read_text())
    settings = result["settings"]
    assert settings["guidance"] == "PAG" and settings["nfe_per_sample"] == 4       # 2 steps x 2 branches
    block = result["config"]["guidance"]                                           # rebuilds the guidance
    assert block["class_path"].endswith("PAG") and block["init_args"]["scale"] == 3


def test_agg_zero_shot_end_to_end_and_errors(tiny_score_checkpoint, tmp_path):
    out = tmp_path / "agg"
    run("--ckpt_path", tiny_score_checkpoint, "--num_images", 2, "--draws", 2, "--output_dir", out,
        "--guidance", "AGG", "--guidance.consistency", "true", "--guidance.steps", 3, "--guidance.t_edit", 2)
    result = json.loads((out / "metrics.json").read_text())
    s = result["settings"]
    assert s["sampler"] == "AGG" and s["nfe_per_sample"] == 6 and s["agg_prior"] == "conditional"  # CMDE: no null score
    assert len(pngs(out)) == 4
    # SR consistency: PSNR of A(draw), clamped, against the low-resolution condition, averaged over 2 x 2 draws
    from msdiff.run import TrainedRun
    from msdiff.tasks import masked_psnr

    trained = TrainedRun.open(tiny_score_checkpoint)
    dataset, task = trained.split("test"), trained.task()
    draws = pngs(out)
    vals = [masked_psnr(task.forward_operator(torch.from_numpy(draws[f"{i:05d}_draw{k}.png"].copy()).permute(2, 0, 1)[None]
                                              .float() / 255).clamp(0, 1), task.low_res(dataset[i]["y"][None].float())).item()
            for i in range(2) for k in range(2)]
    assert result["metrics"]["consistency"] == pytest.approx(sum(vals) / 4, abs=1e-3)
    # the same command again continues a finished run: nothing is sampled, the record is the same
    run("--ckpt_path", tiny_score_checkpoint, "--num_images", 2, "--draws", 2, "--output_dir", out,
        "--guidance", "AGG", "--guidance.consistency", "true", "--guidance.steps", 3, "--guidance.t_edit", 2)
    again = json.loads((out / "metrics.json").read_text())
    assert again["settings"]["agg_prior"] == "conditional" and again["metrics"] == result["metrics"]
    inp = tmp_path / "inpaint"                  # --task: another inverse problem for the same network
    run("--ckpt_path", tiny_score_checkpoint, "--num_images", 2, "--draws", 1, "--output_dir", inp,
        "--task", "msdiff.tasks.Inpainting", "--guidance", "AGG", "--guidance.consistency", "true",
        "--guidance.steps", 2, "--guidance.t_edit", 1)
    # the reported consistency is the masked PSNR of the saved draws against y with the items' real masks
    dataset = trained.split("test", "msdiff.tasks.Inpainting")
    items = [dataset[i] for i in range(2)]
    draws = pngs(inp)
    values = []
    for i, item in enumerate(items):
        sample_i = torch.from_numpy(draws[f"{i:05d}_draw0.png"].copy()).permute(2, 0, 1)[None].float() / 255
        values.append(masked_psnr(sample_i, item["y"][None].float(), item["mask"][None].float()).item())
    got = json.loads((inp / "metrics.json").read_text())["metrics"]["consistency"]
    assert got == pytest.approx(sum(values) / 2, abs=1e-3)
    assert (items[0]["mask"] == 0).any()  # a real hole, which a mask of ones would count
    with pytest.raises(ValueError, match="--task .*not valid JSON"):
        run("--ckpt_path", tiny_score_checkpoint, "--output_dir", tmp_path / "bad_task", "--task", "{bad")
    with pytest.raises(ValueError, match="--guidance.prior unconditional: .*p_uncond"):
        run("--ckpt_path", tiny_score_checkpoint, "--output_dir", tmp_path / "x1", "--guidance", "AGG",
            "--guidance.consistency", "true", "--guidance.prior", "unconditional", "--guidance.steps", 2, "--guidance.t_edit", 1)
    with pytest.raises(ValueError, match="nothing to guide by"):
        run("--ckpt_path", tiny_score_checkpoint, "--output_dir", tmp_path / "x2", "--guidance", "AGG")
    with pytest.raises(ValueError, match="no such image file"):
        run("--ckpt_path", tiny_score_checkpoint, "--output_dir", tmp_path / "x3", "--guidance", "AGG",
            "--guidance.target", tmp_path / "missing.png")


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is not None, reason="open_clip installed")
def test_text_target_without_clip_is_a_start_up_error():
    with pytest.raises(ValueError, match="text target needs the CLIP extra .*open_clip_torch"):
        AGG(target="a zebra")


def test_agg_consistency_loss_uses_the_task_operator_measurements_and_real_mask(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, generator=g)
    other = torch.rand(2, 3, 8, 8, generator=g)
    guidance = AGG(consistency=True, steps=2, t_edit=1)
    sr = SuperResolution(4)
    y = sr.measure(x)["y"]
    (loss,) = [l for l in guidance.build(sr, y, guidance.source(y, 3)).losses if isinstance(l, ConsistencyLoss)]
    assert loss(x).abs().max() < 1e-10 and (loss(other) > 0.01).all()      # ||A(x) - low_res(y)||^2
    inp = Inpainting(0.25)
    m = inp.measure(x, g)
    (loss,) = [l for l in guidance.build(inp, m["y"], m["y"], mask=m["mask"]).losses if isinstance(l, ConsistencyLoss)]
    in_hole = x * m["mask"] + other * (1 - m["mask"])                       # differs only inside the real hole
    assert loss(in_hole).abs().max() < 1e-10 and (loss(other) > 0.1).all()
    # a 1-channel condition becomes a 3-channel source; an image target becomes a pixel MSE loss
    assert guidance.source(torch.rand(2, 1, 8, 8), 3).shape == (2, 3, 8, 8)
    Image.fromarray(np.full((16, 16, 3), 255, np.uint8)).save(tmp_path / "white.png")
    agg = AGG(target=str(tmp_path / "white.png"), steps=2, t_edit=1).build(None, y, y)
    (mse,) = [l for l in agg.losses if isinstance(l, MSELoss)]
    assert mse(torch.ones(2, 3, 8, 8)).abs().max() < 1e-6 and (mse(torch.zeros(2, 3, 8, 8)) > 0.5).all()
