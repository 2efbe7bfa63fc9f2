"""Put fomoe into Hugging Face ``transformers`` MoE models, and take it out again for export.

``convert_model`` replaces every sparse MoE block of a supported model with a
``ConvertedMoeBlock``: a ``fomoe.MoE`` (router + resident experts) plus, where the
architecture has one, the block's shared expert and its sigmoid gate. The block keeps the
original's forward signature, routing semantics and router-logit output, so the model's own
loss and auxiliary load-balancing loss code run unchanged. ``revert_model`` puts the original
block classes back with the (possibly trained) weights, for ``save_pretrained``.

Weight layout: a Hugging Face expert stores ``gate_up_proj [E, 2*d_ff, d]`` (gate rows first)
and ``down_proj [E, d, d_ff]``; fomoe stores ``w13 [E, d, 2*d_ff]`` = ``[W1 | W3]`` and
``w2 [E, d_ff, d]``, so the conversion is a transpose of the last two dimensions each way,
exact in every dtype.

Supported: ``transformers`` >= 5.6, < 6 (fused 3-D expert parameters; earlier 5.x releases
returned softmax probabilities as "router logits"; 4.x stored experts as module lists).
"""

from __future__ import annotations

import copy
import importlib
import logging
import numbers
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from .layer import MoE, MoEConfig

logger = logging.getLogger(__name__)

SUPPORTED_TRANSFORMERS = ((5, 6), (6, 0))  # [minimum, maximum) as (major, minor)
# MoEConfig fields a caller may set at conversion; the others come from the model.
MOE_OPTIONS = ("skip_policy", "renormalize_kept", "aux_loss_coef", "z_loss_coef")


# ---- per-architecture adapters (the registry) ----------------------------------------------


@dataclass(frozen=True)
class BlockAdapter:
    """What fomoe needs to know about one architecture's sparse MoE block.

    All supported blocks share one layout: ``gate`` (a top-k router with ``weight [E, d]``),
    ``experts`` (``gate_up_proj``, ``down_proj``, ``act_fn``) and, optionally,
    ``shared_expert`` + ``shared_expert_gate``. They differ only in the names and in
    whether the top-k softmax probabilities are renormalised.
    """

    arch: str                 # model_type, e.g. "mixtral"
    module: str               # the transformers module that defines the block
    block_class: str
    router_class: str
    renormalize_attr: str | None  # router attribute holding norm_topk_prob; None: always renormalised
    shared_expert: bool = False   # the block adds sigmoid(shared_expert_gate(x)) * shared_expert(x)
    jitter_attr: str | None = None  # block attribute with the training-time input jitter (Mixtral)

    def classes(self) -> tuple[type[nn.Module], type[nn.Module]]:
        mod = importlib.import_module(self.module)
        return getattr(mod, self.block_class), getattr(mod, self.router_class)


ADAPTERS: tuple[BlockAdapter, ...] = (
    # Mixtral: softmax over all experts, top-k, renormalise = softmax over the top-k logits.
    BlockAdapter("mixtral", "transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock",
                 "MixtralTopKRouter", renormalize_attr=None, jitter_attr="jitter_noise"),
    # Qwen2-MoE: softmax, top-k, optional renormalisation, plus a sigmoid-gated shared expert.
    BlockAdapter("qwen2_moe", "transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock",
                 "Qwen2MoeTopKRouter", renormalize_attr="norm_topk_prob", shared_expert=True),
    BlockAdapter("qwen3_moe", "transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock",
                 "Qwen3MoeTopKRouter", renormalize_attr="norm_topk_prob"),
    BlockAdapter("olmoe", "transformers.models.olmoe.modeling_olmoe", "OlmoeSparseMoeBlock",
                 "OlmoeTopKRouter", renormalize_attr="norm_topk_prob"),
)


def supported_architectures() -> list[str]:
    return [a.arch for a in ADAPTERS]


def _check_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("fomoe.convert needs Hugging Face transformers: pip install 'transformers>=5.6,<6'") from exc
    parts = transformers.__version__.split(".")
    try:
        version = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        raise RuntimeError(f"cannot parse the transformers version {transformers.__version__!r}") from None
    low, high = SUPPORTED_TRANSFORMERS
    if not low <= version < high:
        raise RuntimeError(f"fomoe.convert supports transformers >= {low[0]}.{low[1]}, < {high[0]}.{high[1]} "
                           f"(fused expert parameters, raw router logits); found {transformers.__version__}. "
                           f"Install a supported version, e.g. pip install 'transformers>=5.6,<6'")
    return transformers


def _adapter_table() -> dict[type[nn.Module], tuple[BlockAdapter, type[nn.Module]]]:
    """HF block class -> (adapter, router class), for the architectures this transformers has."""
    table = {}
    for adapter in ADAPTERS:
        try:
            block_cls, router_cls = adapter.classes()
        except (ImportError, AttributeError) as exc:
            raise RuntimeError(f"transformers lacks the {adapter.arch} classes fomoe.convert expects "
                               f"({adapter.module}.{adapter.block_class}): {exc}") from exc
        table[block_cls] = (adapter, router_cls)
    return table


# ---- the converted block -------------------------------------------------------------------


class _RouterLogitsTap(nn.Module):
    """Stands where the HF router stood, so that hooks on it see the router logits.

    transformers collects ``output_router_logits`` with forward hooks on every instance of
    the architecture's router class (output index 0). A subclass of that class (built by
    ``_tap_class``) with this forward keeps that working without a second router matmul.
    """

    def __init__(self, top_k: int, num_experts: int, hidden_dim: int) -> None:
        nn.Module.__init__(self)  # not the HF router's __init__: the weight lives in fomoe.MoE
        self.top_k, self.num_experts, self.hidden_dim = top_k, num_experts, hidden_dim
        self._is_hf_initialized = True  # keeps HF's _init_weights (which expects .weight) away

    def forward(self, hidden_states: Tensor, router_logits: Tensor) -> tuple[Tensor, None, None]:
        return router_logits, None, None

    def __reduce_ex__(self, protocol):
        # The subclass is made at run time and cannot be found by name when unpickling (torch.save of a
        # whole model, deepcopy): rebuild it from the HF router class it extends.
        return _new_tap, (self._router_class,), self.__dict__


_TAP_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _tap_class(router_cls: type[nn.Module]) -> type[nn.Module]:
    if router_cls not in _TAP_CLASSES:
        _TAP_CLASSES[router_cls] = type(f"Fomoe{router_cls.__name__}Tap", (_RouterLogitsTap, router_cls),
                                        {"__module__": __name__, "_router_class": router_cls})
    return _TAP_CLASSES[router_cls]


def _new_tap(router_cls: type[nn.Module]) -> nn.Module:
    cls = _tap_class(router_cls)
    return cls.__new__(cls)


class ConvertedMoeBlock(nn.Module):
    """A Hugging Face sparse MoE block running on ``fomoe.MoE``; same inputs and outputs.

    ``moe`` holds the router (``moe.router.weight``, the original router parameter) and the
    resident experts; ``gate`` re-emits the router logits for transformers' output
    collection; ``shared_expert`` / ``shared_expert_gate`` are the original modules.
    """

    def __init__(self, adapter: BlockAdapter, moe: MoE, gate: nn.Module, shared_expert: nn.Module | None,
                 shared_expert_gate: nn.Module | None, jitter_noise: float, original: nn.Module) -> None:
        super().__init__()
        self.arch = adapter.arch
        self.moe = moe
        self.gate = gate
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.jitter_noise = jitter_noise
        # The original block, emptied of its parameters, is what revert_model restores (same object,
        # same attributes). Kept outside the module tree so it is neither saved nor moved.
        self.__dict__["_original"] = original

    def forward(self, hidden_states: Tensor) -> Tensor:
        if self.training and self.jitter_noise > 0:
            # As Mixtral: multiplicative noise on the block input, seen by the router and the experts.
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        out = self.moe(hidden_states)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        self.gate(flat, self.moe.router_logits.to(hidden_states.dtype))
        if self.shared_expert is not None:
            out = out + (torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)).view_as(out)
        return out

    def extra_repr(self) -> str:
        return f"arch={self.arch}, jitter_noise={self.jitter_noise}"


# ---- conversion ----------------------------------------------------------------------------


def _swap_hooks(a: nn.Module, b: nn.Module, pre: bool) -> None:
    """Exchange the forward hooks of two modules (the dicts themselves, so hook handles stay valid)."""
    names = ["_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"]
    if pre:
        names += ["_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"]
    for name in names:
        if name in a.__dict__ and name in b.__dict__:
            a.__dict__[name], b.__dict__[name] = b.__dict__[name], a.__dict__[name]


def _set_child(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _check_silu(act_fn: nn.Module, name: str) -> None:
    # fomoe's expert FFN is SwiGLU: silu(x W1) * (x W3).
    if type(act_fn).__name__ not in ("SiLU", "SiLUActivation"):
        raise ValueError(f"{name}: experts use activation {type(act_fn).__name__}; fomoe's experts are SwiGLU "
                         f"(silu) only")


def _resident_for_layers(resident_experts, num_layers: int) -> list[Sequence[int] | None]:
    if resident_experts is None:
        return [None] * num_layers
    if isinstance(resident_experts, Mapping):
        raise TypeError("resident_experts must be None, a list of expert ids (every MoE layer), or a list of such "
                        "lists (one per MoE layer, in model order); got a mapping")
    items = list(resident_experts)
    if items and all(isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in items):
        return [items] * num_layers
    if len(items) != num_layers:
        raise ValueError(f"resident_experts lists {len(items)} layers but the model has {num_layers} MoE layers")
    return [None if ids is None else list(ids) for ids in items]


def _find_blocks(model: nn.Module, table) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if type(m) in table]


def _unsupported_moe_modules(model: nn.Module) -> list[str]:
    names = {type(m).__name__ for m in model.modules()}
    return sorted(n for n in names if ("moe" in n.lower() and n.lower().endswith("block")) or n.endswith("Experts"))


def convert_model(model: nn.Module, resident_experts=None, inplace: bool = True, **moe_options) -> nn.Module:
    """Replace every sparse MoE block of a Hugging Face model with a fomoe-backed ``ConvertedMoeBlock``.

    resident_experts: ``None`` (every expert), a list of global expert ids held in every MoE
        layer, or one such list per MoE layer (in ``model.modules()`` order, the layer order
        ``fomoe.sync`` and ``Placement.resident(rank, layer)`` use). Non-resident experts'
        weights are dropped; their tokens are skipped (``skip_policy``).
    inplace: convert ``model`` itself (its original expert tensors are freed); ``False``
        converts a deep copy and leaves ``model`` untouched.
    moe_options: ``MoEConfig`` fields ``skip_policy``, ``renormalize_kept``, ``aux_loss_coef``,
        ``z_loss_coef`` for every converted layer.

    Returns the converted model. Parameters keep their dtype, device and ``requires_grad``; the
    router parameter object itself moves into ``moe.router``.
    """
    _check_transformers()
    unknown = sorted(set(moe_options) - set(MOE_OPTIONS))
    if unknown:
        raise TypeError(f"convert_model got unknown options {unknown}; allowed: {list(MOE_OPTIONS)}")
    table = _adapter_table()
    if not inplace:
        model = copy.deepcopy(model)
    blocks = _find_blocks(model, table)
    if not blocks:
        if any(isinstance(m, ConvertedMoeBlock) for m in model.modules()):
            return model  # already converted
        others = _unsupported_moe_modules(model)
        hint = f" It has MoE-like modules {others}, which fomoe.convert does not support yet." if others else ""
        raise ValueError(f"{type(model).__name__} has no sparse MoE block fomoe.convert supports "
                         f"(architectures: {supported_architectures()}).{hint}")
    residents = _resident_for_layers(resident_experts, len(blocks))
    for (name, block), resident in zip(blocks, residents):
        adapter, router_cls = table[type(block)]
        _set_child(model, name, _convert_block(name, block, adapter, router_cls, resident, moe_options))
    logger.info("fomoe.convert: replaced %d %s MoE blocks", len(blocks), table[type(blocks[0][1])][0].arch)
    return model


def _convert_block(name: str, block: nn.Module, adapter: BlockAdapter, router_cls: type[nn.Module],
                   resident: Sequence[int] | None, moe_options: dict) -> ConvertedMoeBlock:
    gate, experts = block.gate, block.experts
    _check_silu(experts.act_fn, name)
    router_w, gate_up, down = gate.weight, experts.gate_up_proj, experts.down_proj
    E, d = router_w.shape
    d_ff = down.shape[2]
    if gate_up.shape != (E, 2 * d_ff, d) or down.shape != (E, d, d_ff):
        raise ValueError(f"{name}: unexpected expert shapes gate_up_proj {tuple(gate_up.shape)}, down_proj "
                         f"{tuple(down.shape)} for {E} experts, d={d}, d_ff={d_ff}")
    renormalize = True if adapter.renormalize_attr is None else bool(getattr(gate, adapter.renormalize_attr))
    try:
        config = MoEConfig(d_model=d, d_ff=d_ff, num_experts=E, top_k=int(gate.top_k), score="softmax",
                           renormalize=renormalize, resident_experts=resident, **moe_options)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc
    # On meta: the checkpoint's weights replace every parameter, so nothing is allocated or
    # randomly initialised first (that alone took minutes for large models).
    moe = MoE(config, device="meta")
    moe._register_residency(router_w.device)
    moe.keep_router_logits = True  # HF's aux loss reads them
    held = moe.expert_ids.to(gate_up.device)
    with torch.no_grad():
        # HF [E, 2f, d] / [E, d, f] -> fomoe [E_local, d, 2f] / [E_local, f, d], resident experts only.
        w13 = gate_up.index_select(0, held).transpose(1, 2).contiguous()
        w2 = down.index_select(0, held).transpose(1, 2).contiguous()
    moe.router.weight = router_w  # the same Parameter object: optimizers and tying survive
    moe.w13 = nn.Parameter(w13, requires_grad=gate_up.requires_grad)
    moe.w2 = nn.Parameter(w2, requires_grad=down.requires_grad)

    tap = _tap_class(router_cls)(int(gate.top_k), E, d)
    shared, shared_gate = (block.shared_expert, block.shared_expert_gate) if adapter.shared_expert else (None, None)
    jitter = float(getattr(block, adapter.jitter_attr)) if adapter.jitter_attr else 0.0
    converted = ConvertedMoeBlock(adapter, moe, tap, shared, shared_gate, jitter, original=block)
    converted.train(block.training)
    _swap_hooks(gate, tap, pre=False)  # e.g. transformers' router-logit recorder, if already installed
    _swap_hooks(block, converted, pre=True)
    # Empty the original so it holds no memory; revert_model refills it.
    gate.weight = None
    experts.gate_up_proj = None
    experts.down_proj = None
    for module in converted.modules():
        module._is_hf_initialized = True  # carried weights must not be re-initialised by HF's init_weights
    return converted


def revert_model(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Put the original Hugging Face MoE blocks back, carrying the current fomoe weights into them.

    Every converted layer must hold all its experts. To export a federated run, load the
    consolidated checkpoint into a fully resident converted model first (``convert_model``
    without ``resident_experts``, then ``load_state_dict``), then revert.
    """
    _check_transformers()
    if not inplace:
        model = copy.deepcopy(model)
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, ConvertedMoeBlock)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no fomoe-converted MoE blocks to revert")
    partial = [name for name, b in blocks if b.moe.partial]
    if partial:
        raise ValueError(f"cannot revert: MoE blocks {partial} hold only some of their experts (the rest live on "
                         f"other workers). Load a consolidated checkpoint into a fully resident converted model "
                         f"(convert_model without resident_experts, then load_state_dict) and revert that")
    for name, converted in blocks:
        _set_child(model, name, _revert_block(converted))
    logger.info("fomoe.convert: restored %d MoE blocks", len(blocks))
    return model


def _revert_block(converted: ConvertedMoeBlock) -> nn.Module:
    block = converted._original
    moe = converted.moe
    # Experts come back in global order (a full layer holds them all, in slot order = id order).
    order = torch.argsort(moe.expert_ids).to(moe.w13.device)
    with torch.no_grad():
        gate_up = moe.w13.index_select(0, order).transpose(1, 2).contiguous()
        down = moe.w2.index_select(0, order).transpose(1, 2).contiguous()
    block.gate.weight = moe.router.weight
    block.experts.gate_up_proj = nn.Parameter(gate_up, requires_grad=moe.w13.requires_grad)
    block.experts.down_proj = nn.Parameter(down, requires_grad=moe.w2.requires_grad)
    if converted.shared_expert is not None:
        block.shared_expert = converted.shared_expert
        block.shared_expert_gate = converted.shared_expert_gate
    block.train(converted.training)
    _swap_hooks(converted.gate, block.gate, pre=False)
    _swap_hooks(converted, block, pre=True)
    return block


__all__ = ["convert_model", "revert_model", "ConvertedMoeBlock", "BlockAdapter", "ADAPTERS",
           "supported_architectures", "SUPPORTED_TRANSFORMERS"]
