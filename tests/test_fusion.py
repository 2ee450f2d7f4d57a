import pytest
import torch

from ace.model.fusion import CoarseFusion, FineFusion, FusionCrossAttention

B, T, N, S, D, H = 2, 3, 5, 3, 16, 2




def _inputs():
    torch.manual_seed(0)
    layers = torch.randn(B, S, N, D)
    y = torch.randn(B, T, D)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 3:] = False
    return layers, y, mask[:, None, None, :]


def test_coarse_and_fine_shapes_and_ranges():
    layers, y, mask = _inputs()
    coarse = CoarseFusion(d_model=D, n_heads=H, num_layers=S).eval()
    out = coarse(y, coarse.memory(layers), mask)
    assert out.shape == (B, T, D)
    assert (out > 0).all() and (out < 1 / S).all()          # sigmoid(.) / S
    fine = FineFusion(d_model=D, n_heads=H, num_layers=S).eval()
    mem = fine.memory(layers)
    assert len(mem) == S and mem[0][0].shape == (B, H, N, D // H)
    assert fine(y, mem, mask).shape == (B, T, D)


def test_fine_fusion_is_gated_sum_of_per_layer_cross_attention():
    layers, y, mask = _inputs()
    fine = FineFusion(d_model=D, n_heads=H, num_layers=S).eval()
    mem = fine.memory(layers)
    expect = 0
    for i in range(S):
        c = fine.attn[i](y, mem[i], mask)
        W = torch.cat([fine.gate_y.weight[i * D:(i + 1) * D], fine.gate_c[i].weight], dim=1)   # W_i (D, 2D)
        a = torch.sigmoid(torch.cat([y, c], -1) @ W.T + fine.gate_y.bias[i * D:(i + 1) * D])
        expect = expect + a * c
    torch.testing.assert_close(fine(y, mem, mask), expect)


def test_fusion_uses_every_encoder_layer_and_off_switch_uses_only_the_last():
    layers, y, mask = _inputs()
    on = FusionCrossAttention(d_model=D, n_heads=H, num_layers=S, fusion=True).eval()
    off = FusionCrossAttention(d_model=D, n_heads=H, num_layers=S, fusion=False).eval()
    assert not hasattr(off, "coarse") and not hasattr(on, "cross")
    changed = layers.clone()
    changed[:, 0] += 1.0                                      # perturb the first encoder layer only
    base_on, base_off = on(y, on.memory(layers), mask), off(y, off.memory(layers), mask)
    assert base_on.shape == base_off.shape == (B, T, D)
    assert not torch.allclose(on(y, on.memory(changed), mask), base_on)
    torch.testing.assert_close(off(y, off.memory(changed), mask), base_off)
    changed[:, -1] += 1.0
    assert not torch.allclose(off(y, off.memory(changed), mask), base_off)


def test_padding_is_ignored_and_shape_errors():
    layers, y, mask = _inputs()
    block = FusionCrossAttention(d_model=D, n_heads=H, num_layers=S).eval()
    changed = layers.clone()
    changed[1, :, 3:] = 100.0                                 # padded positions of query 1
    torch.testing.assert_close(block(y, block.memory(changed), mask), block(y, block.memory(layers), mask))
    with pytest.raises(ValueError, match=r"\(B, 3, N, d\)"):
        block.memory(layers[:, :2])
    with pytest.raises(ValueError, match="divisible"):
        FusionCrossAttention(d_model=10, n_heads=3, num_layers=S)
