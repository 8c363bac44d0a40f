"""torchstep.integrations.peft.param_groups: the peft interop contract (peft.md §6.2, tests 1-5) plus
optimizer smoke steps.  peft is imported plainly: a missing peft must fail this file, not skip it."""
from __future__ import annotations

import copy
import math
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from torch import nn

import torchstep
from torchstep.integrations.peft import PEFT_GROUPS, param_groups, peft_decay_parameter_names

# A peft-shaped model built from plain torch modules (no peft classes): exec'd here and in a subprocess
# where peft and transformers cannot be imported.
FAKE_SRC = textwrap.dedent('''
    import torch
    from torch import nn

    class Magnitude(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))

    class FakeLoraLinear(nn.Module):
        def __init__(self, d_in, d_out, r=2, dora=True):
            super().__init__()
            self.base_layer = nn.Linear(d_in, d_out).requires_grad_(False)
            self.lora_A = nn.ModuleDict({"default": nn.Linear(d_in, r, bias=False)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(r, d_out, bias=False)})
            self.lora_embedding_A = nn.ParameterDict({})
            self.lora_embedding_B = nn.ParameterDict({})
            self.lora_magnitude_vector = nn.ModuleDict({"default": Magnitude(d_out)} if dora else {})
            self.active_adapters = ["default"]

    class FakeLoraEmbedding(nn.Module):
        def __init__(self, vocab, dim, r=2):
            super().__init__()
            self.base_layer = nn.Embedding(vocab, dim).requires_grad_(False)
            self.lora_A = nn.ModuleDict({})
            self.lora_B = nn.ModuleDict({})
            self.lora_embedding_A = nn.ParameterDict({"default": nn.Parameter(torch.randn(r, vocab))})
            self.lora_embedding_B = nn.ParameterDict({"default": nn.Parameter(torch.zeros(dim, r))})
            self.lora_magnitude_vector = nn.ModuleDict({})
            self.active_adapters = ["default"]

    class FakeModulesToSave(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.original_module = module.requires_grad_(False)
            import copy
            self.modules_to_save = nn.ModuleDict({"default": copy.deepcopy(module).requires_grad_(True)})
            self.active_adapters = ["default"]

    class FakePeftModel(nn.Module):
        def __init__(self, norm=nn.LayerNorm):
            super().__init__()
            self.emb = FakeLoraEmbedding(10, 8)
            self.fc = FakeLoraLinear(8, 8)
            self.ln = FakeModulesToSave(norm(8))
            self.out = nn.Linear(8, 3).requires_grad_(False)
''')
_ns: dict = {}
exec(FAKE_SRC, _ns)
FakePeftModel = _ns["FakePeftModel"]

LR, RATIO = 1e-4, 16


def _layout(groups):
    """[(name, lr, wd, [param names])] of dict groups."""
    return [(g["name"], g["lr"], g["weight_decay"], list(g["param_names"])) for g in groups]


def _peft_layout(model, **kwargs):
    """[(lr, wd, [param names])] of create_loraplus_optimizer's optimizer (torch AdamW)."""
    names = {id(p): n for n, p in model.named_parameters()}
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, **kwargs)
    return [(g["lr"], g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in opt.param_groups], opt


# ------------------------------------------------------------------------------------------ test 1
def test_fake_model_peft_compat_four_groups_pinned_lrs():
    model = FakePeftModel()
    groups, report = param_groups(model, lr=LR, loraplus_ratio=RATIO, compat="peft")
    assert [g["name"] for g in groups] == list(PEFT_GROUPS) == ["A", "embedding", "B", "B_no_decay"]
    assert [g["lr"] for g in groups] == [LR, 1e-6, LR * RATIO, LR * RATIO]
    assert groups[2]["lr"] == pytest.approx(1.6e-3, rel=1e-12)   # pin: lr 1e-4, ratio 16
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0, 0.0, 0.0]
    assert [g["param_names"] for g in groups] == [
        ["fc.lora_A.default.weight"],
        ["emb.lora_embedding_A.default", "emb.lora_embedding_B.default"],
        ["fc.lora_B.default.weight", "fc.lora_magnitude_vector.default.weight"],
        ["ln.modules_to_save.default.weight", "ln.modules_to_save.default.bias"],   # LayerNorm → no decay
    ]
    assert report["ln.modules_to_save.default.weight"]["group"] == "B_no_decay"
    assert report["fc.lora_magnitude_vector.default.weight"]["role"] == "magnitude"
    text = str(report)
    assert "B_no_decay" in text and "fc.lora_B.default.weight" in text and "role" in text


def test_fake_model_works_without_peft_or_transformers():
    code = FAKE_SRC + textwrap.dedent('''
        import sys
        from torchstep.integrations.peft import param_groups
        model = FakePeftModel()
        groups, report = param_groups(model, lr=1e-4, loraplus_ratio=16, compat="peft")
        assert [len(g["params"]) for g in groups] == [1, 2, 2, 2], groups
        groups, report = param_groups(model, lr=1e-4, loraplus_ratio=16)
        assert sys.modules.get("peft") is None and sys.modules.get("transformers") is None
        print("ok", [g["name"] for g in groups])
    ''')
    block = "import sys; sys.modules['peft'] = None; sys.modules['transformers'] = None\n"
    res = subprocess.run([sys.executable, "-c", block + code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout


# ------------------------------------------------------------------------------------------ test 2
def test_magnitude_in_B_under_peft_compat_not_under_torchstep():
    model = FakePeftModel()
    mag = "fc.lora_magnitude_vector.default.weight"
    _, peft_rep = param_groups(model, lr=LR, loraplus_ratio=RATIO, compat="peft")
    assert peft_rep[mag]["group"] == "B" and peft_rep[mag]["lr"] == LR * RATIO
    groups, rep = param_groups(model, lr=LR, loraplus_ratio=RATIO, magnitude_lr=3e-4)
    assert rep[mag]["group"] == "magnitude" and rep[mag]["lr"] == 3e-4 and rep[mag]["weight_decay"] == 0.0
    _, rep = param_groups(model, lr=LR, loraplus_ratio=RATIO)
    assert rep[mag]["lr"] == LR   # magnitude_lr defaults to lr, not lr·ratio
    assert rep["fc.lora_B.default.weight"]["lr"] == LR * RATIO


def test_torchstep_compat_groups_norms_and_wd_warning():
    model = FakePeftModel(norm=nn.RMSNorm)
    groups, rep = param_groups(model, lr=LR, loraplus_ratio=RATIO, embedding_lr=5e-5, weight_decay=0.1)
    layout = {g["name"]: (g["lr"], g["weight_decay"], g["param_names"]) for g in groups}
    assert layout == {
        "lora_A": (LR, 0.1, ["fc.lora_A.default.weight"]),
        "lora_B": (LR * RATIO, 0.1, ["fc.lora_B.default.weight"]),
        "lora_embedding": (5e-5, 0.1, ["emb.lora_embedding_A.default", "emb.lora_embedding_B.default"]),
        "magnitude": (LR, 0.0, ["fc.lora_magnitude_vector.default.weight"]),
        "modules_to_save_no_decay": (LR, 0.0, ["ln.modules_to_save.default.weight"]),   # RMSNorm → no decay
    }
    assert any("ignored by peft" in w for w in rep.warnings)
    # peft's decay set counts the RMSNorm weight as decay (transformers ALL_LAYERNORM_LAYERS = [LayerNorm])
    _, prep = param_groups(model, lr=LR, loraplus_ratio=RATIO, weight_decay=0.1, compat="peft")
    assert prep["ln.modules_to_save.default.weight"]["group"] == "B"
    assert prep["ln.modules_to_save.default.weight"]["weight_decay"] == 0.1


# ------------------------------------------------------------------------------------------ test 3
class MLP(nn.Module):
    def __init__(self, vocab=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, 8) if vocab else None
        self.fc1 = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 8)
        self.proj = nn.Linear(8, 4)

    def forward(self, x):
        if self.emb is not None:
            x = self.emb(x)
        return self.proj(self.fc2(torch.relu(self.ln(self.fc1(x)))))


def _peft_mlp(dora=False, embedding=False, bias="none", seed=0):
    torch.manual_seed(seed)
    base = MLP(vocab=11 if embedding else None)
    targets = ["fc1", "fc2"] + (["emb"] if embedding else [])
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=["ln", "proj"], use_dora=dora,
                     bias=bias)
    return base, get_peft_model(copy.deepcopy(base), cfg)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("embedding", [False, True], ids=["mlp", "embedding"])
def test_parity_with_create_loraplus_optimizer(dora, embedding):
    _, model = _peft_mlp(dora=dora, embedding=embedding, bias="lora_only")
    expected, _ = _peft_layout(model, lr=LR, loraplus_lr_ratio=RATIO)
    groups, report = param_groups(model, lr=LR, loraplus_ratio=RATIO, compat="peft")
    assert [(lr, wd, names) for _, lr, wd, names in _layout(groups)] == expected
    assert report.lr_wd() == {n: (lr, wd) for lr, wd, names in expected for n in names}
    if embedding:
        assert len(expected[1][2]) == 2   # lora_embedding_A/B reach peft's embedding group
    if dora:
        assert any("lora_magnitude_vector" in n for n in expected[2][2])
    # non-default embedding lr and loraplus_weight_decay
    expected, _ = _peft_layout(model, lr=LR, loraplus_lr_ratio=1.2, loraplus_lr_embedding=3e-5,
                               loraplus_weight_decay=0.05)
    groups, _ = param_groups(model, lr=LR, loraplus_ratio=1.2, embedding_lr=3e-5, weight_decay=0.05, compat="peft")
    assert [(lr, wd, names) for _, lr, wd, names in _layout(groups)] == expected


def test_peft_ignores_user_weight_decay_kwarg():
    """Documented pitfall: create_loraplus_optimizer(..., weight_decay=0.1) decays nothing — every group sets
    weight_decay explicitly (loraplus_weight_decay, default 0.0); the kwarg only lands in `defaults`."""
    _, model = _peft_mlp(dora=True)
    expected, opt = _peft_layout(model, lr=LR, loraplus_lr_ratio=RATIO, weight_decay=0.1)
    assert opt.defaults["weight_decay"] == 0.1
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0, 0.0, 0.0]
    groups, _ = param_groups(model, lr=LR, loraplus_ratio=RATIO, compat="peft")   # weight_decay=0
    assert [(lr, wd, names) for _, lr, wd, names in _layout(groups)] == expected
    _, rep = param_groups(model, lr=LR, loraplus_ratio=RATIO, weight_decay=0.1)
    assert any("ignored by peft" in w for w in rep.warnings)


def test_decay_set_matches_transformers():
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names
    for model in (_peft_mlp(dora=True, embedding=True)[1], FakePeftModel(), FakePeftModel(norm=nn.RMSNorm)):
        expected = {n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n}
        assert peft_decay_parameter_names(model) == expected


# ------------------------------------------------------------------------------------------ test 4
@pytest.mark.parametrize("compat", ["peft", "torchstep"])
def test_every_trainable_param_in_exactly_one_group(compat):
    models = [FakePeftModel(), _peft_mlp(dora=True, embedding=True, bias="all")[1]]
    # two adapters, only one active and trainable
    _, multi = _peft_mlp()
    multi.add_adapter("other", LoraConfig(r=2, target_modules=["fc1"]))
    models.append(multi)
    for model in models:
        groups, report = param_groups(model, lr=LR, loraplus_ratio=RATIO, compat=compat)
        ids = [id(p) for g in groups for p in g["params"]]
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert len(ids) == len(set(ids)) and set(ids) == trainable
        assert report.frozen == sum(not p.requires_grad for p in model.parameters()) > 0
        assert len(report) == len(trainable)
    assert not any(".other." in n for g in param_groups(multi, lr=LR, loraplus_ratio=2, compat=compat)[0] for n in g["param_names"])


# ------------------------------------------------------------------------------------------ test 5
@pytest.mark.parametrize("embedding", [False, True], ids=["mlp", "embedding"])
def test_dora_at_init_equals_base_model(embedding):
    base, model = _peft_mlp(dora=True, embedding=embedding)
    x = torch.randint(0, 11, (5, 3)) if embedding else torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ optimizers
@pytest.mark.parametrize("compat", ["peft", "torchstep"])
def test_groups_drive_torch_and_torchstep_optimizers(compat):
    x = torch.randn(6, 8)
    for make in (lambda g: torch.optim.AdamW(g), lambda g: torchstep.create("adamw", g),
                 lambda g: torchstep.optim.AdamW(g)):
        _, model = _peft_mlp(dora=True)
        groups, _ = param_groups(model, lr=1e-2, loraplus_ratio=RATIO, weight_decay=0.01, compat=compat)
        opt = make(groups)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model(x).square().mean().backward()
        opt.step()
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]) != p.requires_grad or "lora_B" in n or "lora_A" in n, n
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not p.requires_grad)
        assert not torch.equal(dict(model.named_parameters())["base_model.model.fc1.lora_B.default.weight"],
                               before["base_model.model.fc1.lora_B.default.weight"])


def test_rule_routes_lora_factors_to_fallback_for_muon():
    _, model = _peft_mlp(dora=True)
    groups, report = param_groups(model, lr=1e-3, loraplus_ratio=RATIO, rule="muon")
    algo = {n: g["algo"] for g in groups for n in g["param_names"]}
    assert algo["base_model.model.fc1.lora_A.default.weight"] == "adamw"
    assert algo["base_model.model.fc1.lora_B.default.weight"] == "adamw"
    assert algo["base_model.model.proj.modules_to_save.default.weight"] == "muon"   # full-rank 2-D copy
    assert algo["base_model.model.proj.modules_to_save.default.bias"] == "adamw"
    assert all(g["use_fallback"] == (g["algo"] == "adamw") for g in groups)
    assert "algo" in str(report)
    opt = torchstep.create("muon", groups)
    model(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    assert {g["algo"] for g in opt.param_groups} == {"muon", "adamw"}
    groups, _ = param_groups(model, lr=1e-3, rule={"matrix": "muon", "lora_B": "muon"})
    algo = {n: g["algo"] for g in groups for n in g["param_names"]}
    assert algo["base_model.model.fc1.lora_B.default.weight"] == "muon"
    assert algo["base_model.model.fc1.lora_A.default.weight"] == "adamw"


# ------------------------------------------------------------------------------------------ errors
def test_errors():
    model = FakePeftModel()
    with pytest.raises(ValueError, match="No peft adapters"):
        param_groups(MLP(), lr=LR)
    frozen = FakePeftModel().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        param_groups(frozen, lr=LR)
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="loraplus_ratio"):
            param_groups(model, lr=LR, loraplus_ratio=bad)
    with pytest.raises(ValueError, match="compat"):
        param_groups(model, lr=LR, compat="hf")
    with pytest.raises(ValueError, match="needs loraplus_ratio"):
        param_groups(model, lr=LR, compat="peft")
    with pytest.raises(ValueError, match="magnitude_lr"):
        param_groups(model, lr=LR, loraplus_ratio=2, magnitude_lr=1e-3, compat="peft")
    with pytest.raises(ValueError, match="lr"):
        param_groups(model, lr=-1.0)
    with pytest.raises(ValueError, match="rule keys"):
        param_groups(model, lr=LR, rule={"lora_C": "muon"})


def test_peft_version_pinned():
    assert peft.__version__ == "0.21.2"   # docs/peft-interop.md describes this version
