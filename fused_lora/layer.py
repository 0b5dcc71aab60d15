"""FusedLoRALinear: a drop-in for PEFT's LoRA Linear whose forward is one fused op call.

Attribute and state_dict names follow peft.tuners.lora.layer.Linear (base_layer, lora_A[name], lora_B[name],
lora_dropout[name], r, lora_alpha, scaling, use_rslora, lora_bias, merged_adapters, ...), so checkpoints move
between the two. The layer holds no kernel code: its plan (fused_lora.plan: stacked adapters, per-rank scale
vector, rank offsets, dropout rates, name -> id map, backend; rebuilt whenever one of them would change) feeds
fused_lora.functional, as for PEFT's own layers patched by fused_lora.integrations.peft.

Forward, by case (PEFT's order of precedence):
  adapters disabled        -> base layer only (merged adapters are unmerged first, as PEFT does)
  adapter_names/adapter_ids -> one adapter per row (the per-row op), over ALL adapters of the layer; with
                              adapter_names, adapters no row uses get no gradient (None, as PEFT's mixed batch);
                              adapter_ids are not read on the host, so every adapter gets one (zero if unused)
  otherwise                -> the active adapters that are not merged, stacked along the rank axis, in one
                              fused call (PEFT skips every adapter once any is merged; we keep the
                              unmerged active ones, so merging one adapter does not silently drop the others)
lora_B biases (lora_bias=True): added as s_i * bias_i, folded into the op's bias when they have the base weight's
dtype, else (float32 biases over a 16-bit base) added to the output in float32 so their gradient stays float32;
the same rule as the patched PEFT layer (fused_lora.plan.dense_bias).

Adapter ids (adapter_ids=..., adapter_index(name)) index the adapters in the order of `self.lora_A` keys, i.e.
the order they were added; deleting an adapter shifts the ids of those after it.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

from fused_lora import layer_merge, plan
from fused_lora.layer_options import adapter_dtype, check_adapter_args, check_variant_options
from fused_lora.layer_replace import replace_linear  # noqa: F401  (public: fused_lora.replace_linear)

BASE = "__base__"


def _common_adapter_dtype(dtypes, x_dtype: torch.dtype) -> torch.dtype:
    """The op takes adapters in x's dtype or float32. Mixed dtypes stack in float32 when one of them is float32;
    any other dtype (e.g. bfloat16 adapters on float16 inputs) is cast to x's dtype."""
    dtypes = set(dtypes)
    if len(dtypes) == 1 and next(iter(dtypes)) in (x_dtype, torch.float32):
        return next(iter(dtypes))
    return torch.float32 if torch.float32 in dtypes else x_dtype


def _dropout_rate(module: nn.Module) -> float:
    return module.p if isinstance(module, nn.Dropout) else 0.0


class FusedLoRALinear(nn.Module):
    """LoRA on an nn.Linear: y = x W^T + b + sum over active adapters of s_i * (drop_i(x) A_i^T) B_i^T."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        adapter_name: str = "default",
        r: int = 0,
        lora_alpha: Optional[float] = None,
        **adapter_options,
    ):
        """A fresh nn.Linear(in_features, out_features, bias, device, dtype) as the base layer; with r > 0 it
        also gets the adapter `adapter_name` (options as in add_adapter)."""
        super().__init__()
        self._setup(nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype), adapter_name)
        if r:
            self.add_adapter(adapter_name, r, r if lora_alpha is None else lora_alpha, **adapter_options)
        elif adapter_options or lora_alpha is not None:
            raise TypeError(
                f"adapter options {sorted(adapter_options) or ['lora_alpha']} given without r > 0: "
                "no adapter would be created"
            )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, adapter_name: str = "default", r: int = 8, lora_alpha: float = 8, **adapter_options
    ) -> "FusedLoRALinear":
        """Wrap `linear` (shared, not copied) and add one adapter; defaults r=8, lora_alpha=8 as PEFT's LoraConfig."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(linear, adapter_name)
        layer.add_adapter(adapter_name, r, lora_alpha, **adapter_options)
        return layer

    def _setup(self, base_layer: nn.Linear, adapter_name: str) -> None:
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self.use_dora: dict[str, bool] = {}  # always False; kept because PEFT code reads it
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self._disable_adapters = False
        self._active_adapter: Union[str, list[str]] = adapter_name
        self.merged_adapters: list[str] = []
        self._merge_records: list[layer_merge.MergeRecord] = []

    # ---- adapters -------------------------------------------------------------------------------------------
    def add_adapter(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: Union[bool, str] = True,
        lora_bias: bool = False,
        autocast_adapter_dtype: bool = True,
        inference_mode: bool = False,
        **variant_options,
    ) -> None:
        """PEFT's update_layer for plain LoRA. Adapters live on the base weight's device, in float32 over a
        float16/bfloat16 base when autocast_adapter_dtype (get_peft_model's default), else in the base dtype.
        The new adapter is not activated (unless it is the layer's active adapter name); see set_adapter."""
        check_variant_options(variant_options)
        check_adapter_args(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, lora_bias)
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into the base weight; unmerge() before replacing it")
        weight = self.base_layer.weight
        if lora_bias and self.base_layer.bias is None:
            warnings.warn(
                "`lora_bias=True` was passed but the targeted layer of type Linear has no bias. "
                "This means that merging LoRA weights won't be possible.",
                stacklevel=2,
            )
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = bool(use_rslora)
        self.lora_bias[adapter_name] = bool(lora_bias)
        self.use_dora[adapter_name] = False
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        # built on the CPU in the default dtype first, as PEFT does, so a seeded init draws the same numbers
        lora_a = nn.Linear(self.in_features, r, bias=False)
        lora_b = nn.Linear(r, self.out_features, bias=bool(lora_bias))
        self._init_factors(lora_a, lora_b, r, init_lora_weights, bool(lora_bias))
        target_dtype = adapter_dtype(weight.dtype, autocast_adapter_dtype)
        self.lora_A[adapter_name] = lora_a.to(device=weight.device, dtype=target_dtype)
        self.lora_B[adapter_name] = lora_b.to(device=weight.device, dtype=target_dtype)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @staticmethod
    def _init_factors(lora_a: nn.Linear, lora_b: nn.Linear, r: int, init, lora_bias: bool) -> None:
        if init is False:
            return  # PEFT's init_lora_weights=False: both keep nn.Linear's random init (B != 0)
        if init is True:
            nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
        else:  # "gaussian"
            nn.init.normal_(lora_a.weight, std=1 / r)
        nn.init.zeros_(lora_b.weight)
        if lora_bias:
            nn.init.zeros_(lora_b.bias)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (PEFT semantics: a new active adapter is chosen when the deleted one was the only one).
        A merged adapter must be unmerged first: its delta would otherwise stay in the weight for good."""
        if adapter_name in self.merged_adapters:
            raise ValueError(
                f"adapter {adapter_name!r} is merged into the base weight; call unmerge() before deleting it"
            )
        if adapter_name not in self.lora_A:
            raise ValueError(f"adapter {adapter_name!r} not found; adapters: {list(self.lora_A.keys())}")
        for table in (
            self.lora_A,
            self.lora_B,
            self.lora_dropout,
            self.r,
            self.lora_alpha,
            self.scaling,
            self.use_rslora,
            self.lora_bias,
            self.use_dora,
        ):
            del table[adapter_name]
        if adapter_name in self.active_adapters:
            remaining_active = [n for n in self.active_adapters if n != adapter_name]
            if remaining_active:
                self.set_adapter(remaining_active)
            elif len(self.lora_A):
                new_active = sorted(self.lora_A.keys())[0]
                warnings.warn(
                    f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to {new_active}.",
                    stacklevel=2,
                )
                self.set_adapter(new_active)
            else:
                self.set_adapter([])

    def set_adapter(self, adapter_names: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        """Activate adapter(s); as PEFT, active adapters train (requires_grad) unless inference_mode, others don't."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for table in (self.lora_A, self.lora_B):
            for key, module in table.items():
                module.requires_grad_(key in names and not inference_mode)
        self._active_adapter = names

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return [self._active_adapter] if isinstance(self._active_adapter, str) else list(self._active_adapter)

    def adapter_index(self, adapter_name: str) -> int:
        """The id of an adapter in adapter_ids: its position among self.lora_A keys (order of addition)."""
        for i, name in enumerate(self.lora_A.keys()):
            if name == adapter_name:
                return i
        raise ValueError(f"adapter {adapter_name!r} not found; adapters: {list(self.lora_A.keys())}")

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @disable_adapters.setter
    def disable_adapters(self, value: bool) -> None:
        self.enable_adapters(not value)

    def enable_adapters(self, enabled: bool) -> None:
        """PEFT's toggle: disabling also stops gradients of every adapter; enabling restores the active ones."""
        if enabled:
            self.set_adapter(self.active_adapters)
            self._disable_adapters = False
        else:
            for table in (self.lora_A, self.lora_B):
                table.requires_grad_(False)
            self._disable_adapters = True

    def set_scale(self, adapter: str, scale: float) -> None:
        """scaling = scale * alpha / r (alpha / sqrt(r) with rsLoRA); read at the next forward."""
        if adapter not in self.scaling:
            return  # as PEFT: another layer of the model may hold it
        denominator = math.sqrt(self.r[adapter]) if self.use_rslora[adapter] else self.r[adapter]
        self.scaling[adapter] = scale * self.lora_alpha[adapter] / denominator

    def scale_layer(self, scale: float) -> None:
        for name in self.active_adapters:
            if name in self.scaling:
                self.scaling[name] *= scale

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        for name in self.active_adapters:
            if name not in self.scaling:
                continue
            if scale is None:
                self.set_scale(name, 1.0)
            else:
                self.scaling[name] /= scale

    # ---- base layer access, as PEFT's BaseTunerLayer (transformers code reads layer.weight) -------------------
    def get_base_layer(self) -> nn.Linear:
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    # ---- merge ----------------------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merge(
        self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False, keep_original: bool = False
    ) -> None:
        """Add the adapters (default: the active ones) into the base weight in place, all in one merge_ call.

        safe_merge: nothing is written if a merged value would be non-finite; a ValueError names the adapter.
        keep_original: keep the weight (and bias) as they were on the CPU, so unmerge() restores them bit for bit;
        otherwise unmerge() subtracts, which in low precision leaves a rounding-sized drift.
        lora_bias adapters also merge into the base bias (an error if the base has none)."""
        layer_merge.merge(self, adapter_names, safe_merge=safe_merge, keep_original=keep_original)

    def unmerge(self) -> None:
        """Take every merged adapter out of the base weight (warns when nothing is merged, as PEFT)."""
        layer_merge.unmerge(self)

    # ---- forward --------------------------------------------------------------------------------------------
    def _check_forward_args(self, x: torch.Tensor, adapter_names, adapter_ids) -> None:
        if adapter_names is not None and adapter_ids is not None:
            raise ValueError("pass either adapter_names or adapter_ids, not both")
        if adapter_names is None and adapter_ids is None:
            return
        if adapter_names is not None:
            if isinstance(adapter_names, str):
                raise TypeError(f"adapter_names must be a list of names (one per sample), got {adapter_names!r}")
            samples = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else len(x)
            if samples != len(adapter_names):
                raise ValueError(
                    "Length of `adapter_names` should be the same as the number of inputs, but got "
                    f"{len(adapter_names)} and {samples} respectively."
                )
        if self.merged_adapters:
            which = "adapter_names" if adapter_names is not None else "adapter_ids"
            raise ValueError(
                f"Cannot pass `{which}` when there are merged adapters, please call `unmerge_adapter` first."
            )
        # names the layer does not hold are refused in _rows_forward, from the ids cache (no set built per call)

    def forward(
        self,
        x: torch.Tensor,
        adapter_names: Optional[Sequence[str]] = None,
        adapter_ids: Optional[torch.Tensor] = None,
        *,
        check_ids: bool = True,
    ) -> torch.Tensor:
        """adapter_names: one name per sample (x.shape[0]), "__base__" for none (PEFT's mixed batch).
        adapter_ids: an integer tensor, one id per row of x.reshape(-1, in_features) or per sample, -1 for none;
        ids are positions among self.lora_A keys (adapter_index). check_ids: as fused_lora.lora_linear_rows (ids
        outside [-1, n_adapters) raise ValueError; on CUDA that costs one host sync; skipped under CUDA graph
        capture and torch.compile; with check_ids=False such ids act as -1, for the lora_bias term too).
        Under torch.autocast the layer follows nn.Linear's rules (see fused_lora.functional).
        The operands come from the layer's plan (fused_lora.plan), rebuilt only when something it depends on
        changes."""
        rows = adapter_names is not None or adapter_ids is not None
        if rows:
            self._check_forward_args(x, adapter_names, adapter_ids)
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x)
        if rows:
            names = tuple(self.lora_A._modules)
            if not names:
                return self.base_layer(x)
            return self._rows_forward(x, names, adapter_names, adapter_ids, check_ids)
        names = self._active_unmerged()
        if not names:
            return self.base_layer(x)
        adapters, weight, bias, compute = self._read(x, names)
        key = plan.call_key(adapters, weight, bias, x.device, compute)
        current = plan.cached_plan(self, plan.PLAN_ATTR, key) or plan.store(
            self, plan.PLAN_ATTR, self._build(key, adapters, weight, bias, x, compute)
        )
        return plan.dense_call(current, adapters, x, weight, bias, self.training, compute[1])

    def _active_unmerged(self) -> tuple:
        active, present, merged = self._active_adapter, self._modules["lora_A"]._modules, self.merged_adapters
        if type(active) is str:
            return (active,) if active in present and active not in merged else ()
        return tuple(n for n in active if n in present and n not in merged)

    def _read(self, x: torch.Tensor, names: tuple):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        base = self._modules["base_layer"]
        weight, bias = plan.param(base, "weight"), plan.param(base, "bias")
        return plan.read_lora(self, names, _dropout_rate), weight, bias, plan.compute_dtype(x)

    @staticmethod
    def _build(key, adapters, weight, bias, x, compute) -> plan.Plan:
        dtype = _common_adapter_dtype([t.dtype for t in adapters.a + adapters.b], compute[0])
        return plan.build(key, adapters, weight, bias, x, dtype, compute[1])

    def _rows_forward(self, x: torch.Tensor, names: tuple, adapter_names, adapter_ids, check_ids: bool):
        adapters, weight, bias, compute = self._read(x, names)
        key = plan.call_key(adapters, weight, bias, x.device, compute)
        current = plan.cached_plan(self, plan.ROWS_PLAN_ATTR, key) or plan.store(
            self, plan.ROWS_PLAN_ATTR, self._build(key, adapters, weight, bias, x, compute)
        )
        used = None
        if adapter_names is not None:
            adapter_ids, used, unknown = plan.ids_for_names(current, adapter_names, x.device)
            if unknown:
                raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
            check_ids = False  # built from known names: in range (a check would cost a host sync on CUDA)
        return plan.rows_call(
            current, adapters, x, weight, bias, adapter_ids, self.training, compute[1], check_ids, used
        )

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.half() change the parameters in place: the plans key on dtype/device and would be rebuilt
        # anyway; dropping them here also frees their tensors on the old device
        plan.invalidate(self)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"adapters={list(self.lora_A.keys())}, active={self.active_adapters}, merged={self.merged_adapters}"
        )

    def __repr__(self) -> str:
        return "fused_lora." + super().__repr__()
