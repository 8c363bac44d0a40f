"""Fine-tuning rules in ``torchstep.peft``: ALLoRA, LoRA-MGPO, HUT, HFT (cards: shared/reference/peft.md §2–§5)."""
import copy
import io
import math

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchstep.peft.allora import ALLoRA, allora_coefficient
from torchstep.peft.hft import HalfFineTuning
from torchstep.peft.hut import HUTLinear, apply_hut, merge_hut
from torchstep.peft.mgpo import MGPO, PROFILES, mgpo_perturbation


# ---------------------------------------------------------------------------------------------------- helpers
def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def lora_mlp(r=2, alpha=None, dropout=0.0, dtype=torch.float32, seed=0, init_b=True):
    m = peft.get_peft_model(mlp(dtype, seed), peft.LoraConfig(r=r, lora_alpha=alpha or r, lora_dropout=dropout,
                                                               target_modules=["0", "2"]))
    if init_b:   # B = 0 at peft init; give B values so every term of the rules is exercised
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype))
    return m


def data(dtype=torch.float32, n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g).to(dtype), torch.randn(n, 3, generator=g).to(dtype)


def trainable(m):
    return [p for p in m.parameters() if p.requires_grad]


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def train(model, opt, steps, x, y, wrapper_step=None):
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


# ---------------------------------------------------------------------------------------------------- ALLoRA
@pytest.mark.parametrize("base_cls", [torch.optim.AdamW, torch.optim.SGD])
def test_allora_forced_unit_coefficient_is_bit_exact_base(base_cls):
    x, y = data()
    m1, m2 = lora_mlp(), lora_mlp()
    o1 = base_cls(trainable(m1), lr=1e-2)
    o2 = ALLoRA(base_cls(trainable(m2), lr=1e-2), m2, adaptive=False)
    train(m1, o1, 5, x, y)
    train(m2, o2, 5, x, y)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_allora_coefficient_values_pinned():
    eta = 2.0
    theta = torch.tensor([[0.0, 0.0], [0.3, 0.4], [3.0, 4.0]], dtype=torch.float64)
    c = allora_coefficient(theta, eta=eta)
    assert c.shape == (3, 1)
    assert c[0, 0].item() == pytest.approx(eta, abs=1e-15)                     # θ = 0 → η
    assert c[1, 0].item() == pytest.approx(eta / math.sqrt(2), abs=1e-15)      # ‖θ‖ = 1/η → η/√2
    assert c[2, 0].item() == pytest.approx(1 / math.sqrt(25 + 0.25), abs=1e-15)
    assert allora_coefficient(theta, eta, norm="tensor").shape == ()
    assert allora_coefficient(theta, eta, norm="element").shape == theta.shape


def test_allora_sgd_step_scales_rows_and_grad_is_untouched():
    x, y = data(torch.float64)
    m = lora_mlp(dtype=torch.float64)
    opt = ALLoRA(torch.optim.SGD(trainable(m), lr=0.1), m, eta=1.5)
    opt.zero_grad()
    F.mse_loss(m(x), y).backward()
    params = trainable(m)
    before = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    gvals = [g.clone() for g in grads]
    opt.step()
    for p, p0, g, g0 in zip(params, before, grads, gvals):
        assert p.grad is g and torch.equal(g, g0)                           # .grad never modified
        torch.testing.assert_close(p, p0 - 0.1 * allora_coefficient(p0, 1.5) * g0, rtol=0, atol=1e-14)


def test_allora_per_sample_equals_batch_application():
    x, y = data(torch.float64)
    m = lora_mlp(dtype=torch.float64)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in m.named_parameters()}

    def loss1(ps, xi, yi):
        return F.mse_loss(torch.func.functional_call(m, ps, (xi[None],)), yi[None])

    per = torch.func.vmap(torch.func.grad(loss1), in_dims=(None, 0, 0))(params, x, y)
    per_sample = {n: (allora_coefficient(params[n], 1.0) * per[n]).mean(0) for n in names}
    F.mse_loss(m(x), y).backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(per_sample[n], allora_coefficient(p, 1.0) * p.grad, rtol=0, atol=1e-12)


def test_allora_over_adam_cancels_a_per_tensor_coefficient_on_the_first_step():
    x, y = data(torch.float64)
    m1, m2, m3 = (lora_mlp(dtype=torch.float64) for _ in range(3))
    o1 = torch.optim.Adam(trainable(m1), lr=1e-2, eps=1e-16)
    o2 = ALLoRA(torch.optim.Adam(trainable(m2), lr=1e-2, eps=1e-16), m2, eta=0.5, norm="tensor")
    o3 = ALLoRA(torch.optim.Adam(trainable(m3), lr=1e-2, eps=1e-16), m3, eta=0.5, norm="tensor", apply_to="update")
    for mm, oo in ((m1, o1), (m2, o2), (m3, o3)):
        train(mm, oo, 1, x, y)
    moved = False
    for p, q, r in zip(m1.parameters(), m2.parameters(), m3.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)     # gradient scaling cancelled by Adam
        moved |= not torch.allclose(p, r, rtol=0, atol=1e-6)     # update scaling is not
    assert moved


def test_allora_checkpoint_and_bad_input():
    m = lora_mlp()
    opt = ALLoRA(torch.optim.AdamW(trainable(m), lr=1e-3), m, eta=2.0)
    x, y = data()
    train(m, opt, 2, x, y)
    sd = roundtrip(opt.state_dict())
    assert sd["param_groups"][0]["allora_eta"] == 2.0
    opt2 = ALLoRA(torch.optim.AdamW(trainable(m), lr=1e-3), m, eta=2.0)
    opt2.load_state_dict(sd)
    assert opt2.state is opt2.base.state and len(opt2.state) == len(trainable(m))
    with pytest.raises(ValueError, match="model: no LoRA adapters"):
        ALLoRA(torch.optim.SGD(mlp().parameters(), lr=0.1), mlp())
    with pytest.raises(ValueError, match="scaling-free"):
        ms = lora_mlp(r=2, alpha=4)
        ALLoRA(torch.optim.SGD(trainable(ms), lr=0.1), ms)
    with pytest.raises(ValueError, match="eta"):
        ALLoRA(torch.optim.SGD(trainable(m), lr=0.1), m, eta=0.0)
    with pytest.raises(ValueError, match="apply_to"):
        ALLoRA(torch.optim.SGD(trainable(m), lr=0.1), m, apply_to="both")
    with pytest.raises(ValueError, match="base"):
        ALLoRA(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1), m)
    with pytest.raises(ValueError, match="r"):
        peft.get_peft_model(mlp(), peft.LoraConfig(r=0, target_modules=["0"]))   # rank 0 refused upstream


# ---------------------------------------------------------------------------------------------------- MGPO
def worked_layer():
    lin = nn.Linear(2, 2, bias=False).double()
    m = peft.get_peft_model(nn.Sequential(lin), peft.LoraConfig(r=1, lora_alpha=2, target_modules=["0"]))
    layer = m.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor([[1.0, 0.0]]))
        layer.lora_B["default"].weight.zero_()
    return m, layer


def test_mgpo_worked_numbers():
    A, B = torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64)
    M_A, M_B = torch.tensor([[0.1, 0.2]], dtype=torch.float64), torch.tensor([[0.3], [0.4]], dtype=torch.float64)
    eps = mgpo_perturbation(A, B, M_A, M_B, 2.0, 0.05, 0.5)
    torch.testing.assert_close(eps, torch.tensor([[-0.06, 0.0], [-0.08, 0.0]], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    eps = mgpo_perturbation(A, B, M_A, M_B, 2.0, 0.05, 0.05)       # 1/ḡ = 20 clamped to 10
    torch.testing.assert_close(eps, torch.tensor([[-0.3, 0.0], [-0.4, 0.0]], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    # the same numbers through MGPO on a peft layer, reading the optimizer's exp_avg
    m, layer = worked_layer()
    assert layer.scaling["default"] == 2.0
    opt = torch.optim.AdamW(trainable(m), lr=1e-3)
    opt.state[layer.lora_A["default"].weight]["exp_avg"] = M_A.clone()
    opt.state[layer.lora_B["default"].weight]["exp_avg"] = M_B.clone()
    mg = MGPO(m, opt, profile="nlu")
    mg.gbar["base_model.model.0/default"] = 0.5
    W0 = layer.base_layer.weight.detach().clone()
    with mg.perturbed() as applied:
        torch.testing.assert_close(layer.base_layer.weight - W0,
                                   torch.tensor([[-0.06, 0.0], [-0.08, 0.0]], dtype=torch.float64),
                                   rtol=0, atol=1e-12)
        assert set(applied) == {"base_model.model.0"}
    assert torch.equal(layer.base_layer.weight, W0)


def test_mgpo_profiles_are_the_official_defaults():
    assert PROFILES == {"nlu": {"rho": 0.05, "beta": 0.9, "mu": 0.9, "lr": 1e-4},
                        "nlg": {"rho": 0.01, "beta": 0.8, "mu": 0.8, "lr": 2e-5}}
    m = lora_mlp()
    opt = torch.optim.AdamW(trainable(m), lr=1e-3)
    mg = MGPO(m, opt)
    assert (mg.rho, mg.beta, mg.restore) == (0.05, 0.9, "exact")
    mg = MGPO(m, opt, profile="nlg")
    assert (mg.rho, mg.beta) == (0.01, 0.8)


def run_mgpo(model, opt, mg, steps, x, y):
    for _ in range(steps):
        if mg is None:
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
        else:
            def closure():
                opt.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
                return loss
            mg.step(closure)


def test_mgpo_first_step_and_rho_zero_equal_plain_lora_adamw():
    x, y = data()
    m1, m2 = lora_mlp(), lora_mlp()
    o1, o2 = torch.optim.AdamW(trainable(m1), lr=1e-2), torch.optim.AdamW(trainable(m2), lr=1e-2)
    mg = MGPO(m2, o2)
    with mg.perturbed() as applied:     # step 1: no momentum yet → no perturbation
        assert applied == {}
    run_mgpo(m1, o1, None, 1, x, y)
    run_mgpo(m2, o2, mg, 1, x, y)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    m3, m4 = lora_mlp(), lora_mlp()
    o3, o4 = torch.optim.AdamW(trainable(m3), lr=1e-2), torch.optim.AdamW(trainable(m4), lr=1e-2)
    run_mgpo(m3, o3, None, 10, x, y)
    run_mgpo(m4, o4, MGPO(m4, o4, rho=0.0), 10, x, y)
    for p, q in zip(m3.parameters(), m4.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mgpo_exact_restore_keeps_w_bitwise_and_subtract_drifts_in_bf16(dtype):
    x, y = data(dtype)
    drift = {}
    for restore in ("exact", "subtract"):
        m = lora_mlp(dtype=dtype)
        bases = {n: p.detach().clone() for n, p in m.named_parameters() if "base_layer" in n}
        opt = torch.optim.AdamW(trainable(m), lr=1e-2)
        run_mgpo(m, opt, MGPO(m, opt, rho=0.05, restore=restore), 50, x, y)
        drift[restore] = max((p.float() - bases[n].float()).abs().max().item()
                             for n, p in m.named_parameters() if n in bases)
    assert drift["exact"] == 0.0
    if dtype == torch.bfloat16:
        assert drift["subtract"] > 0.0       # the official in-place subtract does not restore W in bf16


def test_mgpo_epsilon_norm_and_gbar_ema():
    x, y = data(torch.float64)
    m = lora_mlp(dtype=torch.float64)
    opt = torch.optim.AdamW(trainable(m), lr=1e-2)
    mg = MGPO(m, opt, rho=0.05, beta=0.9)
    run_mgpo(m, opt, mg, 1, x, y)
    # ḡ's first value is the raw norm ‖s(G_B A + B G_A)‖ of the step-1 gradients (A, B before the step)
    m_ref = lora_mlp(dtype=torch.float64)
    F.mse_loss(m_ref(x), y).backward()
    for name in ("base_model.model.0", "base_model.model.2"):
        lay = m_ref.get_submodule(name)
        A, B = lay.lora_A["default"].weight, lay.lora_B["default"].weight
        raw = torch.linalg.vector_norm(lay.scaling["default"] * (B.grad @ A + B @ A.grad)).item()
        assert mg.gbar[f"{name}/default"] == pytest.approx(raw, rel=1e-12)
    run_mgpo(m, opt, mg, 3, x, y)
    for name, eps in mg.epsilons().items():
        g = mg.gbar[f"{name}/default"]
        assert torch.linalg.vector_norm(eps).item() == pytest.approx(0.05 * min(1 / (g + 1e-12), 10), rel=1e-10)
    g_before = dict(mg.gbar)
    opt.zero_grad()
    with mg.perturbed():
        F.mse_loss(m(x), y).backward()
    for key, g0 in g_before.items():
        name = key.split("/")[0]
        lay = m.get_submodule(name)
        A, B = lay.lora_A["default"].weight, lay.lora_B["default"].weight
        raw = torch.linalg.vector_norm(lay.scaling["default"] * (B.grad @ A + B @ A.grad)).item()
        assert mg.gbar[key] == pytest.approx(0.9 * g0 + 0.1 * raw, rel=1e-12)


def _assert_grads_taken_at(m, opt, mg, eps, x, y):
    """The adapter gradients under ``mg.perturbed()`` equal a manual forward/backward at W + ε (1e-12)."""
    ref = copy.deepcopy(m)
    with torch.no_grad():
        for name, e in eps.items():
            ref.get_submodule(name).base_layer.weight.add_(e)
    F.mse_loss(ref(x), y).backward()
    opt.zero_grad()
    with mg.perturbed():
        F.mse_loss(m(x), y).backward()
    for p, q in zip(m.parameters(), ref.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)


def test_mgpo_gradients_are_taken_at_the_perturbed_weight():
    x, y = data(torch.float64)
    m = lora_mlp(dtype=torch.float64)
    opt = torch.optim.AdamW(trainable(m), lr=1e-2)
    mg = MGPO(m, opt, rho=0.2)
    run_mgpo(m, opt, mg, 3, x, y)
    eps = mg.epsilons()
    assert eps
    _assert_grads_taken_at(m, opt, mg, eps, x, y)


def test_mgpo_with_sgd_momentum_checkpoint_and_bad_input():
    x, y = data()
    m = lora_mlp()
    opt = torch.optim.SGD(trainable(m), lr=1e-2, momentum=0.9)
    mg = MGPO(m, opt)
    run_mgpo(m, opt, mg, 3, x, y)
    assert mg.epsilons()                                    # momentum_buffer is read
    sd = roundtrip(mg.state_dict())
    mg2 = MGPO(m, opt)
    mg2.load_state_dict(sd)
    assert mg2.gbar == mg.gbar
    with pytest.raises(ValueError, match="optimizer"):
        MGPO(m, torch.optim.SGD(trainable(m), lr=1e-2))    # no first moment
    rms = torch.optim.Rprop(trainable(m), lr=1e-2)          # keeps state, but no first moment
    mg3 = MGPO(m, rms)
    run_mgpo(m, rms, None, 1, x, y)
    with pytest.raises(RuntimeError, match="first moment"):
        mg3.epsilons()
    with pytest.raises(ValueError, match="rho"):
        MGPO(m, opt, rho=-0.1)
    with pytest.raises(ValueError, match="beta"):
        MGPO(m, opt, beta=1.0)
    with pytest.raises(ValueError, match="restore"):
        MGPO(m, opt, restore="undo")
    with pytest.raises(ValueError, match="profile"):
        MGPO(m, opt, profile="vision")
    with pytest.raises(ValueError, match="model: no LoRA adapters"):
        MGPO(mlp(), torch.optim.AdamW(mlp().parameters()))
    zero = lora_mlp()
    lay = zero.base_model.model[0]
    lay.lora_A["default"] = nn.Linear(6, 0, bias=False)                      # a duck-typed rank-0 adapter
    lay.lora_B["default"] = nn.Linear(0, 5, bias=False)
    with pytest.raises(ValueError, match="rank 0"):
        MGPO(zero, torch.optim.AdamW(trainable(zero)))
    with pytest.raises(ValueError, match="rank 0"):
        ALLoRA(torch.optim.AdamW(trainable(zero)), zero)
    conv = peft.get_peft_model(nn.Sequential(nn.Conv2d(2, 2, 1)), peft.LoraConfig(r=1, target_modules=["0"]))
    with pytest.raises(ValueError, match="not nn.Linear"):
        MGPO(conv, torch.optim.AdamW(trainable(conv)))


# ---------------------------------------------------------------------------------------------------- HUT
def test_hut_identity_at_init_and_merge():
    torch.manual_seed(0)
    base = nn.Linear(7, 5)
    for r in (1, 3):
        h = HUTLinear(copy.deepcopy(base), r)
        x = torch.randn(4, 7)
        assert torch.equal(h(x), base(x))                         # bitwise at init (fp32)
        with torch.no_grad():
            for p in (h.hut_A, h.hut_B, h.hut_gamma, h.hut_beta):
                p.add_(0.1 * torch.randn_like(p))
        torch.testing.assert_close(h.merged()(x), h(x), rtol=1e-6, atol=1e-6)
        assert sum(p.numel() for p in h.parameters() if p.requires_grad) == (5 + 7) * r + 2 * 5


def test_hut_gradients_match_closed_forms():
    torch.manual_seed(0)
    h = HUTLinear(nn.Linear(4, 3).double(), 2, scale_shift=False)
    with torch.no_grad():
        h.hut_B.add_(0.3 * torch.randn_like(h.hut_B))
    x = torch.randn(5, 4, dtype=torch.float64)
    W0 = h.base.weight

    def f(MA, MB):
        return F.linear(x, W0 * (MA @ MB), h.base.bias)

    assert torch.autograd.gradcheck(f, (h.hut_A.detach().clone().requires_grad_(),
                                        h.hut_B.detach().clone().requires_grad_()))
    gy = torch.randn(5, 3, dtype=torch.float64)
    (h(x) * gy).sum().backward()
    G = gy.T @ x                                              # ∂L/∂W_new
    torch.testing.assert_close(h.hut_A.grad, (G * W0) @ h.hut_B.detach().T, rtol=0, atol=1e-12)
    torch.testing.assert_close(h.hut_B.grad, h.hut_A.detach().T @ (G * W0), rtol=0, atol=1e-12)


def test_apply_hut_merge_checkpoint_and_bad_input():
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    x = torch.randn(2, 6)
    y0 = model(x)
    names = apply_hut(model, ["0", "2"], r=2)
    assert names == ["0", "2"] and isinstance(model[0], HUTLinear)
    assert torch.equal(model(x), y0)
    assert all(("hut_" in n) == p.requires_grad for n, p in model.named_parameters())
    sd = roundtrip(model.state_dict())
    model2 = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    apply_hut(model2, ["0", "2"], r=2)
    model2.load_state_dict(sd)
    merge_hut(model2)
    assert isinstance(model2[0], nn.Linear)
    torch.testing.assert_close(model2(x), model(x), rtol=1e-6, atol=1e-6)
    fresh = lambda: nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))   # noqa: E731
    with pytest.raises(ValueError, match="target_modules.*LayerNorm"):
        apply_hut(fresh(), ["1"])
    with pytest.raises(ValueError, match="matches no module"):
        apply_hut(fresh(), ["q_proj"])
    with pytest.raises(ValueError, match="r"):
        apply_hut(fresh(), ["0"], r=0)
    with pytest.raises(ValueError, match="base"):
        HUTLinear(nn.Conv1d(2, 2, 1), 1)
    with pytest.raises(ValueError, match="no HUTLinear"):
        merge_hut(fresh())


# ---------------------------------------------------------------------------------------------------- HFT
class LlamaBlock(nn.Module):
    def __init__(self, d=8, f=12):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.self_attn = nn.ModuleDict({k: nn.Linear(d, d, bias=False) for k in ("q_proj", "k_proj", "v_proj",
                                                                                  "o_proj")})
        self.mlp = nn.ModuleDict({"gate_proj": nn.Linear(d, f, bias=False), "up_proj": nn.Linear(d, f, bias=False),
                                  "down_proj": nn.Linear(f, d, bias=False)})

    def forward(self, x):
        a = self.self_attn
        h = self.input_layernorm(x)
        x = x + a["o_proj"](a["q_proj"](h) * torch.sigmoid(a["k_proj"](h)) + a["v_proj"](h))
        h = self.post_attention_layernorm(x)
        return x + self.mlp["down_proj"](F.silu(self.mlp["gate_proj"](h)) * self.mlp["up_proj"](h))


class TinyLlama(nn.Module):
    def __init__(self, layers=4, vocab=11, d=8):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(LlamaBlock(d) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.embed_tokens(idx)
        for b in self.layers:
            x = b(x)
        return self.lm_head(self.norm(x))


def test_hft_category_counts_on_a_llama_shaped_model():
    torch.manual_seed(0)
    model = TinyLlama()
    hft = HalfFineTuning(model, p=0.5, seed=3)
    for rnd in range(4):
        mask = hft.mask(rnd)
        mlp_total = 0
        for i in range(4):
            att = [mask[f"layers.{i}.self_attn.{k}.weight"] for k in ("q_proj", "k_proj", "v_proj", "o_proj")]
            mlps = [mask[f"layers.{i}.mlp.{k}.weight"] for k in ("gate_proj", "up_proj", "down_proj")]
            norms = [mask[f"layers.{i}.{k}.weight"] for k in ("input_layernorm", "post_attention_layernorm")]
            assert sum(att) == 2 and sum(norms) == 1 and sum(mlps) in (1, 2)
            mlp_total += sum(mlps)
        assert mlp_total == 6                                   # exactly half of 12, balanced across layers
        assert mask["embed_tokens.weight"] != mask["lm_head.weight"]
    # trainable fraction by elements: attention 4·2·64 + mlp 6·96 + norms 4·8 + embedding|head 88 = 1208 of 2424
    # (the final norm, a one-member category, is trainable with probability ½ — frozen in this draw)
    rep = hft.apply(0)
    assert rep["trainable_fraction"] == 1208 / 2424
    assert not hft.mask(0)["norm.weight"] and any(hft.mask(r)["norm.weight"] for r in range(10))
    assert rep["trainable_fraction"] == pytest.approx(sum(p.numel() for p in model.parameters() if p.requires_grad)
                                                      / sum(p.numel() for p in model.parameters()))


def test_hft_bench_gpt_categories():
    from torchstep.bench.gpt import GPT, GPTConfig
    model = GPT(GPTConfig(vocab=16, context=8, width=16, depth=3, heads=2))
    hft = HalfFineTuning(model, seed=0)
    groups = {k: sorted(v) for k, v in hft.groups.items()}
    assert groups[("blocks.0", "attention")] == ["blocks.0.proj", "blocks.0.qkv"]
    assert groups[("blocks.0", "mlp")] == ["blocks.0.fc", "blocks.0.fc_proj"]
    assert groups[("blocks.0", "norm")] == ["blocks.0.ln1", "blocks.0.ln2"]
    assert groups[("", "embedding_head")] == ["embeddings", "head"]
    mask = hft.mask(0)
    for i in range(3):
        for pair in (("qkv", "proj"), ("fc", "fc_proj"), ("ln1", "ln2")):
            assert sum(mask[f"blocks.{i}.{k}.weight"] for k in pair) == 1
    assert mask["embed.weight"] == mask["pos.weight"] != mask["head.weight"]


def test_hft_determinism_and_redraw():
    a, b = HalfFineTuning(TinyLlama(), seed=7), HalfFineTuning(TinyLlama(), seed=7)
    assert a.mask(2) == b.mask(2)
    assert a.mask(0) != a.mask(1)
    assert a.mask(0) != HalfFineTuning(TinyLlama(), seed=8).mask(0)


def lm_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 11, (4, 6), generator=g), torch.randint(0, 11, (4, 6), generator=g)


def lm_train(model, opt, steps):
    x, y = lm_batch()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()


def test_hft_frozen_tensors_unchanged_and_p0_is_full_fine_tuning():
    torch.manual_seed(0)
    model = TinyLlama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    hft = HalfFineTuning(model, seed=1)
    lm_train(model, opt, 2)                                   # grads and state everywhere first (stale grads)
    rep = hft.apply(0, opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lm_train(model, opt, 5)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in rep["frozen"]), n
    torch.manual_seed(0)
    m1 = TinyLlama()
    m2 = copy.deepcopy(m1)
    o1, o2 = torch.optim.AdamW(m1.parameters(), lr=1e-2), torch.optim.AdamW(m2.parameters(), lr=1e-2)
    HalfFineTuning(m2, p=0.0).apply(0, o2)
    lm_train(m1, o1, 4)
    lm_train(m2, o2, 4)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    m3 = copy.deepcopy(m1)
    HalfFineTuning(m3, p=1.0).apply(0)
    assert not any(p.requires_grad for p in m3.parameters())


def state_bytes(opt):
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("policy", ["keep", "drop", "reset"])
def test_hft_optimizer_state_policy(policy):
    torch.manual_seed(0)
    model = TinyLlama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    hft = HalfFineTuning(model, seed=2, state=policy)
    hft.apply(0, opt)
    lm_train(model, opt, 2)
    trainable0 = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in opt.state} == trainable0          # state only for round-0 trainable tensors
    exp = sum(2 * p.numel() * p.element_size() + 4 for p in model.parameters() if p.requires_grad)
    assert state_bytes(opt) == exp                            # exp_avg, exp_avg_sq, fp32 step scalar
    steps_before = {id(p): int(s["step"]) for p, s in opt.state.items()}
    rep = hft.apply(1, opt)
    trainable1 = {id(p) for p in model.parameters() if p.requires_grad}
    held = {id(p) for p in opt.state}
    if policy == "keep":
        assert held == trainable0
    elif policy == "drop":
        assert held == trainable0 & trainable1
        assert all(int(opt.state[p]["step"]) == steps_before[id(p)] for p in opt.state)
    else:
        assert held == set()
    lm_train(model, opt, 1)
    assert {id(p) for p in opt.state} == (held | trainable1)
    assert rep["round"] == 1


def test_hft_checkpoint_and_bad_input():
    model = TinyLlama()
    hft = HalfFineTuning(model, seed=5, state="drop")
    hft.apply(3)
    sd = roundtrip(hft.state_dict())
    model2 = TinyLlama()
    HalfFineTuning(model2).load_state_dict(sd)
    assert [p.requires_grad for p in model2.parameters()] == [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="p"):
        HalfFineTuning(model, p=1.5)
    with pytest.raises(ValueError, match="state"):
        HalfFineTuning(model, state="forget")
    with pytest.raises(ValueError, match="model"):
        HalfFineTuning(nn.ReLU())
    with pytest.raises(ValueError, match="round"):
        hft.mask(-1)


# ---------------------------------------------------------------------------------------------------- any optimizer, layering
def test_rules_work_with_torchstep_optimizers():
    from torchstep.optim import AdamW as TSAdamW, Lion
    x, y = data()
    m1, m2 = lora_mlp(), lora_mlp()
    o1 = TSAdamW(trainable(m1), lr=1e-2)
    o2 = ALLoRA(TSAdamW(trainable(m2), lr=1e-2), m2, adaptive=False)
    train(m1, o1, 3, x, y)
    train(m2, o2, 3, x, y)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    m3 = lora_mlp()
    o3 = ALLoRA(Lion(trainable(m3), lr=1e-3), m3)
    train(m3, o3, 2, x, y)
    m4 = lora_mlp()
    o4 = Lion(trainable(m4), lr=1e-3)
    mg = MGPO(m4, o4)
    run_mgpo(m4, o4, mg, 3, x, y)
    assert set(mg.epsilons()) == {"base_model.model.0", "base_model.model.2"}    # Lion's exp_avg is read


def test_mgpo_fan_in_fan_out_layer_is_perturbed_in_its_own_layout():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    base = nn.Sequential(Conv1D(5, 6), nn.Tanh(), nn.Linear(5, 3)).double()
    m = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0", "2"],
                                                  fan_in_fan_out=True))
    x, y = data(torch.float64)
    opt = torch.optim.AdamW(trainable(m), lr=1e-2)
    mg = MGPO(m, opt, rho=0.1)
    run_mgpo(m, opt, mg, 3, x, y)
    eps = mg.epsilons()
    assert eps["base_model.model.0"].shape == m.base_model.model[0].base_layer.weight.shape == (6, 5)
    _assert_grads_taken_at(m, opt, mg, eps, x, y)


def test_peft_rule_modules_import_only_torch_ops_and_partition():
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "torchstep" / "peft"
    for name in ("allora.py", "mgpo.py", "hut.py", "hft.py"):
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level == 0:
                    assert mod.split(".")[0] in ("__future__", "torch", "typing", "math", "re", "contextlib"), (name, mod)
                elif node.level == 2:
                    assert mod.split(".")[0] in ("ops", "partition"), (name, mod)
                else:
                    assert node.level == 1, (name, mod)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    assert a.name.split(".")[0] in ("torch", "math", "re"), (name, a.name)
