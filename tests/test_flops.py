"""Counting: published totals, the analytic count equal to the FLOP counter, the Swin
paper's attention formulas against the measured layer, and the `flops` / `models` commands."""

import json

import pytest
import torch

import vistra
from vistra.analysis import complexity
from vistra.analysis.complexity import model_cost, msa_macs, stages, wmsa_macs
from vistra.analysis.flops import count_macs, flops_report, measure, model_summary
from vistra.cli import main
from vistra.models import get_family, get_spec, list_models

PUBLISHED_GMACS = {
    "vit_base_patch16_224": 17.56,
    "swin_tiny_patch4_window7_224": 4.49,
    "swin_small_patch4_window7_224": 8.7,
    "swin_base_patch4_window7_224": 15.4,
}


def meta_model(name, **kw):
    with torch.device("meta"):
        return vistra.create_model(name, **kw)


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "swin_tiny_patch4_window7_224"])
def test_counted_totals_match_the_published_figures(name):
    report = flops_report(name)
    assert report["macs"] / 1e9 == pytest.approx(PUBLISHED_GMACS[name], rel=0.01)


@pytest.mark.parametrize("name,gmacs", PUBLISHED_GMACS.items())
def test_analytic_totals_match_the_published_figures(name, gmacs):
    assert model_cost(get_spec(name).arch).total_macs / 1e9 == pytest.approx(gmacs, rel=0.01)


@pytest.mark.parametrize("name,img_size", [
    ("vit_base_patch16_224", None),
    ("vit_base_r50_s16_224", None),              # ResNet hybrid, TF-SAME padding
    ("deit_small_distilled_patch16_224", None),  # two prefix tokens, two heads
    ("vit_base_patch16_224_in21k", None),        # pre-logits
    ("vit_fmnist", None),                        # conv stem
    ("swin_fmnist", None),
    ("swin_tiny_patch4_window7_224", None),
    ("swin_tiny_patch4_window7_224", 250),       # padding to whole windows and odd merges
    ("swin_base_patch4_window12_384", None),
])
def test_analytic_count_equals_the_flop_counter_by_stage_and_kind(name, img_size):
    model = meta_model(name, img_size=img_size)
    measured = measure(model)
    cost = model_cost(model.arch)
    assert cost.macs == measured.macs
    assert cost.params == measured.params


def test_listing_every_model_builds_none(monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("model_summary built a model")

    monkeypatch.setattr("vistra.analysis.flops.build_model", no_build)
    monkeypatch.setattr("vistra.analysis.flops.build_from_arch", no_build)
    rows = [model_summary(name) for name in list_models()]
    swin_t = next(r for r in rows if r["name"] == "swin_tiny_patch4_window7_224")
    assert swin_t["params"] == 28_288_354 and swin_t["macs"] / 1e9 == pytest.approx(4.49, 0.01)


def test_a_field_the_formulas_do_not_follow_falls_back_to_counting(monkeypatch):
    family = get_family("vit")
    monkeypatch.setattr(family, "modelled_fields", family.modelled_fields - {"conv_stem"})
    stem = get_spec("vit_fmnist").arch
    assert complexity.unmodelled_fields(stem) == ["conv_stem"]
    with pytest.raises(ValueError, match="does not model conv_stem"):
        model_cost(stem)
    counted = measure(meta_model("vit_fmnist")).total_macs
    assert model_summary("vit_fmnist")["macs"] == counted


def test_windowed_layer_costs_exactly_the_wmsa_formula_where_no_padding_is_needed():
    report = flops_report("swin_tiny_patch4_window7_224")
    for stage in report["stages"]:
        h, w = stage["map"]
        assert stage["measured_attention"] == wmsa_macs(h, w, stage["dim"], stage["window"])
        assert stage["analytic_msa"] == msa_macs(h, w, stage["dim"])
    first, last = report["stages"][0], report["stages"][-1]
    assert first["analytic_msa"] > 10 * first["analytic_wmsa"]
    assert last["analytic_msa"] == last["analytic_wmsa"]  # a 7x7 map is one 7x7 window


def test_padding_to_whole_windows_costs_more_than_the_formula():
    stages_250 = flops_report("swin_tiny_patch4_window7_224", img_size=250)["stages"]
    stage2 = stages_250[1]  # 32x32 padded to 35x35
    assert stage2["padded"] and stage2["map"] == [32, 32]
    assert stage2["measured_attention"] == wmsa_macs(35, 35, 192, 7)
    assert stage2["measured_attention"] > stage2["analytic_wmsa"]


def test_vit_layer_is_global_attention_over_its_tokens_including_the_class_token():
    (stage,) = flops_report("vit_base_patch16_224")["stages"]
    assert stage["measured_attention"] == msa_macs(197, 1, 768)


def test_quadratic_term_dominates_global_attention_on_swins_first_map():
    hw, C = 56 * 56, 96
    assert 2 * hw**2 * C > 4 * hw * C**2
    assert msa_macs(56, 56, C) - wmsa_macs(56, 56, C, 7) == 2 * hw * C * (hw - 49)


def test_counting_on_cpu_counts_what_meta_counts():
    """On CPU, attention runs the flash kernel and linears oneDNN's fused op, neither of
    which torch's counter knows by itself."""
    for name, kw in [("swin_tiny_patch4_window7_224", {"depths": (2, 1, 1, 1)}),
                     ("vit_tiny_patch16_224", {"depth": 1})]:
        cpu = vistra.create_model(name, **kw)
        assert count_macs(cpu, (224, 224)) == count_macs(meta_model(name, **kw), (224, 224))


def test_stages_follow_the_model_built():
    shapes = stages(get_spec("swin_tiny_patch4_window7_224").arch)
    assert [(s.h, s.dim, s.window) for s in shapes] == [(56, 96, 7), (28, 192, 7),
                                                        (14, 384, 7), (7, 768, 7)]


def test_flops_command_json(capsys):
    assert main(["flops", "swin_tiny_patch4_window7_224", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params"] == 28_288_354 and report["macs"] == 4_490_566_656
    assert set(report["by_stage"]) == {"embed", "stage1", "stage2", "stage3", "stage4", "head"}
    for stage in report["stages"]:
        assert {"analytic_msa", "analytic_wmsa", "measured_attention"} <= set(stage)
    assert "softmax" in report["not_counted"]


def test_flops_command_table_names_what_is_left_out(capsys):
    assert main(["flops", "vit_base_patch16_224", "--img-size", "384"]) == 0
    out = capsys.readouterr().out
    assert "at 384x384" in out and "Not counted: softmax" in out and "what-if" in out


def test_plot_is_written(tmp_path):
    from vistra.analysis.complexity_plot import plot_attention_scaling

    path = plot_attention_scaling("swin_tiny_patch4_window7_224", tmp_path / "scaling.png",
                                  sizes=(112, 224), repeats=1)
    assert path.stat().st_size > 10_000


def test_models_command_lists_sizes_and_costs(capsys):
    assert main(["models", "swin_*_224", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["swin_base_patch4_window7_224"]["macs"] / 1e9 == pytest.approx(15.4, rel=0.01)
    assert rows["swin_small_patch4_window7_224"]["params"] / 1e6 == pytest.approx(49.6, 1e-3)
