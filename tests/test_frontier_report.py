"""The issue-23 verdict of benchmarks.frontier_report: gaps to PC-2000, the 25 / 50 evaluation targets and
the noise-floor row, on hand-made rows whose answers are known."""
from __future__ import annotations

import pytest

from benchmarks.frontier_report import checkpoint_table, gap, meets, verdict

REF = {"sampler": "PC-2000 (reference)", "psnr": 20.0, "consistency": 40.0, "tv_ratio": 0.8, "diversity": 8.0}


def row(name: str, nfe: int, psnr: float, consistency: float, tv: float, diversity: float) -> dict:
    return {"sampler": name, "budget": nfe, "nfe": nfe, "seconds": 1.0, "psnr": psnr, "consistency": consistency,
            "tv_ratio": tv, "diversity": diversity}


def test_gap_is_db_below_and_relative_change():
    g = gap(row("a", 25, 19.5, 40.25, 0.88, 6.0), REF)
    assert g["psnr"] == pytest.approx(0.5) and g["consistency"] == pytest.approx(-0.25)
    assert g["tv"] == pytest.approx(0.1) and g["diversity"] == pytest.approx(-0.25)


@pytest.mark.parametrize("psnr, consistency, tv, diversity, db, expected", [
    (19.51, 39.51, 0.80, 8.0, 0.5, True),     # 0.49 dB below: inside
    (19.49, 40.00, 0.80, 8.0, 0.5, False),    # 0.51 dB below in PSNR
    (20.00, 39.49, 0.80, 8.0, 0.5, False),    # 0.51 dB below in consistency
    (21.00, 41.00, 0.80, 8.0, 0.2, True),     # above the reference is never a miss
    (19.85, 39.90, 0.80, 8.0, 0.2, True),     # 0.15 / 0.10 dB below: inside the 50-evaluation target
    (19.75, 39.90, 0.80, 8.0, 0.2, False),    # 0.25 dB below: outside it
    (20.00, 40.00, 0.89, 8.0, 0.5, False),    # TV 0.89 / 0.8 = +11.25%: outside the 10% band
    (20.00, 40.00, 0.87, 8.0, 0.5, True),     # TV +8.75%: inside
])
def test_meets_applies_the_db_and_the_ten_percent_bands(psnr, consistency, tv, diversity, db, expected):
    assert meets(row("a", 25, psnr, consistency, tv, diversity), REF, db) is expected


def test_meets_rejects_diversity_outside_ten_percent_either_way():
    assert meets(row("a", 25, 20.0, 40.0, 0.8, 8.7), REF, 0.5)          # +8.75%
    assert not meets(row("a", 25, 20.0, 40.0, 0.8, 8.9), REF, 0.5)      # +11.25%
    assert not meets(row("a", 25, 20.0, 40.0, 0.8, 7.1), REF, 0.5)      # -11.25%


def test_verdict_names_the_fewest_evaluations_that_meet_each_target():
    data = {"reference": REF, "rows": [
        row("S", 10, 18.0, 35.0, 1.2, 12.0),     # misses both
        row("S", 25, 19.6, 39.6, 0.82, 8.3),     # meets the 25 target (0.4 dB) but not the 50 one
        row("S", 50, 19.9, 39.9, 0.81, 8.1),     # meets the 50 target
        row("T", 50, 19.7, 40.0, 0.8, 8.0)]}     # 0.3 dB below at 50: misses the 50 target
    assert verdict(data) == ["S: <= 25 target met at 25; <= 50 target met at 50",
                             "T: <= 25 target not met; <= 50 target not met"]


def test_table_marks_rows_and_prints_the_noise_floor_against_the_reference():
    floor = row("PC-2000, noise seed 1001 (noise floor)", 2000, 19.9, 39.6, 0.8, 9.2)
    data = {"label": "ck", "step": 7, "conditions": 8, "draws": 2, "reference": REF, "floor": floor,
            "rows": [row("S", 25, 19.6, 39.6, 0.82, 8.3)]}
    lines = checkpoint_table(data).splitlines()
    floor_line = next(line for line in lines if "noise floor" in line)
    assert "| -0.10 | -0.40 | +0% | +15% |" in floor_line
    assert any(line.startswith("| S **(25)** | 25 | 25 | 19.60 | 39.60 |") for line in lines)
    assert not any("noise floor" in line for line in verdict(data))


def test_standard_errors_of_constant_images_by_hand():
    """Constant images against x = 0: PSNR = -20 log10(value) per sample; draws a and a + d differ by d,
    so each condition's diversity is 255 d / sqrt(2) and its relative standard error is that of d."""
    import math
    import statistics

    import torch

    from benchmarks.fmnist import standard_errors
    from msdiff.tasks import SuperResolution

    a = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    d = a.clone()
    first = a[:, None, None, None].expand(4, 1, 4, 4)
    samples = torch.stack([first, first + d[:, None, None, None]])            # (K=2, B=4, 1, 4, 4)
    zeros = torch.zeros(4, 1, 4, 4, dtype=torch.float64)
    values = [0.1, 0.2, 0.3, 0.4, 0.2, 0.4, 0.6, 0.8]
    psnr_se = statistics.stdev([-20 * math.log10(v) for v in values]) / math.sqrt(8)
    se = standard_errors(samples, zeros, zeros, SuperResolution(factor=1), None)
    assert se["psnr_se"] == pytest.approx(psnr_se, rel=1e-9)
    assert se["consistency_se"] == pytest.approx(psnr_se, rel=1e-6)            # A = identity, y = x
    assert se["diversity_se"] == pytest.approx(statistics.stdev([0.1, 0.2, 0.3, 0.4]) / 2 / 0.25, rel=1e-9)
