"""Multi-process checks of turbokernels.parallel: `run_ranks` starts one process per rank on this machine (gloo on
the loopback interface, or NCCL on GPUs), bounded in time and always cleaned up; the scenarios below run in every
rank and write what they saw to a folder for the caller (tests/test_parallel.py) to compare.

A scenario builds the same tiny Llama in every rank (the same seed), so each rank also has the whole model to
compare against: `single` is the unsharded model's output in the same process, `sharded` the tensor-parallel one.
"""
from __future__ import annotations

import os
import socket
import time
import traceback
from typing import Callable

import torch

HIDDEN, HEADS, KV_HEADS, INTERMEDIATE, VOCAB, LAYERS = 128, 4, 2, 256, 256, 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, backend: str, folder: str, scenario: str, kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
                      RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist
    if backend == "gloo":  # the ranks share this machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        dist.init_process_group(backend, rank=rank, world_size=world)
        if ":" in scenario:  # "module:function", e.g. the benchmark's worker (turbokernels.bench.parallel:ranks)
            import importlib
            module, function = scenario.split(":")
            fn = getattr(importlib.import_module(module), function)
        else:
            fn = SCENARIOS[scenario]
        result = fn(rank, world, **kwargs)
        torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(folder, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(scenario: str, folder: str, world: int = 2, backend: str = "gloo", timeout: float = 240.0,
              **kwargs) -> list:
    """Run SCENARIOS[scenario](rank, world, **kwargs) (or "module:function") in `world` spawned processes; returns
    each rank's result.
    A rank's exception is raised here with its traceback; past `timeout` seconds every rank is killed. The port is
    picked free, then bound by rank 0 a moment later: when another process took it meanwhile, the run is retried
    once on a new port."""
    try:
        return _run_ranks(scenario, folder, world, backend, timeout, kwargs)
    except RuntimeError as exc:
        if "address already in use" not in str(exc).lower():
            raise
        for f in os.listdir(folder):
            os.remove(os.path.join(folder, f))
        return _run_ranks(scenario, folder, world, backend, timeout, kwargs)


def _run_ranks(scenario: str, folder: str, world: int, backend: str, timeout: float, kwargs: dict) -> list:
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException
    os.makedirs(folder, exist_ok=True)
    ctx = mp.start_processes(_entry, args=(world, free_port(), backend, folder, scenario, kwargs), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"run_ranks({scenario!r}): not done after {timeout:.0f} s")
    except ProcessException as exc:
        errors = [open(os.path.join(folder, f)).read() for f in sorted(os.listdir(folder)) if f.endswith(".error")]
        raise RuntimeError(f"run_ranks({scenario!r}) failed:\n" + "\n".join(errors or [str(exc)])) from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(5)
    return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(world)]


# ---- the model ------------------------------------------------------------------------------------------------------
def tiny_llama(dtype=torch.float32, seed: int = 0):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                   num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                   tie_word_embeddings=False, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).eval().to(dtype)
    with torch.no_grad():  # make the layers' outputs matter: default init gives near-uniform logits
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


def optimized_llama(kind: str, dtype=torch.float32, seed: int = 0, group_size: int = 32):
    """kind: 'int4', 'sparse24' or 'int4+sparse24' (with turbokernels attention in every case)."""
    import turbokernels as tk
    model = tiny_llama(dtype, seed)
    tk.optimize(model, int4="int4" in kind, sparse24="sparse24" in kind, group_size=group_size, progress=False)
    return model


def prompt(seed: int = 1, batch: int = 2, length: int = 11) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def _mesh(world: int):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cuda" if torch.cuda.is_available() and os.environ.get("TK_TP_CUDA") else "cpu",
                            (world,))


def _device(model):
    if torch.cuda.is_available() and os.environ.get("TK_TP_CUDA"):
        torch.cuda.set_device(int(os.environ["RANK"]) % torch.cuda.device_count())
        return model.to("cuda"), "cuda"
    return model, "cpu"


def _run(model, ids, new_tokens: int):
    with torch.no_grad():
        logits = model(ids).logits.float().cpu()
        tokens = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                                pad_token_id=0).cpu()
    return logits, tokens


# ---- scenarios (each returns a dict of plain tensors and strings) --------------------------------------------------
def scenario_logits(rank: int, world: int, kind: str = "int4+sparse24", dtype: str = "float32",
                    new_tokens: int = 6, whole_plan: bool = False) -> dict:
    """The tiny Llama optimized, then sharded with transformers' own plan: the unsharded model's logits and greedy
    tokens, the sharded model's, and a float64 model of the same quantized weights (restore() of a copy)."""
    import copy
    from torch.distributed.tensor.parallel import parallelize_module
    import turbokernels as tk
    dt = getattr(torch, dtype)
    model, device = _device(optimized_llama(kind, dt))
    ids = prompt().to(device)
    exact = copy.deepcopy(model).cpu()
    tk.restore(exact)
    with torch.no_grad():
        ref64 = exact.double()(ids.cpu()).logits
    single = _run(model, ids, new_tokens)
    # the LM head too: column-parallel with its output gathered (torch's own style for the dense nn.Linear)
    # whole_plan: transformers' plan for the whole model (model.tp_plan), the embedding vocab-parallel too
    plan = tk.parallel.tp_plan(model, plan=model.tp_plan) if whole_plan else \
        tk.parallel.tp_plan(model, include_lm_head=True)
    parallelize_module(model, _mesh(world), plan)
    sharded = _run(model, ids, new_tokens)
    from .integrations.transformers_cache import KVCache  # the decode kernel over each rank's own KV heads
    cache = KVCache(model.config, batch_size=ids.shape[0], max_cache_len=ids.shape[1] + new_tokens)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                                pad_token_id=0, cache=cache).cpu()
    kinds = sorted({type(m).__name__ for m in model.modules() if tk.parallel.is_sharded(m)})
    from torch.distributed.tensor import DTensor
    for name in ("lm_head", "model.embed_tokens"):
        weight = model.get_submodule(name).weight
        if isinstance(weight, DTensor):
            kinds.append(f"{name} {weight.placements}")
    return dict(single_logits=single[0], single_tokens=single[1], sharded_logits=sharded[0],
                sharded_tokens=sharded[1], cache_tokens=cached, cache_keys_shape=tuple(cache.layers[0].keys.shape), ref64=ref64, sharded_kinds=kinds,
                attention=model.config._attn_implementation)


def _local_state(model) -> dict:
    from torch.distributed.tensor import DTensor
    return {k: (v.to_local() if isinstance(v, DTensor) else v).detach().cpu().clone()
            for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def scenario_orders(rank: int, world: int, kind: str = "int4+sparse24") -> dict:
    """Optimize-then-shard and shard-then-optimize of the same model: every rank's local tensors, and logits."""
    from torch.distributed.tensor.parallel import parallelize_module
    import turbokernels as tk
    mesh = _mesh(world)
    first = optimized_llama(kind)
    parallelize_module(first, mesh, tk.parallel.tp_plan(first))
    second = tiny_llama()
    parallelize_module(second, mesh, tk.parallel.tp_plan(second))  # torch's styles on the nn.Linear layers
    report = tk.optimize(second, int4="int4" in kind, sparse24="sparse24" in kind, group_size=32, progress=False)
    ids = prompt()
    with torch.no_grad():
        a, b = first(ids).logits, second(ids).logits
    state = dict(first=_local_state(first), second=_local_state(second), logits_first=a, logits_second=b,
                 report=report)
    # the way back, sharded: nn.Linear layers holding each rank's shard of the dequantized weights, driven by the
    # same hooks; against the unsharded model's restore()
    back = tk.restore(first)
    whole = optimized_llama(kind)
    tk.restore(whole)
    with torch.no_grad():
        state.update(restored=first(ids).logits, restored_whole=whole(ids).logits, restore_report=back,
                     restored_ref64=whole.double()(ids).logits)
    return state


def scenario_save(rank: int, world: int, target: str, kind: str = "int4+sparse24") -> dict:
    """A sharded model written by save_pretrained (every rank calls it; rank 0 writes one unsharded checkpoint)."""
    from torch.distributed.tensor.parallel import parallelize_module
    import turbokernels as tk
    model = optimized_llama(kind)
    parallelize_module(model, _mesh(world), tk.parallel.tp_plan(model))
    tk.save_pretrained(model, target)
    with torch.no_grad():
        logits = model(prompt()).logits
    return dict(logits=logits)


def scenario_load(rank: int, world: int, target: str, kind: str = "int4+sparse24") -> dict:
    """load_state_dict into a sharded model (of other weights: another seed): the whole model's state dict (each
    rank takes its slice), and torch's distributed checkpoint of a sharded model (DTensors); then a bad one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor.parallel import parallelize_module
    import turbokernels as tk
    mesh = _mesh(world)
    ids = prompt()
    whole = optimized_llama(kind)
    sharded = optimized_llama(kind)
    parallelize_module(sharded, mesh, tk.parallel.tp_plan(sharded))
    out = {}
    with torch.no_grad():
        want = sharded(ids).logits
        other = optimized_llama(kind, seed=1)
        parallelize_module(other, mesh, tk.parallel.tp_plan(other))
        before = other(ids).logits
        other.load_state_dict(whole.state_dict())
        out["whole"] = (want, before, other(ids).logits)
        dcp.save(sharded.state_dict(), checkpoint_id=target)
        third = optimized_llama(kind, seed=2)
        parallelize_module(third, mesh, tk.parallel.tp_plan(third))
        state = third.state_dict()
        dcp.load(state, checkpoint_id=target)
        third.load_state_dict(state)
        out["dcp"] = (want, None, third(ids).logits)
        bad = whole.state_dict()
        name = "model.layers.0.mlp.down_proj.qweight"
        bad[name] = bad[name][:, :-1].clone()
        try:
            third.load_state_dict(bad)
            out["bad"] = "no error"
        except RuntimeError as exc:
            out["bad"] = str(exc)
        out["bad unchanged"] = third(ids).logits
    return out


def scenario_compile(rank: int, world: int) -> dict:
    """torch.compile(fullgraph=True) of a sharded column + row pair (the local path: the packed ops and one
    all_reduce in the graph), int4 and int4 + 2:4 with a bias; (eager sharded, compiled, float64) per kind."""
    import copy
    from torch import nn
    from torch.distributed.tensor.parallel import parallelize_module
    import turbokernels as tk
    mesh = _mesh(world)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(11))
    out = {}
    for kind in ("int4", "int4+sparse24"):
        torch.manual_seed(0)
        seq = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))
        tk.optimize(seq, attention=False, int4=True, sparse24="sparse24" in kind, group_size=32, progress=False)
        exact = copy.deepcopy(seq)
        tk.restore(exact)
        with torch.no_grad():
            ref64 = exact.double()(x.double())
            parallelize_module(seq, mesh, {"0": tk.parallel.ColwiseParallel(), "1": tk.parallel.RowwiseParallel()})
            eager = seq(x)
            torch._dynamo.reset()
            compiled = torch.compile(seq, fullgraph=True)(x)
        out[kind] = (eager, compiled, ref64)
    return out


def scenario_refusals(rank: int, world: int) -> dict:
    """Splits the formats cannot make: each must raise an error naming the rule, and leave the layer as it was."""
    from torch import nn
    import turbokernels as tk
    mesh = _mesh(world)
    torch.manual_seed(0)
    out = {}

    def attempt(label, layer, style):
        before = {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
        try:
            tk.parallel.shard_(layer, mesh, style)
            out[label] = "no error"
        except (ValueError, TypeError) as exc:
            out[label] = f"{type(exc).__name__}: {exc}"
        after = layer.state_dict()
        out[label + " unchanged"] = not tk.parallel.is_sharded(layer) and all(torch.equal(v, after[k]) for k, v in before.items())

    attempt("int4 rowwise group", tk.nn.Int4Linear.from_linear(nn.Linear(192, 64), group_size=64), "rowwise")
    attempt("int4 colwise odd N", tk.nn.Int4Linear.from_linear(nn.Linear(64, 33), group_size=32), "colwise")
    attempt("int4 rowwise words", tk.nn.Int4Linear.from_linear(nn.Linear(36, 16), group_size=-1), "rowwise")
    attempt("sparse24 rowwise meta", tk.nn.Sparse24Linear.from_linear(nn.Linear(40, 16)), "rowwise")
    attempt("sparse24int4 rowwise group", tk.nn.Sparse24Int4Linear.from_linear(nn.Linear(192, 16), group_size=64),
            "rowwise")
    act = tk.nn.Int4Linear.from_linear(nn.Linear(64, 16), group_size=32)
    act.perm = torch.randperm(64, generator=torch.Generator().manual_seed(3))  # crosses the ranks' slices
    attempt("int4 rowwise act-order", act, "rowwise")
    attempt("bad style", tk.nn.Int4Linear.from_linear(nn.Linear(64, 16), group_size=32), "diagonal")
    attempt("not packed", nn.Linear(64, 16), "colwise")
    # act-order whose rows stay in their rank's slice is split, and computes what the unsharded layer does
    local = tk.nn.Int4Linear.from_linear(nn.Linear(64, 16), group_size=32)
    k = 64 // world
    local.perm = torch.cat([r * k + torch.randperm(k, generator=torch.Generator().manual_seed(r))
                            for r in range(world)])
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = local(x)
        tk.parallel.shard_(local, mesh, "rowwise")
        got = local(x.chunk(world, dim=-1)[rank]).full_tensor()
    out["act-order local"] = (want, got)
    # one group over the whole input (per-channel): the ranks share its scales; W4A8Linear is an Int4Linear
    for label, layer in (("per-channel", tk.nn.Int4Linear.from_linear(nn.Linear(64, 16), group_size=-1)),
                         ("w4a8", tk.nn.W4A8Linear.from_linear(nn.Linear(64, 16), group_size=32))):
        with torch.no_grad():
            want = layer(x)
            tk.parallel.shard_(layer, mesh, "rowwise")
            out[label] = (want, layer(x.chunk(world, dim=-1)[rank]).full_tensor())
    # optimize() of a sharded model refuses what it cannot do per shard, and leaves the model as it was
    from torch.distributed.tensor.parallel import parallelize_module
    model = tiny_llama()
    parallelize_module(model, mesh, tk.parallel.tp_plan(model))
    linears = lambda: sum(type(m) is nn.Linear for m in model.modules())  # noqa: E731
    before = linears()
    for label, kwargs in (("optimize gptq", dict(int4=True, quant_method="gptq", calibration=[prompt()])),
                          ("optimize per-channel rowwise", dict(int4=True, group_size=-1))):
        try:
            tk.optimize(model, progress=False, **kwargs)
            out[label] = "no error"
        except ValueError as exc:
            out[label] = str(exc)
        out[label + " unchanged"] = linears() == before and model.config._attn_implementation == "sdpa"
    down = model.model.layers[0].mlp.down_proj
    down.forward = down.forward  # what transformers' own tensor-parallel loader leaves: an instance forward
    try:
        tk.optimize(model, int4=True, progress=False)
        out["optimize hf loader"] = "no error"
    except ValueError as exc:
        out["optimize hf loader"] = str(exc)
    out["optimize hf loader unchanged"] = linears() == before
    # with a bias (the tiny Llama has none): split with the outputs column-parallel, added once row-parallel
    for style in ("colwise", "rowwise"):
        for cls in (tk.nn.Int4Linear, tk.nn.Sparse24Linear, tk.nn.Sparse24Int4Linear):
            layer = cls.from_linear(nn.Linear(64, 32))
            with torch.no_grad():
                want = layer(x)
                tk.parallel.shard_(layer, mesh, style)
                got = layer(x if style == "colwise" else x.chunk(world, dim=-1)[rank]).full_tensor()
            out[f"{style} bias {cls.__name__}"] = (want, got)
    return out


def scenario_styles(rank: int, world: int) -> dict:
    """Two packed layers (column- then row-parallel) under several layouts, in both orders: the default layouts
    (the local path), the output gathered between the layers and split again, a sequence-parallel output
    (reduce-scatter). Each result is (unsharded output, float64 output of the same weights, the sharded model's
    whole output, local-path flags, what the model returned: the styles promise a plain tensor or a DTensor)."""
    import copy
    from torch import nn
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import parallelize_module
    import turbokernels as tk
    P = tk.parallel
    mesh = _mesh(world)
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(7))
    plans = {"default": lambda: {"0": P.ColwiseParallel(), "1": P.RowwiseParallel()},
             "gathered between": lambda: {"0": P.ColwiseParallel(output_layouts=Replicate()),
                                          "1": P.RowwiseParallel(input_layouts=Replicate())},
             "sequence-parallel output": lambda: {"0": P.ColwiseParallel(),
                                                  "1": P.RowwiseParallel(output_layouts=Shard(1),
                                                                         use_local_output=False)}}

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))

    out = {}
    for kind in ("int4", "int4+sparse24"):
        opts = dict(attention=False, int4=True, sparse24="sparse24" in kind, group_size=32, progress=False)
        whole = build()
        tk.optimize(whole, **opts)
        exact = copy.deepcopy(whole)
        tk.restore(exact)
        with torch.no_grad():
            want, ref64 = whole(x), exact.double()(x.double())
        for plan_name, plan in plans.items():
            for order in ("optimize, shard", "shard, optimize"):
                model = build()
                if order == "optimize, shard":
                    tk.optimize(model, **opts)
                    parallelize_module(model, mesh, plan())
                else:
                    parallelize_module(model, mesh, plan())
                    tk.optimize(model, **opts)
                with torch.no_grad():
                    y = model(x)
                returned = f"DTensor {y.placements}" if isinstance(y, DTensor) else type(y).__name__
                y = y.full_tensor() if isinstance(y, DTensor) else y
                out[f"{kind} {plan_name} {order}"] = (want, ref64, y, [model[i]._tp.local_io for i in (0, 1)],
                                                      returned)
    return out


SCENARIOS: dict[str, Callable] = {"styles": scenario_styles, "load": scenario_load, "compile": scenario_compile,
                                  "logits": scenario_logits, "orders": scenario_orders, "save": scenario_save,
                                  "refusals": scenario_refusals}
