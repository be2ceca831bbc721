"""On a CUDA GPU (`python -m pytest -m gpu`; skipped without one): training for two epochs
and resuming, predict, eval, every explain method and export from a GPU-trained checkpoint,
bf16 and fp16 (autocast and cast), compilation, and torchrun over two GPUs where there are.
Each result is checked against the CPU's, which the rest of the suite pins down.
benchmarks/gpu_check.sh runs this file and benchmarks/gpu.py --quick on a bare GPU machine."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from test_train_e2e import ctrl_c_in_epoch, make_colour_folder, tiny_config

import vistra.train.loop as loop
from vistra import create_model
from vistra.accel import device_has_bf16, resolve_amp
from vistra.cli import main
from vistra.explain import explain, methods_for
from vistra.runtime import load_classifier
from vistra.train import resume, train
from vistra.train.checkpoint import load_training_state
from vistra.weights import load_checkpoint, save_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _weights(run_dir):
    return torch.load(run_dir / "last.ckpt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_colour_folder(tmp_path_factory.mktemp("gpu") / "colours")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A two-epoch run on the GPU (fp32, TF32 where the GPU has it): its directory."""
    run = tmp_path_factory.mktemp("gpu") / "run"
    result = train(tiny_config(data, run, device="cuda", workers=2, ema=True, ema_decay=0.9))
    assert next(result.model.parameters()).device.type == "cuda"
    return run


def test_an_interrupted_gpu_run_resumes_to_the_uninterrupted_runs_end(data, trained,
                                                                     tmp_path, monkeypatch):
    real_epoch = ctrl_c_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, tmp_path / "cut", device="cuda", workers=2, ema=True,
                          ema_decay=0.9))
    monkeypatch.setattr(loop, "train_one_epoch", real_epoch)
    resumed = resume(tmp_path / "cut")
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    straight, cut = _weights(trained), _weights(tmp_path / "cut")
    assert straight.keys() == cut.keys()
    # the same arithmetic; GPU kernels may add in another order (atomics), so not bit-exact
    for key, value in straight.items():
        torch.testing.assert_close(cut[key], value, rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training_on_the_gpu(data, tmp_path, amp):
    result = train(tiny_config(data, tmp_path / "run", device="cuda", amp=amp, epochs=1))
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in result.history)
    scaler = load_training_state(tmp_path / "run" / "last.ckpt")["scaler"]
    assert ("scale" in scaler) == (amp == "fp16")


def test_amp_auto_takes_what_this_gpu_computes_natively():
    expected = "bf16" if device_has_bf16("cuda") else "fp16"
    assert resolve_amp("auto", "cuda") == expected


def test_compiled_training_reports_its_first_step_and_saves_the_plain_keys(data, tmp_path,
                                                                          capsys):
    train(tiny_config(data, tmp_path / "run", device="cuda", epochs=1, compile=True,
                      quiet=False))
    assert "torch.compile: the first step took" in capsys.readouterr().out
    assert not [k for k in _weights(tmp_path / "run") if "_orig_mod" in k]


def test_predict_and_eval_on_the_gpu_answer_as_on_the_cpu(data, trained, capsys):
    best = str(trained / "best.safetensors")
    answers = {}
    for device in ("cpu", "cuda"):
        assert main(["predict", best, str(data), "--device", device, "--dtype", "fp32",
                     "--format", "json"]) in (0, 1)  # 1: the folder's unreadable files
        answers[device] = json.loads(capsys.readouterr().out)
    assert [p["path"] for p in answers["cpu"]] == [p["path"] for p in answers["cuda"]]
    for cpu, gpu in zip(answers["cpu"], answers["cuda"], strict=True):
        assert cpu["topk"][0]["class"] == gpu["topk"][0]["class"]
        assert abs(cpu["topk"][0]["probability"] - gpu["topk"][0]["probability"]) < 1e-2
    reports = {}
    for argv in (["--device", "cpu", "--dtype", "fp32"], ["--device", "cuda", "--dtype", "fp32"],
                 ["--device", "cuda", "--amp", "bf16"], ["--device", "cuda", "--compile"]):
        assert main(["eval", best, "--data", str(data), "--json", *argv]) == 0
        reports[" ".join(argv)] = json.loads(capsys.readouterr().out)
    tops = [r["top1"] for r in reports.values()]
    assert max(tops) - min(tops) <= 1 / reports["--device cpu --dtype fp32"]["images"] + 1e-9


@pytest.mark.parametrize("dtype, amp", [("bf16", "off"), ("fp16", "off"), ("auto", "bf16"),
                                        ("auto", "fp16")])
def test_half_precision_inference_on_the_gpu_stays_close_to_fp32(trained, dtype, amp):
    x = torch.randn(16, 3, 16, 16)
    reference = load_classifier(trained / "best.safetensors", "cuda", dtype="fp32")(x)
    half = load_classifier(trained / "best.safetensors", "cuda", dtype=dtype, amp=amp)
    assert half.device.startswith("cuda")
    logits = half(x)
    assert logits.dtype == torch.float32 and logits.device.type == "cpu"
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max() + 1e-3


def _tiny_swin(path):
    torch.manual_seed(0)
    model = create_model("swin_tiny_patch4_window7_224", img_size=64, embed_dim=16,
                         depths=(2, 1), num_heads=(1, 2), window_size=4, num_classes=3)
    save_checkpoint(model, path, classes=["a", "b", "c"])
    return path


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_every_explain_method_runs_on_the_gpu_as_on_the_cpu(trained, tmp_path, kind):
    path = trained / "best.safetensors" if kind == "vit" else _tiny_swin(tmp_path / "s.st")
    image = Image.new("RGB", (48, 40), (200, 40, 40))
    image.paste((30, 30, 220), (0, 0, 20, 20))
    on_cpu, on_gpu = load_checkpoint(path), load_checkpoint(path, device="cuda")
    assert methods_for(on_gpu) == methods_for(on_cpu)
    for method in methods_for(on_gpu):
        gpu = explain(on_gpu, image, method=method).map.float().cpu()
        cpu = explain(on_cpu, image, method=method).map.float().cpu()
        assert gpu.shape == cpu.shape and torch.isfinite(gpu).all(), method
        if cpu.std() > 1e-6 and gpu.std() > 1e-6:
            correlation = torch.corrcoef(torch.stack([cpu.flatten(), gpu.flatten()]))[0, 1]
            assert correlation > 0.9, (method, float(correlation))


def test_a_gpu_trained_checkpoint_exports_and_answers_as_in_pytorch(trained, tmp_path):
    onnx_file = tmp_path / "run.onnx"
    assert main(["export", str(trained / "best.safetensors"), "--out", str(onnx_file)]) == 0
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(load_classifier(onnx_file)(x),
                               load_classifier(trained / "best.safetensors", dtype="fp32")(x),
                               atol=1e-4, rtol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="torchrun over GPUs needs two")
def test_torchrun_trains_on_two_gpus_with_the_global_batch_logged(data, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
               "vistra", "train", "--data", str(data), "--model", "vit_tiny_patch16_224",
               "--output", str(tmp_path / "run"), "--epochs", "1", "--img-size", "16",
               "--batch-size", "4", "--workers", "0", "--model-arg", "patch_size=8",
               "--model-arg", "depth=1", "--model-arg", "embed_dim=32", "--model-arg",
               "num_heads=2", "--amp", "auto"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "effective batch: 4 images x 1 accumulation step(s) x 2 processes = 8" in done.stdout
    assert load_training_state(tmp_path / "run" / "last.ckpt")["run"]["world_size"] == 2


def test_the_benchmark_command_times_the_gpu(capsys):
    for argv in (["--mode", "train", "--dtype", "bf16"], ["--compile"]):
        assert main(["benchmark", "vit_fmnist", "--device", "cuda", "--batch-size", "8",
                     "--repeats", "2", "--json", *argv]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["device"].startswith("cuda") and "compute capability" in report[
            "device_name"]
        (result,) = report["results"]
        assert result["images_per_s"] > 0 and result["peak_memory_mb"] > 0
        if "--compile" in argv:
            assert result["compiled"] and result["first_step_s"] > 0
