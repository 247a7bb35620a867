"""Guided samplers and guidance losses (layer 2, plain torch)."""
from msdiff.guidance.agg import AGG, GuidedStep, build_agg, ddim_coefficients, load_image
from msdiff.guidance.attention import ASAG, PAG, SEG, AttentionGuidance
from msdiff.guidance.cfg import CFG
from msdiff.guidance.losses import (ClipDirectionalLoss, ConsistencyLoss, DinoClsLoss, L1Loss, MSELoss, RangeLoss,
                                    StatisticsLoss)

__all__ = ["AGG", "GuidedStep", "build_agg", "load_image", "ddim_coefficients", "L1Loss", "MSELoss", "StatisticsLoss", "ConsistencyLoss",
           "RangeLoss", "ClipDirectionalLoss", "DinoClsLoss",
           "ASAG", "PAG", "SEG", "AttentionGuidance", "CFG"]
