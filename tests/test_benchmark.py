"""The benchmark's bookkeeping: what it times, how it counts FLOPs and memory, the peer it
builds, and the command's output. No timed assertions: machines differ."""

import json
from functools import partial

import pytest
import torch

import vistra.analysis.benchmark as analysis_benchmark
import vistra.cli.benchmark as cli_benchmark
from vistra.analysis.benchmark import benchmark, make_step, peak_memory
from vistra.analysis.complexity import model_cost
from vistra.cli import main
from vistra.models import build_model, get_spec

TINY = "vit_fmnist"  # 28 px, 0.3 M parameters: a benchmark of it takes a fraction of a second
SMALL_GEMM = 256  # the peak's GEMMs at this size: cheap even where bf16 is emulated


def test_report_holds_consistent_figures():
    report = benchmark(TINY, batch_size=4, repeats=2, gemm_size=SMALL_GEMM)
    (result,) = report.results
    macs = model_cost(get_spec(TINY).arch).total_macs
    assert result.impl == "vistra" and result.mode == "infer" and len(result.step_times_ms) == 2
    assert result.gflop_per_image == pytest.approx(2 * macs / 1e9)
    assert result.images_per_s == pytest.approx(4 / (result.latency_ms / 1e3))
    assert result.achieved_gflops == pytest.approx(result.gflop_per_image * result.images_per_s)
    assert result.fraction_of_peak == pytest.approx(result.achieved_gflops
                                                    / report.gemm_peak_gflops)
    assert report.gemm_peak_gflops > 0 and result.peak_memory_mb > 0
    assert report.speedup() is None
    peaks = report.gemm_peak_gflops_by_dtype
    assert set(peaks) == {"fp32", "bf16"} and min(peaks.values()) > 0
    assert report.gemm_peak_gflops == peaks["fp32"]  # the benchmarked dtype's


def test_the_peak_is_the_benchmarked_dtypes_and_the_cpu_is_described(monkeypatch):
    monkeypatch.setattr(analysis_benchmark, "cpu_has_bf16", lambda: False)
    report = benchmark(TINY, batch_size=1, dtype="bf16", repeats=1, warmup=0,
                       measure_memory=False, gemm_size=SMALL_GEMM)
    assert report.gemm_peak_gflops == report.gemm_peak_gflops_by_dtype["bf16"]
    (result,) = report.results
    assert result.fraction_of_peak == pytest.approx(result.achieved_gflops
                                                    / report.gemm_peak_gflops_by_dtype["bf16"])
    assert report.cpu_bf16 is False
    assert set(report.cpu_bf16_flags) <= {"avx512_bf16", "amx_bf16"}
    assert isinstance(report.cpu_model, str)


def test_training_counts_three_forwards_and_updates_the_weights():
    model = build_model(TINY)
    before = model.head.weight.detach().clone()
    make_step(model, torch.randn(2, 1, 28, 28), "train", "fp32")()
    assert not torch.equal(before, model.head.weight)
    (result,) = benchmark(TINY, batch_size=2, mode="train", dtype="bf16", repeats=1,
                          gemm_size=SMALL_GEMM).results
    assert result.gflop_per_image == pytest.approx(3 * 2 * model_cost(model.arch).total_macs / 1e9)


def test_peak_memory_sees_what_a_step_holds_at_once():
    def step():
        a = torch.ones(2**20)  # 4 MiB
        b = torch.ones(2**20)  # 4 MiB more, both alive
        del a, b
        torch.ones(2**20)  # 4 MiB again, after freeing

    assert peak_memory(step) == 8 * 2**20


@pytest.mark.parametrize("kw,message", [({"dtype": "fp16"}, "dtype must be one of"),
                                        ({"mode": "eval"}, "mode must be one of"),
                                        ({"compare": "timm"}, "takes 'hf'")])
def test_bad_options_are_clear_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        benchmark(TINY, **kw)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_hf_peer_has_the_same_architecture(name):
    pytest.importorskip("transformers")
    from vistra.analysis.peers import hf_peer

    peer = hf_peer(name)
    with torch.device("meta"):
        ours = build_model(name)
    assert sum(p.numel() for p in peer.parameters()) == sum(p.numel() for p in ours.parameters())
    eps = {m.eps for m in peer.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == ({1e-5} if "swin" in name else {1e-6})
    out = peer.eval()(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)


def test_hf_peer_refuses_what_transformers_cannot_build():
    pytest.importorskip("transformers")
    from vistra.analysis.peers import hf_peer

    with pytest.raises(ValueError, match="no transformers equivalent"):
        hf_peer("vit_base_r50_s16_224")


def test_benchmark_command_json_with_the_peer(capsys, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setattr(cli_benchmark, "benchmark", partial(benchmark, gemm_size=SMALL_GEMM))
    argv = ["benchmark", "vit_tiny_patch16_224", "--batch-size", "1", "--repeats", "1",
            "--img-size", "64", "--compare", "hf", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["impl"] for r in report["results"]] == ["vistra", "hf"]
    assert report["speedup_vs_hf"] == pytest.approx(
        report["results"][0]["images_per_s"] / report["results"][1]["images_per_s"])


@pytest.mark.parametrize("has_bf16", [True, False])
def test_benchmark_command_says_whether_the_cpu_has_bf16_arithmetic(capsys, monkeypatch,
                                                                    has_bf16):
    monkeypatch.setattr(analysis_benchmark, "cpu_has_bf16", lambda: has_bf16)
    monkeypatch.setattr(cli_benchmark, "benchmark", partial(benchmark, gemm_size=SMALL_GEMM))
    argv = ["benchmark", TINY, "--batch-size", "2", "--repeats", "1", "--warmup", "0",
            "--no-memory"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("CPU: ")]
    assert "GEMM peak fp32 " in line and ", bf16 " in line and line.endswith("(same run)")
    if has_bf16:
        assert "bf16 arithmetic: yes" in line
    else:
        assert "bf16 arithmetic: no (bf16 is emulated: slow)" in line
    assert TINY in out

    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cpu_bf16"] is has_bf16 and isinstance(report["cpu_model"], str)
    assert set(report["gemm_peak_gflops_by_dtype"]) == {"fp32", "bf16"}
    assert min(report["gemm_peak_gflops_by_dtype"].values()) > 0
    assert report["gemm_peak_gflops"] == report["gemm_peak_gflops_by_dtype"]["fp32"]


def test_the_peak_is_the_fastest_gemm_and_names_it(monkeypatch):
    """A slow torch.mm and a fast oneDNN GEMM: the peak is oneDNN's, so a model at the speed
    of the faster GEMM is at 100% of peak, never above."""
    import time

    def fake_gemms(dtype, n, device="cpu"):
        return {"torch.mm": lambda: time.sleep(0.02), "oneDNN": lambda: time.sleep(0.004)}

    monkeypatch.setattr(analysis_benchmark, "gemm_steps", fake_gemms)
    report = benchmark(TINY, batch_size=1, repeats=2, warmup=0, measure_memory=False,
                       gemm_size=SMALL_GEMM)
    for kind in ("fp32", "bf16"):
        by_gemm = report.gemm_gflops_by_dtype[kind]
        assert set(by_gemm) == {"torch.mm", "oneDNN"}
        assert report.gemm_peak_source_by_dtype[kind] == "oneDNN"
        assert report.gemm_peak_gflops_by_dtype[kind] == max(by_gemm.values())
    assert report.gemm_peak_gflops == report.gemm_gflops_by_dtype["fp32"]["oneDNN"]
    assert "fp32" in report.cpu_line() and "(oneDNN)" in report.cpu_line()
    assert any("the fastest of torch.mm" in note for note in report.notes)


def test_fastest_gemm_takes_the_highest_rate():
    assert analysis_benchmark.fastest_gemm({"torch.mm": 200.0, "oneDNN": 351.0}) == (
        "oneDNN", 351.0)
    assert analysis_benchmark.fastest_gemm({"torch.mm": 90.0}) == ("torch.mm", 90.0)


def test_both_gemms_are_timed_where_torch_has_onednn():
    steps = analysis_benchmark.gemm_steps(torch.float32, 64)
    assert "torch.mm" in steps
    if torch.backends.mkldnn.is_available():
        assert "oneDNN" in steps


def test_bf16_inference_runs_vistra_cast_and_the_peers_faster_path():
    pytest.importorskip("transformers")
    report = benchmark("vit_tiny_patch16_224", batch_size=1, img_size=64, dtype="bf16",
                       compare="hf", repeats=1, warmup=0, measure_memory=False,
                       gemm_size=SMALL_GEMM)
    ours, theirs = report.results
    assert (ours.impl, ours.path, set(ours.images_per_s_by_path)) == (
        "vistra", "bf16 cast", {"bf16 cast"})
    assert set(theirs.images_per_s_by_path) == {"bf16 cast", "bf16 autocast"}
    assert theirs.images_per_s == max(theirs.images_per_s_by_path.values())
    assert theirs.path == max(theirs.images_per_s_by_path,
                              key=theirs.images_per_s_by_path.__getitem__)
    (also,) = [line for line in report.format().splitlines() if "also ran" in line]
    assert also.strip().startswith(f"hf {theirs.path} chosen")


def test_a_compiled_models_first_step_is_timed_apart(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    report = benchmark(TINY, batch_size=2, repeats=1, warmup=0, compile=True,
                       measure_memory=False, gemm_size=SMALL_GEMM)
    (result,) = report.results
    assert len(compiled) == 1 and result.compiled
    assert result.first_step_s is not None and len(result.step_times_ms) == 1  # not timed
    assert "vistra+c first step" in report.format() and "not in the figures" in report.format()
