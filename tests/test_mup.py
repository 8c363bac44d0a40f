"""μP: shapes, readout, init rescaling, learning-rate groups (parity with the ``mup`` package), coordinate check."""
import math

import mup
import pytest
import torch
from torch import nn

from torchstep.optim import Muon
from torchstep.scaling import (MuReadout, attention_scale, coord_summary, dit_roles, infinite_shapes, make_mup,
                               mlp_coord_check, mu_shapes, mup_param_groups)


def mlp(width, readout=MuReadout, d_in=32, d_out=10, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         readout(width, d_out))


def test_shapes_classify_input_hidden_output_and_bias():
    s = infinite_shapes(mlp(256), mlp(64))
    assert s["0.weight"].base == (64, None) and s["0.weight"].ninf == 1 and s["0.weight"].width_mult == 4
    assert s["2.weight"].hidden and s["2.weight"].width_mult == 4 and s["2.weight"].fanin_fanout_ratio == 1
    assert s["4.weight"].base == (None, 64) and not s["4.weight"].hidden
    assert s["4.bias"].ninf == 0 and s["4.bias"].width_mult == 1
    conv = lambda c: nn.Conv2d(c, 2 * c, 3)
    c = infinite_shapes(conv(32), conv(8))["weight"]
    assert c.hidden and c.base == (16, 8, None, None) and c.width_mult == 4 and c.fanin_fanout_ratio == 1


def test_delta_marks_only_the_dimensions_that_change_between_base_and_delta():
    # a head count that differs between base and target but equals in base and delta is not a width
    def model(width, heads):
        return nn.Sequential(nn.Linear(width, heads), nn.Linear(heads, width))
    s = infinite_shapes(model(512, 8), model(64, 4), delta=model(128, 4))
    assert s["0.weight"].base == (None, 64) and s["1.weight"].base == (64, None)
    with pytest.raises(ValueError, match="parameter names differ"):
        infinite_shapes(mlp(64), nn.Linear(3, 3))


def _mup_model(width):
    return mlp(width, readout=mup.MuReadout)


@pytest.mark.parametrize("rule", ["adam", "sgd"])
def test_parity_with_the_mup_package_over_ten_steps(rule):
    ref, ours = _mup_model(256), mlp(256)
    mup.set_base_shapes(ref, _mup_model(64), delta=_mup_model(128))
    make_mup(ours, mlp(64), delta=mlp(128))
    for (n, a), b in zip(ref.named_parameters(), ours.parameters()):
        assert torch.equal(a, b), n                    # the same rescaled init, bit for bit
    if rule == "adam":
        ref_opt = mup.MuAdam(ref.parameters(), lr=1e-2, weight_decay=1e-3)
        opt = torch.optim.Adam(mup_param_groups(ours, 1e-2, weight_decay=1e-3))
    else:
        ref_opt = mup.MuSGD(ref.parameters(), lr=1e-1, weight_decay=1e-3, momentum=0.9)
        opt = torch.optim.SGD(mup_param_groups(ours, 1e-1, weight_decay=1e-3, rule="sgd"), momentum=0.9)
    key = lambda groups, params: sorted((g["lr"], g["weight_decay"], len(g["params"])) for g in groups)
    assert key(ref_opt.param_groups, None) == key(opt.param_groups, None)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        for model, o in ((ref, ref_opt), (ours, opt)):
            o.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            o.step()
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_adam_groups_and_decoupled_weight_decay():
    model = mlp(256)
    make_mup(model, mlp(64))
    groups = {g["name"]: g for g in mup_param_groups(model, 1e-3, weight_decay=0.1)}
    assert groups["hidden lr×0.25"]["param_names"] == ["2.weight"]
    assert groups["hidden lr×0.25"]["lr"] == pytest.approx(2.5e-4) and groups["hidden lr×0.25"]["weight_decay"] == 0.4
    assert groups["vector lr×1"]["lr"] == 1e-3 and groups["vector lr×1"]["weight_decay"] == 0.1
    assert set(groups["vector lr×1"]["param_names"]) == {"0.weight", "0.bias", "2.bias", "4.weight", "4.bias"}
    decoupled = {g["name"]: g for g in mup_param_groups(model, 1e-3, weight_decay=0.1, decoupled_wd=True)}
    assert decoupled["hidden lr×0.25"]["weight_decay"] == 0.1


def test_muon_groups_route_hidden_matrices_to_the_matrix_rule():
    model = mlp(256)
    make_mup(model, mlp(64))
    groups = mup_param_groups(model, 0.02, rule="muon")
    hidden = [g for g in groups if g["use_muon"]]
    assert [g["param_names"] for g in hidden] == [["2.weight"]] and hidden[0]["lr"] == 0.02
    opt = Muon(groups, lr=0.02, ns_dtype="float32")
    nn.functional.cross_entropy(model(torch.randn(4, 32)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    names = {id(p): n for g in opt.param_groups for n, p in zip(g["param_names"], g["params"])}
    kinds = {names[id(p)]: sorted(st) for p, st in opt.state.items()}
    assert kinds["2.weight"] != kinds["0.weight"] and kinds["0.weight"] == kinds["4.weight"]   # matrix rule vs AdamW
    rms = {g["name"]: g for g in mup_param_groups(model, 0.02, rule="muon", adjust_lr="match_rms_adamw")}
    assert rms["hidden lr×0.5"]["lr"] == pytest.approx(0.01)   # 0.2·√max(m, n) grows as √m
    with pytest.raises(ValueError, match="rule"):
        mup_param_groups(model, 0.02, rule="lamb")


def test_readout_multiplier_and_rescaled_init():
    base, model = mlp(64), mlp(256)
    before = model[4].weight.detach().clone(), model[0].bias.detach().clone(), model[2].bias.detach().clone()
    make_mup(model, base)
    assert model[4].width_mult == 4
    assert torch.equal(model[4].weight, before[0] * 2)              # × √m
    assert torch.equal(model[0].bias, before[1])                    # fan-in is not a width
    assert torch.equal(model[2].bias, before[2] * 2)                # × √(fan-in mult)
    x = torch.randn(3, 256)
    torch.testing.assert_close(model[4](x), nn.functional.linear(x / 4, model[4].weight, model[4].bias))
    with pytest.raises(RuntimeError, match="already rescaled"):
        make_mup(model, base)
    make_mup(model, base, rescale_params=False)                     # re-setting shapes is allowed
    assert mu_shapes(model)["2.weight"].hidden


def test_hidden_init_rescaling_for_a_fixed_std_model():
    model = mlp(256)
    w = model[2].weight.detach().clone()
    make_mup(model, mlp(64), rescale_hidden_init=True)
    assert torch.equal(model[2].weight, w * 0.5)                    # × m^-½


def test_bad_models_are_rejected():
    with pytest.raises(ValueError, match="MuReadout"):
        make_mup(mlp(256, readout=nn.Linear), mlp(64, readout=nn.Linear))
    with pytest.raises(ValueError, match="make_mup first"):
        mup_param_groups(mlp(64), 1e-3)
    with pytest.raises(ValueError, match="head_dim"):
        attention_scale(0, 64)


def test_attention_scale_is_one_over_d_and_the_standard_scale_at_the_base():
    assert attention_scale(64, 64) == 1 / 8                          # "8/d at d = 64"
    assert attention_scale(256, 64) == pytest.approx(8 / 256)


def test_coordinate_check_is_flat_under_mup_and_grows_under_sp():
    widths = [64, 256, 1024, 2048]
    mu, sp = mlp_coord_check(widths)                 # the card's setting: Adam 1e-2, 5 steps, base 64, delta 128
    ratio = lambda s: max(s.values()) / min(s.values())
    mu_out, sp_out = coord_summary(mu), coord_summary(sp)
    assert list(mu_out) == widths and mu_out[64] == pytest.approx(sp_out[64])   # identical at the base width
    assert ratio(mu_out) < 1.2 and ratio(sp_out) > 3                           # card: 1.16 vs 14.5
    mu_hidden, sp_hidden = coord_summary(mu, "2"), coord_summary(sp, "2")
    assert ratio(mu_hidden) < 1.2
    assert list(sp_hidden.values()) == sorted(sp_hidden.values()) and ratio(sp_hidden) > 10
    assert coord_summary(mu, step=0)[64] == coord_summary(sp, step=0)[64]


def test_dit_block_roles_follow_from_shapes():
    class DiTBlock(nn.Module):          # the pieces of a DiT that are not a plain transformer
        def __init__(self, d):
            super().__init__()
            self.patch = nn.Conv2d(4, d, 2, stride=2)
            self.t_mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
            self.label = nn.Embedding(11, d)
            self.adaLN = nn.Linear(d, 6 * d)
            self.final = MuReadout(d, 2 * 2 * 8, readout_zero_init=True)
    s = infinite_shapes(DiTBlock(1152), DiTBlock(288))
    assert s["patch.weight"].ninf == 1 and s["t_mlp.0.weight"].ninf == 1 and s["label.weight"].ninf == 1
    assert s["t_mlp.2.weight"].hidden and s["adaLN.weight"].hidden and s["adaLN.weight"].width_mult == 4
    assert not s["final.weight"].hidden
    assert set(dit_roles()) >= {"final layer (d → p·p·C)", "attention logits"}


def test_three_width_dims_and_tied_readouts_are_rejected():
    with pytest.raises(ValueError, match="width dimensions"):
        infinite_shapes({"w": (8, 8, 8)}, {"w": (4, 4, 4)})
    class Tied(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.emb = nn.Embedding(10, d)
            self.out = MuReadout(d, 10, bias=False)
            self.out.weight = self.emb.weight
    with pytest.raises(ValueError, match="tied"):
        make_mup(Tied(64), Tied(16))
