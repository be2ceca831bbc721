"""`vistra convert` writes a vistra checkpoint that loads with no other file; `pretrained=`
takes vistra checkpoints too."""

import pytest
import torch
from safetensors.torch import save_file

import vistra
from vistra.cli import main
from vistra.weights import load_checkpoint, read_metadata, save_checkpoint

NAME = "vit_tiny_patch16_224"  # full depth: `convert` builds the registered architecture


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
    torch.manual_seed(0)
    source = vistra.create_model(NAME, num_classes=7).eval()
    path = tmp_path_factory.mktemp("src") / "vit_tiny.pth"
    torch.save(source.state_dict(), path)
    return path, source


def outputs(model, size=224):
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(x)


def test_convert_keeps_the_files_classes_and_loads_alone(tmp_path, timm_file, capsys):
    src, source = timm_file
    assert main(["convert", str(src), str(tmp_path / "out.safetensors"), "--model", NAME]) == 0
    assert "loaded 152 tensors into vit_tiny_patch16_224" in capsys.readouterr().out
    model = load_checkpoint(tmp_path / "out.safetensors")
    assert model.num_classes == 7
    torch.testing.assert_close(outputs(model), outputs(source))
    meta = read_metadata(tmp_path / "out.safetensors")
    assert meta["model_name"] == NAME
    assert meta["extra"] == {"converted_from": "vit_tiny.pth", "source_layout": "timm ViT"}


def test_convert_to_another_size_and_class_count(tmp_path, timm_file, capsys):
    src, source = timm_file
    args = ["convert", str(src), str(tmp_path / "out.safetensors"), "--model", NAME,
            "--num-classes", "3", "--img-size", "160"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "head initialised fresh for 3 classes (the file's has 7)" in printed
    assert "position embedding resampled from a 14x14 grid to 10x10" in printed
    model = load_checkpoint(tmp_path / "out.safetensors")
    assert model.num_classes == 3 and model.data_config.img_size == (160, 160)
    assert outputs(model, 160).shape == (1, 3)


def test_convert_errors_are_clear(tmp_path, timm_file, capsys):
    src, _ = timm_file
    assert main(["convert", str(src), str(tmp_path / "out.pth"), "--model", NAME]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    args = ["convert", str(src), str(tmp_path / "o.safetensors"), "--model",
            "deit_tiny_distilled_patch16_224"]
    assert main(args) == 2
    assert "do not fit deit_tiny_distilled_patch16_224" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_pretrained_accepts_a_vistra_checkpoint(tmp_path):
    torch.manual_seed(0)
    source = vistra.create_model(NAME, depth=2, num_classes=4)
    save_checkpoint(source, tmp_path / "mine.safetensors", classes=list("abcd"))
    model = vistra.create_model(NAME, depth=2, num_classes=4,
                                pretrained=tmp_path / "mine.safetensors")
    torch.testing.assert_close(outputs(model), outputs(source))


def test_create_model_takes_the_class_count_of_the_file_unless_told_otherwise(tmp_path):
    source = vistra.create_model("vit_tiny_patch16_224", depth=1, num_classes=5)
    path = tmp_path / "five.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    same = vistra.create_model("vit_tiny_patch16_224", depth=1, pretrained=path)
    assert same.num_classes == 5 and not same.load_report.reinitialised
    torch.testing.assert_close(same.head.weight, source.head.weight)
    other = vistra.create_model("vit_tiny_patch16_224", depth=1, pretrained=path, num_classes=3)
    assert other.num_classes == 3 and other.load_report.reinitialised
