"""Tensor parallelism for the packed modules, through torch.distributed's own engine (DTensor, parallelize_module).

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    import turbokernels as tk
    tk.optimize(model, int4=True)                                  # before or after sharding: both orders work
    mesh = init_device_mesh("cuda", (world_size,))
    parallelize_module(model, mesh, tk.parallel.tp_plan(model))   # transformers' own plan, our styles

Megatron's split: a column-parallel layer holds a slice of the output features and takes the whole input; a
row-parallel layer holds a slice of the input features, takes its slice of the input (the column-parallel layer's
output, never gathered) and sums the partial outputs (one all-reduce). `ColwiseParallel` / `RowwiseParallel` here
are torch's styles (same arguments, same input/output layouts; plain nn.Linear and nn.Embedding go to torch's
code) that also shard Int4Linear, W4A8Linear, Sparse24Linear and Sparse24Int4Linear. A sharded layer is the same
class with its global in_features / out_features, its packed buffers DTensors (so state_dict, torch's distributed
checkpoint and `DTensor.full_tensor()` see the whole weight), and `module._tp` the sharding: forward runs the
layer's usual kernels on this rank's shard (`_tp.local(module)`: a plain layer of the same class over the local
tensors, no copy). Two paths: under the styles' default layouts (what tp_plan gives; `_tp.local_io`) plain tensors
in and out, the row-parallel sum one `all_reduce` on the output, no hooks and no DTensor per call; under any other
layout DTensors in and out, for torch's hooks (Shard(-1) for column-parallel; for row-parallel Partial, reduced to
Replicate before the bias, which is added once), ~0.3-0.5 ms more per layer pair on a CPU core (bench/parallel.py).

How each packed tensor is split (SPLITS below): along out_features for column-parallel (qweight's, scales' and
offsets' columns, values' and meta's rows), along in_features for row-parallel: int4 words hold 8 input rows and a
scale row covers group_size inputs, so each rank's slice must be a multiple of 8 and of the group size (one group
over the whole K, per-channel: its scales are replicated); 2:4 metadata holds 16 input columns per int16, so a
multiple of 16. Act-order (a permutation of the inputs, GPTQ's g_idx) is split row-parallel only when every rank's
rows read inputs of its own slice (else refused: the rank would need the other ranks' inputs); column-parallel
replicates it. Sizes that do not divide are refused with an error naming the layer and the rule.

Attention needs nothing: it is per head, and a rank's q/k/v projections produce its own heads (transformers'
models reshape by head_dim). A state dict loads into a sharded layer as whole tensors (each rank takes its slice)
or as DTensors of its placements (torch.distributed.checkpoint): `load_local_`. Not sharded here:
turbokernels.nn.MultiheadAttention (torch has no style for nn.MultiheadAttention either); training (the layers are
inference-only).
"""
from __future__ import annotations

import fnmatch
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel as _TorchColwise
from torch.distributed.tensor.parallel import RowwiseParallel as _TorchRowwise

from .nn import Int4Linear, Sparse24Int4Linear, Sparse24Linear
from .nn._packed import PackedWeightModule

COLWISE, ROWWISE = "colwise", "rowwise"
# torch's ColwiseParallel() / RowwiseParallel() layouts: (input, the input the split needs, output)
_LAYOUTS = {COLWISE: ((Replicate(),), (Replicate(),), (Shard(-1),)),
            ROWWISE: ((Shard(-1),), (Shard(-1),), (Replicate(),))}

# tensor -> the dim it is split along (None: replicated), per style; the bias is split with the outputs
SPLITS = {
    Int4Linear: {COLWISE: dict(qweight=1, scales=1, offsets=1, perm=None, bias=0),
                 ROWWISE: dict(qweight=0, scales=0, offsets=0, perm=0, bias=None)},
    Sparse24Linear: {COLWISE: dict(values=0, meta=0, bias=0),
                     ROWWISE: dict(values=1, meta=1, bias=None)},
    Sparse24Int4Linear: {COLWISE: dict(qweight=1, scales=1, offsets=1, meta=0, bias=0),
                         ROWWISE: dict(qweight=0, scales=0, offsets=0, meta=1, bias=None)},
}


def _splits(module: nn.Module) -> Optional[dict]:
    for cls, rules in SPLITS.items():  # W4A8Linear is an Int4Linear
        if isinstance(module, cls):
            return rules
    return None


def _one_group(module: nn.Module) -> bool:
    """One scale row over the whole input (per-channel): row-parallel ranks share it."""
    scales = module._buffers.get("scales")
    return scales is not None and scales.shape[0] == 1


def _check_shardable(where: str, module: nn.Module, style: str, world: int, in_features: Optional[int] = None,
                     out_features: Optional[int] = None) -> None:
    """Refuse a split the packed format cannot make, naming the rule (ValueError). in/out_features: the whole
    layer's, when `module` is one rank's shard."""
    n, k = out_features or module.out_features, in_features or module.in_features
    if style == COLWISE:
        if n % world:
            raise ValueError(f"{where}: column-parallel splits out_features={n} over {world} ranks: it must be a "
                             f"multiple of {world}")
        return
    if k % world:
        raise ValueError(f"{where}: row-parallel splits in_features={k} over {world} ranks: it must be a multiple "
                         f"of {world}")
    k_rank = k // world
    if isinstance(module, Int4Linear):
        need = [(8, "an int4 word holds 8 input rows")]
        if not _one_group(module):
            need.append((module.group_size, f"group_size={module.group_size}: a rank holds whole groups"))
    else:
        need = [(16, "an int16 of 2:4 metadata holds 16 input columns")]
        if isinstance(module, Sparse24Int4Linear) and not _one_group(module):
            need.append((module.group_size, f"group_size={module.group_size}: a rank holds whole groups"))
    for multiple, why in need:
        if k_rank % multiple:
            raise ValueError(f"{where}: row-parallel gives each of {world} ranks {k_rank} of in_features={k}; it "
                             f"must be a multiple of {multiple} ({why})")


def _perm_rows(where: str, perm: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The act-order permutation of this rank's rows, in its own input slice's numbering; ValueError when a rank's
    rows read another rank's inputs."""
    k_rank = perm.numel() // world
    owner = perm.view(world, k_rank) // k_rank  # the rank whose input slice each row reads
    expected = torch.arange(world, device=perm.device).view(world, 1)
    if not torch.equal(owner, expected.expand_as(owner)):
        r = int((owner != expected).any(dim=1).nonzero()[0])
        raise ValueError(f"{where}: row-parallel with act-order (perm): rank {r}'s rows read input features outside "
                         f"its slice {r * k_rank}..{(r + 1) * k_rank - 1}, which that rank does not receive; shard "
                         f"this layer column-parallel, or quantize it without act-order")
    return perm[rank * k_rank:(rank + 1) * k_rank] - rank * k_rank


def _group(mesh):
    if mesh.ndim != 1:
        raise ValueError(f"turbokernels.parallel: a 1-D device mesh (the tensor-parallel one) is expected, got "
                         f"{mesh.ndim}-D; pass mesh['tp'] for a 2-D mesh")
    return mesh.get_group()


def _broadcast(t: torch.Tensor, mesh, src_data_rank: Optional[int]) -> torch.Tensor:
    """src_data_rank's copy of t on every rank (None: each rank keeps its own, as torch's styles do)."""
    if src_data_rank is None or mesh.size() == 1:
        return t
    group = _group(mesh)
    wide = t.detach().to(torch.int32) if t.dtype == torch.int16 else t.detach().clone()  # gloo has no int16
    dist.broadcast(wide, src=dist.get_global_rank(group, src_data_rank), group=group)
    return wide.to(t.dtype)


def _dtensor(local: torch.Tensor, mesh, dim: Optional[int], full_shape) -> DTensor:
    placement = Replicate() if dim is None else Shard(dim)
    shape = torch.Size(full_shape)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local.contiguous(), mesh, [placement], run_check=False, shape=shape, stride=stride)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank calls it); a plain tensor as it is."""
    if not isinstance(t, DTensor):
        return t
    if t.dtype == torch.int16:  # gloo has no int16
        return t.to(torch.int32).full_tensor().to(torch.int16)
    return t.full_tensor()


class Sharding:
    """How a packed layer is split (module._tp): the mesh, the style, this rank's sizes; builds the local layer."""

    def __init__(self, mesh, style: str, in_local: int, out_local: int, local_perm: Optional[torch.Tensor],
                 split: Optional[dict] = None):
        self.mesh, self.style = mesh, style
        self.split = split or {}  # tensor name -> the dim it is split along (None: replicated)
        self.in_local, self.out_local = in_local, out_local
        self.local_perm = local_perm  # row-parallel act-order: this rank's rows in its own numbering
        self.group = _group(mesh)
        # the local path: tensors in and out, the row-parallel sum one all_reduce (set by the styles for their
        # default layouts); else DTensors in and out, for torch's hooks (~70 us of DTensor bookkeeping a layer on a
        # CPU core: bench/parallel.py)
        self.local_io = False
        self._local: Optional[PackedWeightModule] = None
        self._local_of: tuple = ()

    def __repr__(self) -> str:
        return f"Sharding({self.style}, ranks={self.mesh.size()}, local in/out={self.in_local}/{self.out_local})"

    @staticmethod
    def _watched(module: PackedWeightModule) -> tuple:
        return tuple(module._buffers[n] for n in module.PACKED) + (module._parameters.get("bias"),)

    def local(self, module: PackedWeightModule) -> PackedWeightModule:
        """This rank's shard as a plain layer of module's class over the DTensors' local tensors (no copy); rebuilt
        when a buffer is replaced (.to(), .half())."""
        watched = self._watched(module)
        if self._local is None or any(a is not b for a, b in zip(watched, self._local_of)):
            self._local = self.build_local(module, {n: module._buffers[n] for n in module.PACKED},
                                           module._parameters.get("bias"))
            self._local_of = watched
        return self._local

    def build_local(self, module: PackedWeightModule, packed: dict, bias) -> PackedWeightModule:
        """A plain layer of module's class over the local tensors of `packed` (and, column-parallel, `bias`),
        validated by the format's checks (TypeError/ValueError naming the argument)."""
        with_bias = bias is not None and self.style == COLWISE
        kwargs = dict(bias=with_bias, device="meta")
        if hasattr(module, "group_size"):
            kwargs["group_size"] = module.group_size
        local = type(module)(self.in_local, self.out_local, **kwargs)
        for n, t in packed.items():
            local._buffers[n] = t.to_local() if isinstance(t, DTensor) else t
        if self.local_perm is not None:
            local._buffers["perm"] = self.local_perm.to(local._buffers["qweight"].device)
        if with_bias:
            local.bias = nn.Parameter(bias.to_local() if isinstance(bias, DTensor) else bias, requires_grad=False)
        local.train(module.training)
        local.replan()
        return local

    def forward(self, module: PackedWeightModule, x):
        mesh = self.mesh
        if isinstance(x, DTensor):
            want = _LAYOUTS[self.style][1]  # the input the split needs
            if x.device_mesh != mesh:
                raise ValueError(f"{type(module).__name__}(x): x is a DTensor on another device mesh than the "
                                 f"layer's")
            if x.placements != want:
                x = x.redistribute(placements=list(want))
            x = x.to_local()
        y = self.local(module)(x)  # a plain tensor x is taken as this rank's input: checked there
        if self.local_io:
            if self.style == ROWWISE:
                if mesh.size() > 1:
                    dist.all_reduce(y, group=self.group)
                bias = module._parameters.get("bias")
                if bias is not None:
                    b = bias.to_local() if isinstance(bias, DTensor) else bias
                    y = y + b.to(y.dtype)
            return y
        if self.style == COLWISE:
            shape = (*y.shape[:-1], module.out_features)
            return DTensor.from_local(y, mesh, [Shard(-1)], run_check=False, shape=torch.Size(shape),
                                      stride=torch.empty(shape, device="meta").stride())
        out = DTensor.from_local(y, mesh, [Partial()], run_check=False)
        bias = module._parameters.get("bias")
        if bias is None:
            return out  # the output style reduces it (all-reduce to Replicate, reduce-scatter to Shard)
        total = out.redistribute(placements=[Replicate()]).to_local()
        b = bias.to_local() if isinstance(bias, DTensor) else bias
        return DTensor.from_local(total + b.to(total.dtype), mesh, [Replicate()], run_check=False)


def _install(module: PackedWeightModule, sharding: Sharding, dts: dict, local: PackedWeightModule) -> None:
    """Put the DTensors `dts` (packed names, "bias" when there is one) into the layer, sharded by `sharding`, whose
    local layer `local` was built (and validated) from them."""
    for n in module.PACKED:
        if n in dts:
            module._buffers[n] = dts[n]
    if "bias" in dts:
        module.bias = nn.Parameter(dts["bias"], requires_grad=False)
    module._plan = None
    module._tp = sharding
    sharding._local, sharding._local_of = local, sharding._watched(module)


def shard_(module: PackedWeightModule, mesh, style: str, src_data_rank: Optional[int] = 0,
           name: str = "") -> PackedWeightModule:
    """Split a packed layer's tensors over the 1-D `mesh` in place (`style` "colwise" or "rowwise"): each rank keeps
    its slice, as a DTensor. src_data_rank: the rank whose values every rank takes (torch's styles' argument; None:
    each rank's own, e.g. a model every rank built or loaded identically). The layer is changed only once every
    check has passed. parallelize_module with this module's ColwiseParallel / RowwiseParallel calls this."""
    where = f"{style} sharding of {type(module).__name__}" + (f" '{name}'" if name else "")
    rules = _splits(module)
    if rules is None:
        raise TypeError(f"{where}: expected a turbokernels packed layer (Int4Linear, W4A8Linear, Sparse24Linear, "
                        f"Sparse24Int4Linear), got {type(module).__name__}")
    if style not in rules:
        raise ValueError(f"{where}: style must be '{COLWISE}' or '{ROWWISE}', got {style!r}")
    if module._tp is not None:
        raise ValueError(f"{where}: the layer is already sharded ({module._tp})")
    group = _group(mesh)
    world, rank = mesh.size(), dist.get_rank(group)
    _check_shardable(where, module, style, world)
    split = dict(rules[style])
    if style == ROWWISE and _one_group(module):
        split.update(scales=None, offsets=None)
    tensors = {n: module._buffers[n] for n in module.PACKED}
    bias = module._parameters.get("bias")
    if bias is not None:
        tensors["bias"] = bias.detach()
    full = {n: _broadcast(t, mesh, src_data_rank) for n, t in tensors.items()}
    perm = full.get("perm")
    local_perm = None
    if style == ROWWISE and perm is not None and perm.numel():
        local_perm = _perm_rows(where, perm, rank, world)
    elif perm is not None and not perm.numel():
        split["perm"] = None  # no act-order: an empty tensor, replicated
    local = {}
    for n, t in full.items():
        d = split[n]
        local[n] = t if d is None else t.chunk(world, dim=d)[rank]
    k_local = module.in_features // world if style == ROWWISE else module.in_features
    n_local = module.out_features // world if style == COLWISE else module.out_features
    sharding = Sharding(mesh, style, k_local, n_local, local_perm, split)
    dts = {n: _dtensor(local[n], mesh, split[n], full[n].shape) for n in full}
    # the local layer passes the format's checks before the module is changed
    _install(module, sharding, dts, sharding.build_local(module, {n: dts[n] for n in module.PACKED}, dts.get("bias")))
    return module


def load_local_(module: PackedWeightModule, tensors: dict) -> None:
    """load_state_dict into a sharded layer (nn/_packed.py calls it): `tensors` (packed names and "bias") are whole
    tensors, each rank taking its slice (every rank holds the checkpoint, as after from_pretrained or torch.load),
    or DTensors of the layer's own placements (torch's distributed checkpoint). Everything is checked by the
    format's own checks on this rank's slice before the layer changes (TypeError/ValueError naming the argument).
    Whole tensors get the unsharded layer's dtype rule (`_cast_packed`: the same decision on every rank); DTensors
    keep theirs, and the bias takes the layer's dtype."""
    sharding = module._tp
    world, rank = sharding.mesh.size(), dist.get_rank(sharding.group)
    for n, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"load_state_dict({n}): expected a torch.Tensor, got {type(t).__name__}")
    tensors = dict(tensors)
    packed = [n for n in module.PACKED if n in tensors]
    if packed and not any(isinstance(tensors[n], DTensor) for n in packed):
        tensors.update(module._cast_packed({n: tensors[n] for n in packed}))
    local, shapes = {}, {}
    for n, t in tensors.items():
        current = module._buffers[n] if n in module._buffers else module._parameters["bias"]
        d = sharding.split.get(n)
        if tuple(t.shape) != tuple(current.shape):
            raise ValueError(f"load_state_dict({n}): {n} has shape {tuple(t.shape)}, this tensor-parallel layer's "
                             f"whole {n} is {tuple(current.shape)}")
        if isinstance(t, DTensor):
            want = (Replicate(),) if d is None else (Shard(d),)
            if t.placements != want:
                raise ValueError(f"load_state_dict({n}): a DTensor placed {t.placements}; this layer's {n} is "
                                 f"placed {want}")
            piece = t.to_local()
        else:
            piece = t if d is None else t.chunk(world, dim=d)[rank]
        if n == "bias":
            piece = piece.to(current.dtype)
        local[n] = piece.detach().to(current.device).contiguous()
        shapes[n] = current.shape
    perm = tensors.get("perm")
    local_perm = sharding.local_perm
    if sharding.style == ROWWISE and perm is not None and perm.numel():
        full = perm.full_tensor() if isinstance(perm, DTensor) else perm
        local_perm = _perm_rows(f"load_state_dict into {type(module).__name__}", full.to(torch.int64), rank, world)
    dts = {n: _dtensor(local[n], sharding.mesh, sharding.split.get(n), shapes[n]) for n in local}
    trial = Sharding(sharding.mesh, sharding.style, sharding.in_local, sharding.out_local, local_perm, sharding.split)
    built = trial.build_local(module, {n: dts.get(n, module._buffers[n]) for n in module.PACKED},
                              dts.get("bias", module._parameters.get("bias")))
    sharding.local_perm = local_perm
    _install(module, sharding, dts, built)


def from_local_shard_(module: PackedWeightModule, mesh, style: str, in_features: int,
                      out_features: int) -> PackedWeightModule:
    """The other order: `module` is this rank's shard already (a packed layer built from a sharded nn.Linear's
    local weight); make it the sharded layer of global in_features x out_features, without communication."""
    where = f"{style} sharding of {type(module).__name__}"
    rules = _splits(module)
    world = mesh.size()
    _group(mesh)
    split = dict(rules[style])
    _check_shardable(where, module, style, world, in_features, out_features)
    if style == ROWWISE and _one_group(module):
        raise ValueError(f"{where}: this rank's shard has one group over its {module.in_features} inputs "
                         f"(group_size={module.group_size}), whose scales differ from the whole weight's; quantize "
                         f"before sharding, or use a group size that divides each rank's {module.in_features} inputs")
    if style == ROWWISE and isinstance(module, Int4Linear) and module.perm.numel():
        raise ValueError(f"{where}: act-order on a row-parallel shard is not supported; quantize before sharding")
    tensors = {n: module._buffers[n] for n in module.PACKED}
    if "perm" in tensors and not tensors["perm"].numel():
        split["perm"] = None  # no act-order: an empty tensor, replicated
    bias = module._parameters.get("bias")
    if bias is not None:
        tensors["bias"] = bias.detach()

    def full_shape(n, t):
        d = split[n]
        if d is None:
            return t.shape
        s = list(t.shape)
        s[d] *= world
        return s

    dts = {n: _dtensor(t, mesh, split[n], full_shape(n, t)) for n, t in tensors.items()}
    sharding = Sharding(mesh, style, module.in_features, module.out_features, None, split)
    _install(module, sharding, dts, sharding.build_local(module, {n: dts[n] for n in module.PACKED}, dts.get("bias")))
    module.in_features, module.out_features = in_features, out_features
    return module


def dense_linear(module: PackedWeightModule) -> nn.Linear:
    """restore() of a sharded layer: an nn.Linear holding this rank's shard of the dequantized (or pruned) weight
    as torch's own styles shard one (column-parallel: weight and bias Shard(0); row-parallel: weight Shard(1), bias
    replicated), so the same hooks drive it."""
    sharding = module._tp
    local = sharding.local(module)
    if isinstance(local, Sparse24Linear):
        dense = local.to_dense()
    else:
        dense = local.dequantize(module.bias.dtype if module.bias is not None else local.scales.dtype)
    shape = (module.out_features, module.in_features)
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(_dtensor(dense, sharding.mesh, 0 if sharding.style == COLWISE else 1, shape),
                                 requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    if sharding.local_io:  # the local path had no hooks: torch's own, with the default layouts, drive the linear
        style = _TorchColwise() if sharding.style == COLWISE else _TorchRowwise()
        style.desired_input_layouts = _LAYOUTS[sharding.style][1]
        _with_hooks(style, linear, sharding.mesh)
    return linear


def _hook_partial(hook) -> Optional[partial]:
    """The functools.partial a distribute_module hook lambda calls (its closure), or None."""
    for cell in getattr(hook, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if isinstance(value, partial):
            return value
    return None


def usual_hooks(module: nn.Module, style: str) -> bool:
    """Whether `module`'s forward hooks are exactly those of torch's ColwiseParallel() / RowwiseParallel() with
    their default layouts and a local output (what tp_plan gives): then a packed replacement can take the local
    path instead of carrying the hooks over. Anything unrecognized: False (the hooks are carried over)."""
    pre, post = list(module._forward_pre_hooks.values()), list(module._forward_hooks.values())
    if len(pre) != 1 or len(post) != 1 or module._forward_pre_hooks_with_kwargs or module._forward_hooks_with_kwargs:
        return False
    into, out = _hook_partial(pre[0]), _hook_partial(post[0])
    if into is None or out is None:
        return False
    cls = _TorchColwise if style == COLWISE else _TorchRowwise
    layout_in, desired, layout_out = _LAYOUTS[style]
    return (into.func is cls._prepare_input_fn and out.func is cls._prepare_output_fn
            and tuple(into.args) == (layout_in, desired) and tuple(out.args) == (layout_out, True)
            and not into.keywords and not out.keywords)


def _with_hooks(style, module: nn.Module, device_mesh) -> nn.Module:
    """torch's input/output hooks of `style` (its layouts) on `module`, as torch's own styles install them."""
    return distribute_module(module, device_mesh, None,
                             partial(style._prepare_input_fn, style.input_layouts, style.desired_input_layouts),
                             partial(style._prepare_output_fn, style.output_layouts, style.use_local_output))


def _distribute(style, module: nn.Module, device_mesh, kind: str) -> nn.Module:
    """A packed layer under one of the styles below: split, then either the local path (the style's default
    layouts with a local output, what a transformers model's plan uses; no hooks, no DTensor per call) or torch's
    input/output hooks around a layer that takes and returns DTensors."""
    into, style.desired_input_layouts, out = _LAYOUTS[kind]
    usual = style.use_local_output and style.input_layouts == into and style.output_layouts == out
    shard_(module, device_mesh, kind, style.src_data_rank)
    module._tp.local_io = usual
    return distribute_module(module, device_mesh, None) if usual else _with_hooks(style, module, device_mesh)


class ColwiseParallel(_TorchColwise):
    """torch's ColwiseParallel (same arguments and layouts), which also shards turbokernels' packed layers."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if _splits(module) is None:
            return super()._apply(module, device_mesh)
        return _distribute(self, module, device_mesh, COLWISE)


class RowwiseParallel(_TorchRowwise):
    """torch's RowwiseParallel (same arguments and layouts), which also shards turbokernels' packed layers."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if _splits(module) is None:
            return super()._apply(module, device_mesh)
        return _distribute(self, module, device_mesh, ROWWISE)


# transformers' plan strings -> styles (transformers/distributed/tensor_parallel.py registers the same names)
_HF_STYLES = {
    "colwise": lambda: ColwiseParallel(),
    "rowwise": lambda: RowwiseParallel(),
    "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
    "rowwise_split_input": lambda: RowwiseParallel(input_layouts=Replicate()),
    "embedding_rowwise": lambda: RowwiseParallel(input_layouts=Replicate()),  # vocab-parallel nn.Embedding
}


def tp_plan(model: nn.Module, plan: Optional[dict] = None, *, include_lm_head: bool = False) -> dict:
    """A parallelize_module plan {module name pattern: style} from a transformers model's own tensor-parallel
    plan (config.base_model_tp_plan under the base model's prefix; with include_lm_head, the model's _tp_plan for
    the LM head too), or from `plan` ({pattern: "colwise" | "rowwise" | ...}), with this module's styles, which
    take plain and packed layers alike. A style string it does not know is refused, naming the entry."""
    fn = "tp_plan"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}(model): expected an nn.Module, got {type(model).__name__}")
    if plan is None:
        config = getattr(model, "config", None)
        base = getattr(config, "base_model_tp_plan", None)
        if not base:
            raise ValueError(f"{fn}(model): {type(model).__name__} has no config.base_model_tp_plan (a transformers "
                             f"model that supports tensor parallelism has one); pass plan={{pattern: style}}")
        prefix = getattr(model, "base_model_prefix", "")
        names = {n for n, _ in model.named_children()}
        lead = f"{prefix}." if prefix and prefix in names else ""
        plan = {lead + k: v for k, v in base.items()}
        if include_lm_head:  # the class's own plan (an instance's _tp_plan is the whole model's, filled at init)
            plan.update(getattr(type(model), "_tp_plan", None) or {})
    if not isinstance(plan, dict):
        raise TypeError(f"{fn}(plan): expected a dict {{pattern: style}}, got {type(plan).__name__}")
    out = {}
    for pattern, style in plan.items():
        if style not in _HF_STYLES:
            raise ValueError(f"{fn}(plan): entry {pattern!r}: style {style!r} is not one of {sorted(_HF_STYLES)}")
        out[pattern] = _HF_STYLES[style]()
    matched = {p for p in out if any(fnmatch.fnmatchcase(n, p) for n, _ in model.named_modules())}
    if not matched:
        raise ValueError(f"{fn}(plan): no module of the model matches any of {sorted(out)}")
    return out


def is_sharded(module: nn.Module) -> bool:
    return getattr(module, "_tp", None) is not None


def style_of(weight: torch.Tensor) -> Optional[str]:
    """The style of a sharded nn.Linear weight (out_features, in_features): Shard(0) is column-parallel, Shard(1)
    row-parallel; None for a plain tensor. Anything else (replicated, 2-D meshes, uneven) is refused."""
    if not isinstance(weight, DTensor):
        return None
    placements = weight.placements
    if weight.device_mesh.ndim == 1 and len(placements) == 1 and isinstance(placements[0], Shard):
        if placements[0].dim in (0, -2):
            return COLWISE
        if placements[0].dim in (1, -1):
            return ROWWISE
    raise ValueError(f"a weight distributed as {placements} on a {weight.device_mesh.ndim}-D mesh: only "
                     f"column-parallel (Shard(0)) and row-parallel (Shard(1)) on a 1-D mesh are supported")
