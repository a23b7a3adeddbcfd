"""Decode budget per generated token: device dispatches, host syncs and host time, next to the goal.

Runs `model.generate()` on CPU tensors with every ferrum op routed to its MPS implementation (the
launch code a Mac runs) and the Metal kernels replaced by stubs that only count their launches,
so the numbers are the host side of a decode step on a Mac:

  metal      Metal kernel launches (counted at the shader-compiler seam, ferrum_mps.shaders)
  aten       other device ops: aten compute ops seen by a TorchDispatchMode (views, allocations,
             metadata ops and the host-side reductions of CPU-only input checks excluded)
  syncs      host syncs: aten._local_scalar_dense (item/int/bool of a tensor), Tensor.tolist/numpy
  host us    wall time of the decode forward per layer (kernels stubbed; aten ops run on the CPU)

    python benchmarks/bench_decode_budget.py                      # synthetic Qwen3-30B-A3B dims, 2 layers
    python benchmarks/bench_decode_budget.py --model gemma        # the embedded Gemma-3-270M
    python benchmarks/bench_decode_budget.py --model path/to.gguf --tokens 8
    python benchmarks/bench_decode_budget.py --launch layer dispatcher   # side by side: layer launches vs per-kernel ops

Budget (issue 11): Qwen3-30B-A3B Q4_K_M reads ~1.92 GB per token; at 60% of an M-Max's 400 GB/s
that is ~8 ms per token, ~170 us per layer for 48 layers. Goal: <= 10 dispatches per layer,
<= 150 us host per layer, <= 1 sync per token (generate()'s own stopping check).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

BUDGET = {"dispatches_per_layer": 10, "host_us_per_layer": 150.0, "syncs_per_token": 1, "gpu_us_per_layer": 170.0}

# aten ops that launch nothing on a GPU: views, metadata, allocations.
_FREE = {
    "view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze", "select",
    "slice", "as_strided", "alias", "detach", "split", "split_with_sizes", "chunk", "unbind", "narrow",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "_reshape_alias",
    "view_as", "unflatten", "flatten", "movedim", "diagonal", "is_same_size",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "dim", "size", "stride", "numel",
    "set_", "resize_", "_has_compatible_shallow_copy_type",
}
# aten ops that read a device value on the host (bool(t), t.item(), int(t), torch.equal).
_SYNC = {"_local_scalar_dense", "is_nonzero", "item", "equal"}
# Host-side reductions that feed a CPU-only input check inside an MPS launch function (they do
# not run on a Mac: the check is gated on ids.device.type == "cpu").
_HOST_CHECK = {"min", "max", "aminmax"}


class Stats:
    def __init__(self):
        self.metal = 0
        self.aten = Counter()
        self.syncs = 0
        self.in_op_syncs = 0
        self.in_op = 0  # depth inside a ferrum op's launch function
        self.counting = False

    def total_aten(self) -> int:
        return sum(self.aten.values())


class _StubKernel:
    def __init__(self, stats: Stats):
        self.stats = stats

    def __call__(self, *args, **kwargs):
        self.stats.metal += 1


class _StubLibrary:
    def __init__(self, stats: Stats):
        self.stats = stats

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _StubKernel(self.stats)


class CountOps(TorchDispatchMode):
    def __init__(self, stats: Stats):
        super().__init__()
        self.stats = stats

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace == "ferrum":  # counted as Metal launches at the shader seam
            return func(*args, **(kwargs or {}))
        if name in _SYNC:
            if self.stats.in_op:
                self.stats.in_op_syncs += 1
            else:
                self.stats.syncs += 1
        elif name not in _FREE and not (self.stats.in_op and name in _HOST_CHECK):
            out = func(*args, **(kwargs or {}))
            # .to()/.contiguous() that return their input launch nothing
            if not (name in ("_to_copy", "clone", "contiguous", "to") and out is (args[0] if args else None)):
                self.stats.aten[name] += 1
            return out
        return func(*args, **(kwargs or {}))


def launch_functions(unchecked: bool) -> dict:
    """op name -> its MPS launch function (`unchecked`: the launch_* variants without argument checks where they exist)."""
    import importlib

    from ferrum_mps import metal

    fns = {n: getattr(metal, n) for n in ("qlinear", "qembedding", "moe_route", "moe_ffn", "moe_qlinear") if hasattr(metal, n)}
    fns.update(extra_mps_impls())
    if unchecked:
        for op in list(fns):
            for mod in ("norm", "attention", "fused_linear"):
                try:
                    m = importlib.import_module(f"ferrum_mps.ops.{mod}")
                except ImportError:
                    continue
                if hasattr(m, f"launch_{op}"):
                    fns[op] = getattr(m, f"launch_{op}")
    return fns


@contextlib.contextmanager
def direct_calls(stats: Stats, unchecked: bool):
    """Experiment: torch.ops.ferrum.<op> replaced by a plain Python call of its launch function, i.e. no
    dispatcher per kernel: the host cost one custom op per decoder layer would pay inside (plus its one dispatch)."""
    from ferrum_mps import shaders

    ns, saved = torch.ops.ferrum, {}
    try:
        for op, fn in launch_functions(unchecked).items():
            saved[op] = getattr(ns, op)
            setattr(ns, op, fn)
        with shaders.use_shader_compiler(lambda source: _StubLibrary(stats)):
            yield
    finally:
        for op, fn in saved.items():
            setattr(ns, op, fn)


@contextlib.contextmanager
def metal_launch_path(stats: Stats):
    """Every ferrum op on CPU tensors runs its MPS launch function; every Metal kernel is a counting stub."""
    from ferrum_mps import metal, shaders

    names = [n for n in ("qlinear", "qembedding", "moe_route", "moe_ffn", "moe_qlinear", "dequantize") if hasattr(metal, n)]
    lib = torch.library.Library("ferrum", "IMPL")

    def routed(fn):
        def run(*args):
            # A dispatch mode is off while it handles an op: count the launch function's own aten ops
            # (casts, copies: real dispatches on MPS) with a fresh mode when counting is on.
            stats.in_op += 1
            try:
                with CountOps(stats) if stats.counting else contextlib.nullcontext():
                    return fn(*args)
            finally:
                stats.in_op -= 1

        return run

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            for n in names:
                lib.impl(n, routed(getattr(metal, n)), "CPU")
            for n, fn in extra_mps_impls().items():
                lib.impl(n, routed(fn), "CPU")
        with shaders.use_shader_compiler(lambda source: _StubLibrary(stats)):
            yield
    finally:
        lib._destroy()


def extra_mps_impls() -> dict:
    """MPS launch functions of the fused ops (ferrum_mps.ops.fused_*), when they exist."""
    import importlib
    import pkgutil

    import ferrum_mps.ops as ops_pkg

    found = {}
    for m in pkgutil.iter_modules(ops_pkg.__path__):
        if m.name in ("linear", "moe"):
            continue
        mod = importlib.import_module(f"ferrum_mps.ops.{m.name}")
        for attr in dir(mod):
            if attr.endswith("_mps") and callable(getattr(mod, attr)):
                op = attr[: -len("_mps")]
                if hasattr(torch.ops.ferrum, op):
                    found[op] = getattr(mod, attr)
    return found


@contextlib.contextmanager
def count_host_reads(stats: Stats):
    """Tensor.tolist / numpy read device memory on the host without going through aten on CPU tensors."""
    orig = {n: getattr(torch.Tensor, n) for n in ("tolist", "numpy")}

    def wrap(n):
        def f(self, *a, **k):
            if stats.in_op:
                stats.in_op_syncs += 1
            else:
                stats.syncs += 1
            return orig[n](self, *a, **k)

        return f

    try:
        for n in orig:
            setattr(torch.Tensor, n, wrap(n))
        yield
    finally:
        for n, f in orig.items():
            setattr(torch.Tensor, n, f)


class ForwardProbe:
    """Per forward call of the model: the stats delta and wall time, split into layers and the rest."""

    def __init__(self, model, stats: Stats | None):
        self.model, self.stats, self.calls = model, stats, []
        self.handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                        model.register_forward_hook(self._post, with_kwargs=True),
                        model.layers[0].register_forward_pre_hook(self._layers_pre),
                        model.layers[-1].register_forward_hook(self._layers_post)]

    def _snap(self):
        s = self.stats
        return (s.metal, s.total_aten(), s.syncs, Counter(s.aten)) if s else (0, 0, 0, Counter())

    def _pre(self, mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.cur = {"T": ids.shape[1], "t0": time.perf_counter(), "s0": self._snap()}

    def _layers_pre(self, mod, args):
        self.cur["l0"], self.cur["ls0"] = time.perf_counter(), self._snap()

    def _layers_post(self, mod, args, out):
        self.cur["l1"], self.cur["ls1"] = time.perf_counter(), self._snap()

    def _post(self, mod, args, kwargs, out):
        self.cur["t1"], self.cur["s1"] = time.perf_counter(), self._snap()
        self.calls.append(self.cur)

    def remove(self):
        for h in self.handles:
            h.remove()


def load(name: str, layers: int, dtype):
    import ferrum_mps

    if name == "qwen3moe-a3b":
        from ferrum_mps.testing import synthetic as S

        cfg = S.qwen3_30b_a3b_config(layers, full_vocab=False)
        m = S.synthetic_gguf(cfg, unique_rows=1024, unique_experts=4, progress=True)
        path = m.path
    elif name == "gemma":
        from ferrum_mps.default_model import default_model_path

        path = default_model_path()
    else:
        path = name
    return ferrum_mps.load_model(path, device="cpu", dtype=dtype, progress=False)


def run(model, prompt_len: int, tokens: int, count: bool, generate_kwargs: dict, launch: str = "dispatcher"):
    stats = Stats() if count else None
    probe = ForwardProbe(model, stats)
    ids = torch.randint(3, min(model.config.vocab_size, 1000), (1, prompt_len), generator=torch.Generator().manual_seed(0))
    gen_stats = Stats()
    if launch in ("dispatcher", "layer"):
        path = metal_launch_path(stats or gen_stats)
    else:
        path = direct_calls(gen_stats, launch == "unchecked")
    # "layer": the decoder layers call the launch functions themselves (models/launch.py, the default on MPS)
    model.launch_path = launch == "layer"
    with path, torch.inference_mode():
        ctx = contextlib.ExitStack()
        if count:
            stats.counting = True
            ctx.enter_context(CountOps(stats))
            ctx.enter_context(count_host_reads(stats))
        with ctx:
            # eos_token_id=None fixes the length; min_new_tokens would add a vocabulary-wide mask per step
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens + 1,
                           eos_token_id=None, do_sample=False, pad_token_id=0, **generate_kwargs)
    probe.remove()
    model.launch_path = None
    return probe.calls, stats


def summarize(model, calls, stats, n_layers):
    decode = [c for c in calls if c["T"] == 1]
    if not decode:
        raise RuntimeError("no decode step was seen")
    per = lambda i: statistics.mean(c["s1"][i] - c["s0"][i] for c in decode)  # noqa: E731
    per_layer = lambda i: statistics.mean(c["ls1"][i] - c["ls0"][i] for c in decode) / n_layers  # noqa: E731
    ops_layer = Counter()
    for c in decode:
        ops_layer.update(c["ls1"][3] - c["ls0"][3])
    return {
        "metal_per_layer": per_layer(0), "aten_per_layer": per_layer(1),
        "metal_per_token": per(0), "aten_per_token": per(1),
        "syncs_in_forward": per(2),
        "aten_layer_breakdown": {k: v / len(decode) / n_layers for k, v in ops_layer.most_common()},
    }


def host_time(calls, n_layers):
    decode = [c for c in calls if c["T"] == 1][1:]  # the first decode step warms caches
    # min over steps: the machine is shared, and the noise only ever adds time
    layer_us = min((c["l1"] - c["l0"]) * 1e6 / n_layers for c in decode)
    fwd_us = min((c["t1"] - c["t0"]) * 1e6 for c in decode)
    return layer_us, fwd_us


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3moe-a3b", help="qwen3moe-a3b (synthetic), gemma, or a .gguf path")
    p.add_argument("--layers", type=int, default=2, help="layers of the synthetic model (default 2)")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--tokens", type=int, default=6, help="decode steps measured")
    p.add_argument("--dtype", default="float32", choices=("float16", "float32", "bfloat16"),
                   help="activation dtype (float32: the CPU has no fast float16 for the aten ops that still run)")
    p.add_argument("--repeat", type=int, default=3, help="timed generate() runs (the minimum is reported)")
    p.add_argument("--breakdown", action="store_true", help="print the aten ops of one layer")
    p.add_argument("--launch", nargs="+", default=["layer"], choices=("layer", "dispatcher", "direct", "unchecked"),
                   help="how the decoder layers reach the kernels: calling the launch functions themselves (layer, "
                        "what MPS runs; default), one op per kernel through the dispatcher (dispatcher), or, as "
                        "experiments, every op replaced by a direct Python call of its MPS function (direct) or of its "
                        "unchecked launch_* variant (unchecked). The first one listed is counted and is the base of the ratios")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: host cost is single-threaded; more threads only spin)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = load(a.model, a.layers, getattr(torch, a.dtype))
    L = len(model.layers)
    # counted run (the dispatch mode costs host time itself: timing runs go without it)
    calls, stats = run(model, a.prompt, a.tokens, True, {}, a.launch[0] if a.launch[0] in ("layer", "dispatcher") else "dispatcher")
    s = summarize(model, calls, stats, L)
    tokens_run = sum(1 for c in calls if c["T"] == 1) + 1
    decode = [c for c in calls if c["T"] == 1]
    # from one decode step's start to the next: generate()'s per-token work included, its one-time setup not
    syncs_total = (decode[-1]["s0"][2] - decode[0]["s0"][2]) / max(1, len(decode) - 1)
    by_launch = {}
    for _ in range(a.repeat):  # interleaved: the machine's load drifts
        for launch in a.launch:
            by_launch.setdefault(launch, []).append(host_time(run(model, a.prompt, a.tokens, False, {}, launch)[0], L))
    layer_us = min(t[0] for t in by_launch[a.launch[0]])
    fwd_us = min(t[1] for t in by_launch[a.launch[0]])
    print(f"model {a.model}: {L} layers, hidden {model.config.hidden_size}, {a.dtype}, prompt {a.prompt}, "
          f"{a.tokens} decode steps, torch {torch.__version__}")
    rows = [
        ("metal launches / layer", s["metal_per_layer"], None),
        ("other device ops / layer", s["aten_per_layer"], None),
        ("device dispatches / layer", s["metal_per_layer"] + s["aten_per_layer"], BUDGET["dispatches_per_layer"]),
        ("device dispatches / token (whole forward)", s["metal_per_token"] + s["aten_per_token"], None),
        ("  of which outside the layers", s["metal_per_token"] + s["aten_per_token"]
         - L * (s["metal_per_layer"] + s["aten_per_layer"]), None),
        ("host syncs / token in forward", s["syncs_in_forward"], 0),
        ("host syncs / token incl. generate()", syncs_total, BUDGET["syncs_per_token"]),
        ("host us / layer (kernels stubbed)", layer_us, BUDGET["host_us_per_layer"]),
        ("host us / decode forward", fwd_us, None),
    ]
    print(f"{'per generated token':45s} {'measured':>10s} {'goal':>8s} {'ratio':>7s}")
    for name, v, goal in rows:
        g = "" if goal is None else f"{goal:8g}"
        r = "" if not goal else f"{v / goal:7.2f}"
        print(f"{name:45s} {v:10.1f} {g:>8s} {r:>7s}")
    if stats.in_op_syncs:
        print(f"(+{stats.in_op_syncs / max(1, tokens_run):.1f} syncs/token inside op launch functions on CPU "
              "tensors only: their input checks are gated on the CPU device and skip on MPS)")
    print(f"GPU budget per layer at 60% of 400 GB/s for Qwen3-30B-A3B Q4_K_M: ~{BUDGET['gpu_us_per_layer']:.0f} us; "
          f"host/GPU ratio {layer_us / BUDGET['gpu_us_per_layer']:.2f}")
    if len(a.launch) > 1:
        base = min(t[0] for t in by_launch[a.launch[0]])
        for launch, ts in by_launch.items():
            us = min(t[0] for t in ts)
            print(f"host us / layer, ops called via {launch:10s}: {us:8.1f}  ({us / base:.2f}x of {a.launch[0]})")
    if a.breakdown:
        print("aten ops per layer per token:", ", ".join(f"{k} {v:g}" for k, v in s["aten_layer_breakdown"].items()))


if __name__ == "__main__":
    main()
