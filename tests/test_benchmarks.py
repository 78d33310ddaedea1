"""The paper's analyses (benchmarks/) run end to end in tiny configurations: correctness
only, the figures come from the full runs (docs/RESULTS.md)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is several times faster
    yield
    torch.set_num_threads(threads)


def test_bias_benchmark():
    import bias

    result = bias.main(["--tiny"])
    rows = result["blocks"]
    assert {r["dim"] for r in rows} == {2, 4} and len(rows) == 2 * 2 * len(bias.ESTIMATORS)
    assert all(abs(r["bias"]) < 1 for r in rows)
    for hist in result["training"].values():
        assert [h["step"] for h in hist] == [0, 2, 4]
    assert (BENCH / "out" / "bias_tiny.png").stat().st_size > 0


def test_exact_logdet_is_the_power_series_and_truncation_drops_terms():
    import bias

    torch.manual_seed(0)
    g = bias.branch(4, 0.95)
    x = torch.randn(16, 4, dtype=torch.float64)
    exact = bias.exact(g, x)
    # the dense Jacobian's logdet equals the power series (200 terms, exact traces)
    jac = torch.func.vmap(torch.func.jacrev(lambda t: g(t[None])[0]))(x).detach()
    series = sum((-1) ** (k + 1) * torch.linalg.matrix_power(jac, k).diagonal(0, 1, 2).sum(1) / k
                 for k in range(1, 201))  # fmt: skip
    torch.testing.assert_close(exact, series, atol=1e-6, rtol=1e-6)
    two = sum((-1) ** (k + 1) * torch.linalg.matrix_power(jac, k).diagonal(0, 1, 2).sum(1) / k
              for k in range(1, 3))  # fmt: skip
    assert float((two - exact).abs().mean()) > 1e-3  # what truncation leaves out


def test_activation_benchmark():
    import activations

    result = activations.main(["--tiny"])
    sat = {r["activation"]: r["saturated_fraction"] for r in result["derivatives"]}
    assert sat["elu"] > 0.4 and sat["lipswish"] < 0.1  # ELU saturates for z > 0
    assert {r["activation"] for r in result["ablation"]} == {"elu", "lipswish"}
    for r in result["derivatives"]:
        assert r["max_abs_d1"] <= 1 + 1e-9  # 1-Lipschitz


def test_norm_benchmark():
    import norms

    result = norms.main(["--tiny"])
    assert [r["norm"] for r in result["rows"]] == ["p = 2", "p = inf", "learned mixed norms"]
    assert all(r["test_nll"] > 0 for r in result["rows"])
    assert len(result["rows"][2]["learned_orders"]) > 0


def test_fig3_memory_benchmark_in_process(tmp_path):
    import speed_memory

    assert speed_memory.SUITES["fig3-cifar10"][0] == "fig3-cifar10-naive"
    results = [speed_memory.run_one(n) for n in ("fig3-tiny-naive", "fig3-tiny-neumann-bif")]
    assert all(r["peak_rss_gb"] > 0 and r["sec_per_iter"] > 0 for r in results)
    speed_memory._plot_fig3(results, tmp_path / "fig3.png", "fig3-tiny")
    assert (tmp_path / "fig3.png").stat().st_size > 0


def test_hybrid_benchmark():
    import hybrid

    rows = hybrid.main(["--tiny"])["rows"]
    assert [r["lambda"] for r in rows] == ["0", "1/D", "1"]
    assert all(0 <= r["accuracy"] <= 1 and r["test_bpd"] > 0 for r in rows)


def test_readme_job_benchmark():
    import readme_job

    result = readme_job.main(["--tiny", "--seeds", "0"])
    runs = {r["recipe"]: r for r in result["runs"]}
    assert runs["old"]["lr"] == 2e-3 and runs["new"]["lr"] == 5e-3
    assert all(r["steps"] == 3 and r["bits_per_dim"] > 0 for r in runs.values())


def test_ab_step_measurement():
    """One version's side of benchmarks/ab.py: seconds, FLOPs and fraction of peak."""
    import ab

    res = ab.measure("toy2d")
    assert res["sec_per_step"] > 0 and len(res["step_times"]) == ab.CONFIGS["toy2d"][-1]
    assert res["gflop_per_step"] > 0 and 0 < res["fraction_of_peak"] < 2
    assert res["certify_amortized"] >= 0


def test_gpu_step_benchmark_runs_its_variants_in_fresh_processes(tmp_path):
    """benchmarks/gpu_step.py on the CPU (tiny): one row per variant, TensorFloat-32
    skipped off CUDA; without MNIST or a GPU the default refuses in one line."""
    import gpu_step

    result = gpu_step.main(["--tiny", "--device", "cpu", "--variants", "fp32", "tf32", "bf16"])
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"fp32", "bf16"}
    for r in rows.values():
        assert r["images_per_s"] > 0 and r["peak_gb"] > 0 and r["batch"] == 8
        assert r["mean_sec_per_step"] >= min(r["step_times"]) > 0
    with pytest.raises(SystemExit, match="MNIST not found at"):
        gpu_step.main(["--mnist", str(tmp_path / "nowhere")])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            gpu_step.main([])


def test_peers_benchmark_smoke():
    """benchmarks/peers.py --quick: two resflow families and zuko's MAF on one data set,
    the conditional toy for the two MAFs; every NLL and KL finite."""
    pytest.importorskip("zuko")
    import json

    import peers

    out = peers.main(["--quick", "--repeats", "1", "--datasets", "8gaussians",
                      "--models", "maf", "realnvp-vector", "zuko-maf"])  # fmt: skip
    saved = json.loads((BENCH / "out" / "peers_quick.json").read_text())
    rows = saved["results"]["8gaussians"]["models"]
    assert set(rows) == {"maf", "realnvp-vector", "zuko-maf"}
    assert all(math.isfinite(r["nll"]) and r["samples_per_cpu_s"] > 0 for r in rows.values())
    assert set(out["conditional"]) == {"maf", "zuko-maf"}
    assert all(math.isfinite(r["kl"]) for r in out["conditional"].values())
