"""Devices and precision, read on a CPU: every command defaults to CUDA where torch sees a
GPU; --amp auto picks bf16 where the device computes it natively, fp16 on older GPUs, off on
CPUs without bf16; TF32 only on GPUs that have it; vistra.optimize and the training
attention touch a model only on the CPU; the fused optimizer step on CUDA. The GPU's own
side runs in tests/test_gpu.py (pytest -m gpu)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vistra.accel.capabilities
import vistra.train.optim
from vistra import create_model
from vistra.accel import accelerate_training, optimize
from vistra.accel.capabilities import (
    default_device,
    enable_tf32,
    has_tf32,
    resolve_amp,
    resolve_device,
    resolve_dtype,
)
from vistra.accel.modules import FastAttention, FastBlock, FastLinear
from vistra.accel.training import TrainingAttention
from vistra.cli import build_parser
from vistra.cli.inference import runtime_device
from vistra.runtime import load_classifier, resolve_precision
from vistra.train import TrainConfig
from vistra.train.distributed import init_distributed
from vistra.train.optim import build_optimizer
from vistra.weights import save_checkpoint

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)


def gpu(monkeypatch, capability=(9, 0), count=1):
    """torch answering as a machine with `count` CUDA GPUs of `capability`."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def cpu_bf16(monkeypatch, native: bool):
    monkeypatch.setattr(vistra.accel.capabilities, "cpu_has_bf16", lambda: native)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(create_model("vit_tiny_patch16_224", **TINY), path,
                    classes=["a", "b", "c"])
    return path


# --- which device -------------------------------------------------------------------------

def test_the_default_device_is_cuda_where_torch_sees_a_gpu(monkeypatch):
    gpu(monkeypatch)
    assert default_device() == "cuda"
    assert init_distributed(None).device == torch.device("cuda", 0)
    no_gpu(monkeypatch)
    assert default_device() == "cpu"
    assert init_distributed(None).device == torch.device("cpu")


def test_a_device_torch_cannot_reach_is_refused_saying_what_to_pass(monkeypatch):
    no_gpu(monkeypatch)
    with pytest.raises(ValueError, match="sees no CUDA GPU here.*use --device cpu"):
        resolve_device("cuda")
    gpu(monkeypatch, count=2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="has 2 CUDA GPU"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("command", ["train", "eval", "predict", "explain", "serve", "demo",
                                     "benchmark"])
def test_every_command_that_runs_a_model_takes_device(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    assert "--device" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["eval", "predict", "serve"])
def test_inference_commands_default_to_the_default_device_but_run_onnx_on_the_cpu(command):
    extra = {"eval": ["--data", "d"], "predict": ["img.png"], "serve": []}[command]
    for model, expected in (("m.safetensors", None), ("m.onnx", "cpu")):
        args = build_parser().parse_args([command, model, *extra])
        assert args.device is None  # resolved by resolve_device: cuda if there is one
        assert runtime_device(args, model) == expected


# --- which precision ----------------------------------------------------------------------

@pytest.mark.parametrize("capability, auto", [((9, 0), "bf16"), ((8, 0), "bf16"),
                                              ((7, 5), "fp16"), ((7, 0), "fp16")])
def test_amp_auto_on_a_gpu_is_bf16_from_compute_capability_8_and_fp16_before(
        monkeypatch, capability, auto):
    gpu(monkeypatch, capability)
    assert resolve_amp("auto", "cuda") == auto
    assert resolve_dtype("auto", "torch", "cuda") == auto  # inference casts the same way
    assert resolve_dtype("auto", "onnx", "cuda") == "fp32"
    for asked in ("bf16", "fp16", "off"):
        assert resolve_amp(asked, "cuda") == asked


@pytest.mark.parametrize("native, auto", [(True, "bf16"), (False, "off")])
def test_amp_auto_on_a_cpu_follows_its_bf16_arithmetic(monkeypatch, native, auto):
    cpu_bf16(monkeypatch, native)
    assert resolve_amp("auto", "cpu") == auto
    assert resolve_dtype("auto", "torch", "cpu") == ("bf16" if native else "fp32")
    with pytest.raises(ValueError, match="--amp must be one of auto, bf16, fp16, off"):
        resolve_amp("fp8", "cpu")


def test_amp_autocasts_an_fp32_model_and_refuses_a_cast_one(monkeypatch):
    cpu_bf16(monkeypatch, True)
    assert resolve_precision("auto", "off", "torch") == ("bf16", "off")
    assert resolve_precision("auto", "auto", "torch") == ("fp32", "bf16")
    assert resolve_precision("fp32", "fp16", "torch") == ("fp32", "fp16")
    with pytest.raises(ValueError, match="--amp bf16 runs an fp32 model.*choose one"):
        resolve_precision("bf16", "bf16", "torch")
    with pytest.raises(ValueError, match="--amp bf16 is for the torch backend"):
        resolve_precision("auto", "bf16", "onnx")
    with pytest.raises(ValueError, match="--dtype fp16 is for the torch backend"):
        resolve_dtype("fp16", "onnx")


def test_a_classifier_under_amp_keeps_fp32_weights_and_answers_close_to_fp32(checkpoint):
    x = torch.randn(4, 3, 32, 32)
    plain = load_classifier(checkpoint, dtype="fp32")
    mixed = load_classifier(checkpoint, dtype="auto", amp="bf16")
    assert (mixed.dtype, mixed.amp, mixed.device) == ("fp32", "bf16", "cpu")
    assert {p.dtype for p in mixed.model.parameters()} == {torch.float32}
    torch.testing.assert_close(mixed(x), plain(x), atol=0.05, rtol=0.05)
    half = load_classifier(checkpoint, dtype="fp16")  # the older GPUs' cast, here on a CPU
    assert {p.dtype for p in half.model.parameters()} == {torch.float16}
    torch.testing.assert_close(half(x), plain(x), atol=0.02, rtol=0.02)


def test_compile_is_asked_of_the_model_once(checkpoint, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **kw: compiled.append(self))
    classifier = load_classifier(checkpoint, compile=True)
    assert compiled == [classifier.model]
    with pytest.raises(ValueError, match="--compile is for the torch backend"):
        load_classifier(checkpoint, backend="onnx", compile=True)


def test_tf32_only_on_a_gpu_that_has_it(monkeypatch):
    assert not has_tf32("cpu") and not enable_tf32("cpu")
    gpu(monkeypatch, (7, 5))
    assert not has_tf32("cuda") and not enable_tf32("cuda")
    gpu(monkeypatch, (8, 0))
    monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee")
    assert has_tf32("cuda") and enable_tf32("cuda")
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


# --- what is applied where ----------------------------------------------------------------

def test_optimize_only_sets_eval_mode_and_casts_off_the_cpu():
    """A model elsewhere (the meta device stands for a GPU here) keeps its plain modules:
    the CPU's oneDNN versions would be dead weight or worse there."""
    model = create_model("vit_tiny_patch16_224", **TINY).to("meta")
    optimize(model, torch.bfloat16)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    fast = (FastBlock, FastAttention, FastLinear)
    assert not [m for m in model.modules() if isinstance(m, fast)]
    on_cpu = optimize(create_model("vit_tiny_patch16_224", **TINY))
    assert [m for m in on_cpu.modules() if isinstance(m, fast)]  # while the CPU gets them


def test_the_training_attention_is_the_cpus_only():
    model = accelerate_training(create_model("vit_tiny_patch16_224", **TINY).to("meta"))
    assert not [m for m in model.modules() if isinstance(m, TrainingAttention)]


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_the_optimizer_step_is_fused_on_cuda_and_foreach_elsewhere(monkeypatch, name):
    model = create_model("vit_tiny_patch16_224", **TINY)
    cfg = TrainConfig(optimizer=name)
    assert build_optimizer(model, cfg).defaults["foreach"] is True
    monkeypatch.setattr(vistra.train.optim, "_on_cuda", lambda model: True)
    optimizer = build_optimizer(model, cfg)
    assert optimizer.defaults["fused"] is True and not optimizer.defaults["foreach"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_the_gpu_benchmark_says_there_is_no_gpu_to_measure_here():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    done = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert "no CUDA GPU" in done.stderr and "gpu_check.sh" in done.stderr
