"""Calibration: what optimize() learns about each layer's inputs by running the model on sample inputs.

GPTQ and SparseGPT need each layer's input Hessian (sum of x x^T over calibration tokens), Wanda the L2 norm of each
input feature. Both are captured by forward pre-hooks while calibration inputs run through the model.

Layer by layer, as GPTQ's and SparseGPT's reference code do: the model's repeated blocks (the nn.ModuleList holding
most of the layers to compress, e.g. a decoder's `model.layers`) are calibrated one at a time. The inputs of the
first block are captured once (the model's forward is stopped there); each block then runs on them with hooks on
its layers, its layers are compressed and put in place, and the block runs again to give the next block its inputs
-- so every block is calibrated on what the already compressed blocks before it produce, and only one block's
statistics are alive at a time (a Hessian is in_features^2 float32: a whole 1B-parameter model's at once would not
fit in 24 GiB). Layers outside the blocks (an included LM head, a pooler) get one pass over the whole model at the
end. Before relying on the blocks being a chain, the first pass checks it: block 0's output, computed from its
captured inputs, must be what block 1 received, with the same keyword arguments; a model where that does not hold
(per-block attention masks, blocks not run in order) is calibrated in one pass over the float model instead, and the
report says which was used.

The calibration inputs are kept (the first block's inputs, one hidden state per input); the cache of a Hugging Face
model is turned off while calibrating (a block run twice would otherwise append its keys twice).
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
from torch import nn


def progress_bar(items: list, enabled: bool, desc: str):
    """items, with a tqdm bar on stderr when enabled and tqdm is installed."""
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False)


def calibration_items(fn: str, calibration) -> list:
    """The calibration inputs, checked, as a list (they are run more than once)."""
    if calibration is None or isinstance(calibration, (str, bytes)) or not hasattr(calibration, "__iter__"):
        raise TypeError(f"{fn}(calibration): expected an iterable of model inputs (tensors, tuples or dicts of "
                        f"them), got {type(calibration).__name__}")
    items = list(calibration)
    if not items:
        raise ValueError(f"{fn}(calibration): is empty; it needs at least one batch of model inputs")
    return items


def run_model(model: nn.Module, item) -> None:
    """One calibration input through the model: a dict as keyword arguments, a tuple/list as positional ones; a
    model whose forward takes `use_cache` gets use_cache=False."""
    extra = {"use_cache": False} if "use_cache" in _parameters(model) else {}
    if isinstance(item, dict):
        model(**{**item, **extra})
    elif isinstance(item, (tuple, list)):
        model(*item, **extra)
    else:
        model(item, **extra)


def _parameters(model: nn.Module):
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}


def capture(fn: str, forward: Callable, layers: dict, items: list, hessians: bool) -> dict:
    """Run forward(item) for each item (no gradients) with a forward pre-hook on each of `layers` ({name: module});
    returns {name: statistic} for the layers the inputs reached: the L2 norm of each input feature over all tokens
    (Wanda's), or with hessians=True a HessianAccumulator of x x^T (GPTQ's and SparseGPT's; float32 sums).
    Layers fed the very same tensor (q/k/v, gate/up: found on the first item, whose tensors are kept alive until
    then so that identity means the same tensor) share one statistic. The hooks are always removed."""
    from .compress.gptq import HessianAccumulator
    first: dict[str, list] = {}  # the first item's tensors per layer (a layer may be called more than once)
    stats: dict = {}
    leader: dict[str, bool] = {}  # after the first item: does this layer add to its (maybe shared) statistic
    first_item = True
    handles = []

    def new_stat(x):
        return (HessianAccumulator(x.shape[-1], x.device, torch.float32) if hessians
                else torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device))

    def add(stat, x):
        if hessians:
            stat.add(x)
        else:
            stat.add_(x.reshape(-1, x.shape[-1]).to(torch.float32).square().sum(0))

    def hook_for(name):
        def hook(module, args):
            if first_item:  # keep the tensor itself (identity: not a detached alias), group after this item
                first.setdefault(name, []).append(args[0])
                return
            if name not in leader:  # reached only after the first item
                leader[name], stats[name] = True, new_stat(args[0])
            if leader[name]:
                add(stats[name], args[0].detach())
        return hook

    def group_first_item():
        """Layers whose first-item calls saw the very same tensors share one statistic, its first layer adds."""
        groups: list[list[str]] = []
        for name, xs in first.items():
            group = next((g for g in groups if len(first[g[0]]) == len(xs)
                          and all(a is b for a, b in zip(first[g[0]], xs))), None)
            (group.append(name) if group is not None else groups.append([name]))
        for group in groups:
            stat = new_stat(first[group[0]][0])
            for x in first[group[0]]:
                add(stat, x.detach())
            for j, name in enumerate(group):
                stats[name], leader[name] = stat, j == 0
        first.clear()

    try:
        for name, module in layers.items():
            handles.append(module.register_forward_pre_hook(hook_for(name)))
        with torch.no_grad():
            for i, item in enumerate(items):
                forward(item)
                if i == 0:
                    group_first_item()
                    first_item = False  # the hooks read it through their closure
    finally:
        for h in handles:
            h.remove()
    if hessians:
        return stats
    return {name: sq.sqrt() for name, sq in stats.items()}  # a group's layers share one sum, added by its leader


# ---- layer by layer ------------------------------------------------------------------------------------------------
class _Reached(Exception):
    """Raised by the pre-hook that stops the model's forward where the captured block inputs are complete."""


def find_blocks(model: nn.Module, layers: dict) -> Optional[tuple[str, nn.ModuleList]]:
    """(name, list) of the nn.ModuleList holding most of `layers` in its children, or None."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name:
            count = sum(n.startswith(name + ".") for n in layers)
            if count > best_count:
                best, best_count = (name, module), count
    return best


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _no_cache(value):
    """A transformers Cache among a block's arguments becomes None: calibration keeps no keys and values."""
    return None if type(value).__name__.endswith("Cache") and hasattr(value, "update") else value


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # objects without a usable == (a mask function...): the same object or not
        return a is b


@torch.no_grad()
def block_inputs(model: nn.Module, blocks: nn.ModuleList, items: list) -> tuple[list, Optional[str]]:
    """The (args, kwargs) each calibration item gives blocks[0], and None when the blocks form a chain (block 1
    receives block 0's output and the same other arguments), else why not."""
    captured: dict[int, list] = {0: [], 1: []}
    stop_at = 1 if len(blocks) > 1 else 0

    def hook_for(i):
        def hook(module, args, kwargs):
            captured[i].append((tuple(_no_cache(a) for a in args), {k: _no_cache(v) for k, v in kwargs.items()}))
            if i == stop_at:
                raise _Reached
        return hook

    handles = [blocks[i].register_forward_pre_hook(hook_for(i), with_kwargs=True) for i in range(stop_at + 1)]
    try:
        for item in items:
            try:
                run_model(model, item)
            except _Reached:
                pass
    finally:
        for h in handles:
            h.remove()
    inputs = captured[0]
    if stop_at == 0 or not inputs:
        return inputs, None
    if len(captured[1]) != len(inputs):
        return inputs, "the blocks are not each run once per input"
    for (args0, kw0), (args1, kw1) in zip(inputs, captured[1]):
        out = _block_output(blocks[0](*args0, **kw0))
        if not (args1 and isinstance(args1[0], torch.Tensor) and out.shape == args1[0].shape
                and torch.allclose(out, args1[0], rtol=1e-5, atol=1e-6)):
            return inputs, "block 1 does not receive block 0's output"
        if not (_same(args0[1:], args1[1:]) and _same(kw0, kw1)):
            return inputs, "the blocks receive different arguments (e.g. per-block attention masks)"
    return inputs, None


def calibrate(fn: str, model: nn.Module, layers: dict, calibration, hessians: bool,
              build: Callable[[str, object], nn.Module], progress: bool = False) -> tuple[dict, str]:
    """Capture each of `layers`' ({name: module}) statistic and call build(name, statistic) -> its replacement,
    layer by layer when the model has a chain of blocks (module docstring). Returns ({name: replacement} for the
    layers the inputs reached, how it was done). Replacements are put in place only while calibrating: on return,
    and on any error, the model holds its original modules."""
    items = calibration_items(fn, calibration)
    built: dict[str, nn.Module] = {}
    installed: list = []  # (parent, attribute, original), undone at the end

    def install(name, new):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        installed.append((parent, attr, getattr(parent, attr)))
        setattr(parent, attr, new)

    def build_all(names, stats):
        for name in names:
            if name in stats:
                built[name] = build(name, stats[name])

    found = find_blocks(model, layers)
    how = "one pass over the model"
    try:
        with torch.no_grad():
            if found is not None:
                prefix, blocks = found
                inputs, why_not = block_inputs(model, blocks, items)
                if why_not is not None:
                    how += f" (not layer by layer: {why_not})"
                else:
                    how = f"layer by layer over {prefix} ({len(blocks)} blocks)"
                    for i, block in enumerate(progress_bar(list(blocks), progress, f"{fn}: calibrating {prefix}")):
                        names = [n for n in layers if n.startswith(f"{prefix}.{i}.")]
                        if names and inputs:
                            stats = capture(fn, lambda inp: block(*inp[0], **inp[1]),
                                            {n: layers[n] for n in names}, inputs, hessians)
                            build_all(names, stats)
                            for n in names:
                                if n in built:
                                    install(n, built[n])
                            del stats
                        if i + 1 < len(blocks):
                            inputs = [((_block_output(block(*args, **kw)),) + tuple(args[1:]), kw)
                                      for args, kw in inputs]
            rest = [n for n in layers if n not in built and not (how.startswith("layer by layer")
                                                                 and n.startswith(found[0] + "."))]
            if rest:
                stats = capture(fn, lambda item: run_model(model, item), {n: layers[n] for n in rest}, items, hessians)
                build_all(rest, stats)
    finally:
        for parent, attr, original in reversed(installed):
            setattr(parent, attr, original)
    return built, how
