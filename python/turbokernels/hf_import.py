"""Load Hugging Face folders quantized by third-party tools straight into turbokernels modules.

    model, report = tk.load_quantized("Llama-3.2-1B-GPTQ/")   # each 4-bit linear an Int4Linear, the rest float
    report["model.layers.0.self_attn.q_proj"]                  # "Int4Linear <- GPTQ v1 g128 act-order sym"

The folder: config.json (the model's transformers config); the weights in model.safetensors, or in the shards that
model.safetensors.index.json lists; the quantization config in config.json's `quantization_config`, else in a
quantize_config.json / quant_config.json beside it (AutoGPTQ, GPTQModel and AutoAWQ write those).

Read (4-bit weight-only formats, each converted exactly by formats/int4_importers.py):
  GPTQ (AutoGPTQ, GPTQModel, optimum)  quant_method "gptq" (or none, in an AutoGPTQ quantize_config.json); bits 4;
      checkpoint_format (or format) "gptq" (v1: zero points stored minus one) or "gptq_v2"; group_size (-1: per
      channel); desc_act (act-order: g_idx decides); sym; pack_dtype int32; modules_to_not_convert; GPTQModel's
      `dynamic` "-:<regex>" skip rules. Tensors <layer>.qweight, .qzeros, .scales, .g_idx (optional), .bias.
  AWQ (AutoAWQ, transformers)  quant_method "awq"; bits (w_bit) 4; version (format) "gemm"; group_size
      (q_group_size); zero_point; modules_to_not_convert. Tensors <layer>.qweight, .qzeros, .scales, .bias.
  compressed-tensors (llm-compressor)  quant_method "compressed-tensors"; format "pack-quantized" (top level or per
      config group); config_groups.*: weights {type "int", num_bits 4, strategy "group"/"channel"/"tensor",
      group_size, symmetric, actorder}, targets (a class name such as "Linear", a layer name, or "re:<regex>");
      ignore (the same kinds of names). Tensors <layer>.weight_packed, .weight_scale, .weight_zero_point,
      .weight_g_idx, .weight_shape, .bias.

Refused, with an error naming the format: other bit widths; GPTQ checkpoint formats marlin, bitblas, ipex, qqq and
the rest (also is_marlin_format, and quant_method "marlin" / "gptq_marlin" / "awq_marlin": Marlin repacks the
weights into its own tile order), GPTQModel `dynamic` overrides other than skips, pack dtypes other than int32; AWQ
versions gemv, gemv_fast, marlin, exllama, ipex, llm-awq (their own packings); compressed-tensors formats other than
pack-quantized (int-quantized, float-quantized, naive-quantized, marlin-24, nvfp4/mxfp4-pack-quantized...), schemes
that are not 4-bit int weight-only (activation quantization), block/token strategies, sparsity, transform and
KV-cache configs; exllama's own layouts (quant_method "exl2" / "exl3") and every other quant_method.

Which layers are quantized is read from the tensors (a layer with <layer>.qweight / .weight_packed), checked
against the config: a layer the config leaves float (modules_to_not_convert, ignore) must be stored float, and a
compressed-tensors layer its config groups target must be stored packed. Everything is read, converted and checked
before the model is assembled; a folder that does not fit raises a ValueError naming the tensor.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Optional

import torch
from torch import nn

FN = "load_quantized"
CONFIG = "config.json"
QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json")  # AutoGPTQ / GPTQModel, AutoAWQ
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"

# the tensors of one quantized layer, by format; the first is the one whose presence makes a layer quantized
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
AWQ_TENSORS = ("qweight", "qzeros", "scales")
CT_TENSORS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")

MARLIN_METHODS = ("marlin", "gptq_marlin", "awq_marlin", "gptq_marlin_24")
EXLLAMA_METHODS = ("exl2", "exl3")


class _Spec:
    """What a quantization config says, checked: the format, and per layer whether and how it is quantized."""

    def __init__(self, method: str, label: str, not_convert=(), not_convert_key: str = "modules_to_not_convert",
                 group_size: Optional[int] = None, version: Optional[int] = None, sym: Optional[bool] = None,
                 desc_act: bool = False, skip_regexes=(), ct_groups=(), ct_ignore=()):
        self.method, self.label = method, label
        self.not_convert, self.not_convert_key = list(not_convert), not_convert_key
        self.group_size, self.version, self.sym, self.desc_act = group_size, version, sym, desc_act
        self.skip_regexes = list(skip_regexes)
        self.ct_groups, self.ct_ignore = list(ct_groups), list(ct_ignore)

    @property
    def tensors(self) -> tuple:
        return {"gptq": GPTQ_TENSORS, "awq": AWQ_TENSORS, "compressed-tensors": CT_TENSORS}[self.method]

    def left_float(self, name: str, module: nn.Module) -> Optional[str]:
        """Why the config keeps this layer float, or None."""
        if self.method == "compressed-tensors":
            return "compressed-tensors ignore" if any(_ct_match(p, name, module) for p in self.ct_ignore) else None
        # transformers and AutoAWQ skip a module when an entry is a substring of its name
        if any(isinstance(k, str) and k in name for k in self.not_convert):
            return self.not_convert_key
        if any(re.match(p, name) for p in self.skip_regexes):
            return "dynamic (GPTQModel skip rule)"
        return None

    def ct_scheme(self, name: str, module: nn.Module) -> Optional[dict]:
        return next((g for g in self.ct_groups if any(_ct_match(t, name, module) for t in g["targets"])), None)


# ---- the quantization config -------------------------------------------------------------------------------------
def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{FN}(path): {what} is not readable JSON ({exc})") from exc


def quantization_config(path) -> Optional[tuple[str, dict]]:
    """(the file it came from, the quantization config) of a Hugging Face folder, or None when it has none (or no
    config.json). config.json's quantization_config wins over a quantize_config.json beside it: transformers and
    optimum read that one."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(os.path.join(path, CONFIG)):
        return None
    config = _read_json(os.path.join(path, CONFIG), CONFIG)
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if qc is not None:
        if not isinstance(qc, dict):
            raise ValueError(f"{FN}(path): {CONFIG}'s quantization_config must be an object, got "
                             f"{type(qc).__name__}")
        return CONFIG, qc
    for name in QUANT_CONFIG_FILES:
        p = os.path.join(path, name)
        if os.path.isfile(p):
            qc = _read_json(p, name)
            if not isinstance(qc, dict):
                raise ValueError(f"{FN}(path): {name} must hold an object, got {type(qc).__name__}")
            return name, qc
    return None


def _lower(v) -> Optional[str]:
    return v.lower() if isinstance(v, str) else v


def _int_field(where: str, key: str, v, default=None) -> int:
    v = default if v is None else v
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{FN}(path): {where}: {key} must be an integer, got {v!r}")
    return v


def _bits(where: str, label: str, qc: dict, *keys) -> None:
    bits = next((qc[k] for k in keys if qc.get(k) is not None), 4)
    if bits != 4:
        raise ValueError(f"{FN}(path): {where}: {label} with {bits}-bit weights is not supported (4-bit only)")


def _group_size(where: str, qc: dict, *keys) -> int:
    gs = _int_field(where, keys[0], next((qc[k] for k in keys if qc.get(k) is not None), None), -1)
    if gs == 0 or gs < -1:
        raise ValueError(f"{FN}(path): {where}: {keys[0]} must be positive or -1 (per channel), got {gs}")
    return gs


def _names(where: str, key: str, v) -> list:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ValueError(f"{FN}(path): {where}: {key} must be a list of module names, got {v!r}")
    return v


def _parse(where: str, qc: dict) -> _Spec:
    method = _lower(qc.get("quant_method"))
    if method is None and where != CONFIG:
        method = "gptq"  # AutoGPTQ before 0.7 wrote quantize_config.json without quant_method
    if method in MARLIN_METHODS:
        raise ValueError(f"{FN}(path): {where}: quant_method {method!r} is not supported: Marlin-repacked weights "
                         f"are in Marlin's tile order, not GPTQ's or AWQ's; use the checkpoint before repacking")
    if method in EXLLAMA_METHODS:
        raise ValueError(f"{FN}(path): {where}: quant_method {method!r} is not supported: exllama's own "
                         f"variable-bit layout")
    if method == "gptq":
        return _parse_gptq(where, qc)
    if method == "awq":
        return _parse_awq(where, qc)
    if method == "compressed-tensors":
        return _parse_ct(where, qc)
    raise ValueError(f"{FN}(path): {where}: quant_method {qc.get('quant_method')!r} is not supported; supported: "
                     f"'gptq', 'awq', 'compressed-tensors' (4-bit)")


def _parse_gptq(where: str, qc: dict) -> _Spec:
    fmt = _lower(qc.get("checkpoint_format") or qc.get("format") or "gptq")
    if qc.get("is_marlin_format"):
        fmt = "marlin"
    if fmt not in ("gptq", "gptq_v2"):
        kind = "Marlin-repacked" if fmt == "marlin" else "a repacked layout"
        raise ValueError(f"{FN}(path): {where}: GPTQ checkpoint_format {fmt!r} ({kind}) is not supported; "
                         f"supported: 'gptq' (v1) and 'gptq_v2'")
    _bits(where, f"GPTQ ({fmt})", qc, "bits", "w_bit")
    pack = qc.get("pack_dtype")
    if pack is not None and str(pack).replace("torch.", "") != "int32":
        raise ValueError(f"{FN}(path): {where}: GPTQ pack_dtype {pack!r} is not supported (int32 words only)")
    skips = []
    dynamic = qc.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise ValueError(f"{FN}(path): {where}: dynamic must be an object of per-module rules, got {dynamic!r}")
    for rule, override in dynamic.items():
        if isinstance(rule, str) and rule.startswith("-:"):
            skips.append(rule[2:])
        else:
            raise ValueError(f"{FN}(path): {where}: GPTQModel dynamic override {rule!r}: {override!r} is not "
                             f"supported (only '-:' skip rules)")
    return _Spec("gptq", "GPTQ", _names(where, "modules_to_not_convert", qc.get("modules_to_not_convert")),
                 group_size=_group_size(where, qc, "group_size", "q_group_size"),
                 version=2 if fmt == "gptq_v2" else 1, sym=bool(qc.get("sym", True)),
                 desc_act=bool(qc.get("desc_act", False)), skip_regexes=skips)


def _parse_awq(where: str, qc: dict) -> _Spec:
    version = _lower(qc.get("version") or qc.get("format") or "gemm")
    if version != "gemm":
        raise ValueError(f"{FN}(path): {where}: AWQ version {version!r} is not supported (its own packing); "
                         f"supported: 'gemm'")
    _bits(where, "AWQ (gemm)", qc, "bits", "w_bit")
    return _Spec("awq", "AWQ GEMM", _names(where, "modules_to_not_convert", qc.get("modules_to_not_convert")),
                 group_size=_group_size(where, qc, "group_size", "q_group_size"),
                 sym=not qc.get("zero_point", True))


def _parse_ct(where: str, qc: dict) -> _Spec:
    for key in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        v = qc.get(key)
        if not v:
            continue
        fmt = v.get("format") if isinstance(v, dict) else None
        if key == "sparsity_config" and _lower(fmt) == "dense":
            continue
        raise ValueError(f"{FN}(path): {where}: compressed-tensors {key} ({fmt or v!r}) is not supported: 4-bit "
                         f"weight-only pack-quantized checkpoints only")
    top = _lower(qc.get("format"))
    groups_cfg = qc.get("config_groups")
    if not isinstance(groups_cfg, dict) or not groups_cfg:
        raise ValueError(f"{FN}(path): {where}: compressed-tensors config_groups must be a non-empty object, got "
                         f"{groups_cfg!r}")
    groups = []
    for gname, g in groups_cfg.items():
        at = f"config_groups.{gname}"
        if not isinstance(g, dict):
            raise ValueError(f"{FN}(path): {where}: {at} must be an object, got {g!r}")
        fmt = _lower(g.get("format") or top)
        if fmt != "pack-quantized":
            raise ValueError(f"{FN}(path): {where}: {at}: compressed-tensors format {fmt!r} is not supported; "
                             f"supported: 'pack-quantized' (4-bit int)")
        w = g.get("weights")
        if not isinstance(w, dict):
            raise ValueError(f"{FN}(path): {where}: {at}.weights must describe the weight quantization, got {w!r}")
        if g.get("input_activations") or g.get("output_activations"):
            raise ValueError(f"{FN}(path): {where}: {at} quantizes activations too: not supported (weight-only)")
        if _lower(w.get("type", "int")) != "int":
            raise ValueError(f"{FN}(path): {where}: {at}.weights.type {w.get('type')!r} is not supported (int)")
        _bits(where, f"compressed-tensors ({at})", w, "num_bits")
        strategy = _lower(w.get("strategy"))
        if strategy not in ("group", "channel", "tensor"):
            raise ValueError(f"{FN}(path): {where}: {at}.weights.strategy {w.get('strategy')!r} is not "
                             f"supported; supported: 'group', 'channel', 'tensor'")
        if w.get("dynamic"):
            raise ValueError(f"{FN}(path): {where}: {at}.weights.dynamic is set: not supported (static scales)")
        gs = _group_size(where, w, "group_size") if strategy == "group" else -1
        targets = _names(where, f"{at}.targets", g.get("targets"))
        groups.append(dict(name=gname, targets=targets, group_size=gs, strategy=strategy,
                           symmetric=bool(w.get("symmetric", True))))
    return _Spec("compressed-tensors", "compressed-tensors pack-quantized", ct_groups=groups,
                 ct_ignore=_names(where, "ignore", qc.get("ignore")))


def _ct_match(pattern: str, name: str, module: nn.Module) -> bool:
    """compressed-tensors' target/ignore rule: "re:<regex>" matched from the start of the name, else the exact layer
    name or the module's class name."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name or pattern == type(module).__name__


# ---- the weights ---------------------------------------------------------------------------------------------------
def _load_tensors(path: str) -> dict:
    try:
        import safetensors.torch as st
    except ImportError as exc:
        raise ImportError(f"{FN}: needs the safetensors package (pip install safetensors)") from exc
    index = os.path.join(path, WEIGHTS_INDEX)
    if os.path.isfile(index):
        meta = _read_json(index, WEIGHTS_INDEX)
        weight_map = meta.get("weight_map") if isinstance(meta, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{FN}(path): {WEIGHTS_INDEX} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(path, WEIGHTS)):
        weight_map, files = None, [WEIGHTS]
    else:
        raise FileNotFoundError(f"{FN}(path): {os.fspath(path)!r} has neither {WEIGHTS} nor {WEIGHTS_INDEX}")
    tensors = {}
    for name in files:
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{FN}(path): {WEIGHTS_INDEX} lists {name!r}, which the folder lacks")
        try:
            shard = st.load_file(p)
        except Exception as exc:  # safetensors raises its own error type on a corrupt file
            raise ValueError(f"{FN}(path): {name} is not a readable safetensors file ({exc})") from exc
        for k, v in shard.items():
            if k in tensors:
                raise ValueError(f"{FN}(path): tensor {k!r} is stored twice (again in {name})")
            if weight_map is not None and weight_map.get(k) != name:
                raise ValueError(f"{FN}(path): tensor {k!r} is in {name}, but {WEIGHTS_INDEX} puts it in "
                                 f"{weight_map.get(k)!r}")
            tensors[k] = v
    if weight_map is not None:
        absent = [k for k in weight_map if k not in tensors]
        if absent:
            raise ValueError(f"{FN}(path): {WEIGHTS_INDEX} lists tensors its shards lack: {absent[:5]}")
    return tensors


# ---- the model skeleton --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter created inside goes to the meta device as it is registered (the file's tensors replace them),
    while buffers computed at construction (rotary inv_freq) stay real: the torch.device("meta") context would lose
    those. The same trick as accelerate's init_empty_weights(include_buffers=False), without the dependency; like
    it, the patch is process-wide while the skeleton is built."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _skeleton(path: str) -> nn.Module:
    import transformers
    config = _read_json(os.path.join(path, CONFIG), CONFIG)
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ValueError(f"{FN}(path): {CONFIG} has no model_type")
    # without it transformers would look for the GPTQ/AWQ/compressed-tensors libraries and their kernels
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        hf_config = transformers.AutoConfig.for_model(**config)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{FN}(path): transformers {transformers.__version__} cannot read {CONFIG} "
                         f"({exc})") from exc
    arch = (config.get("architectures") or [None])[0]
    if isinstance(arch, str):
        causal = arch.endswith(("ForCausalLM", "LMHeadModel"))
    else:  # a config written by hand: a causal LM when transformers has one for the model type
        from transformers.models.auto import modeling_auto
        causal = config["model_type"] in getattr(modeling_auto, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", {})
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    with _parameters_on_meta():
        return auto.from_config(hf_config)


# ---- one layer -----------------------------------------------------------------------------------------------------
def _import_layer(spec: _Spec, name: str, linear: nn.Linear, target: nn.Module, t: dict):
    """(Int4Weight, description) of one quantized layer from its tensors t {suffix: tensor}."""
    from .formats import int4_importers as imp
    N, K = linear.out_features, linear.in_features
    if spec.method == "gptq":
        for s in ("qzeros", "scales"):
            if s not in t:
                raise ValueError(f"{FN}(path): tensor {name}.{s} is missing (GPTQ layer '{name}' has {name}.qweight)")
        if spec.desc_act and "g_idx" not in t:
            raise ValueError(f"{FN}(path): tensor {name}.g_idx is missing (desc_act is set: act-order needs it)")
        w = imp.from_gptq(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"), in_features=K,
                          group_size=spec.group_size, version=spec.version)
        what = f"GPTQ v{spec.version}"
        sym = spec.sym
    elif spec.method == "awq":
        for s in ("qzeros", "scales"):
            if s not in t:
                raise ValueError(f"{FN}(path): tensor {name}.{s} is missing (AWQ layer '{name}' has {name}.qweight)")
        w = imp.from_awq(t["qweight"], t["qzeros"], t["scales"], group_size=spec.group_size)
        what, sym = "AWQ GEMM", spec.sym
    else:
        scheme = spec.ct_scheme(name, target)
        if scheme is None:
            raise ValueError(f"{FN}(path): tensor {name}.weight_packed: no config_groups entry targets layer "
                             f"'{name}'")
        if "weight_scale" not in t:
            raise ValueError(f"{FN}(path): tensor {name}.weight_scale is missing (layer '{name}' has "
                             f"{name}.weight_packed)")
        if not scheme["symmetric"] and "weight_zero_point" not in t:
            raise ValueError(f"{FN}(path): tensor {name}.weight_zero_point is missing ({scheme['name']} is "
                             f"asymmetric)")
        g_idx = t.get("weight_g_idx")
        gs = scheme["group_size"]
        if g_idx is None and gs != -1 and -(-K // gs) > 1:
            # the importer infers the group size from K and the scales' columns when nothing says it; the config
            # does, so say it the one way the importer takes it: the plain g_idx arange(K) // gs
            g_idx = torch.arange(K, dtype=torch.int32) // gs
        w = imp.from_compressed_tensors(t["weight_packed"], t["weight_scale"], t.get("weight_zero_point"), g_idx,
                                        t.get("weight_shape", (N, K)))
        want = -1 if gs == -1 or -(-K // gs) == 1 else gs
        got = -1 if w.num_groups == 1 else w.group_size
        if got != want:
            raise ValueError(f"{FN}(path): tensor {name}.weight_scale: {w.num_groups} groups, but "
                             f"{scheme['name']} says {scheme['strategy']} with group_size {gs}")
        what, sym = "compressed-tensors pack-quantized", scheme["symmetric"]
    if w.shape != (N, K):
        raise ValueError(f"{FN}(path): tensor {name}.{spec.tensors[0]}: holds a {w.shape[0]} x {w.shape[1]} weight "
                         f"(out x in), but layer '{name}' is {N} x {K}")
    group = "per-channel" if w.group_size == -1 or w.num_groups == 1 else f"g{w.group_size}"
    parts = [what, group] + (["act-order"] if w.perm is not None else []) + ["sym" if sym else "asym"]
    return w, "Int4Linear <- " + " ".join(parts)


# ---- the entry -----------------------------------------------------------------------------------------------------
def load_quantized(path, *, dtype: Optional[torch.dtype] = None, device="cpu"):
    """Load a Hugging Face folder quantized by GPTQ, AWQ (GEMM) or compressed-tensors (pack-quantized, 4-bit): the
    transformers model its config.json describes, every quantized linear an Int4Linear holding the checkpoint's
    integers and scales exactly, every other tensor as stored.

    dtype: the float tensors' dtype (float16, bfloat16 or float32; default as stored); the Int4Linear layers keep
    the scales' stored dtype, which is exact, and run in any activation dtype. device: where the model goes.
    Returns (model in eval mode, report {layer name: "Int4Linear <- <format> ..." or "float (<why>)"} for every
    linear layer). See the module docstring for the configs read and refused.
    """
    from ._checks import requested_device
    from .formats.int4 import FLOAT_DTYPES
    from .model import _as_linear, _swap
    from .nn import Int4Linear
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{FN}(path): expected a folder path, got {type(path).__name__}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{FN}(path): no such folder: {os.fspath(path)!r}")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"{FN}(dtype): expected None, torch.float16, torch.bfloat16 or torch.float32, got {dtype!r}")
    if not isinstance(device, (str, int, torch.device)) or isinstance(device, bool):
        raise TypeError(f"{FN}(device): expected a device name, index or torch.device, got {type(device).__name__}")
    device = requested_device(f"{FN}(device)", device)  # checked now, not after the whole folder is read
    if device.type == "meta":
        raise ValueError(f"{FN}(device): 'meta' holds no data; expected 'cpu', 'cuda' or another real device")
    if not os.path.isfile(os.path.join(path, CONFIG)):
        raise FileNotFoundError(f"{FN}(path): {os.fspath(path)!r} has no {CONFIG}")
    found = quantization_config(path)
    if found is None:
        raise ValueError(f"{FN}(path): {os.fspath(path)!r} has no quantization_config in {CONFIG} and no "
                         f"{' / '.join(QUANT_CONFIG_FILES)}: not a quantized checkpoint (load it with transformers)")
    spec = _parse(*found)
    tensors = _load_tensors(path)
    model = _skeleton(path)

    # the quantized layers, from their tensors
    first, suffixes = spec.tensors[0], spec.tensors
    layers = sorted({k[:-len(first) - 1] for k in tensors if k.endswith("." + first)})
    modules = dict(model.named_modules())
    built, report, used = {}, {}, set()
    for name in layers:
        target = modules.get(name)
        linear = _as_linear(target) if target is not None else None
        if linear is None:
            what = "has no such layer" if target is None else f"has a {type(target).__name__} there"
            raise ValueError(f"{FN}(path): tensor {name}.{first}: the model ({type(model).__name__}) {what}, not a "
                             f"linear layer")
        why = spec.left_float(name, target)
        if why is not None:
            raise ValueError(f"{FN}(path): tensor {name}.{first}: layer '{name}' is stored quantized, but the config "
                             f"keeps it float ({why})")
        t = {s: tensors[f"{name}.{s}"] for s in suffixes if f"{name}.{s}" in tensors}
        try:
            w, desc = _import_layer(spec, name, linear, target, t)
        except (TypeError, ValueError) as exc:
            if str(exc).startswith(f"{FN}("):
                raise
            raise type(exc)(f"{FN}(path): layer '{name}' (tensors {', '.join(f'{name}.{s}' for s in t)}): "
                            f"{exc}") from exc
        bias = tensors.get(f"{name}.bias")
        if (bias is None) != (linear.bias is None) or (bias is not None and bias.shape != (linear.out_features,)):
            have = "none" if bias is None else f"shape {tuple(bias.shape)}"
            raise ValueError(f"{FN}(path): tensor {name}.bias: {have} in the checkpoint, but layer '{name}' "
                             f"{'has no bias' if linear.bias is None else f'has one of {linear.out_features}'}")
        if bias is not None:
            bias = bias.to(w.scales.dtype)  # Int4Linear keeps its bias in the scales' dtype
        built[id(target)] = Int4Linear.from_weight(w, bias)
        report[name] = desc
        used.update(f"{name}.{s}" for s in t)
        used.add(f"{name}.bias")

    # every other parameter and persistent buffer from the file; a tensor under several names (a tied LM head)
    # stays one tensor, found under any of them
    under = tuple(n + "." for n in layers)
    slots: dict[int, list] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        if mname.startswith(under) or mname in layers:
            continue
        persistent = [b for b in module._buffers if b not in module._non_persistent_buffers_set]
        for kind, names in (("_parameters", list(module._parameters)), ("_buffers", persistent)):
            for pname in names:
                t = getattr(module, kind)[pname]
                if t is not None:
                    full = f"{mname}.{pname}" if mname else pname
                    slots.setdefault(id(t), [t, kind, []])[2].append((module, pname, full))
    loaded, missing, wrong = [], [], []
    for t, kind, places in slots.values():
        names = [full for _, _, full in places]
        stored = [n for n in names if n in tensors]
        if not stored:
            missing.append(names[0])
            continue
        src = tensors[stored[0]]
        if src.shape != t.shape:
            wrong.append(f"{stored[0]}: {tuple(src.shape)} in the checkpoint, {tuple(t.shape)} in the model")
            continue
        used.update(stored)
        loaded.append((src, kind, places, t))
    ignorable = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    ignorable_names = {f"{m}.{b}" if m else b for m, mod in model.named_modules()
                       for b in mod._non_persistent_buffers_set}  # older checkpoints carry rotary inv_freq
    unexpected = [k for k in tensors if k not in used and k not in ignorable_names
                  and not any(p.search(k) for p in ignorable)]
    if missing or unexpected or wrong:
        hint = ""
        stray = [k for k in unexpected if k.rpartition(".")[2] in suffixes]
        if stray:
            hint = f" ({stray[0]} is a {spec.label} tensor without its {stray[0].rpartition('.')[0]}.{first})"
        shown = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}{hint}" if unexpected
                 else "", f"different shapes {wrong[:5]}" if wrong else ""]
        raise ValueError(f"{FN}(path): the checkpoint's tensors do not fit {type(model).__name__} built from "
                         f"{CONFIG}: " + "; ".join(s for s in shown if s))

    # the float linears: why they are float, and none the config says is quantized may be stored float
    for name, module in model.named_modules():
        if id(module) in built or _as_linear(module) is None:
            continue
        why = spec.left_float(name, module)
        if why is None and spec.method == "compressed-tensors" and spec.ct_scheme(name, module) is not None:
            raise ValueError(f"{FN}(path): tensor {name}.weight: layer '{name}' is stored float, but "
                             f"{spec.ct_scheme(name, module)['name']} targets it (expected {name}.weight_packed)")
        report[name] = f"float ({why})" if why else "float (stored unquantized)"

    # assemble: nothing above changed the model but the modules' own construction
    _swap(FN, model, lambda name, module: id(module) in built, lambda module: built[id(module)])
    for src, kind, places, t in loaded:
        if src.is_floating_point() and dtype is not None:
            src = src.to(dtype)
        if kind == "_parameters":
            src = nn.Parameter(src, requires_grad=t.requires_grad and src.is_floating_point())
        for module, pname, _ in places:
            getattr(module, kind)[pname] = src
    order = [n for n, m in model.named_modules() if n in report]
    return model.to(device).eval(), {n: report[n] for n in order}
