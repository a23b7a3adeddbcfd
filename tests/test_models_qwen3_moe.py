"""Qwen3-MoE from a synthetic llama.cpp-style GGUF vs transformers loading the very same file."""

import contextlib
import warnings

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.generation.streamers import BaseStreamer

import ferrum_mps.loading as loading
from ferrum_mps.models import Qwen3MoeForCausalLM, StaticCache
from ferrum_mps.models.launch import LayerLaunch
from ferrum_mps.nn.moe import FusedMoE
from ferrum_mps import metal
from ferrum_mps.testing.synthetic import synthetic_gguf

GREEDY = dict(do_sample=False, max_new_tokens=20, min_new_tokens=20)
SHORT = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6)  # CPU reference ops are slow: keep the rest short


@pytest.fixture(scope="module")
def synth():
    return synthetic_gguf("qwen3moe")  # 2 layers, 8 experts top-2, expert width != 768, vocab 1027


@pytest.fixture(scope="module")
def model(synth):
    return loading.load_model(synth.path, device="cpu", progress=False)


@pytest.fixture(scope="module")
def ref(synth):
    # config= because transformers 5.23 ignores qwen3moe.expert_feed_forward_length (builds 768-wide experts).
    return synth.hf_model(dtype=torch.float32)


def prompt(n, seed, vocab=1024):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def test_file_has_the_mixed_qtypes_and_our_model_reads_them(synth, model):
    assert {Q.Q4_K, Q.Q6_K, Q.Q8_0} <= set(synth.qtypes.values())
    assert isinstance(model, Qwen3MoeForCausalLM)
    c = model.config
    ref_cfg = synth.config
    assert c.moe_intermediate_size == ref_cfg.moe_intermediate_size not in (768, 0)  # 768: transformers' assumption
    assert (c.num_experts, c.num_experts_per_tok) == (ref_cfg.num_experts, ref_cfg.num_experts_per_tok)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (ref_cfg.num_attention_heads, ref_cfg.num_key_value_heads, ref_cfg.head_dim)
    assert c.vocab_size == ref_cfg.vocab_size >= 1000
    assert not c.tied_lm_head and c.mlp_only_layers == []
    moe = model.layers[1].mlp
    assert isinstance(moe, FusedMoE) and moe.intermediate_size == c.moe_intermediate_size
    assert moe.gate_qtype == int(synth.qtypes["blk.1.ffn_gate_exps.weight"])
    assert moe.down_qtype == int(synth.qtypes["blk.1.ffn_down_exps.weight"])
    # weights stay raw bytes: no float tensor anywhere near the size of a projection
    big_float = [n for n, t in model.state_dict().items() if t.is_floating_point() and t.numel() > 4096]
    assert big_float == [], big_float


def test_logits_match_transformers(model, ref):
    ids = torch.randint(0, 1027, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids).logits, ref(ids).logits
    assert ours.shape == theirs.shape == (2, 13, 1027)
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)


def test_logits_to_keep_and_incremental_cache(model):
    ids = prompt(9, 3)
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
        out = model(ids[:, :6], use_cache=True)
        step = model(ids[:, 6:], past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(step, full[:, 6:], atol=1e-4, rtol=0)


def test_cache_is_accepted_under_both_names_and_returned_under_the_installed_one(model):
    # transformers >= 5.24's generate() passes `cache=` and reads `output.cache`; older ones use
    # `past_key_values`. A cache received under either name must be used (else every step after
    # the first runs without its history) and handed back where generate() looks for it.
    ids = prompt(9, 3)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :6], use_cache=True)
        kv = out.get("cache", None) if "cache" in type(out).__dataclass_fields__ else out.get("past_key_values", None)
        assert kv is not None and kv.get_seq_length() == 6
        step = model(ids[:, 6:7], cache=kv, use_cache=True)
        torch.testing.assert_close(step.logits, full[:, 6:7], atol=1e-4, rtol=0)
        step = model(ids[:, 7:], past_key_values=kv, use_cache=True).logits
        torch.testing.assert_close(step, full[:, 7:], atol=1e-4, rtol=0)
        with pytest.raises(ValueError, match="cache once"):
            model(ids[:, :1], cache=kv, past_key_values=model.static_cache(1, 8))


def test_static_cache_follows_to_dtype(model):
    # After .to() the cache must write into the moved tensors (it kept stale copies once).
    ids = prompt(3, 2)
    with torch.no_grad():
        want = model.decode_step(ids, model.static_cache(1, 8), torch.arange(3))
        moved = model.static_cache(1, 8).to(torch.float64).to(torch.float32)
        torch.testing.assert_close(model.decode_step(ids, moved, torch.arange(3)), want, atol=1e-5, rtol=0)
        assert moved.k[0].dtype == torch.float32
        assert moved.k[0][:, :, :3].abs().sum() > 0 and moved.k[0][:, :, 3:].abs().sum() == 0


def test_greedy_generate_matches_transformers(model, ref):
    ids = prompt(7, 1)
    ours = model.generate(ids, **GREEDY)
    theirs = ref.generate(ids, **GREEDY)
    assert ours.shape == (1, 27)
    assert ours.tolist() == theirs.tolist()


def test_left_padded_batch_equals_per_prompt(model, synth):
    a, b = prompt(7, 1), prompt(4, 2)
    pad = synth.config.pad_token_id
    batch = torch.cat([a, torch.cat([torch.full((1, 3), pad), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    both = model.generate(batch, attention_mask=mask, **SHORT)
    assert both[0].tolist() == model.generate(a, **SHORT)[0].tolist()
    assert both[1, 7:].tolist() == model.generate(b, **SHORT)[0, 4:].tolist()


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_streamer_and_sampling_through_generate(model, synth):
    tok = loading.load_tokenizer(synth.path)
    enc = tok("hello world", return_tensors="pt")
    streamer = Collect()
    out = model.generate(**enc, streamer=streamer, **SHORT)
    streamed = [t for chunk in streamer.chunks[1:] for t in chunk]  # first put() is the prompt
    assert streamer.ended and streamed == out[0, enc.input_ids.shape[1]:].tolist()
    # stop strings go through transformers' own StopStringCriteria: stop at the 3rd generated token's text
    new = out[0, enc.input_ids.shape[1]:]
    stop = tok.decode(new[2:3])
    assert stop.strip() and stop not in tok.decode(new[:2]), "pick another prompt: the stop string must be new"
    stopped = model.generate(**enc, stop_strings=[stop], tokenizer=tok, **dict(SHORT, min_new_tokens=0))
    assert stopped[0].tolist() == out[0, : enc.input_ids.shape[1] + 3].tolist()
    torch.manual_seed(0)
    s1 = model.generate(**enc, do_sample=True, temperature=0.8, top_p=0.9, max_new_tokens=4)
    torch.manual_seed(0)
    s2 = model.generate(**enc, do_sample=True, temperature=0.8, top_p=0.9, max_new_tokens=4)
    assert s1.tolist() == s2.tolist() and s1.shape[1] <= enc.input_ids.shape[1] + 4
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def generate_with_logits(model, ids, n, **kw):
    out = model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, output_logits=True,
                         return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits, 1), getattr(out, "cache", None) or out.past_key_values


def test_generate_defaults_to_a_static_cache_sized_from_the_request(model, ref):
    ids = prompt(7, 1)
    toks, logits, cache = generate_with_logits(model, ids, 5)
    # every token but the last is fed back: prompt + 4 slots, all filled, none to spare
    assert isinstance(cache, StaticCache) and cache.max_len == cache.seen == 7 + 4
    assert toks.tolist() == ref.generate(ids, **dict(GREEDY, max_new_tokens=5, min_new_tokens=5)).tolist()
    dyn_toks, dyn_logits, dyn = generate_with_logits(model, ids, 5, cache_implementation="dynamic")
    assert not isinstance(dyn, StaticCache) and dyn_toks.tolist() == toks.tolist()
    torch.testing.assert_close(logits, dyn_logits, atol=1e-4, rtol=0)


def test_generate_from_inputs_embeds(model):
    ids = prompt(5, 7)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    from_embeds = model.generate(inputs_embeds=embeds, **SHORT)  # only the new tokens
    assert from_embeds.tolist() == model.generate(ids, **SHORT)[:, 5:].tolist()


class HostSyncs(TorchDispatchMode):
    """Counts aten ops that read a tensor value on the host (ferrum ops are not entered: a mode
    is off while it handles an op, and their CPU impls' input checks do not exist on MPS)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("_local_scalar_dense", "is_nonzero", "item", "equal"):
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_static_cache_forward_reads_nothing_back_from_the_device(model):
    mode, active = HostSyncs(), []
    pre = model.register_forward_pre_hook(lambda *a: active.append(mode.__enter__()))
    post = model.register_forward_hook(lambda *a: mode.__exit__(None, None, None))
    try:
        ids = prompt(5, 3)
        batch = torch.cat([ids, torch.cat([torch.full((1, 2), 1024), ids[:, :3]], 1)])
        mask = torch.ones_like(batch)
        mask[1, :2] = 0
        model.generate(batch, attention_mask=mask, **SHORT)
    finally:
        pre.remove(), post.remove()
    assert len(active) == 6 and mode.n == 0


def test_compiled_decode_inside_generate_equals_eager(model):
    ids = prompt(7, 1)
    eager_toks, eager_logits, _ = generate_with_logits(model, ids, 5)
    torch._dynamo.reset()
    model.compile_decode()  # fullgraph: any graph break raises
    try:
        comp_toks, comp_logits, cache = generate_with_logits(model, ids, 5)
        again, _, _ = generate_with_logits(model, prompt(7, 9), 5)  # same shapes: the graph is reused
    finally:
        model.compile_decode(enabled=False)
    assert comp_toks.tolist() == eager_toks.tolist() and cache.seen == 7 + 4
    torch.testing.assert_close(comp_logits, eager_logits, atol=1e-4, rtol=0)
    assert again.tolist() == generate_with_logits(model, prompt(7, 9), 5)[0].tolist()


def test_loaded_model_is_frozen_so_compiling_needs_no_no_grad(model):
    # The ferrum ops have no backward: a trainable parameter (the float router) made inductor
    # trace one and fail when the README's compile line ran outside no_grad.
    assert not any(p.requires_grad for p in model.parameters())
    ids = prompt(3, 2)
    with torch.no_grad():
        want = model.decode_step(ids, model.static_cache(1, 16), torch.arange(3))
    torch._dynamo.reset()
    got = torch.compile(model.decode_step, fullgraph=True)(ids, model.static_cache(1, 16), torch.arange(3))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


# every op the model can call, fused ones included (each has its MPS function in ferrum_mps.metal)
METAL_OPS = ("qlinear", "qembedding", "moe_route", "moe_ffn", "rms_norm", "add_rms_norm", "qk_norm_rope_cache",
             "moe_gate_route", "decode_attention", "qkv_linear", "gate_up_act")


@contextlib.contextmanager
def metal_kernels_on_cpu():
    """Route the ferrum ops of CPU tensors through their MPS implementations (launch code + Metal sources)."""
    lib, calls = torch.library.Library("ferrum", "IMPL"), {}

    def counted(name):
        def run(*args):
            calls[name] = calls.get(name, 0) + 1
            return getattr(metal, name)(*args)

        return run

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            for name in METAL_OPS:
                lib.impl(name, counted(name), "CPU")
        yield calls
    finally:
        lib._destroy()  # the CPU reference kernels are back


@pytest.fixture
def layer_launches(monkeypatch):
    """Counts the decoder-layer calls that ran models/launch.py's launch path."""
    n, call = [0], LayerLaunch.__call__

    def counted(self, *args):
        n[0] += 1
        return call(self, *args)

    monkeypatch.setattr(LayerLaunch, "__call__", counted)
    return n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_whole_model_on_the_metal_path_equals_cpu_ops(synth, metal_device, dtype, layer_launches):
    """The same model through the Metal kernels (harness on CPU, the GPU on a Mac): prefill and a decode step,
    per-kernel ops on a DynamicCache, the layers' own launches (models/launch.py) on the static cache."""
    cpu = loading.load_model(synth.path, device="cpu", dtype=dtype, progress=False)
    ids = prompt(6, 4)
    with torch.no_grad():
        want = cpu(ids, use_cache=True)
        want_step = cpu(ids[:, :1], past_key_values=want.past_key_values).logits
        if metal_device.type == "mps":
            gpu = loading.load_model(synth.path, device="mps", dtype=dtype, progress=False)
            run = lambda x, **kw: gpu(x.to("mps"), **kw)  # noqa: E731
            ctx, model = contextlib.nullcontext(), gpu
        else:
            run, ctx, model = cpu, metal_kernels_on_cpu(), cpu
        with ctx as calls:
            got = run(ids, use_cache=True)
            got_step = run(ids[:, :1], past_key_values=got.past_key_values).logits
            # the static cache (generate()'s default): fused q/k norm + rope + cache write, decode attention,
            # every kernel of a layer launched by the layer itself (the default on MPS tensors)
            model.launch_path = True
            cache = model.static_cache(1, 8)
            got_static = run(ids, past_key_values=cache).logits
            got_static_step = run(ids[:, :1], past_key_values=cache).logits
    assert layer_launches[0] == 2 * 2  # 2 layers x the 2 static-cache forwards
    if metal_device.type == "cpu":  # every op really went through the Metal launch code
        # the 2 DynamicCache forwards through the ops; of the static ones only embedding, final norm and lm_head
        assert calls["qembedding"] == 4 and calls["moe_ffn"] == 2 * 2 and calls["moe_gate_route"] == 2 * 2
        assert calls["qkv_linear"] == 2 * 2 and calls["qlinear"] == 2 * 2 + 4  # o_proj x 2 layers; lm_head
        assert "qk_norm_rope_cache" not in calls and "decode_attention" not in calls
        # 3 residual adds + the final norm per forward; layer-0 norm + q/k norms
        assert calls["add_rms_norm"] == 2 * 4 + 2 and calls["rms_norm"] == 2 * (1 + 2 * 2)
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.logits.cpu().float(), want.logits.float(), atol=tol, rtol=0)
    torch.testing.assert_close(got_step.cpu().float(), want_step.float(), atol=tol, rtol=0)
    torch.testing.assert_close(got_static.cpu().float(), want.logits.float(), atol=tol, rtol=0)
    torch.testing.assert_close(got_static_step.cpu().float(), want_step.float(), atol=tol, rtol=0)


def test_launch_path_in_generate_and_under_compile(model, metal_device, layer_launches):
    """generate() on the layers' own launches equals the CPU ops; torch.compile(fullgraph) traces the ops instead."""
    ids = prompt(5, 8)
    want_toks, want_logits, _ = generate_with_logits(model, ids, 3)
    model.launch_path = True
    try:
        if metal_device.type == "mps":
            model.to("mps")
        toks, logits, _ = generate_with_logits(model, ids.to(metal_device), 3)
        assert layer_launches[0] == 2 * 3  # 2 layers x (prefill + 2 one-token steps)
        torch._dynamo.reset()
        model.compile_decode()  # fullgraph: a graph break on the launch path would raise
        comp_toks, comp_logits, _ = generate_with_logits(model, ids.to(metal_device), 3)
        assert layer_launches[0] == 2 * 3 + 2  # the eager prefill only: compiled steps run the ops
    finally:
        model.compile_decode(enabled=False)
        model.launch_path = None
        model.to("cpu")
    assert toks.tolist() == want_toks.tolist() == comp_toks.tolist()
    torch.testing.assert_close(logits.cpu(), want_logits, atol=1e-3, rtol=0)
    torch.testing.assert_close(comp_logits.cpu(), want_logits, atol=1e-3, rtol=0)


def as_float_linear(q):
    lin = torch.nn.Linear(q.in_features, q.out_features, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.ops.ferrum.dequantize(q.raw, q.qtype, q.out_features, q.in_features, torch.float32))
    return lin


def test_launch_path_yields_to_hooks_and_swapped_projections(model, metal_device, layer_launches):
    """A forward hook on a submodule, or a projection that is not a QuantLinear, sends the layer to the
    ops path (the launches would skip both): the hook fires and the logits stay those of the CPU ops."""
    if metal_device.type != "cpu":
        pytest.skip("runs CPU tensors through the harness; the mps variant of the fixture has no harness")
    ids = prompt(5, 8)
    with torch.no_grad():
        want = model(ids, past_key_values=model.static_cache(1, 8)).logits
    attn = model.layers[1].self_attn
    seen, o_proj, q_proj = [], attn.o_proj, attn.q_proj
    handle = attn.q_proj.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    model.launch_path = True
    try:
        with metal_kernels_on_cpu(), torch.no_grad():
            hooked = model(ids, past_key_values=model.static_cache(1, 8)).logits
            handle.remove()
            attn.o_proj, attn.q_proj = as_float_linear(o_proj), as_float_linear(q_proj)
            model.layers[1]._launch = None
            swapped = model(ids, past_key_values=model.static_cache(1, 8)).logits
    finally:
        handle.remove()
        attn.o_proj, attn.q_proj = o_proj, q_proj
        model.layers[1]._launch = None
        model.launch_path = None
    assert seen == [torch.Size([1, 5, attn.q_proj.out_features])]  # the hooked layer ran its modules
    assert layer_launches[0] == 2 * 1  # layer 0 of each forward launched itself, layer 1 did not
    torch.testing.assert_close(hooked, want, atol=1e-3, rtol=0)
    torch.testing.assert_close(swapped, want, atol=1e-3, rtol=0)


def test_dense_layers_inside_a_moe_model():
    """A block with ffn_gate/up/down instead of a router + experts (transformers' mlp_only_layers).

    transformers 5.23's GGUF loader leaves such dense blocks randomly initialised (reported MISSING),
    so the reference is its Qwen3MoeForCausalLM on the file's tensors dequantized by gguf-py.
    """
    from transformers import Qwen3MoeForCausalLM as HFQwen3Moe

    from ferrum_mps.testing.synthetic import dequantized_hf_state_dict

    synth = synthetic_gguf("qwen3moe", mlp_only_layers=[0])
    model = loading.load_model(synth.path, device="cpu", progress=False)
    assert model.config.mlp_only_layers == [0] and not isinstance(model.layers[0].mlp, FusedMoE)
    assert isinstance(model.layers[1].mlp, FusedMoE)
    ref = HFQwen3Moe(synth.config).eval()
    ref.load_state_dict(dequantized_hf_state_dict(synth.path, synth.config), strict=True)
    ids = prompt(9, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-3, rtol=0)
