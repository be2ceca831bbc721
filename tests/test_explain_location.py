"""The default map points at the evidence on the architectures people train: the Fashion-MNIST
recipes' ViT and Swin, trained for a few epochs through `vistra train` on a task whose
answer is a place (location_task.py: the class is the quadrant of a bright object, a dim one
elsewhere as a distractor, or none when there is no bright object). The default method's
maximum must lie in the bright object's quadrant for >= 90% of held-out images; every
method's share is printed beside occlusion's, whose perturbations find the evidence by
construction."""

from __future__ import annotations

import pytest
from location_task import (
    accuracy,
    held_out,
    method_share,
    train_location_model,
    write_location_folder,
)

from vistra.explain import default_method, methods_for

HELD_OUT = 60  # RISE's 1000 masks per image are most of the time spent explaining
# swin_fmnist's last stage is already one window (7x7 tokens in shifted windows of 4, merged
# to 4x4); windows of 2 give the other layout, a last stage of four windows.
MODELS = {"vit_fmnist": ("vit_fmnist", {}),
          "swin_fmnist": ("swin_fmnist", {}),
          "swin_fmnist, windows of 2": ("swin_fmnist", {"window_size": 2})}
# Two cases run only on request (`python -m pytest -m location`), outside the suite's 10
# minutes: each takes about two minutes. On the four-class task the ViT's RISE share came
# out at 83-98% between runs: it learnt one quadrant as "no bright object elsewhere" and did
# not look at that quadrant's object (location_task.py); with the fifth class it is 100% on
# three training seeds.
ON_REQUEST = pytest.mark.location


@pytest.fixture(scope="module")
def location_data(tmp_path_factory):
    return write_location_folder(tmp_path_factory.mktemp("location"))


@pytest.mark.slow
@pytest.mark.parametrize("label", [
    pytest.param("vit_fmnist", marks=ON_REQUEST), "swin_fmnist",
    pytest.param("swin_fmnist, windows of 2", marks=ON_REQUEST)])
def test_the_default_maps_maximum_lies_on_the_deciding_object(label, location_data, tmp_path):
    name, model_kwargs = MODELS[label]
    model = train_location_model(name, location_data, tmp_path / "run", model_kwargs)
    x, labels = held_out(model, HELD_OUT)
    learned = accuracy(model, x, labels)
    assert learned >= 0.95, f"{label} did not learn the task (accuracy {learned:.2f})"
    shares = {m: method_share(model, x, labels, m) for m in methods_for(model)}
    default = default_method(model)
    report = (f"{label}, accuracy {learned:.2f}; the map's maximum on the deciding object: "
              + ", ".join(f"{m} {share:.0%}{' (default)' if m == default else ''}"
                          for m, share in shares.items()))
    print("\n" + report)
    assert shares[default] >= 0.9, report
