"""μP (maximal update parametrisation, Tensor Programs V: Yang et al., arXiv 2203.03466) as a practical API.

A model becomes μP in three steps, the ``mup`` package's semantics (checked against ``mup`` 1.0.0 in
tests/test_mup.py):

1. **Which dimensions are widths.** :func:`make_mup` compares the model with a *base* model (and optionally a
   *delta* model of another width: then only the dimensions that differ between base and delta are widths,
   which is what a model whose head count or vocabulary also changes needs).  Each parameter gets a
   :class:`MuShape`; its *width multiplier* ``m`` is ``dim / base_dim`` of its last width dimension (for a
   matrix: fan-in).  Tensors with two width dimensions are *hidden* (matrix-like); with one or none,
   *vector-like* (input weights, biases, norm gains, the readout).
2. **Readout and init.** The output layer is a :class:`MuReadout`: ``y = W(output_mult · x / m) + b``, with
   W and b multiplied once by √m so their init variance stays that of the base model (``mup.MuReadout``).
   Other Linear / Conv biases are multiplied by √(fan-in multiplier) (``mup.layer.rescale_linear_bias``).
   Hidden weights must have init variance ∝ 1/fan-in; PyTorch's default init does.  A model initialised
   with a width-independent std (GPT-2's 0.02) passes ``rescale_hidden_init=True`` (std × m^-½, what
   ``mup.init.normal_`` samples).  Attention logits use ``attention_scale`` (1/d_head, written √d₀/d_head
   so the base model is unchanged — the README's "8/d at d = 64").
3. **Learning rates.** :func:`mup_param_groups` splits the model into groups with μP learning rates:

   ============  =========================================  ==========================================
   rule          hidden (2 width dims)                      vector-like (≤ 1 width dim)
   ============  =========================================  ==========================================
   ``adam``      lr / m, weight decay × m (``MuAdam``)¹     unchanged
   ``sgd``       lr / (m_in/m_out), wd × (m_in/m_out)       1 width dim: lr × m, wd / m; none: unchanged
   ``muon``      routed to the matrix rule (``use_muon``);  AdamW fallback (``use_muon=False``),
                 lr unchanged for ``adjust_lr`` original /   unchanged
                 spectral_norm / none, lr / √m for
                 match_rms_adamw
   ============  =========================================  ==========================================

   ¹ ``decoupled_wd=True`` leaves λ unchanged instead (the later ``mup`` option of that name): with torch's
   decoupled AdamW the per-step decay ``lr·λ`` then shrinks as 1/m.  For the width rule of Fan et al.
   (λ ∝ √m) see :func:`torchstep.scaling.width_scaled_groups`.

   Why Muon needs no lr change: μP's spectral condition asks ‖ΔW‖₂ = Θ(√(fan_out/fan_in)); Muon's update is
   orthogonal, so ‖ΔW‖₂ = lr × its shape scale, which is √(fan_out/fan_in) for ``spectral_norm`` and a
   width-independent multiple of it for ``original`` / ``none``; ``match_rms_adamw`` (0.2·√max(m, n)) grows
   as √m, hence lr / √m (Bernstein et al., "A spectral condition for feature learning", arXiv 2310.17813).

:func:`coord_check` is the paper's validation: mean |activation| of every module after a few steps, across
widths — flat under μP, growing under the standard parametrisation.

Diffusion Transformers ("Scaling Diffusion Transformers Efficiently via μP", Zheng et al., arXiv 2505.15270):
the paper proves that DiT, U-ViT, PixArt-α and MMDiT have the vanilla Transformer's μP, so the same three
steps apply; :func:`dit_roles` documents which DiT module is which (see its docstring).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.shapes import SHAPE_SCALES
from ..optim._base import check_choice

MUP_RULES = ("adam", "sgd", "muon")
_SHAPES_ATTR = "_torchstep_mu_shapes"
_RESCALED_ATTR = "_torchstep_mu_rescaled"


@dataclass(frozen=True)
class MuShape:
    """A parameter's shape with its width dimensions: ``base[i]`` is the base size of dimension i, or None
    where the dimension is finite (the same at every width)."""
    shape: tuple[int, ...]
    base: tuple[int | None, ...]

    @property
    def ninf(self) -> int:
        return sum(b is not None for b in self.base)

    def dim_mult(self, i: int) -> float:
        return 1.0 if self.base[i] is None else self.shape[i] / self.base[i]

    @property
    def width_mult(self) -> float:
        """``dim / base_dim`` of the last width dimension (a matrix's fan-in); 1 for a finite tensor."""
        inf = [i for i, b in enumerate(self.base) if b is not None]
        return self.dim_mult(inf[-1]) if inf else 1.0

    @property
    def fanin_fanout_ratio(self) -> float:
        """Fan-in multiplier / fan-out multiplier (``mup``'s ``fanin_fanout_mult_ratio``; MuSGD's matrix lr)."""
        return self.dim_mult(1) / self.dim_mult(0)

    @property
    def hidden(self) -> bool:
        return self.ninf == 2


def _shapes_of(x: nn.Module | Mapping[str, Iterable[int]]) -> dict[str, tuple[int, ...]]:
    if isinstance(x, nn.Module):
        return {name: tuple(p.shape) for name, p in x.named_parameters()}
    return {name: tuple(s) for name, s in x.items()}


def _zip(base: dict[str, tuple], target: dict[str, tuple], what: str) -> dict[str, MuShape]:
    if set(base) != set(target):
        raise ValueError(f"Invalid {what}: parameter names differ (only in the model: "
                         f"{sorted(set(target) - set(base))}; only in {what}: {sorted(set(base) - set(target))})")
    out = {}
    for name, shape in target.items():
        b = base[name]
        if len(b) != len(shape):
            raise ValueError(f"Invalid {what}: {name} has {len(b)} dims there and {len(shape)} in the model")
        out[name] = MuShape(shape, tuple(None if bd == d else bd for bd, d in zip(b, shape)))
        if out[name].ninf > 2:
            raise ValueError(f"Invalid model: {name} has {out[name].ninf} width dimensions (valid range: at most 2; "
                             "μP is not defined beyond matrices of widths)")
    return out


def infinite_shapes(model: nn.Module | Mapping, base: nn.Module | Mapping,
                    delta: nn.Module | Mapping | None = None) -> dict[str, MuShape]:
    """:class:`MuShape` of every parameter of ``model`` (a module or ``name → shape``).

    Without ``delta`` a dimension is a width if it differs between ``base`` and ``model``; with ``delta`` (a
    model of another width) if it differs between ``base`` and ``delta`` — then its base size is ``base``'s.
    """
    base_shapes, shapes = _shapes_of(base), _shapes_of(model)
    if delta is None:
        return _zip(base_shapes, shapes, "base")
    marks = _zip(base_shapes, _shapes_of(delta), "base")         # which dims are widths, and their base size
    if set(marks) != set(shapes):
        raise ValueError(f"Invalid base: parameter names differ from the model's ({sorted(set(marks) ^ set(shapes))})")
    return {name: MuShape(shapes[name], marks[name].base) for name in shapes}


class MuReadout(nn.Linear):
    """The μP output layer: ``y = W(output_mult · x / m) + b`` with ``m`` the fan-in width multiplier (set by
    :func:`make_mup`; 1 before it, so an un-converted model is the standard parametrisation).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        readout_zero_init: initialise W and b to zero (``mup``'s option; TP5 recommends it for the readout).
        output_mult: a tunable constant multiplier on the logits (transfers across widths).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, readout_zero_init: bool = False,
                 output_mult: float = 1.0, device=None, dtype=None):
        self.readout_zero_init, self.output_mult, self.width_mult = readout_zero_init, output_mult, 1.0
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        if self.readout_zero_init:
            nn.init.zeros_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)
        else:
            super().reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.output_mult * x / self.width_mult, self.weight, self.bias)   # mup's order: same bits

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, output_mult={self.output_mult}, width_mult={self.width_mult:g}"


def attention_scale(head_dim: int, base_head_dim: int) -> float:
    """μP's attention-logit scale ``√d₀ / d_head``: 1/d_head scaling, equal to 1/√d₀ at the base width."""
    if not (head_dim > 0 and base_head_dim > 0):
        raise ValueError(f"Invalid head_dim: {head_dim!r} / base_head_dim {base_head_dim!r} (valid range: both > 0)")
    return math.sqrt(base_head_dim) / head_dim


def make_mup(model: nn.Module, base: nn.Module | Mapping, delta: nn.Module | Mapping | None = None,
             rescale_params: bool = True, rescale_hidden_init: bool = False) -> dict[str, MuShape]:
    """Make ``model`` μP relative to ``base`` (see the module docstring); returns and records its shapes.

    Args:
        model: the model at its target width (modified in place).
        base: the base model (or ``name → shape``), the width the hyperparameters were tuned at.
        delta: optional model of a third width; only dimensions differing between base and delta are widths.
        rescale_params: rescale :class:`MuReadout` (× √m) and Linear/Conv biases (× √(fan-in mult)) once,
            converting PyTorch's default init to μP's (``mup.set_base_shapes(rescale_params=True)``).
        rescale_hidden_init: also multiply hidden weights by m^-½ (for a model whose init std does not already
            scale as 1/√fan-in, e.g. a fixed 0.02).

    Raises ``ValueError`` for a plain ``nn.Linear`` whose fan-in is a width but fan-out is not (an output layer
    that is not a :class:`MuReadout`), and ``RuntimeError`` when called twice with rescaling on.
    """
    shapes = infinite_shapes(model, base, delta)
    for mname, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, MuReadout):
            continue
        s = shapes[f"{mname}.weight" if mname else "weight"]
        if s.base[1] is not None and s.base[0] is None:
            raise ValueError(f"Invalid model: {mname or 'the model'} maps a width to a fixed size; "
                             "make it a torchstep.scaling.MuReadout (valid range: output layers are MuReadout)")
    if rescale_params and getattr(model, _RESCALED_ATTR, False):
        raise RuntimeError("make_mup already rescaled this model; call it with rescale_params=False to re-set "
                           "its shapes (a checkpoint of a μP model is already rescaled)")
    prefix = {m: f"{n}." if n else "" for n, m in model.named_modules()}
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or weight is None:
                continue
            key = prefix[module] + "weight"
            if key not in shapes:                       # a weight tied to another module's (named there)
                raise ValueError(f"Invalid model: {key} is tied to another parameter (valid range: untied layers; "
                                 "a MuReadout sharing an embedding's weight is not supported)")
            s = shapes[key]
            if isinstance(module, MuReadout):
                module.width_mult = s.width_mult
                factors = {"weight": s.width_mult ** 0.5, "bias": s.width_mult ** 0.5}
            else:
                factors = {"bias": s.dim_mult(1) ** 0.5, "weight": s.width_mult ** -0.5 if s.hidden
                           and rescale_hidden_init else 1.0}
            if rescale_params:
                for name, factor in factors.items():
                    p = getattr(module, name, None)
                    if p is not None and factor != 1.0:
                        p.mul_(factor)
    if rescale_params:
        setattr(model, _RESCALED_ATTR, True)
    setattr(model, _SHAPES_ATTR, shapes)
    return shapes


def mu_shapes(model: nn.Module) -> dict[str, MuShape]:
    """The shapes :func:`make_mup` recorded on ``model``."""
    shapes = getattr(model, _SHAPES_ATTR, None)
    if shapes is None:
        raise ValueError("Invalid model: it has no μP shapes (valid range: a model passed to make_mup first)")
    return shapes


def hidden_lr_factor(rule: str, width_mult: float, fanin_fanout_ratio: float = 1.0,
                     adjust_lr: str = "original") -> float:
    """μP's lr factor for a hidden tensor (two width dims) under ``rule`` — the table in the module docstring:
    ``adam`` 1/m, ``sgd`` 1/(m_in/m_out), ``muon`` m^-½ for ``match_rms_adamw`` and 1 for the other scales."""
    if rule == "adam":
        return 1.0 / width_mult
    if rule == "sgd":
        return 1.0 / fanin_fanout_ratio
    return width_mult ** -0.5 if adjust_lr == "match_rms_adamw" else 1.0


def _mults(rule: str, s: MuShape, decoupled_wd: bool, adjust_lr: str) -> tuple[float, float]:
    """(lr factor, weight-decay factor) of one tensor under ``rule``."""
    if s.hidden:
        lr = hidden_lr_factor(rule, s.width_mult, s.fanin_fanout_ratio, adjust_lr)
        wd = {"adam": 1.0 if decoupled_wd else s.width_mult, "sgd": s.fanin_fanout_ratio}.get(rule, 1.0)
        return lr, wd
    if rule == "sgd":
        m = s.width_mult if s.ninf == 1 else 1.0
        return m, 1.0 / m
    return 1.0, 1.0


def mup_param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, rule: str = "adam",
                     decoupled_wd: bool = False, adjust_lr: str = "original",
                     shapes: Mapping[str, MuShape] | None = None) -> list[dict]:
    """Param groups with μP learning rates and weight decays for ``rule`` (table in the module docstring).

    Args:
        model: a model passed to :func:`make_mup` (or any model with ``shapes`` given).
        lr, weight_decay: the base model's tuned values.
        rule: ``adam`` (any entry-wise normalised rule: AdamW, Lion, Adafactor…), ``sgd`` (SGD-like), or
            ``muon`` (a torchstep Muon-family optimizer: hidden tensors get ``use_muon=True``).
        decoupled_wd: ``adam`` only — keep λ unchanged on hidden tensors instead of λ × m.
        adjust_lr: ``muon`` only — the optimizer's ``adjust_lr`` shape scale.

    Groups are ordered by first appearance, carry ``param_names`` and a ``name`` (``hidden`` / ``vector``
    plus the multiplier), so a routing report can say which tensor got which lr.
    """
    check_choice("rule", rule, MUP_RULES)
    check_choice("adjust_lr", adjust_lr, SHAPE_SCALES)
    shapes = mu_shapes(model) if shapes is None else shapes
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        s = shapes[name]
        lr_f, wd_f = _mults(rule, s, decoupled_wd, adjust_lr)
        kind = "hidden" if s.hidden else "vector"
        key = (kind, lr_f, wd_f)
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], "name": f"{kind} lr×{lr_f:g}",
                           "lr": lr * lr_f, "weight_decay": weight_decay * wd_f}
            if rule == "muon":
                groups[key]["use_muon"] = s.hidden
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def dit_roles() -> dict[str, str]:
    """Which μP role each Diffusion-Transformer module plays (Zheng et al., arXiv 2505.15270).

    [paper, abstract] DiT, U-ViT, PixArt-α and MMDiT have the vanilla Transformer's μP (their Thm 3.1), so
    :func:`make_mup` finds every role from shapes alone — a dimension that grows with the model is a width.
    [code, ML-GSAI/Scaling-Diffusion-Transformers-muP @6d1583d, ``DiT/models_mup.py``] what the official
    DiT-μP does beyond the shapes: adaLN modulation is Kaiming-initialised (not adaLN-Zero) because a
    zero hidden matrix has no μP scale; the final layer is a zero-initialised ``MuReadout``; width grows by
    adding heads at a fixed head_dim (72), so the attention scale stays 1/√d_head; base width 288 (4 heads),
    ``MuAdamW(lr=2**-10, weight_decay=0)``, output_mult 1, transferred to DiT-XL-2 (1152).  PixArt-α adds a
    caption projection (T5 4096 → d: input; its second layer d → d: hidden) and re-draws the
    ``scale_shift_table`` vectors N(0, 0.02).  Not checked here: MMDiT (no code released) and the paper's
    own tables (its text could not be retrieved; only the abstract and the code were read).
    """
    return {
        "patch embedding (conv, C·p·p → d)": "input (vector-like): lr unchanged, Kaiming fan-in init",
        "timestep MLP, first layer (256 sinusoidal features → d)": "input (vector-like): lr unchanged",
        "timestep MLP, second layer (d → d)": "hidden: lr / m",
        "class-label embedding table / caption projection first layer (fixed → d)": "input: lr unchanged",
        "adaLN modulation (d → 6d), attention qkv / out, MLP, cross-attention": "hidden: lr / m, Kaiming init",
        "final layer (d → p·p·C)": "output: MuReadout, zero init, lr unchanged, logits × output_mult/m",
        "biases, norm gains, scale_shift_table": "vector-like: lr unchanged",
        "attention logits": "head_dim fixed as width grows: 1/√d_head unchanged (else attention_scale)",
    }


@dataclass(frozen=True)
class CoordRecord:
    """Mean |output| of one module at one width, after ``step`` optimizer steps (0 = at init)."""
    width: int
    seed: int
    step: int
    module: str
    l1: float


def coord_check(model_factory: Callable[[int], nn.Module], widths: Iterable[int],
                batch: tuple[torch.Tensor, torch.Tensor], loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer], steps: int = 5, seeds: int = 1,
                modules: Callable[[str, nn.Module], bool] | None = None) -> list[CoordRecord]:
    """TP5's coordinate check: train each width ``steps`` steps on one fixed batch and record the mean |·| of
    every module's output at each forward pass (step t = the forward before update t+1).

    ``model_factory(width)`` builds (and, for μP, converts) a model with seeded init — call
    ``torch.manual_seed`` inside it if its init must not depend on the caller's RNG; ``seeds`` repeats the
    run with ``torch.manual_seed(seed)`` set before each factory call.  ``modules(name, module)`` selects
    what is recorded (default: leaf modules and the whole model as ``"output"``).
    """
    x, y = batch
    records: list[CoordRecord] = []
    for width in widths:
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = model_factory(width)
            opt = optimizer_factory(model)
            step = [0]
            hooks = []
            for name, module in model.named_modules():
                leaf = not any(True for _ in module.children())
                if modules(name, module) if modules is not None else (leaf or name == ""):
                    label = name or "output"

                    def hook(mod, args, out, label=label):
                        if isinstance(out, torch.Tensor):
                            records.append(CoordRecord(width, seed, step[0], label,
                                                       float(out.detach().abs().mean())))
                    hooks.append(module.register_forward_hook(hook))
            try:
                for t in range(steps + 1):
                    step[0] = t
                    loss = loss_fn(model(x), y)
                    if t == steps:
                        break
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            finally:
                for h in hooks:
                    h.remove()
    return records


def coord_summary(records: Iterable[CoordRecord], module: str = "output", step: int | None = None) -> dict[int, float]:
    """Width → mean (over seeds) of ``module``'s l1 at ``step`` (default: the last step recorded)."""
    rows = [r for r in records if r.module == module]
    if not rows:
        raise ValueError(f"Invalid module: {module!r} was not recorded")
    step = max(r.step for r in rows) if step is None else step
    out: dict[int, list[float]] = {}
    for r in rows:
        if r.step == step:
            out.setdefault(r.width, []).append(r.l1)
    return {w: sum(v) / len(v) for w, v in sorted(out.items())}


def mlp_coord_check(widths=(64, 256, 1024, 2048), steps: int = 5, lr: float = 1e-2, base_width: int = 64,
                    d_in: int = 32, d_out: int = 10, batch: int = 64, seed: int = 0):
    """The card's coordinate check (TP5 §6.3 setting): a 3-layer MLP ``d_in → w → w → d_out`` trained with Adam
    at ``lr`` for ``steps`` steps on one fixed random batch, μP (base ``base_width``, delta 2·base) against the
    standard parametrisation.  Returns ``(mup_records, sp_records)``."""
    def mlp(width, readout):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                             readout(width, d_out))

    def mu_model(width):
        model = mlp(width, MuReadout)
        make_mup(model, mlp(base_width, MuReadout), delta=mlp(2 * base_width, MuReadout))
        return model
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(batch, d_in, generator=g), torch.randint(0, d_out, (batch,), generator=g)
    mu = coord_check(mu_model, widths, data, F.cross_entropy,
                     lambda m: torch.optim.Adam(mup_param_groups(m, lr)), steps=steps)
    sp = coord_check(lambda w: mlp(w, nn.Linear), widths, data, F.cross_entropy,
                     lambda m: torch.optim.Adam(m.parameters(), lr), steps=steps)
    return mu, sp


def plot_coord_check(records: list[CoordRecord], path, title: str = "coordinate check") -> None:
    """One panel per step: log mean |activation| of every recorded module vs width (log)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = sorted({r.step for r in records})
    modules = sorted({r.module for r in records})
    fig, axes = plt.subplots(1, len(steps), figsize=(3 * len(steps), 3), sharey=True, squeeze=False)
    for ax, t in zip(axes[0], steps):
        for m in modules:
            s = coord_summary(records, m, t)
            ax.plot(list(s), list(s.values()), marker=".", label=m)
        ax.set(xscale="log", yscale="log", title=f"step {t}", xlabel="width")
    axes[0][0].set_ylabel("mean |activation|")
    axes[0][-1].legend(fontsize=6, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["MuShape", "infinite_shapes", "MuReadout", "attention_scale", "make_mup", "mu_shapes",
           "mup_param_groups", "hidden_lr_factor", "dit_roles", "CoordRecord", "coord_check", "coord_summary", "plot_coord_check",
           "mlp_coord_check", "MUP_RULES"]
