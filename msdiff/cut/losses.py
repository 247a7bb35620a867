"""CUT / FastCUT training losses: PatchNCE and the adversarial (GAN) losses.

PatchNCE is Park et al., *Contrastive Learning for Unpaired Image-to-Image Translation*
(ECCV 2020), Eq. 2-3; LSGAN is Mao et al. 2017; the non-saturating loss is Goodfellow et
al. 2014 in its softplus form. Every loss returns one value per element (patch or image),
callers reduce. Plain PyTorch (no Lightning).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F_
from einops import rearrange
from torch import Tensor

from msdiff.utils import batch_mean

# Value written over the self-comparison logits q_s . k_s on the negatives' diagonal before the
# division by tau (as in the reference): exp(-10 / 0.07) ~ 1e-62, i.e. removed from the softmax.
_MASKED_LOGIT = -10.0


def patch_nce_loss(q: Tensor, k: Tensor, batch_size: int, tau: float = 0.07,
                   negatives_from_minibatch: bool = False) -> Tensor:
    """PatchNCE (Park et al. 2020, Eq. 2-3): one InfoNCE loss per query patch.

    q, k: (batch_size * S, C) L2-normalised embeddings of S output patches (queries z_hat) and
    of the source patches at the same locations (keys z), image-major. For query s the positive
    is k_s; the negatives are the other S - 1 keys of the same image (or all other keys of the
    minibatch when `negatives_from_minibatch`). Keys are detached (no gradient flows into the
    source branch through k). The logits are [q_s.k_s, q_s.k_j (j != s)] / tau, with the
    self-comparison j == s on the negatives' diagonal set to -10 before dividing by tau, and the
    loss is the cross-entropy with target 0. `batch_size` must be the batch on this device (not
    the global one under DDP): it decides which keys count as the same image.
    Returns (batch_size * S,).
    """
    if q.ndim != 2 or q.shape != k.shape:
        raise ValueError(f"patch_nce_loss: q and k must both be (N, C), got {tuple(q.shape)} and {tuple(k.shape)}")
    if batch_size < 1 or q.shape[0] % batch_size != 0:
        raise ValueError(f"patch_nce_loss: batch_size={batch_size} must divide the number of patches {q.shape[0]}")
    if tau <= 0:
        raise ValueError(f"patch_nce_loss: tau must be > 0, got {tau}")
    n = q.shape[0]
    k = k.detach()
    l_pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
    groups = 1 if negatives_from_minibatch else batch_size
    qg, kg = (rearrange(v, "(g s) c -> g s c", g=groups) for v in (q, k))
    l_neg = torch.einsum("gsc,gtc->gst", qg, kg)  # q_s . k_t within each group
    eye = torch.eye(qg.shape[1], dtype=torch.bool, device=q.device)
    l_neg = rearrange(l_neg.masked_fill(eye, _MASKED_LOGIT), "g s t -> (g s) t")
    logits = torch.cat([l_pos, l_neg], dim=1) / tau
    target = torch.zeros(n, dtype=torch.long, device=q.device)
    return F_.cross_entropy(logits, target, reduction="none")


def lsgan_loss(pred: Tensor, target_is_real: bool) -> Tensor:
    """LSGAN (Mao et al. 2017): mean over the patch map of (D(x) - 1)^2 for real targets,
    D(x)^2 for fake ones. pred: (B, ...) logits -> (B,)."""
    target = 1.0 if target_is_real else 0.0
    return batch_mean((pred - target).square())


def nonsaturating_gan_loss(pred: Tensor, target_is_real: bool) -> Tensor:
    """Non-saturating GAN loss: -log sigmoid(D(x)) = softplus(-D(x)) for real targets and
    -log(1 - sigmoid(D(x))) = softplus(D(x)) for fake ones, averaged over the patch map -> (B,)."""
    return batch_mean(F_.softplus(-pred if target_is_real else pred))


GAN_LOSSES = {"lsgan": lsgan_loss, "nonsaturating": nonsaturating_gan_loss}


def gan_loss(mode: str, pred: Tensor, target_is_real: bool) -> Tensor:
    """Dispatch on the configured adversarial loss name ('lsgan' or 'nonsaturating') -> (B,)."""
    try:
        fn = GAN_LOSSES[mode]
    except KeyError:
        raise ValueError(f"gan_mode: expected one of {sorted(GAN_LOSSES)}, got {mode!r}") from None
    return fn(pred, target_is_real)
