"""Guidance (layer 2, plain torch): the `Guidance` base type with THE prior -> score -> sampler
composition (`base`), score-wrapping guidances (CFG, ASAG, PAG, SEG), AGG (`AGG`: the sample.py
guidance; `AGGSampler`: its per-batch algorithm) and the guidance losses."""
from msdiff.guidance.agg import AGG
from msdiff.guidance.agg_sampler import AGGSampler, GuidedStep, agg_losses, build_agg, load_image
from msdiff.guidance.attention import ASAG, PAG, SEG, AttentionGuidance
from msdiff.guidance.base import Guidance, Unguided
from msdiff.guidance.cfg import CFG
from msdiff.guidance.losses import (ClipDirectionalLoss, ConsistencyLoss, DinoClsLoss, L1Loss, MSELoss, RangeLoss,
                                    StatisticsLoss)

__all__ = ["Guidance", "Unguided", "AGG", "AGGSampler", "GuidedStep", "build_agg", "agg_losses", "load_image",
           "L1Loss", "MSELoss", "StatisticsLoss", "ConsistencyLoss", "RangeLoss", "ClipDirectionalLoss", "DinoClsLoss",
           "ASAG", "PAG", "SEG", "AttentionGuidance", "CFG"]
