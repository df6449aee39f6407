"""Save an optimized model and load it back bit for bit.

    tk.save_pretrained(model, "out/")            # out/model.safetensors + out/turbokernels.json
    model = tk.from_pretrained("out/")           # a Hugging Face model rebuilt from the saved config, or
    tk.from_pretrained("out/", model=skeleton)   # the same architecture built by the caller, loaded in place

turbokernels.json describes every swapped module (its type and constructor arguments), the tensors that share
storage (a tied LM head is written once), the attention implementation optimize() set, and for a Hugging Face model
its class and config. Loading builds every replacement, loads and validates every tensor (shapes, dtypes, packed
formats) before it touches the target: a checkpoint that does not fit is refused with an error naming what differs,
and the target model is left as it was.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from .model import _PREVIOUS_ATTN, _as_linear, _is_dtensor, _swap

FORMAT = "turbokernels/1"
WEIGHTS = "model.safetensors"
CONFIG = "turbokernels.json"
_DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def _safetensors(fn: str):
    try:
        import safetensors.torch
    except ImportError as exc:
        raise ImportError(f"{fn}: needs the safetensors package (pip install safetensors)") from exc
    return safetensors.torch


def _describe(module: nn.Module) -> Optional[dict]:
    """The type and constructor arguments of a turbokernels module, or None for anything else."""
    from .nn import Int4Linear, MultiheadAttention, Sparse24Int4Linear, Sparse24Linear, W4A8Linear
    from .nn.multihead_attention import mha_config, mha_weight
    bias = getattr(module, "bias", None) is not None
    if isinstance(module, (Int4Linear, Sparse24Int4Linear)):  # W4A8Linear is an Int4Linear
        kind = "W4A8Linear" if isinstance(module, W4A8Linear) else type(module).__name__
        return dict(type=kind, in_features=module.in_features, out_features=module.out_features, bias=bias,
                    group_size=module.group_size, dtype=str(module.scales.dtype))
    if isinstance(module, Sparse24Linear):
        return dict(type="Sparse24Linear", in_features=module.in_features, out_features=module.out_features,
                    bias=bias, dtype=str(module.values.dtype))
    if isinstance(module, MultiheadAttention):
        return dict(type="MultiheadAttention", **mha_config(module), dtype=str(mha_weight(module).dtype))
    return None


def save_pretrained(model: nn.Module, path) -> None:
    """Write `model` (optimized or not) to the folder `path`: model.safetensors and turbokernels.json."""
    fn = "save_pretrained"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}(model): expected an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}(path): expected a folder path, got {type(path).__name__}")
    st = _safetensors(fn)
    modules = {name: d for name, m in model.named_modules() if name and (d := _describe(m)) is not None}
    state = model.state_dict()
    sharded = any(_is_dtensor(t) for t in state.values())
    if sharded:
        # tensor parallel: every rank gathers each shard (a collective, in the state dict's order, the same on every
        # rank); rank 0 writes one unsharded checkpoint, the others wait for it
        import torch.distributed as dist
        from .parallel import full_tensor
        state = {k: full_tensor(t) if _is_dtensor(t) else t for k, t in state.items()}
        if dist.get_rank() != 0:
            dist.barrier()
            return
    try:
        _write(st, model, path, modules, state)
    finally:
        if sharded:
            dist.barrier()


def _write(st, model: nn.Module, path, modules: dict, state: dict) -> None:
    tensors, tied, seen, storages = {}, {}, {}, set()
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):  # the packed modules' _extra_state: modules[...] describes it
            continue
        ptr = t.untyped_storage().data_ptr()
        ident = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and ident in seen:  # the same tensor under two names (a tied head): written once
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        t = t.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory: a different view of a storage already written is copied
        tensors[key] = t.clone() if t.numel() and ptr in storages else t
        storages.add(ptr)
    # buffers outside the state dict (rotary inv_freq...) are rebuilt from the config; a model cast after it was
    # built (model.to(torch.bfloat16)) casts them too, so their dtypes are recorded for a rebuilt model
    volatile = {f"{name}.{b}" if name else b: str(m._buffers[b].dtype) for name, m in model.named_modules()
                for b in m._non_persistent_buffers_set if m._buffers.get(b) is not None}
    config = getattr(model, "config", None)
    meta = {"format": FORMAT, "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "modules": modules, "tied": tied, "non_persistent_buffer_dtypes": volatile,
            "hf_config": config.to_dict() if hasattr(config, "to_dict") else None,
            "attention": "turbokernels" if getattr(config, "_attn_implementation", None) == "turbokernels" else None,
            "previous_attention": getattr(model, _PREVIOUS_ATTN, None)}
    os.makedirs(path, exist_ok=True)
    st.save_file(tensors, os.path.join(path, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG), "w") as f:
        json.dump(meta, f, indent=1, default=str)


def _build(fn: str, name: str, d: dict, target: nn.Module) -> nn.Module:
    """An empty turbokernels module as described by d, checked against the target's module at `name`."""
    from .nn import Int4Linear, MultiheadAttention, Sparse24Int4Linear, Sparse24Linear, W4A8Linear
    from .nn.multihead_attention import mha_config
    kind, dtype = d.get("type"), _DTYPES.get(d.get("dtype"))
    if dtype is None:
        raise ValueError(f"{fn}(path): module '{name}': unknown dtype {d.get('dtype')!r}")
    if kind == "MultiheadAttention":
        if type(target) is not nn.MultiheadAttention and not isinstance(target, MultiheadAttention):
            raise ValueError(f"{fn}(model): module '{name}' is a {type(target).__name__}; the checkpoint has a "
                             f"MultiheadAttention there")
        if (target.embed_dim, target.num_heads) != (d["embed_dim"], d["num_heads"]):
            raise ValueError(f"{fn}(model): module '{name}': embed_dim, num_heads = {target.embed_dim}, "
                             f"{target.num_heads}; the checkpoint has {d['embed_dim']}, {d['num_heads']}")
        return MultiheadAttention(**{k: d[k] for k in mha_config(target)}, dtype=dtype)
    classes = {"Int4Linear": Int4Linear, "W4A8Linear": W4A8Linear, "Sparse24Linear": Sparse24Linear,
               "Sparse24Int4Linear": Sparse24Int4Linear}
    if kind not in classes:
        raise ValueError(f"{fn}(path): module '{name}': unknown type {kind!r}")
    linear = _as_linear(target)
    if linear is None and type(target) is classes[kind]:
        linear = target
    if linear is None:
        raise ValueError(f"{fn}(model): module '{name}' is a {type(target).__name__}; the checkpoint has a {kind} "
                         f"made from a linear layer there")
    if (linear.out_features, linear.in_features) != (d["out_features"], d["in_features"]):
        raise ValueError(f"{fn}(model): module '{name}' is {linear.out_features} x {linear.in_features}; the "
                         f"checkpoint's {kind} is {d['out_features']} x {d['in_features']}")
    args = dict(bias=d["bias"], dtype=dtype)
    if "group_size" in d:  # the int4 kinds
        args["group_size"] = d["group_size"]
    return classes[kind](d["in_features"], d["out_features"], **args)


def _hf_model(fn: str, meta: dict) -> nn.Module:
    if not meta.get("hf_config"):
        raise ValueError(f"{fn}(model): the checkpoint holds no Hugging Face config ({meta.get('model_class')}); "
                         f"pass the architecture as model=")
    import transformers
    cls = getattr(transformers, meta["model_class"].rsplit(".", 1)[-1], None)
    if cls is None or not hasattr(cls, "config_class"):
        raise ValueError(f"{fn}(path): transformers {transformers.__version__} has no model class "
                         f"{meta['model_class']!r}; pass the architecture as model=")
    config = cls.config_class.from_dict(meta["hf_config"])
    model = cls(config).eval()
    for name, dtype in meta.get("non_persistent_buffer_dtypes", {}).items():
        owner, _, b = name.rpartition(".")
        try:
            module = model.get_submodule(owner) if owner else model
        except AttributeError:  # another transformers version builds it differently: leave it as built
            continue
        if b in module._buffers and str(module._buffers[b].dtype) != dtype and dtype in _DTYPES:
            module._buffers[b] = module._buffers[b].to(_DTYPES[dtype])
    return model


def from_pretrained(path, model: Optional[nn.Module] = None) -> nn.Module:
    """Load a folder written by save_pretrained. model: the architecture to load into, as it was before
    optimization (its swapped modules are replaced as the checkpoint describes); None builds the Hugging Face model
    from the saved class and config; with model=None, a Hugging Face folder quantized by GPTQ, AWQ or
    compressed-tensors (no turbokernels.json) loads through hf_import.load_quantized. Returns the model."""
    fn = "from_pretrained"
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}(path): expected a folder path, got {type(path).__name__}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"{fn}(model): expected an nn.Module or None, got {type(model).__name__}")
    st = _safetensors(fn)
    cfg_path, weights_path = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
    if model is None and not os.path.isfile(cfg_path):
        from .hf_import import load_quantized, quantization_config
        if quantization_config(path) is not None:  # a folder a third-party quantizer wrote (hf_import.py)
            return load_quantized(path)[0]
    for p in (cfg_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{fn}(path): {os.fspath(path)!r} has no {os.path.basename(p)}")
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{fn}(path): {CONFIG} is not readable JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{fn}(path): {CONFIG} is not a {FORMAT} checkpoint description "
                         f"(format {meta.get('format') if isinstance(meta, dict) else None!r})")
    try:
        tensors = st.load_file(weights_path)
    except Exception as exc:  # safetensors raises its own error type on a corrupt file
        raise ValueError(f"{fn}(path): {WEIGHTS} is not a readable safetensors file ({exc})") from exc
    for alias, source in meta.get("tied", {}).items():
        if source not in tensors:
            raise ValueError(f"{fn}(path): tied tensor {alias!r} refers to {source!r}, which the file lacks")
        tensors[alias] = tensors[source]
    target = _hf_model(fn, meta) if model is None else model

    # every replacement built and loaded, every other tensor checked: nothing of the target changes before this ends
    modules = dict(target.named_modules())
    built: dict[int, nn.Module] = {}
    under = []
    for name, d in meta.get("modules", {}).items():
        if name not in modules:
            raise ValueError(f"{fn}(model): has no module '{name}' (the checkpoint has a {d.get('type')} there)")
        new = _build(fn, name, d, modules[name])
        prefix = name + "."
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        for k, v in new.state_dict().items():  # _extra_state: what the description says, not stored as a tensor
            if not isinstance(v, torch.Tensor):
                sub.setdefault(k, v)
        try:
            new.load_state_dict(sub, strict=True)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"{fn}(path): module '{name}' ({d.get('type')}): {exc}") from exc
        device = next((t.device for t in modules[name].parameters()), torch.device("cpu"))
        built[id(modules[name])] = new.to(device).train(modules[name].training)
        under.append(prefix)
    rest = {k: v for k, v in target.state_dict().items() if isinstance(v, torch.Tensor)
            and not any(k.startswith(p) for p in under)}
    missing = [k for k in rest if k not in tensors]
    unexpected = [k for k in tensors if k not in rest and not any(k.startswith(p) for p in under)]
    owned = model is None  # built here: its tensors take the checkpoint's dtypes; a caller's keep theirs (must match)
    wrong = [f"{k}: {tuple(tensors[k].shape)} {tensors[k].dtype} in the checkpoint, {tuple(v.shape)} {v.dtype} in "
             f"the model" for k, v in rest.items() if k in tensors
             and (tensors[k].shape != v.shape or (tensors[k].dtype != v.dtype and not owned))]
    if missing or unexpected or wrong:
        shown = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                 f"different {wrong[:5]}" if wrong else ""]
        raise ValueError(f"{fn}(model): the checkpoint does not fit this model: " + "; ".join(s for s in shown if s))
    attention = meta.get("attention")
    if attention is not None and not hasattr(getattr(target, "config", None), "_attn_implementation"):
        raise ValueError(f"{fn}(model): the checkpoint sets the attention implementation {attention!r}; this model "
                         f"has no transformers config")

    # install
    if attention is not None:
        from .integrations import transformers as tkt
        tkt.register()
        previous = target.config._attn_implementation
        if hasattr(target, "set_attn_implementation"):
            target.set_attn_implementation(attention)
        else:
            target.config._attn_implementation = attention
        setattr(target, _PREVIOUS_ATTN, meta.get("previous_attention") or previous)
    _swap(fn, target, lambda name, module: id(module) in built, lambda module: built[id(module)])
    with torch.no_grad():
        for k, v in target.state_dict(keep_vars=True).items():
            if k not in rest:
                continue
            if owned:
                v.data = tensors[k].to(v.device)
            else:
                v.copy_(tensors[k])
    return target
