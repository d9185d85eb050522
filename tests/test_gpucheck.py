"""Issue 18: `python -m dpdm gpu-check --quick` runs every part on CPU and reports
numbers that hang together (the full form is for a GPU; docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO, subprocess_env  # tests/helpers.py


@pytest.mark.slow
def test_gpu_check_quick_on_cpu(tmp_path):
    out = tmp_path / "gpu-check.json"
    p = subprocess.run([sys.executable, "-m", "dpdm", "gpu-check", "--quick", "--device", "cpu", "--json", str(out)],
                       env=subprocess_env(), capture_output=True, text=True, cwd=REPO, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["quick"] and r["device"].startswith("cpu")
    assert r["bench"]["dp_ex_per_s"] > 0 and r["bench"]["nonprivate_ex_per_s"] > 0 and r["bench"]["B"] == 8
    digits = r["training"]["digits"]
    assert digits["s_per_step"] > 0 and digits["steps_timed"] == 3 and digits["per_example_method"] == "rows"
    # the smoke grid: 2 main cells, the K1 ablation model and the fine-tuning miniature's two
    # models on digits_private, each projected from its dataset's step time
    cells = r["projection"]["cells"]
    assert sorted(c["cell"] for c in cells) == ["digits/eps1/seed0", "digits/eps10/K1/seed0", "digits/eps10/seed0",
                                                "digits_private/eps10/public/seed0",
                                                "digits_private/eps10/scratch/seed0"]
    assert set(r["training"]) == {"digits", "digits_private"}
    for c in cells:
        step = r["training"][c["cell"].split("/")[0]]["s_per_step"]
        assert c["planned_steps"] > 0 and c["gpu_hours"] == pytest.approx(c["planned_steps"] * step / 3600)
    # the miniature's public model (pretrain.digits_public of config/smoke.yaml, used by the
    # config/smoke-finetune.yaml layer that --quick projects too), counted once
    pre = r["pretraining"]["digits_public"]
    assert pre["dataset"] == "digits_public" and pre["s_per_step"] > 0 and pre["steps_timed"] == 3
    assert pre["planned_steps"] > 0 and pre["gpu_hours"] == pytest.approx(pre["planned_steps"] * pre["s_per_step"]
                                                                          / 3600)
    assert r["projection"]["pretrain"] == [{k: pre[k] for k in ("model", "dataset", "planned_steps", "gpu_hours")}]
    assert r["projection"]["total_gpu_hours"] == pytest.approx(sum(c["gpu_hours"] for c in cells)
                                                               + pre["gpu_hours"])
    s = r["sampling"]
    assert s["fp32"]["fid_vs_fp32"] == pytest.approx(0.0, abs=1e-3) and s["fp32"]["img_per_s"] > 0
    for name in ("bf16", "channels_last"):
        assert s[name]["img_per_s"] > 0 and s[name]["fid_vs_fp32"] > -1e-3  # ~0 up to rounding
    assert s["channels_last"]["max_abs_pixel_diff_vs_fp32"] <= 2  # a memory layout: the same samples
    assert s["bf16"]["max_abs_pixel_diff_vs_fp32"] >= 1  # bf16 does change them (measured: 1 level of 255)
    assert s["model"].startswith("random weights")
    assert "CUDA" in s["tf32"]["skipped"] and "CUDA" in s["compile"]["skipped"]
