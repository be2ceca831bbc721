"""The fine-tuning knobs: layer-wise learning-rate decay, gradient accumulation, class
balancing and early stopping, each exact on resume."""

import copy

import pytest
import torch
from test_cli_train import _config
from test_train_e2e import TINY, ctrl_c_in_epoch, make_colour_folder, tiny_config
from test_train_resume import _without_time

import vistra.train.loop as loop
from vistra import create_model
from vistra.models import VistraModel
from vistra.train import TrainConfig, resume, train
from vistra.train.checkpoint import load_training_state
from vistra.train.data import ClassBalancedSampler, EpochSeededSampler, class_weights
from vistra.train.distributed import DistContext
from vistra.train.loss import training_loss
from vistra.train.optim import build_optimizer, build_scheduler, set_peak_lr
from vistra.train.params import describe_layer_decay, param_groups

# --- layer decay ---------------------------------------------------------------------------


def _scales(groups):
    return {name: group["lr_scale"] for group in groups for name in group["names"]}


def test_layer_decay_scales_vit_s_as_beit():
    """ViT-S: 12 blocks. The head and final norm at 1, block i at d^(12 - i), the patch
    embedding, class token and position embedding at d^13."""
    d = 0.75
    model = create_model("vit_small_patch16_224", num_classes=10)
    scales = _scales(param_groups(model, 0.05, layer_decay=d))

    def expected(name):
        if name.startswith(("patch_embed.", "cls_token", "pos_embed")):
            return d ** 13
        if name.startswith("blocks."):
            return d ** (12 - int(name.split(".")[1]))
        assert name.startswith(("norm.", "head."))
        return 1.0

    names = [name for name, _ in model.named_parameters()]
    assert sorted(scales) == sorted(names)
    for name in names:
        assert scales[name] == pytest.approx(expected(name)), name


def test_layer_decay_counts_swin_t_blocks_across_its_stages():
    """Swin-T: stages of 2, 2, 6 and 2 blocks, 12 in all, numbered 1-12 from the input,
    block k at d^(13 - k); a patch merging goes with the block before it; the patch
    embedding at d^13, the final norm and the head at 1."""
    d = 0.8
    model = create_model("swin_tiny_patch4_window7_224", num_classes=10)
    scales = _scales(param_groups(model, 0.05, layer_decay=d))
    first_block = {0: 1, 1: 3, 2: 5, 3: 11}  # the number of each stage's first block
    merging = {1: 2, 2: 4, 3: 10}  # the block before each stage's patch merging

    def expected(name):
        parts = name.split(".")
        if parts[0] == "patch_embed":
            return d ** 13
        if parts[0] == "layers" and parts[2] == "downsample":
            return d ** (13 - merging[int(parts[1])])
        if parts[0] == "layers":
            return d ** (13 - (first_block[int(parts[1])] + int(parts[3])))
        assert parts[0] in ("norm", "head")
        return 1.0

    names = [name for name, _ in model.named_parameters()]
    assert sorted(scales) == sorted(names)
    for name in names:
        assert scales[name] == pytest.approx(expected(name)), name


def test_layer_decay_keeps_weight_decay_and_scales_the_schedule():
    model = create_model("vit_tiny_patch16_224", img_size=16, num_classes=3, **TINY)
    plain = param_groups(model, 0.05)
    decayed = param_groups(model, 0.05, layer_decay=0.5)
    for weight_decay in (0.05, 0.0):
        assert {n for g in plain if g["weight_decay"] == weight_decay for n in g["names"]} == \
            {n for g in decayed if g["weight_decay"] == weight_decay for n in g["names"]}
    cfg = TrainConfig(lr=0.1, layer_decay=0.5, epochs=1)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, 10)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == \
        pytest.approx([0.025, 0.05, 0.1])  # embeddings, the one block, the head
    set_peak_lr(scheduler, 0.2)  # a resume's new --lr keeps the layers' ratios
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([0.05, 0.1, 0.2])
    text = describe_layer_decay(optimizer.param_groups, 0.5)
    assert text.splitlines() == ["layer decay 0.5: learning rate = lr x scale",
                                 "  x1  head, norm", "  x0.5  blocks.0",
                                 "  x0.25  cls_token, patch_embed, pos_embed"]


def test_a_model_that_does_not_define_its_layers_refuses_layer_decay(monkeypatch):
    model = create_model("vit_tiny_patch16_224", img_size=16, num_classes=3, **TINY)
    monkeypatch.setattr(type(model), "layer_ids", VistraModel.layer_ids)
    with pytest.raises(ValueError, match="vit models do not define layer_ids"):
        param_groups(model, 0.05, layer_decay=0.5)


# --- gradient accumulation -----------------------------------------------------------------

def _one_epoch(model, batches, accum_steps):
    cfg = TrainConfig(optimizer="sgd", lr=0.5, momentum=0.9, weight_decay=0.05, epochs=1,
                      accum_steps=accum_steps, quiet=True)
    optimizer = build_optimizer(model, cfg)
    steps = -(-len(batches) // accum_steps)
    scheduler = build_scheduler(optimizer, cfg, steps)
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    loop.train_one_epoch(model, batches, optimizer, scheduler, cfg, ctx, 1, None, None, 1)
    return scheduler.last_epoch


def test_four_accumulated_batches_of_8_make_the_update_of_one_batch_of_32():
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", img_size=16, num_classes=4, **TINY)
    small, large = model, copy.deepcopy(model)
    images, labels = torch.randn(72, 3, 16, 16), torch.randint(0, 4, (72,))
    # 9 batches of 8: steps of 4, 4 and 1 batches; against batches of 32, 32 and 8.
    eights = [(images[i:i + 8], labels[i:i + 8]) for i in range(0, 72, 8)]
    thirty_twos = [(images[i:i + 32], labels[i:i + 32]) for i in range(0, 72, 32)]
    assert _one_epoch(small, eights, 4) == _one_epoch(large, thirty_twos, 1) == 3
    for (name, a), b in zip(small.named_parameters(), large.parameters(), strict=True):
        assert (a - b).abs().max() < 1e-5, name
    assert not torch.equal(small.head.weight, create_model(
        "vit_tiny_patch16_224", img_size=16, num_classes=4, **TINY).head.weight)


def test_accumulation_steps_the_schedule_per_update_and_logs_the_batch(tmp_path, capsys):
    data = make_colour_folder(tmp_path / "data", per_class=8)  # 18 training images
    result = train(tiny_config(data, tmp_path / "run", epochs=1, batch_size=4, accum_steps=2,
                               quiet=False))
    state = load_training_state(result.run_dir / "last.ckpt")
    assert state["run"]["steps_per_epoch"] == 3  # 5 batches in steps of 2, 2 and 1
    assert state["scheduler"]["last_epoch"] == 3
    assert "effective batch: 4 images x 2 accumulation step(s) = 8 per optimizer step" in \
        capsys.readouterr().out


# --- class balance -------------------------------------------------------------------------

def test_the_balanced_sampler_draws_each_class_equally_often_and_the_same_each_epoch():
    labels = [0] * 900 + [1] * 100
    sampler = ClassBalancedSampler(labels, num_replicas=1, rank=0, seed=3)
    sampler.set_epoch(1)
    drawn = list(sampler)
    assert len(drawn) == 1000
    assert 0.45 < sum(labels[i] for i in drawn) / 1000 < 0.55
    assert list(sampler) == drawn
    sampler.set_epoch(2)
    assert list(sampler) != drawn
    shards = [ClassBalancedSampler(labels, 2, rank, seed=3) for rank in (0, 1)]
    for shard in shards:
        shard.set_epoch(1)
    assert [len(s) for s in shards] == [500, 500]
    one = ClassBalancedSampler(labels, 1, 0, seed=3)
    one.set_epoch(1)  # the two shards take turns at the draws of a single process
    assert [i for pair in zip(*map(list, shards), strict=True) for i in pair] == list(one)


def test_an_image_drawn_twice_in_an_epoch_gets_new_augmentations():
    seeded = EpochSeededSampler([5, 7, 5, 5], seed=0)
    seeds = [seed for index, seed in seeded if index == 5]
    assert len(set(seeds)) == 3


def test_inverse_frequency_weights_and_the_weighted_loss():
    weights = class_weights([0] * 6 + [1] * 2, 2)
    assert weights.tolist() == pytest.approx([8 / (2 * 6), 8 / (2 * 2)])
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    expected = (weights[0] * losses[0] + weights[1] * losses[1]) / weights.sum()
    assert training_loss(logits, labels, class_weights=weights).item() == \
        pytest.approx(expected.item())


@pytest.mark.parametrize("balance", ["sampler", "loss"])
def test_a_balanced_run_resumes_exactly(tmp_path, monkeypatch, balance):
    """Every knob at once, interrupted in epoch 2 and resumed: the run of one go."""
    data = make_colour_folder(tmp_path / "data", per_class=6)
    (data / "red").joinpath("extra.png").write_bytes((data / "red" / "0.png").read_bytes())
    knobs = dict(balance=balance, layer_decay=0.7, accum_steps=2, patience=3, ema=True,
                 mixup=0.4)
    straight = train(tiny_config(data, tmp_path / "straight", **knobs))
    real_epoch = ctrl_c_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, tmp_path / "cut", **knobs))
    monkeypatch.setattr(loop, "train_one_epoch", real_epoch)
    resumed = resume(tmp_path / "cut")
    a = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.ckpt", weights_only=True)
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert _without_time(resumed.history) == _without_time(straight.history)


# --- early stopping ------------------------------------------------------------------------

def _scripted_top1(monkeypatch, top1s):
    """Validation answers `top1s`, one per epoch (the real validation still runs)."""
    real = loop._validate_epoch

    def scripted(run, train_loss, train_acc):
        record, (which, _, weights) = real(run, train_loss, train_acc)
        record["val_top1"] = top1s[run.epoch - 1]
        return record, (which, top1s[run.epoch - 1], weights)

    monkeypatch.setattr(loop, "_validate_epoch", scripted)


def test_patience_stops_the_run_and_keeps_the_best(tmp_path, monkeypatch, capsys):
    data = make_colour_folder(tmp_path / "data", per_class=4)
    _scripted_top1(monkeypatch, [0.5, 0.6, 0.6, 0.55, 0.9, 0.9])
    result = train(tiny_config(data, tmp_path / "run", epochs=6, patience=2, quiet=False))
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    assert (result.best_epoch, result.best_top1) == (2, 0.6)
    out = capsys.readouterr().out
    assert "stopped after epoch 4 of 6: no better validation top-1 in 2 epoch(s)" in out
    assert (result.run_dir / "best.safetensors").is_file()
    again = resume(result.run_dir)  # a stopped run stays stopped
    assert [r["epoch"] for r in again.history] == [1, 2, 3, 4]


# --- options -------------------------------------------------------------------------------

def test_the_knobs_and_the_teacher_are_command_line_options():
    cfg = _config(["--data", "d", "--model", "m", "--layer-decay", "0.75", "--accum-steps",
                   "4", "--balance", "loss", "--patience", "3", "--teacher", "t.onnx",
                   "--distill", "soft", "--distill-alpha", "0.7", "--distill-tau", "2"])
    assert (cfg.layer_decay, cfg.accum_steps, cfg.balance, cfg.patience) == (0.75, 4, "loss", 3)
    assert (cfg.teacher, cfg.distill, cfg.distill_alpha, cfg.distill_tau) == \
        ("t.onnx", "soft", 0.7, 2.0)
    with pytest.raises(SystemExit):
        _config(["--balance", "oversample"])


@pytest.mark.parametrize("option, message", [
    ({"layer_decay": 1.5}, "layer_decay must be in"), ({"accum_steps": 0}, "accum_steps"),
    ({"patience": 0}, "patience must be 1 or more"), ({"balance": "x"}, "balance must be"),
])
def test_bad_knob_values_are_refused(option, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**option)
