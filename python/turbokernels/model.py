"""Whole-model helpers: swap nn.Linear layers for turbokernels modules, and back.

    tk.model.quantize_int4_(model, group_size=128)   # in place; returns the names of the swapped layers
    tk.model.int4_from_gguf_(model, "model.gguf")    # the file's own Q4_0/Q4_1/Q4_K blocks, no requantization
    tk.model.restore_(model)                          # every Int4Linear back to an nn.Linear (dequantized)

Later op families add their swaps here, so there is one place that walks a model.
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from .formats.int4 import Int4Weight, check_group_size, check_scale_dtype
from .calibration import progress_bar
from .nn import Int4Linear, W4A8Linear

# The output projection's error lands directly on the logits. Measured (bench/e2e.py, SmolLM2-135M, int4 g32, 2026-12):
# with its head quantized too, perplexity on the benchmark's passage +6.6%, mean KL divergence from fp32 0.055, top-1
# token agreement 82%, greedy decode identical for 10 of 32 tokens (body alone: no measurable change). llama.cpp keeps
# `output.weight` at Q6_K/Q8_0 whatever the body's type for the same reason.
DEFAULT_EXCLUDE = ("lm_head", "*.lm_head")


def _swap(fn: str, model: nn.Module, want: Callable[[str, nn.Module], bool],
          make: Callable[[nn.Module], nn.Module]) -> list[str]:
    """Build every replacement first, then install them: an error while converting any layer leaves the whole model
    untouched (no layer swapped), and names the layer."""
    plan = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if want(full, child):
                try:
                    new = make(child)
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"{fn}(model): layer '{full}': {exc}") from exc
                plan.append((module, child_name, full, new))
    for parent, child_name, _, new in plan:
        setattr(parent, child_name, new)
    return [full for _, _, full, _ in plan]


def _excluded(name: str, exclude: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)


def quantize_int4_(model: nn.Module, group_size: int = 128, symmetric: bool = False,
                   exclude: Iterable[str] = DEFAULT_EXCLUDE,
                   include: Optional[Callable[[str, nn.Linear], bool]] = None,
                   scale_dtype: Optional[torch.dtype] = None, w4a8: bool = False) -> list[str]:
    """Replace every nn.Linear of `model` (in place) by an Int4Linear; returns the names replaced.

    exclude: fnmatch patterns of layer names to keep in float (default: the LM head; `exclude=()` quantizes it too:
        faster decode where the head is a large share of the weights (small models, large vocabularies), at a
        measurable quality cost: see DEFAULT_EXCLUDE). A head tied
        to the input embedding is untied by the swap: the embedding keeps its float weight (it reads one row a
        token), the head gets its own int4 copy. transformers' `tie_weights()` (e.g. from resize_token_embeddings)
        cannot re-tie an Int4Linear head: resize first, then quantize.
    include: optional predicate (name, layer) -> bool for finer control.
    scale_dtype: the dtype of each group's scale and offset (default: the layer's for fp16/bf16 layers, fp32 for fp32
        ones). torch.float16 halves what an fp32 model's scales cost (at group size 32 they are a third of the bytes
        a decode step streams: bench/e2e.py's *_f16_scales_* variants) for a relative scale error of at most 2^-11,
        small against int4's own rounding; exact for weights that came from llama.cpp's Q4_0/Q4_1, whose scales
        and minima are fp16.
    w4a8: build W4A8Linear layers instead (opt-in): the activations are quantized to int8 per block of 32 input
        features before each product, which the CPU kernel turns into integer dot products (faster decode on CPUs,
        bench/int4.py; an extra relative RMS error of about 0.5%: reference/w4a8_mm.py). The group size
        must then be a multiple of 32 or -1 (per channel) for the CPU kernel; other sizes run the reference.
    Every replacement is built before any is installed: a layer that cannot be quantized (e.g. a NaN weight) raises
    an error naming it and leaves the whole model unchanged.
    """
    fn = "quantize_int4_"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}(model): expected an nn.Module, got {type(model).__name__}")
    check_group_size(group_size, f"{fn}(group_size)")
    exclude = _check_filters(fn, exclude, include)
    check_scale_dtype(scale_dtype, f"{fn}(scale_dtype)")
    if not isinstance(w4a8, bool):
        raise TypeError(f"{fn}(w4a8): expected a bool, got {type(w4a8).__name__}")
    cls = W4A8Linear if w4a8 else Int4Linear

    def want(name, module):
        return (type(module) is nn.Linear and not _excluded(name, exclude)
                and (include is None or include(name, module)))

    def make(linear):
        layer = cls.from_linear(linear, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype)
        return layer.to(linear.weight.device)

    return _swap(fn, model, want, make)


def _check_filters(fn: str, exclude, include) -> tuple:
    patterns = tuple(exclude) if not isinstance(exclude, str) and hasattr(exclude, "__iter__") else None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{fn}(exclude): expected an iterable of fnmatch patterns (str), got "
                        f"{type(exclude).__name__ if patterns is None else repr(patterns)}")
    if include is not None and not callable(include):
        raise TypeError(f"{fn}(include): expected a callable (name, layer) -> bool, got {type(include).__name__}")
    return patterns


def _gguf_field(reader, key: str):
    import gguf
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types[0] == gguf.GGUFValueType.STRING else value.tolist()[0]


def _row_orders(n: int, heads: Iterable[int]):
    """Candidate orders of a GGUF tensor's output rows: as stored, then with llama.cpp's q/k interleave undone for
    each head count (convert_hf_to_gguf.py permutes the rows of q and k per head; transformers' GGUF loader
    reverses it with n_head for q and n_kv_head for k)."""
    yield "", None
    for h in heads:
        if h > 0 and n % (2 * h) == 0:
            order = torch.arange(n).reshape(h, n // h // 2, 2).transpose(1, 2).reshape(n)
            yield f", llama.cpp's q/k row order undone ({h} heads)", order


def int4_from_gguf_(model: nn.Module, path, exclude: Iterable[str] = DEFAULT_EXCLUDE,
                    include: Optional[Callable[[str, nn.Linear], bool]] = None) -> dict[str, str]:
    """Swap the nn.Linear layers of a model loaded from a GGUF file (transformers' `gguf_file=`, which dequantizes
    every tensor) for Int4Linear layers holding that file's own 4-bit blocks, in place: Q4_0, Q4_1 and Q4_K tensors
    become group-size-32 Int4Weights losslessly (Int4Weight.from_gguf) -- no dequantize-then-requantize.

    Each layer's tensor is found by the `gguf` package's name map for the file's architecture, and taken only when
    its dequantized weight equals the layer's bit for bit (as stored, or with llama.cpp's q/k row interleave
    undone): a file that is not the model's, a name the map misses or a layer changed since loading keeps its float
    weight, and the report says why. Tensors of other types (Q8_0, Q6_K, F16...) stay float. exclude / include:
    as quantize_int4_ (default: the LM head stays float). Returns {name: what happened} for every nn.Linear.
    Every replacement is built before any is installed."""
    fn = "int4_from_gguf_"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}(model): expected an nn.Module, got {type(model).__name__}")
    import os
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}(path): expected a path to a .gguf file, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{fn}(path): no such file: {os.fspath(path)!r}")
    exclude = _check_filters(fn, exclude, include)
    try:
        import gguf
    except ImportError as exc:
        raise ImportError(f"{fn}: reading GGUF files needs the gguf package (pip install gguf)") from exc
    from .formats.int4_importers import GGUF_BLOCK, GGUF_TYPES
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError/struct errors/... on a file that is not GGUF
        raise ValueError(f"{fn}(path): {os.fspath(path)!r} is not a readable GGUF file ({exc})") from exc
    arch = _gguf_field(reader, "general.architecture")
    arch_id = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    blocks = _gguf_field(reader, f"{arch}.block_count") if arch else None
    if arch_id is None or not isinstance(blocks, int):
        raise ValueError(f"{fn}(path): the file's architecture {arch!r} (block count {blocks!r}) is not one the "
                         f"gguf package {getattr(gguf, '__version__', '')} can map to module names")
    names = gguf.get_tensor_name_map(arch_id, blocks)
    tensors = {t.name: t for t in reader.tensors}
    config = getattr(model, "config", None)
    heads = sorted({h for h in (getattr(config, "num_attention_heads", None),
                                getattr(config, "num_key_value_heads", None)) if isinstance(h, int)})
    report: dict[str, str] = {}
    built: dict[int, nn.Module] = {}  # id(layer) -> its replacement (_swap's make sees the layer, not its name)

    def want(name, module):
        if type(module) is not nn.Linear:
            return False
        if _excluded(name, exclude) or (include is not None and not include(name, module)):
            report[name] = "kept float: excluded"
            return False
        tname = names.get_name(name + ".weight", try_suffixes=(".weight",))
        t = tensors.get(tname) if tname else None
        if t is None:
            report[name] = "kept float: no tensor of the file maps to this layer"
            return False
        kind = t.tensor_type.name
        if kind not in GGUF_TYPES:
            report[name] = f"kept float: {tname} is {kind}"
            return False
        K, N = (int(v) for v in t.shape)  # GGUF lists ne0 = K first
        if (N, K) != (module.out_features, module.in_features):
            report[name] = f"kept float: {tname} is {N} x {K}, the layer {module.out_features} x {module.in_features}"
            return False
        w = Int4Weight.from_gguf(t.data, t.tensor_type, (N, K))
        target = module.weight.detach()
        deq = w.dequantize(torch.float32).to(device=target.device, dtype=target.dtype)
        for how, order in _row_orders(N, heads):
            if torch.equal(deq if order is None else deq[order.to(deq.device)], target):
                if order is not None:
                    w = Int4Weight(w.qweight[:, order].contiguous(), w.scales[:, order].contiguous(),
                                   w.offsets[:, order].contiguous(), GGUF_BLOCK, K)
                bias = None if module.bias is None else module.bias.detach()
                built[id(module)] = Int4Linear.from_weight(w, bias).to(target.device)
                report[name] = f"Int4Linear <- {kind} {tname} (lossless, g{GGUF_BLOCK}{how})"
                return True
        report[name] = f"kept float: {tname} ({kind}) does not dequantize to this layer's weight"
        return False

    _swap(fn, model, want, lambda linear: built[id(linear)])
    return report


# ---- optimize / restore: every technique in one call, and the way back ---------------------------------------------
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
QUANT_METHODS = ("rtn", "gptq")
_PREVIOUS_ATTN = "_turbokernels_previous_attn_implementation"  # set on a model whose attention optimize() switched


def _name_filter(fn: str, arg: str, value, default: bool):
    """include / exclude: fnmatch patterns (a str or an iterable of them) or a predicate (name, module) -> bool.
    Returns a predicate; None gives `default` for every layer."""
    if value is None:
        return lambda name, module: default
    if callable(value):
        return lambda name, module: bool(value(name, module))
    patterns = (value,) if isinstance(value, str) else tuple(value) if hasattr(value, "__iter__") else None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{fn}({arg}): expected fnmatch patterns of module names (a str or an iterable of str) or a "
                        f"predicate (name, module) -> bool, got {type(value).__name__}")
    return lambda name, module: _excluded(name, patterns)


def _as_linear(module: nn.Module) -> Optional[nn.Linear]:
    """nn.Linear as is; transformers' Conv1D (GPT-2: weight stored (in, out), y = x W + b) as the equivalent
    nn.Linear, on the meta device but with the same tensors; anything else None."""
    if type(module) is nn.Linear:
        return module
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
        weight = module.weight
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.detach().t(), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
        return linear
    return None


def optimize(model: nn.Module, *, attention: bool = True, int4: bool = False, sparse24: bool = False,
             group_size: int = 128, symmetric: bool = False, quant_method: str = "rtn", act_order: bool = False,
             prune_method: str = "magnitude", calibration=None, include=None,
             exclude=DEFAULT_EXCLUDE, progress: bool = True) -> dict[str, str]:
    """Swap turbokernels into `model`, in place; returns {module name: what it became, or why it was kept}.

    attention: a Hugging Face model's attention implementation becomes "turbokernels" (the previous one is
        remembered for restore()), and every nn.MultiheadAttention becomes turbokernels.nn.MultiheadAttention.
    int4: each nn.Linear (and transformers' Conv1D, GPT-2) becomes an Int4Linear on a grid per group of
        `group_size` input features (`symmetric` for symmetric grids), by `quant_method`: "rtn" (round to nearest)
        or "gptq" (compress/gptq.py: rounding errors moved onto the not yet quantized inputs, weighted by the
        layer's input Hessian over `calibration`; `act_order` walks the most active inputs first).
    sparse24: each becomes a Sparse24Linear, pruned to 2:4 by `prune_method`: "magnitude"; "wanda" (|w| times
        the L2 norm of its input feature over `calibration`); or "sparsegpt" (compress/sparsegpt.py: the mask of
        each 4 inputs chosen and the kept weights updated column by column to undo what pruning did to the layer's
        output on `calibration`, like GPTQ). 2:4 pruning costs quality (one-shot magnitude pruning of a small LLM
        raises its perplexity many-fold); it is never on by default. int4 and sparse24 together give
        Sparse24Int4Linear: the kept weights rounded to nearest, or with quant_method="gptq" (prune_method
        "sparsegpt") pruned and quantized in one walk.
    calibration: an iterable of model inputs (a tensor, a tuple of positional arguments or a dict of keyword
        arguments each), for "gptq", "wanda" and "sparsegpt". Layer by layer when the model's blocks form a chain
        (calibration.py): each block calibrated on the outputs of the blocks already compressed, one block's
        statistics in memory at a time; the report's "<calibration>" says how it went.
    include / exclude: fnmatch patterns of module names or a predicate (name, module) -> bool; by default every
        linear but the LM head (DEFAULT_EXCLUDE).
    progress: a progress bar over the layers (tqdm, when installed) on stderr; False: silent.
    Every replacement is built before any is installed: an error (a bad argument, a layer that cannot be
    converted) leaves the model as it was. restore(model) undoes it all.
    """
    fn = "optimize"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}(model): expected an nn.Module, got {type(model).__name__}")
    for arg, v in (("attention", attention), ("int4", int4), ("sparse24", sparse24), ("symmetric", symmetric),
                   ("act_order", act_order), ("progress", progress)):
        if not isinstance(v, bool):
            raise TypeError(f"{fn}({arg}): expected a bool, got {type(v).__name__}")
    if not (attention or int4 or sparse24):
        raise ValueError(f"{fn}(attention, int4, sparse24): all False: nothing to do")
    if int4 and sparse24:
        from .formats.sparse24_int4 import check_dense_group_size
        check_dense_group_size(group_size, f"{fn}(group_size)")
    elif int4:
        check_group_size(group_size, f"{fn}(group_size)")
    if prune_method not in PRUNE_METHODS:
        raise ValueError(f"{fn}(prune_method): expected one of {PRUNE_METHODS}, got {prune_method!r}")
    if quant_method not in QUANT_METHODS:
        raise ValueError(f"{fn}(quant_method): expected one of {QUANT_METHODS}, got {quant_method!r}")
    gptq = int4 and quant_method == "gptq"
    if quant_method == "gptq" and not int4:
        raise ValueError(f"{fn}(quant_method): 'gptq' quantizes to int4: it needs int4=True")
    if prune_method != "magnitude" and not sparse24:
        raise ValueError(f"{fn}(prune_method): {prune_method!r} prunes to 2:4: it needs sparse24=True")
    wanda, sparsegpt = sparse24 and prune_method == "wanda", sparse24 and prune_method == "sparsegpt"
    if gptq and sparse24 and not sparsegpt:
        raise ValueError(f"{fn}(quant_method): 'gptq' with sparse24=True takes prune_method='sparsegpt' (pruning "
                         f"and quantization in one walk), got prune_method={prune_method!r}")
    if act_order and not (gptq and not sparse24):
        raise ValueError(f"{fn}(act_order): only quant_method='gptq' without sparse24 has an order to choose")
    calibrated = wanda or gptq or sparsegpt
    if calibration is not None and not calibrated:
        raise ValueError(f"{fn}(calibration): only prune_method='wanda' or 'sparsegpt' (sparse24=True) and "
                         f"quant_method='gptq' (int4=True) use calibration data")
    if calibration is not None:
        from .calibration import calibration_items
        calibration = calibration_items(fn, calibration)
    if calibrated and calibration is None:
        needs = f"prune_method={prune_method!r}" if sparse24 and prune_method != "magnitude" else \
            "quant_method='gptq'"
        raise ValueError(f"{fn}(calibration): {needs} needs "
                         f"calibration inputs (an iterable of model inputs) to measure each layer's inputs")
    included = _name_filter(fn, "include", include, True)
    excluded = _name_filter(fn, "exclude", exclude, False)
    report: dict[str, str] = {}

    # which linears, and what each becomes
    linears: dict[str, nn.Linear] = {}
    if int4 or sparse24:
        for name, module in model.named_modules():
            linear = _as_linear(module)
            if linear is None:
                continue
            if not name:  # _swap replaces children; a bare layer has no parent to hold its replacement
                report["<model>"] = "kept: the model itself is a linear layer (use the turbokernels.nn modules' " \
                                    "from_linear)"
                continue
            if excluded(name, module) or not included(name, module):
                report[name] = "kept: excluded"
            elif sparse24 and linear.in_features % 4:
                report[name] = f"kept: in_features={linear.in_features} is not a multiple of 4 (2:4 sparsity)"
            elif linear.weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                report[name] = f"kept: weight dtype {linear.weight.dtype}"
            else:
                linears[name] = linear
    from .nn import MultiheadAttention as TkMultiheadAttention, Sparse24Int4Linear, Sparse24Linear
    modules = dict(model.named_modules())
    bias = {name: None if linear.bias is None else linear.bias.detach() for name, linear in linears.items()}
    sym = ", symmetric" if symmetric else ""

    # tensor-parallel linears (torch's ColwiseParallel / RowwiseParallel): each rank's shard is compressed and
    # sharded the same way (parallel.from_local_shard_); quantizing a group-aligned shard gives the whole weight's
    # groups exactly
    sharded = {}
    for name, linear in linears.items():
        try:
            style = _tp_style(linear)
        except ValueError as exc:
            raise ValueError(f"{fn}(model): layer '{name}': {exc}") from exc
        if style is not None:
            sharded[name] = style
    if sharded and calibrated:
        raise ValueError(f"{fn}(model): layer '{next(iter(sharded))}' is tensor-parallel: calibrated methods "
                         f"(gptq, wanda, sparsegpt) run before sharding; optimize the unsharded model, then shard it")

    def make(name: str, stat) -> nn.Module:
        """The replacement of linear `name`, given its calibration statistic (None without calibration)."""
        linear = linears[name]
        if name in sharded:
            linear = _local_linear(linear)
        w = linear.weight.detach()
        try:
            if sparsegpt and int4 and quant_method == "gptq":
                from .compress.sparsegpt import sparsegpt_24_int4
                new = Sparse24Int4Linear.from_weight(
                    sparsegpt_24_int4(w, stat.hessian(), group_size=group_size, symmetric=symmetric), bias[name])
                what = f"Sparse24Int4Linear (2:4 SparseGPT + int4 g{group_size}{sym} in one walk)"
            elif sparsegpt:
                from .compress.sparsegpt import sparsegpt_24
                from .formats.sparse24 import Sparse24Weight
                pruned = Sparse24Weight.from_dense(sparsegpt_24(w, stat.hessian()))
                if int4:
                    from .formats.sparse24_int4 import Sparse24Int4Weight
                    new = Sparse24Int4Linear.from_weight(
                        Sparse24Int4Weight.from_sparse24(pruned, group_size, symmetric), bias[name])
                    what = f"Sparse24Int4Linear (2:4 sparsegpt, int4 g{group_size}{sym})"
                else:
                    new = Sparse24Linear.from_weight(pruned, bias[name])
                    what = "Sparse24Linear (2:4 sparsegpt)"
            elif int4 and sparse24:
                new = Sparse24Int4Linear.from_linear(linear, group_size=group_size, method=prune_method,
                                                     activation_norm=stat, symmetric=symmetric)
                what = f"Sparse24Int4Linear (2:4 {prune_method}, int4 g{group_size}{sym})"
            elif sparse24:
                new = Sparse24Linear.from_linear(linear, method=prune_method, activation_norm=stat)
                what = f"Sparse24Linear (2:4 {prune_method})"
            elif gptq:
                from .compress.gptq import gptq_quantize
                weight = gptq_quantize(w, stat.hessian(), group_size=group_size, symmetric=symmetric,
                                       act_order=act_order)
                new = Int4Linear.from_weight(weight, bias[name])
                what = f"Int4Linear (g{group_size}{sym}, GPTQ{', act-order' if act_order else ''})"
            else:
                new = Int4Linear.from_linear(linear, group_size=group_size, symmetric=symmetric)
                what = f"Int4Linear (g{group_size}{sym})"
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{fn}(model): layer '{name}': {exc}") from exc
        report[name] = what + (" from Conv1D" if modules[name] is not linear and name not in sharded else "")
        if name in sharded:
            from . import parallel
            whole = linears[name]
            try:
                parallel.from_local_shard_(new, whole.weight.device_mesh, sharded[name], whole.in_features,
                                           whole.out_features)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{fn}(model): layer '{name}': {exc}") from exc
            if parallel.usual_hooks(modules[name], sharded[name]):  # torch's default layouts: the local path
                new._tp.local_io = True
            else:
                _copy_hooks(modules[name], new)
            report[name] += f", {sharded[name]} shard"
        return new.to(w.device)

    built: dict[int, nn.Module] = {}
    if calibrated and linears:
        from .calibration import calibrate
        made, how = calibrate(fn, model, {n: modules[n] for n in linears}, calibration, hessians=not wanda,
                              build=make, progress=progress)
        report["<calibration>"] = how
        for name in linears:
            if name in made:
                built[id(modules[name])] = made[name]
            else:
                report[name] = "kept: the calibration inputs never reached it"
    else:
        for name in progress_bar(list(linears), progress and len(linears) > 1, fn):
            built[id(modules[name])] = make(name, None)
    if attention:
        for name, module in model.named_modules():
            if type(module) is nn.MultiheadAttention:
                if not name:
                    report["<model>"] = "kept: the model itself is an nn.MultiheadAttention (use " \
                                        "turbokernels.nn.MultiheadAttention.from_module)"
                    continue
                built[id(module)] = TkMultiheadAttention.from_module(module)
                report[name] = "turbokernels.nn.MultiheadAttention"

    # the attention implementation first (the one step that may still raise), then the swaps, which cannot
    if attention and hasattr(getattr(model, "config", None), "_attn_implementation"):
        from .integrations import transformers as tkt
        tkt.register()
        previous = model.config._attn_implementation
        if previous != tkt.NAME:
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation(tkt.NAME)
            else:  # transformers before set_attn_implementation: the attribute it sets
                model.config._attn_implementation = tkt.NAME
            setattr(model, _PREVIOUS_ATTN, previous)
        report["<attention>"] = f"transformers attention implementation '{tkt.NAME}' (was '{previous}')"
    elif attention and not any(v == "turbokernels.nn.MultiheadAttention" for v in report.values()):
        report["<attention>"] = "kept: no transformers attention interface and no nn.MultiheadAttention"
    _swap(fn, model, lambda name, module: id(module) in built, lambda module: built[id(module)])
    return report


def _tp_style(linear: nn.Linear) -> Optional[str]:
    """'colwise' / 'rowwise' for a linear sharded by torch's tensor-parallel styles, None for a plain one."""
    if not _is_dtensor(linear.weight):
        return None
    if "forward" in linear.__dict__:  # transformers' own loader (from_pretrained(tp_plan=...)) replaces forward
        raise ValueError("sharded by transformers' tensor-parallel loader, whose forward turbokernels cannot carry "
                         "over; optimize the unsharded model, or shard it with torch's parallelize_module")
    from . import parallel
    return parallel.style_of(linear.weight)


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _local_linear(linear: nn.Linear) -> nn.Linear:
    """This rank's shard of a tensor-parallel nn.Linear as a plain one (no copy)."""
    w = linear.weight.detach().to_local()
    local = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device="meta")
    local.weight = nn.Parameter(w, requires_grad=False)
    if linear.bias is not None:
        local.bias = nn.Parameter(linear.bias.detach().to_local(), requires_grad=False)
    return local


_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
          "_forward_hooks_always_called")


def _copy_hooks(old: nn.Module, new: nn.Module) -> None:
    """The forward hooks a parallel style installed (they take the module as an argument: any module serves)."""
    for attr in _HOOKS:
        if hasattr(old, attr):
            getattr(new, attr).update(getattr(old, attr))


def _dense_linear(layer: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear holding `weight` (out_features, in_features) and a copy of the layer's bias: the way back."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return linear


def restore(model: nn.Module) -> dict[str, str]:
    """Undo optimize(): Int4Linear / W4A8Linear / Sparse24Linear / Sparse24Int4Linear back to nn.Linear holding the
    dequantized (or pruned) weight, turbokernels.nn.MultiheadAttention back to nn.MultiheadAttention, and a Hugging
    Face model's attention implementation back to what it was. Returns {name: what it became}. Every replacement
    is built before any is installed."""
    fn = "restore"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}(model): expected an nn.Module, got {type(model).__name__}")
    from .nn import MultiheadAttention as TkMultiheadAttention, Sparse24Int4Linear, Sparse24Linear
    from .nn.multihead_attention import mha_config, mha_weight
    report: dict[str, str] = {}
    built: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        if not name:  # the model itself: _swap replaces children only
            continue
        if getattr(module, "_tp", None) is not None:  # tensor-parallel: this rank's shard, as torch shards a linear
            from . import parallel
            built[id(module)] = parallel.dense_linear(module)
            _copy_hooks(module, built[id(module)])
            report[name] = f"nn.Linear (from {type(module).__name__}, {module._tp.style} shard)"
            continue
        if isinstance(module, (Int4Linear, Sparse24Int4Linear)):
            dtype = module.bias.dtype if module.bias is not None else module.scales.dtype
            dense = module.dequantize(dtype)
        elif isinstance(module, Sparse24Linear):
            dense = module.to_dense()
        elif isinstance(module, TkMultiheadAttention):
            p = mha_weight(module)
            mha = nn.MultiheadAttention(**mha_config(module), device=p.device, dtype=p.dtype)
            mha.load_state_dict(module.state_dict())
            mha.train(module.training)
            built[id(module)] = mha
            report[name] = "nn.MultiheadAttention"
            continue
        else:
            continue
        built[id(module)] = _dense_linear(module, dense)
        report[name] = f"nn.Linear (from {type(module).__name__})"
    _swap(fn, model, lambda name, module: id(module) in built, lambda module: built[id(module)])
    previous = getattr(model, _PREVIOUS_ATTN, None)
    if previous is not None:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(previous)
        else:
            model.config._attn_implementation = previous
        delattr(model, _PREVIOUS_ATTN)
        report["<attention>"] = f"transformers attention implementation '{previous}'"
    return report


def restore_(model: nn.Module) -> list[str]:
    """Replace every Int4Linear by an nn.Linear holding its dequantized weight (the way back). Every layer's tensors
    are validated (Int4Weight's checks) and every replacement built before any is installed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"restore_(model): expected an nn.Module, got {type(model).__name__}")

    def make(layer: Int4Linear) -> nn.Linear:
        dtype = layer.bias.dtype if layer.bias is not None else layer.scales.dtype
        weight = Int4Weight(layer.qweight, layer.scales, layer.offsets, layer.group_size, layer.in_features,
                            layer.perm if layer.perm.numel() else None)
        return _dense_linear(layer, weight.dequantize(dtype))

    return _swap("restore_", model, lambda name, m: isinstance(m, Int4Linear), make)


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the weights of the linear layers (nn.Linear's weight, a turbokernels layer's packed buffers:
    int4 words, scales, offsets, 2:4 values and metadata): what compression shrinks."""
    from .nn._packed import PackedWeightModule
    total = 0
    for m in model.modules():
        if isinstance(m, PackedWeightModule):
            total += sum(t.numel() * t.element_size() for n in m.PACKED
                         if isinstance(t := m._buffers.get(n), torch.Tensor))
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total
