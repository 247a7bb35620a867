"""CUT / FastCUT training losses by value (msdiff.cut.system): which options reach the loss.

A tiny CUTSystem with fixed random weights runs one `training_step` with its optimizers, backward
and schedulers replaced by no-ops (so the weights stay fixed), and the logged losses are compared
with the objective written out here (Park et al. 2020, Eq. 2-5 and the official weighting):

    L_D   = (LSGAN(D(G(A)), fake) + LSGAN(D(B), real)) / 2
    L_GAN = lambda_GAN LSGAN(D(G(A)), real)
    NCE(src, out) = lambda_NCE / L sum_l mean_s CE([q_s.k_s, q_s.k_j (j != s)] / tau, 0),
            queries q from F(G_enc(out)) (mirrored back when the batch was flipped), keys k from
            F(G_enc(src)) at the same patch ids; negatives from the same image or the minibatch
    L_G   = L_GAN + (NCE(A, G(A)) + NCE(B, G(B))) / 2   (CUT, identity term)
          = L_GAN + NCE(A, G(A))                          (FastCUT)

The patch ids and the flip come from the per-iteration generator (seed, iteration, rank), replayed
here. The PatchNCE below is an independent per-patch loop, not msdiff.cut.losses.patch_nce_loss.
"""
from __future__ import annotations

import math

import pytest
import torch

from msdiff.cut.system import CUTSystem
from msdiff.utils import make_generator, mix_seed

TINY = dict(ngf=4, ndf=4, n_blocks=1, num_patches=5, netf_nc=8, n_epochs=1, n_epochs_decay=1,
            lr_interval="step", nce_layers=(0, 4, 5), n_layers_d=1)


def _system(seed: int = 0, **kw) -> CUTSystem:
    torch.manual_seed(seed)
    m = CUTSystem(**{**TINY, **kw})
    with torch.no_grad():  # weights large enough for the loss terms to differ clearly
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
    return m.double()


class _NoOp:
    def zero_grad(self, set_to_none=True):
        pass

    def step(self):
        pass


def _step_logs(m: CUTSystem, batch: dict) -> dict:
    """One training_step with no weight update; returns the logged losses."""
    logs = {}
    m.optimizers = lambda: (_NoOp(), _NoOp(), _NoOp())
    m.lr_schedulers = lambda: []
    m.manual_backward = lambda loss: None
    m.log_dict = lambda d, **kw: logs.update({k: float(v) for k, v in d.items()})
    m.training_step(batch, 0)
    return logs


def _nce_hand(m: CUTSystem, src, out, flipped: bool, g: torch.Generator, tau: float, minibatch: bool,
              lambda_nce: float) -> float:
    feat_q = m.G(out, m.nce_layers, encode_only=True)
    if flipped:
        feat_q = [f.flip(3) for f in feat_q]
    feat_k = m.G(src, m.nce_layers, encode_only=True)
    b = src.shape[0]
    total = 0.0
    for fq, fk, mlp in zip(feat_q, feat_k, m.F.mlps):
        hw = fk.shape[2] * fk.shape[3]
        ids = torch.randperm(hw, generator=g)[: min(m.num_patches, hw)]
        S = ids.numel()

        def embed(f):
            z = mlp(f.flatten(2)[:, :, ids].transpose(1, 2))  # (B, S, nc)
            return z / (z.norm(dim=-1, keepdim=True) + 1e-7)

        q, k = embed(fq), embed(fk)
        losses = []
        for i in range(b):
            for s in range(S):
                pos = (q[i, s] * k[i, s]).sum()
                if minibatch:
                    negs = [(q[i, s] * k[j, u]).sum() for j in range(b) for u in range(S) if (j, u) != (i, s)]
                else:
                    negs = [(q[i, s] * k[i, u]).sum() for u in range(S) if u != s]
                logits = torch.stack([pos, *negs]) / tau
                losses.append(-(logits[0] - torch.logsumexp(logits, 0)))
        total += float(torch.stack(losses).mean())
    return total * lambda_nce / len(m.nce_layers)


def _lsgan(pred, real: bool) -> float:
    return float((pred - (1.0 if real else 0.0)).square().mean())


def _batch(seed=1, b=2, h=12, w=16):
    g = torch.Generator().manual_seed(seed)
    return {"A": torch.rand(b, 3, h, w, generator=g, dtype=torch.float64),
            "B": torch.rand(b, 3, h, w, generator=g, dtype=torch.float64)}


def _hand_losses(m: CUTSystem, batch: dict, *, idt: bool, flip: bool, tau: float, minibatch: bool,
                 lambda_nce: float, lambda_gan: float) -> dict:
    real_a, real_b = 2 * batch["A"] - 1, 2 * batch["B"] - 1
    b = real_a.shape[0]
    g = make_generator(mix_seed(m.seed, 0, 0))
    flipped = flip and bool(torch.rand((), generator=g) < 0.5)
    with torch.no_grad():
        real = torch.cat([real_a, real_b]) if idt else real_a
        if flipped:
            real = real.flip(3)
        fake = m.G(real)
        fake_b = fake[:b]
        loss_d = 0.5 * (_lsgan(m.D(fake_b), False) + _lsgan(m.D(real_b), True))
        gan = lambda_gan * _lsgan(m.D(fake_b), True)
        nce_a = _nce_hand(m, real_a, fake_b, flipped, g, tau, minibatch, lambda_nce)
        nce = 0.5 * (nce_a + _nce_hand(m, real_b, fake[b:], flipped, g, tau, minibatch, lambda_nce)) if idt else nce_a
    return {"train/loss_D": loss_d, "train/loss_G_GAN": gan, "train/loss_NCE": nce_a, "train/loss_G": gan + nce,
            "flipped": flipped}


def _check(logs: dict, want: dict) -> None:
    for k in ("train/loss_D", "train/loss_G_GAN", "train/loss_NCE", "train/loss_G"):
        assert logs[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), k


@pytest.mark.parametrize("minibatch", [False, True])
def test_cut_losses_by_value(minibatch):
    """CUT: identity term NCE(B, G(B)) averaged with NCE(A, G(A)); nce_t and the negatives option
    reach PatchNCE."""
    kw = dict(nce_t=0.5, nce_includes_all_negatives_from_minibatch=minibatch, lambda_nce=1.5, lambda_gan=0.7)
    m = _system(**kw)
    batch = _batch()
    logs = _step_logs(m, batch)
    want = _hand_losses(m, batch, idt=True, flip=False, tau=0.5, minibatch=minibatch, lambda_nce=1.5, lambda_gan=0.7)
    _check(logs, want)
    # the options matter at these weights: a different tau or negatives set gives another value
    other = _hand_losses(m, batch, idt=True, flip=False, tau=0.07, minibatch=not minibatch, lambda_nce=1.5,
                         lambda_gan=0.7)
    assert abs(other["train/loss_NCE"] - want["train/loss_NCE"]) > 1e-3


def test_identity_term_direction_matters():
    """The identity term's keys come from real B and its queries from G(B); swapped, the value differs."""
    m = _system(nce_t=0.3)
    batch = _batch(seed=2)
    logs = _step_logs(m, batch)
    want = _hand_losses(m, batch, idt=True, flip=False, tau=0.3, minibatch=False, lambda_nce=1.0, lambda_gan=1.0)
    _check(logs, want)
    real_b = 2 * batch["B"] - 1
    with torch.no_grad():
        idt_b = m.G(torch.cat([2 * batch["A"] - 1, real_b]))[2:]
        g1, g2 = (make_generator(11) for _ in range(2))
        fwd = _nce_hand(m, real_b, idt_b, False, g1, 0.3, False, 1.0)
        rev = _nce_hand(m, idt_b, real_b, False, g2, 0.3, False, 1.0)
    assert abs(fwd - rev) > 1e-3


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fastcut_losses_by_value(seed):
    """FastCUT: no identity term, lambda_NCE 10, flip-equivariance (the seeds cover both flips)."""
    kw = dict(nce_t=0.2, lambda_nce=10.0, nce_idt=False, flip_equivariance=True, seed=seed)
    m = _system(**kw)
    batch = _batch(seed=3)
    logs = _step_logs(m, batch)
    want = _hand_losses(m, batch, idt=False, flip=True, tau=0.2, minibatch=False, lambda_nce=10.0, lambda_gan=1.0)
    _check(logs, want)
    assert logs["train/loss_G"] == pytest.approx(logs["train/loss_G_GAN"] + logs["train/loss_NCE"], rel=1e-12)


def test_the_fastcut_seeds_cover_both_flips():
    flips = {bool(torch.rand((), generator=make_generator(mix_seed(s, 0, 0))) < 0.5) for s in range(4)}
    assert flips == {True, False}


def test_lambda_nce_zero_drops_nce_and_identity():
    m = _system(lambda_nce=0.0, nce_idt=True)
    batch = _batch(seed=4)
    logs = _step_logs(m, batch)
    want = _hand_losses(m, batch, idt=False, flip=False, tau=0.07, minibatch=False, lambda_nce=0.0, lambda_gan=1.0)
    assert logs["train/loss_NCE"] == 0.0
    assert logs["train/loss_G"] == pytest.approx(want["train/loss_G_GAN"], rel=1e-12)
    assert logs["train/loss_D"] == pytest.approx(want["train/loss_D"], rel=1e-9)


def test_nonsaturating_gan_mode_reaches_the_losses():
    m = _system(gan_mode="nonsaturating", nce_idt=False)
    batch = _batch(seed=5)
    logs = _step_logs(m, batch)
    real_a, real_b = 2 * batch["A"] - 1, 2 * batch["B"] - 1
    with torch.no_grad():
        fake_b = m.G(real_a)
        sp = torch.nn.functional.softplus
        loss_d = 0.5 * (float(sp(m.D(fake_b)).mean()) + float(sp(-m.D(real_b)).mean()))
        gan = float(sp(-m.D(fake_b)).mean())
    assert logs["train/loss_D"] == pytest.approx(loss_d, rel=1e-9)
    assert logs["train/loss_G_GAN"] == pytest.approx(gan, rel=1e-9)
    assert not math.isclose(gan, _lsgan(m.D(fake_b).detach(), True))
