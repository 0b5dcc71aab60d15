"""Per-layer plans: what one LoRA layer's fused call needs, built once and reused while nothing it depends on changes.

One module serves FusedLoRALinear, PEFT's LoRA Linear (patched: FusedPeftLoraLinear) and AdaLoRA's SVDLinear
(FusedSVDLinear): adapter stacking, the per-rank scale vector (on the device), rank offsets, dropout rates, the
name -> id map of mixed batches, lora_bias folding, and the backend (fused_lora.ops.resolve's answer).

Validity. Every call reads, from the layer as it is now, what a plan is derived from: the adapter names in use and,
per adapter, the dtype/device/shape of A and B, its scaling, its dropout rate (read from whatever dropout module
is there now) and its lora_B bias; the base weight's and bias's dtype/device/shape; x's compute dtype and device;
FUSED_LORA_BACKEND. That tuple is the plan's key: a call whose key differs builds a new plan. So each dependency
invalidates the plan exactly, however it changed: add/delete/set_adapter, `layer.scaling[name] = ...`, a replaced
or edited dropout module, replaced parameters, .to()/dtype/device, merge/unmerge and enable/disable (they change
the names in use), a new FUSED_LORA_BACKEND. Reading it costs Python attribute reads, no tensor op.

Tensors. A plan never hands the op a copy of an adapter that could be stale:
- one adapter in its op dtype: A and B go to the op as they are (the live parameters);
- when gradients are needed: torch.cat / casts of the live parameters at every call (autograd reaches each one);
- without gradients: the stacked (or cast) adapters, a folded lora_bias, AdaLoRA's scale vector are cached, keyed
  on each source tensor's identity, storage and version counter (`_version`: bumped by optimizer steps, copy_
  and every other in-place op). These copies are also dropped whenever the layer runs with gradients, because a
  training step may write parameters through paths that version counters miss (fused optimizers writing raw
  memory, `.data`). After writing adapters through `.data` with no training step between, call invalidate(layer).
Under torch.compile a plan is built at every trace and never stored: the graph and dynamo's guards are its cache.
Plans are not copied with their layer (copy.deepcopy, pickle): a copy builds its own at its first call.

Tensors a plan creates (scale vector, zero seed, id tables) are made outside inference mode, so a plan built under
torch.inference_mode() still serves a later training call. On CUDA, build the plan (one eager call) before
capturing a CUDA graph: building it copies the scale vector from the host.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from fused_lora import functional, ops
from fused_lora.functional import autocast_dtype, draw_dropout_seed
from fused_lora.ops.backends import backend_env
from fused_lora.validate import check_adapters, check_linear

PLAN_ATTR = "_fused_lora_plan"  # layer.__dict__ entries: the dense plan and the mixed-batch plan
ROWS_PLAN_ATTR = "_fused_lora_rows_plan"
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_plain_eager = ops.plain_eager


def _dropped_on_copy():
    return None


def _persistent(make: Callable[[], Tensor]) -> Tensor:
    """make() outside inference mode: an inference tensor could not be saved for a later backward."""
    if not _is_compiling() and torch.is_inference_mode_enabled():
        with torch.inference_mode(False):
            return make()
    return make()


def param(module: nn.Module, name: str) -> Optional[Tensor]:
    """module.<name> for a parameter: a dict lookup for plain modules, getattr otherwise (parametrizations)."""
    p = module._parameters.get(name)
    return p if p is not None else getattr(module, name, None)


class Plan:
    """What a layer's fused call needs for one key (see the module docstring). Built by `build`."""

    __slots__ = (
        "key",
        "names",
        "index",
        "ranks",
        "rank_ptr",
        "rates",
        "eval_rates",
        "any_dropout",
        "scalings",
        "scale",
        "adapter_dtype",
        "device",
        "backend",
        "zero_seed",
        "fold_bias",
        "usable",
        "why",
        "_cache",
        "__weakref__",
    )

    def __reduce__(self):
        return (_dropped_on_copy, ())

    def __deepcopy__(self, memo):
        return None

    # ---- cached tensors derived from live ones, valid while the sources are unchanged ----
    def derived(self, slot: str, sources: Sequence[Optional[Tensor]], make: Callable[[], object]):
        """make(), cached in `slot` while every source is the same tensor object with the same storage and version
        counter. Only for calls that need no gradient through `sources` (the caller decides)."""
        stamp = []
        for t in sources:
            stamp.append(None if t is None else (id(t), t._version, t.data_ptr()))
        entry = self._cache.get(slot)
        # the entry holds the sources themselves, so their ids cannot be reused by other tensors while it lives
        if entry is not None and entry[0] == stamp:
            return entry[2]
        value = _persistent(make)
        self._cache[slot] = (stamp, tuple(sources), value)
        return value

    def drop_cached(self) -> None:
        if self._cache:
            self._cache.clear()

    def seed(self, training: bool) -> Tensor:
        if training and self.any_dropout:
            return draw_dropout_seed(self.device)
        return self.zero_seed

    def dropout_p(self, training: bool) -> List[float]:
        return self.rates if training else self.eval_rates


# ---- reading a layer ------------------------------------------------------------------------------------------------
class Adapters:
    """The live tensors of the named adapters of one layer and the key of everything a plan derives from them."""

    __slots__ = ("names", "a", "b", "bias", "scales", "rates", "key")

    def __init__(self, names, a, b, bias, scales, rates, key):
        self.names, self.a, self.b, self.bias, self.scales, self.rates, self.key = names, a, b, bias, scales, rates, key

    def need_grad(self) -> bool:
        if not _grad_enabled():
            return False
        for t in self.a:
            if t.requires_grad:
                return True
        for t in self.b:
            if t.requires_grad:
                return True
        for t in self.bias:
            if t is not None and t.requires_grad:
                return True
        return False


def _number(value) -> float:
    return value if type(value) is float else float(value)


def read_lora(layer: nn.Module, names: Tuple[str, ...], rate_of: Callable[[nn.Module], Optional[float]]) -> Adapters:
    """LoRA layers whose lora_A/lora_B are nn.Linear modules in ModuleDicts (FusedLoRALinear, PEFT's Linear).
    `rate_of(dropout module)`: its rate, or None for a module the fused op cannot reproduce."""
    children = layer._modules
    mods_a, mods_b, mods_d = children["lora_A"]._modules, children["lora_B"]._modules, children["lora_dropout"]._modules
    scaling, with_bias = layer.scaling, layer.lora_bias
    a_list, b_list, biases, scales, rates, key = [], [], [], [], [], [names]
    for n in names:
        a = param(mods_a[n], "weight")
        module_b = mods_b[n]
        b = param(module_b, "weight")
        lb = param(module_b, "bias") if with_bias.get(n, False) else None
        s = _number(scaling[n])
        p = rate_of(mods_d[n])
        a_list.append(a)
        b_list.append(b)
        biases.append(lb)
        scales.append(s)
        rates.append(p)
        key.append(
            (
                a.dtype,
                a.device,
                a.shape,
                b.dtype,
                b.device,
                b.shape,
                s,
                p,
                None if lb is None else (lb.dtype, lb.device, lb.shape),
            )
        )
    return Adapters(names, a_list, b_list, biases, scales, rates, tuple(key))


def base_key(weight: Tensor, bias: Optional[Tensor]) -> tuple:
    return (weight.dtype, weight.device, weight.shape, None if bias is None else (bias.dtype, bias.device, bias.shape))


def compute_dtype(x: Tensor) -> Tuple[torch.dtype, bool]:
    """(the dtype the op computes x in, whether torch.autocast is on for x's device): under autocast the autocast
    dtype replaces float32/float16/bfloat16 (float64 stays), as for nn.Linear."""
    cast_to = autocast_dtype(x.device)
    if cast_to is None:
        return x.dtype, False
    return (x.dtype if x.dtype == torch.float64 else cast_to), True


def call_key(
    adapters: Adapters,
    weight: Tensor,
    bias: Optional[Tensor],
    x_device: torch.device,
    compute: Tuple[torch.dtype, bool],
    extra=None,
) -> Optional[tuple]:
    """The key of a plan for this call; None where plans are not kept (see cached_plan)."""
    if not _plain_eager():
        return None
    return (adapters.key, base_key(weight, bias), x_device, compute, backend_env(), extra)


# ---- building -------------------------------------------------------------------------------------------------------
def _scale_vector(scales: Sequence[float], ranks: Sequence[int], device: torch.device) -> Tensor:
    per_rank = [s for s, r in zip(scales, ranks) for _ in range(r)]
    return _persistent(lambda: torch.tensor(per_rank, dtype=torch.float32, device=device))


def build(
    key: tuple,
    adapters: Adapters,
    weight: Tensor,
    bias: Optional[Tensor],
    x: Tensor,
    adapter_dtype: Optional[torch.dtype],
    autocast: bool,
    why_not: Optional[str] = None,
    per_rank_scale: bool = True,
) -> Plan:
    """A plan for `adapters` (live tensors read by read_lora/...) over the base weight/bias for inputs like x.

    adapter_dtype: the dtype A and B reach the op in (None: the call cannot be fused, with `why_not`).
    Checks the operands once, here (validate.check_linear/check_adapters messages), so a call only checks x."""
    plan = Plan()
    plan.key, plan.names, plan._cache = key, adapters.names, {}
    plan.index = {n: i for i, n in enumerate(adapters.names)}
    plan.ranks = [t.shape[0] for t in adapters.a]
    ptr = [0]
    for r in plan.ranks:
        ptr.append(ptr[-1] + r)
    plan.rank_ptr = ptr
    plan.device = x.device
    plan.usable, plan.why = adapter_dtype is not None, why_not
    plan.adapter_dtype = adapter_dtype
    plan.scalings = tuple(adapters.scales)
    plan.rates = [0.0 if p is None else float(p) for p in adapters.rates]
    plan.eval_rates = [0.0] * len(plan.rates)
    plan.any_dropout = any(p > 0 for p in plan.rates)
    plan.fold_bias = False
    plan.scale = plan.zero_seed = plan.backend = None
    if not plan.usable:
        return plan
    if not autocast:  # under autocast, fused_lora.lora_linear checks the cast operands at every call
        check_linear(x, weight, bias)
        for a, b in zip(adapters.a, adapters.b):
            check_adapters(x, weight, a.detach().to(adapter_dtype), b.detach().to(adapter_dtype))
    if per_rank_scale:
        plan.scale = _scale_vector(adapters.scales, plan.ranks, x.device)
    plan.zero_seed = _persistent(lambda: torch.zeros(1, dtype=torch.int64, device=x.device))
    # lora_B biases join the op's bias only when that loses nothing: same dtype as the base weight (the op's bias
    # dtype). float32 lora biases over a 16-bit weight are added to the output in float32 instead, so their gradient
    # is never rounded to 16 bits (PEFT adds lora_B(...) * scaling in the adapters' dtype, too).
    lora_biases = [t for t in adapters.bias if t is not None]
    plan.fold_bias = bool(lora_biases) and all(t.dtype == weight.dtype for t in lora_biases)
    if key is not None and not x.is_meta:  # meta tensors take the registered op's fake impl (ops.eager_call_ok)
        plan.backend = ops.resolve(x.device)
    return plan


def cached_plan(layer: nn.Module, attr: str, key: Optional[tuple]) -> Optional[Plan]:
    """The layer's stored plan when its key is `key`. Plans are kept and used in plain eager mode only
    (ops.plain_eager): under torch.compile dynamo's guards do that job, and under FakeTensorMode or
    `with torch.device("meta")` a plan's tensors would be fake or on the wrong device."""
    if key is None:
        return None
    plan = layer.__dict__.get(attr)
    if plan is not None and plan.key == key:
        return plan
    return None


def store(layer: nn.Module, attr: str, plan: Plan) -> Plan:
    if plan.key is not None:
        layer.__dict__[attr] = plan
    return plan


def invalidate(layer: nn.Module) -> None:
    """Drop the layer's plans (and their cached stacked adapters); the next call builds new ones. Only needed after
    writing adapter values through `.data` (which version counters do not see) without a training step between."""
    layer.__dict__.pop(PLAN_ATTR, None)
    layer.__dict__.pop(ROWS_PLAN_ATTR, None)


# ---- operands -------------------------------------------------------------------------------------------------------
def stack(a_list: List[Tensor], b_list: List[Tensor], dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """A [sum r_i, K] and B [N, sum r_i] of adapters stacked along the rank axis in `dtype` (one adapter already in
    `dtype`: the tensors themselves). Forward and merge (fused_lora.layer_merge) stack the same way."""
    if len(a_list) == 1:
        a, b = a_list[0], b_list[0]
        return (a if a.dtype == dtype else a.to(dtype)), (b if b.dtype == dtype else b.to(dtype))
    a = torch.cat([t if t.dtype == dtype else t.to(dtype) for t in a_list], 0)
    b = torch.cat([t if t.dtype == dtype else t.to(dtype) for t in b_list], 1)
    return a, b


def adapter_operands(
    plan: Plan, adapters: Adapters, grad: bool, frozen: Optional[Sequence[bool]] = None
) -> Tuple[Tensor, Tensor]:
    """(A [R, K], B [N, R]) in plan.adapter_dtype, contiguous. One adapter already in that dtype: the parameters
    themselves. With gradients: built from the live parameters now (`frozen[i]` detaches adapter i: a mixed batch
    whose rows never use it leaves its gradient None, as PEFT's). Without: cached (Plan.derived)."""
    a_list, b_list, dtype = adapters.a, adapters.b, plan.adapter_dtype
    if len(a_list) == 1 and a_list[0].dtype == dtype and b_list[0].dtype == dtype:
        a, b = a_list[0], b_list[0]
    elif grad or plan.key is None:
        if frozen is not None:
            a_list = [t.detach() if f else t for t, f in zip(a_list, frozen)]
            b_list = [t.detach() if f else t for t, f in zip(b_list, frozen)]
        a, b = stack(a_list, b_list, dtype)
    else:

        def stacked():
            a, b = stack(a_list, b_list, dtype)
            return a.contiguous(), b.contiguous()

        a, b = plan.derived("ab", a_list + b_list, stacked)
    return (a if a.is_contiguous() else a.contiguous()), (b if b.is_contiguous() else b.contiguous())


def _bias_terms(adapters: Adapters, n_out: int, like: Tensor) -> Tensor:
    """[n, N] float32 rows s_i * lora_B_i.bias (zeros for adapters without one)."""
    rows = [
        t.to(torch.float32) * s if t is not None else like.new_zeros(n_out, dtype=torch.float32)
        for t, s in zip(adapters.bias, adapters.scales)
    ]
    return torch.stack(rows)


def has_lora_bias(adapters: Adapters) -> bool:
    for t in adapters.bias:
        if t is not None:
            return True
    return False


def dense_bias(
    plan: Plan, adapters: Adapters, bias: Optional[Tensor], weight: Tensor, grad: bool
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(the op's bias, a float32 [N] term to add to the op's output or None) for the lora_B biases (see build)."""
    if not has_lora_bias(adapters):
        return bias, None
    sources = [bias] + list(adapters.bias)
    grad = grad or (bias is not None and bias.requires_grad and _grad_enabled())

    def folded():
        total = _bias_terms(adapters, weight.shape[0], weight).sum(0)
        return (total if bias is None else bias.to(torch.float32) + total).to(weight.dtype)

    def term():
        return _bias_terms(adapters, weight.shape[0], weight).sum(0)

    if plan.fold_bias:
        return (folded() if grad or plan.key is None else plan.derived("bias", sources, folded)), None
    return bias, (term() if grad or plan.key is None else plan.derived("bias", sources, term))


def rows_bias_table(plan: Plan, adapters: Adapters, weight: Tensor, grad: bool) -> Optional[Tensor]:
    """[n + 1, N] float32: row i = s_i * lora_B_i.bias, the last row zeros (what id -1, and unchecked ids outside
    [-1, n), select), or None when no adapter has a lora_B bias."""
    if not has_lora_bias(adapters):
        return None

    def table():
        terms = _bias_terms(adapters, weight.shape[0], weight)
        return torch.cat([terms, terms.new_zeros(1, weight.shape[0])])

    return table() if grad or plan.key is None else plan.derived("bias_table", list(adapters.bias), table)


def add_row_bias(y: Tensor, table: Tensor, ids: Tensor, n: int) -> Tensor:
    """y [M, N] + table[ids], with ids outside [0, n) selecting the zero row n; in float32, rounded once."""
    ids = torch.where((ids >= 0) & (ids < n), ids, n)
    return (y + table[ids]).to(y.dtype)


# ---- mixed batches: adapter_names -> ids ----------------------------------------------------------------------------
NO_ADAPTER = "__base__"  # PEFT's name for "no adapter" in adapter_names
_IDS_CACHE: Dict[tuple, Tuple[Tensor, frozenset, tuple]] = {}
_IDS_CACHE_SIZE = 64


def _ids_entry(index: Dict[str, int], adapter_names: Sequence[str], make_tensor):
    ids = [index.get(n, -1) for n in adapter_names]
    unknown = tuple(sorted({n for n in adapter_names if n != NO_ADAPTER and n not in index}))
    return make_tensor(ids), frozenset(ids), unknown


def ids_for_names(plan: Plan, adapter_names: Sequence[str], device: torch.device) -> Tuple[Tensor, frozenset, tuple]:
    """(int64 ids [len(adapter_names)] on `device` (-1 for "__base__" and names the layer does not hold), the set
    of ids used, the names the layer does not hold). Every LoRA layer of a model sees the same adapter_names at a
    decode step, so this is built once for all of them (keyed on the names and the layer's adapter order), not one
    host-to-device copy per layer per step."""
    index = plan.index
    if plan.key is None:  # not plain eager: under torch.compile, a constant of the graph
        return _ids_entry(index, adapter_names, lambda ids: torch.tensor(ids, dtype=torch.int64, device=device))
    key = (tuple(adapter_names), plan.names, device)
    entry = _IDS_CACHE.get(key)
    if entry is None:
        if len(_IDS_CACHE) >= _IDS_CACHE_SIZE:
            _IDS_CACHE.clear()
        entry = _ids_entry(
            index, adapter_names, lambda ids: _persistent(lambda: torch.tensor(ids, dtype=torch.int64, device=device))
        )
        _IDS_CACHE[key] = entry
    return entry


# ---- the calls ------------------------------------------------------------------------------------------------------
def _lora_linear():
    # through the package attribute: the public entry point, as callers (and tools wrapping it) know it
    import fused_lora

    return fused_lora.lora_linear


def _lora_linear_rows():
    import fused_lora

    return fused_lora.lora_linear_rows


def dense_call(
    plan: Plan,
    adapters: Adapters,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    training: bool,
    autocast: bool,
    scale: Optional[Tensor] = None,
) -> Tensor:
    """y = x W^T + bias + the plan's adapters, all rows; `scale`: a per-call per-rank scale (AdaLoRA) instead of
    the plan's. Under autocast the operands go to fused_lora.lora_linear, which applies nn.Linear's casts."""
    grad = adapters.need_grad()
    if grad:
        plan.drop_cached()
    a, b = adapter_operands(plan, adapters, grad)
    op_bias, term = dense_bias(plan, adapters, bias, weight, grad)
    scale = plan.scale if scale is None else scale
    # a scale that trains (AdaLoRA's lora_E) goes to lora_linear, which folds it into A for its gradient
    if autocast or (scale.requires_grad and _grad_enabled()):
        y = _lora_linear()(
            x, weight, op_bias, a, b, scale, dropout_p=plan.rates, training=training, rank_splits=plan.ranks
        )
    else:
        y = functional.lora_linear_prepared(
            x, weight, op_bias, a, b, scale, plan.rank_ptr, plan.dropout_p(training), plan.seed(training), plan.backend
        )
    return y if term is None else (y + term).to(y.dtype)


def rows_call(
    plan: Plan,
    adapters: Adapters,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    row_ids: Tensor,
    training: bool,
    autocast: bool,
    check_ids: bool,
    used: Optional[frozenset] = None,
) -> Tensor:
    """Row m of x.reshape(-1, K) uses adapter row_ids[m] (ids per row or per sample; -1: none). `used`: the ids
    present, when known (adapter_names): the other adapters get no gradient, as in PEFT's mixed batch."""
    grad = adapters.need_grad()
    if grad:
        plan.drop_cached()
    frozen = None if used is None or not grad else [i not in used for i in range(len(plan.names))]
    a, b = adapter_operands(plan, adapters, grad, frozen)
    table = rows_bias_table(plan, adapters, weight, grad)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        check_linear(x, weight, bias)
    ids = functional.row_ids_for(row_ids, x, math.prod(x.shape[:-1]), len(plan.names), check_ids)
    if autocast:
        y = _lora_linear_rows()(
            x, weight, bias, a, b, plan.scale, plan.ranks, ids, dropout_p=plan.rates, training=training, check_ids=False
        )
    else:
        y = functional.lora_linear_rows_prepared(
            x,
            weight,
            bias,
            a,
            b,
            plan.scale,
            plan.rank_ptr,
            ids,
            plan.dropout_p(training),
            plan.seed(training),
            plan.backend,
        )
    if table is None:
        return y
    rows = ids.numel()
    return add_row_bias(y.reshape(rows, -1), table, ids, len(plan.names)).reshape(y.shape)
