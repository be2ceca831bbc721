"""Models give right answers whatever the caller does around them (issue 16, items 9-11): built
or loaded under inference_mode, weights written behind autograd's back, forward hooks holding
intermediate tensors, and a stream of image sizes."""

import pytest
import torch
from torch import nn

import vistra
from vistra.accel.modules import LAYOUT_CACHE_SIZES
from vistra.models.swin import SwinBlock, SwinConfig, WindowAttention

SWIN = ("swin_tiny_patch4_window7_224",
        {"embed_dim": 32, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8), "img_size": 112})
VIT = ("vit_tiny_patch16_224", {"depth": 2, "img_size": 112})


def small(name_kw, **kw):
    torch.manual_seed(0)
    name, arch = name_kw
    return vistra.create_model(name, **arch, **kw).eval()


def image(size=112, batch=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_a_swin_built_and_loaded_under_inference_mode_predicts():
    x = image()
    trained = small(SWIN)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    with torch.inference_mode():
        expected = trained(x)
        model = small(SWIN)  # every parameter an inference tensor, with no version counter
        fresh = model(x)
        model.load_state_dict(trained.state_dict())
        torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(fresh, small(SWIN)(x).detach())
    with torch.no_grad():  # and outside inference_mode afterwards
        torch.testing.assert_close(model(x), expected)
    with torch.inference_mode():  # optimized under inference_mode too
        fast = vistra.optimize(small(SWIN))
        fast.load_state_dict(trained.state_dict())
        torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-5)


def write_through_data(model: nn.Module) -> None:
    """An in-place write that autograd's version counter does not see."""
    for m in model.modules():
        if isinstance(m, WindowAttention):
            m.relative_position_bias_table.data.add_(0.5)


def assign_new_tables(model: nn.Module) -> None:
    state = {k: v + 0.5 if k.endswith("relative_position_bias_table") else v
             for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)


@pytest.mark.parametrize("change", [write_through_data, assign_new_tables])
def test_weights_changed_outside_autograd_change_the_output(change):
    model, x = small(SWIN), image()
    with torch.inference_mode():
        before = model(x)
    change(model)
    fresh = small(SWIN)
    fresh.load_state_dict(model.state_dict())
    with torch.inference_mode():
        after = model(x)
        assert not torch.allclose(after, before)
        torch.testing.assert_close(after, fresh(x))


# Modules whose outputs the residual branch of a block is, or may be, in eval mode.
WATCHED = ("attn", "attn.proj", "attn.proj_drop", "drop_path1",
           "mlp", "mlp.fc2", "mlp.drop2", "drop_path2")


@pytest.mark.parametrize("name_kw,block_path", [(VIT, "blocks.1"), (SWIN, "layers.0.blocks.1"),
                                                (SWIN, "layers.3.blocks.0")])
def test_forward_hooks_hold_the_values_the_modules_returned(name_kw, block_path):
    """A hook keeps a reference to each output; a copy taken in the hook is what it returned."""
    model, x = small(name_kw), image()
    held, returned = {}, {}

    def keep(name):
        def hook(module, args, output):
            held[name], returned[name] = output, output.clone()
        return hook

    block = model.get_submodule(block_path)
    handles = [block.get_submodule(name).register_forward_hook(keep(name)) for name in WATCHED]
    with torch.inference_mode():
        logits = model(x)
    for h in handles:
        h.remove()
    assert held.keys() == set(WATCHED)
    for name in WATCHED:
        assert torch.equal(held[name], returned[name]), f"{block_path}.{name}'s output rewritten"
    with torch.inference_mode():  # without hooks, the in-place fast path, same answer
        torch.testing.assert_close(model(x), logits, atol=1e-5, rtol=1e-5)


def test_a_global_forward_hook_holds_the_values_and_a_pre_hook_on_fc1_fires():
    model, x = small(VIT), image()
    held, returned, calls = [], [], []

    def keep(module, args, output):
        if module is model.blocks[0].drop_path1:
            held.append(output)
            returned.append(output.clone())

    handle = nn.modules.module.register_module_forward_hook(keep)
    pre = model.blocks[0].mlp.fc1.register_forward_pre_hook(lambda m, args: calls.append(m))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        handle.remove()
        pre.remove()
    assert torch.equal(held[0], returned[0])
    assert len(calls) == 1


def test_the_layout_cache_keeps_only_the_most_recent_sizes():
    plain = SwinBlock(16, 2, 7, 3, SwinConfig(), 0.0).eval()
    block = vistra.optimize(SwinBlock(16, 2, 7, 3, SwinConfig(), 0.0))
    block.load_state_dict(plain.state_dict())
    sizes = [(8 + i, 9 + 2 * i) for i in range(3 * LAYOUT_CACHE_SIZES)]
    with torch.inference_mode():
        for H, W in sizes:
            block(torch.randn(1, H, W, 16))
        assert len(block._layouts) == LAYOUT_CACHE_SIZES
        assert [k[:2] for k in block._layouts] == sizes[-LAYOUT_CACHE_SIZES:]
        x = torch.randn(1, *sizes[0], 16)  # evicted long ago: built again, same answer
        expected = plain(x)
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
    assert len(block._layouts) == LAYOUT_CACHE_SIZES
