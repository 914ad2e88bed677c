#!/usr/bin/env python3
"""PyTorch reference model for Joule's supported MoE families.

Follows the math of Hugging Face transformers' modeling code for
  * Qwen3MoeForCausalLM  (modeling_qwen3_moe.py)
  * Qwen2MoeForCausalLM  (modeling_qwen2_moe.py)
  * MixtralForCausalLM   (modeling_mixtral.py)
  * DeepseekV3ForCausalLM (modeling_deepseek_v3.py; BF16 or FP8 block-scaled weights)
without depending on transformers or safetensors: weights are read with json +
numpy and upcast once to float32 (FP8 ones dequantized with their block scales);
every computation runs in float32.

Module use:
    model = load_model("/path/to/checkpoint")
    logits = model.logits([1, 2, 3])                 # [T, vocab], full recompute
    ids, margins = model.greedy([1, 2, 3], 12)       # KV-cached greedy decode

CLI (see tests/reference/README.md):
    reference.py logits    --model DIR --ids 1,2,3
    reference.py generate  --model DIR --ids 1,2,3 [--steps 12]
    reference.py selfcheck --model DIR
    reference.py fp8check  --model FP8_DIR --like BF16_DIR
    reference.py golden    --model DIR --name NAME --out FILE [--source TEXT]
    reference.py check     --models-dir DIR --fixtures FILE... [--atol 1e-4]
    reference.py bench     --model DIR --batch 1 --batch 64 --prompt-len 32
                           --decode-steps 32 --threads 2 [--json OUT]

Exit status 77 means "torch is not importable": ctest treats it as SKIP.
"""

import argparse
import glob
import hashlib
import json
import math
import os
import platform
import struct
import sys
import time

try:
    import numpy as np
    import torch
    import torch.nn.functional as F
except ImportError as _import_error:  # main() reports it and exits with SKIP_RETURN_CODE
    torch = None
    F = None
    _IMPORT_ERROR = str(_import_error)

SKIP_RETURN_CODE = 77

# The built-in byte-level tokenizer: bytes 0..255 plus specials 256..258.
TOKENIZER_ID_LIMIT = 259
GOLDEN_PROMPT_LENGTHS = (1, 6, 19, 37)
GOLDEN_SEED = 20240611
GOLDEN_GREEDY_STEPS = 12
SELF_CHECK_ATOL = 1e-5
GREEDY_TIE_MARGIN = 1e-3


class CheckpointError(Exception):
    """A checkpoint or configuration the reference refuses to guess about."""


# --------------------------------------------------------------------------
# safetensors reader (json + numpy)
# --------------------------------------------------------------------------

def _bf16_to_f32(raw_u16):
    return (raw_u16.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path, dtypes=None):
    """Returns {name: float32 numpy array} for one .safetensors file; F8_E4M3 values are decoded
    but not scaled (DeepseekV3Model applies the block scales). Fills `dtypes` {name: dtype}."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path}: shorter than the 8-byte safetensors header length")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > file_size - 8:
            raise CheckpointError(f"{path}: header length {header_len} exceeds file size {file_size}")
        header = json.loads(f.read(header_len).decode("utf-8"))
    data_start = 8 + header_len
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start,
                     shape=(file_size - data_start,)) if file_size > data_start else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info["dtype"]
        shape = [int(s) for s in info["shape"]]
        begin, end = (int(x) for x in info["data_offsets"])
        count = int(np.prod(shape)) if shape else 1
        itemsize = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1}.get(dtype)
        if itemsize is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype} "
                                  "(reference reads BF16, F16, F32, F8_E4M3)")
        if end < begin or end > data.shape[0] or end - begin != count * itemsize:
            raise CheckpointError(f"{path}: tensor {name} has bad data_offsets [{begin}, {end}) "
                                  f"for shape {shape} {dtype}")
        raw = np.asarray(data[begin:end])
        if dtypes is not None:
            dtypes[name] = dtype
        if dtype == "F8_E4M3":
            arr = e4m3_to_f32(raw)
        elif dtype == "BF16":
            arr = _bf16_to_f32(raw.view("<u2"))
        elif dtype == "F16":
            arr = raw.view("<f2").astype(np.float32)
        else:
            arr = raw.view("<f4").astype(np.float32)
        tensors[name] = arr.reshape(shape)
    return tensors


def read_checkpoint_tensors(model_dir, dtypes=None):
    """Reads model.safetensors, or the shards named by model.safetensors.index.json."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    tensors = {}
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        by_file = {}
        for name, fname in weight_map.items():
            by_file.setdefault(fname, set()).add(name)
        for fname, names in sorted(by_file.items()):
            shard = read_safetensors(os.path.join(model_dir, fname), dtypes)
            missing = names - set(shard)
            if missing:
                raise CheckpointError(f"{fname}: index names tensors the shard lacks: {sorted(missing)[:5]}")
            extra = set(shard) - names
            if extra:
                raise CheckpointError(f"{fname}: shard holds tensors the index does not map to it: "
                                      f"{sorted(extra)[:5]}")
            tensors.update(shard)
        return tensors
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors files")
    for path in files:
        for name, arr in read_safetensors(path, dtypes).items():
            if name in tensors:
                raise CheckpointError(f"{path}: duplicate tensor {name}")
            tensors[name] = arr
    return tensors


def checkpoint_digest(model_dir):
    """sha256 over config.json and the safetensors files, to tell checkpoints apart."""
    h = hashlib.sha256()
    names = ["config.json"] + sorted(os.path.basename(p) for p in
                                     glob.glob(os.path.join(model_dir, "*.safetensors")))
    for name in names:
        h.update(name.encode())
        with open(os.path.join(model_dir, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------

FAMILIES = {
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "MixtralForCausalLM": "mixtral",
}

# Defaults of the HF configuration classes where a key may be absent.
_DEFAULTS = {
    "qwen3_moe": dict(rms_norm_eps=1e-6, rope_theta=10000.0, norm_topk_prob=False,
                      attention_bias=False, decoder_sparse_step=1),
    "qwen2_moe": dict(rms_norm_eps=1e-6, rope_theta=10000.0, norm_topk_prob=False,
                      qkv_bias=True, decoder_sparse_step=1),
    "mixtral": dict(rms_norm_eps=1e-5, rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2),
}


class Config:
    def __init__(self, raw):
        self.raw = raw
        archs = raw.get("architectures") or []
        if not archs:
            raise CheckpointError("config.json: 'architectures' is missing or empty")
        self.architecture = archs[0]
        if self.architecture not in FAMILIES:
            raise CheckpointError(f"config.json: architectures[0]={self.architecture!r} is not one of "
                                  f"{sorted(FAMILIES) + [DEEPSEEK_V3_ARCHITECTURE]}")
        fam = self.family = FAMILIES[self.architecture]
        d = _DEFAULTS[fam]

        def req(key):
            if raw.get(key) is None:
                raise CheckpointError(f"config.json: {key!r} is required")
            return raw[key]

        self.vocab_size = int(req("vocab_size"))
        self.hidden_size = int(req("hidden_size"))
        self.num_layers = int(req("num_hidden_layers"))
        self.num_heads = int(req("num_attention_heads"))
        self.num_kv_heads = int(raw.get("num_key_value_heads") or self.num_heads)
        # Qwen3/Mixtral: getattr(config, "head_dim", None) or hidden // heads.
        self.head_dim = int(raw.get("head_dim") or self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError("config.json: num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise CheckpointError("config.json: head_dim must be even for RoPE")
        self.rms_norm_eps = float(raw.get("rms_norm_eps", d["rms_norm_eps"]))
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"config.json: hidden_act={act!r} unsupported (only 'silu')")
        self.tie_word_embeddings = bool(raw.get("tie_word_embeddings", False))

        # RoPE: only the default rotation; refuse scaling variants instead of guessing.
        if raw.get("rope_scaling") is not None:
            raise CheckpointError(f"config.json: rope_scaling={raw['rope_scaling']!r} is unsupported")
        rope_params = raw.get("rope_parameters")
        theta = raw.get("rope_theta")
        if isinstance(rope_params, dict):
            rtype = rope_params.get("rope_type", rope_params.get("type", "default"))
            if rtype != "default":
                raise CheckpointError(f"config.json: rope_parameters.rope_type={rtype!r} is unsupported")
            if rope_params.get("rope_theta") is not None:
                theta = rope_params["rope_theta"]
        elif rope_params is not None:
            raise CheckpointError("config.json: rope_parameters must be an object")
        self.rope_theta = float(theta if theta is not None else d["rope_theta"])
        if float(raw.get("partial_rotary_factor", 1.0)) != 1.0:
            raise CheckpointError("config.json: partial_rotary_factor != 1 is unsupported")

        # Sliding window.
        self.sliding_window = None
        if fam == "mixtral":
            sw = raw.get("sliding_window")
            if sw is not None:
                self.sliding_window = int(sw)
                if self.sliding_window <= 0:
                    raise CheckpointError("config.json: sliding_window must be positive or null")
        else:
            if raw.get("use_sliding_window", False):
                raise CheckpointError(f"config.json: use_sliding_window=true is unsupported for {fam} "
                                      "(HF's per-layer max_window_layers rule differs across versions)")
            if raw.get("layer_types") is not None and any(t != "full_attention" for t in raw["layer_types"]):
                raise CheckpointError("config.json: layer_types other than full_attention are unsupported")

        # Attention projections.
        self.qk_norm = fam == "qwen3_moe"
        if fam == "qwen3_moe":
            self.qkv_bias = self.o_bias = bool(raw.get("attention_bias", d["attention_bias"]))
        elif fam == "qwen2_moe":
            self.qkv_bias = bool(raw.get("qkv_bias", d["qkv_bias"]))
            self.o_bias = False
        else:
            self.qkv_bias = self.o_bias = False

        # Mixture of experts.
        if fam == "mixtral":
            self.num_experts = int(raw.get("num_local_experts", d["num_local_experts"]))
            self.top_k = int(raw.get("num_experts_per_tok", d["num_experts_per_tok"]))
            self.moe_intermediate_size = int(req("intermediate_size"))
            self.intermediate_size = self.moe_intermediate_size
            self.norm_topk_prob = True  # Mixtral always renormalizes
            self.shared_expert_intermediate_size = 0
            self.moe_layers = [True] * self.num_layers
        else:
            self.num_experts = int(req("num_experts"))
            self.top_k = int(req("num_experts_per_tok"))
            self.moe_intermediate_size = int(req("moe_intermediate_size"))
            self.intermediate_size = int(raw.get("intermediate_size") or 0)
            self.norm_topk_prob = bool(raw.get("norm_topk_prob", d["norm_topk_prob"]))
            step = int(raw.get("decoder_sparse_step", d["decoder_sparse_step"]) or 1)
            mlp_only = set(int(x) for x in (raw.get("mlp_only_layers") or []))
            self.moe_layers = [(i not in mlp_only) and self.num_experts > 0 and (i + 1) % step == 0
                               for i in range(self.num_layers)]
            if not all(self.moe_layers) and self.intermediate_size <= 0:
                raise CheckpointError("config.json: dense layers need intermediate_size")
            self.shared_expert_intermediate_size = (
                int(req("shared_expert_intermediate_size")) if fam == "qwen2_moe" else 0)
        if any(self.moe_layers) and not (0 < self.top_k <= self.num_experts):
            raise CheckpointError("config.json: need 0 < num_experts_per_tok <= num_experts")


# --------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------

def rms_norm(x, weight, eps):
    # HF *RMSNorm: x.float() * rsqrt(mean(x^2) + eps), then weight * x (all float32 here).
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class KVCache:
    """Per-layer K/V tensors [B, kv_heads, S, head_dim], appended with torch.cat like HF's DynamicCache."""

    def __init__(self, num_layers):
        self.k = [None] * num_layers
        self.v = [None] * num_layers
        self.length = 0

    def update(self, layer, k, v):
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k, v
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)
        return self.k[layer], self.v[layer]


def _same(x):
    return x


def _round_bf16(x):
    """x rounded to BF16 (nearest even) and back: what a GPU GEMM's input holds."""
    return x.to(torch.bfloat16).to(x.dtype)


class Mlp:
    """SwiGLU: down(silu(gate(x)) * up(x)). `act` rounds each GEMM's input (identity in float32)."""

    def __init__(self, gate, up, down, act=_same):
        self.gate, self.up, self.down, self.act = gate, up, down, act

    def __call__(self, x):
        x = self.act(x)
        return F.linear(self.act(F.silu(F.linear(x, self.gate)) * F.linear(x, self.up)), self.down)


class MoeBlock:
    """Softmax top-k routing, as Qwen3MoeSparseMoeBlock / Qwen2MoeSparseMoeBlock / MixtralSparseMoeBlock."""

    def __init__(self, router, experts, top_k, norm_topk_prob, shared=None, shared_gate=None,
                 act=_same):
        self.act = act                # rounds GEMM inputs (identity in float32)
        self.router = router          # [E, H]
        self.experts = experts        # list of Mlp
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.shared = shared          # Mlp or None (Qwen2-MoE)
        self.shared_gate = shared_gate  # [1, H] or None
        self.router_gaps = None       # list to collect min (k-th - (k+1)-th) routing prob, if set

    def __call__(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        router_logits = F.linear(self.act(x), self.router)
        probs = F.softmax(router_logits, dim=1, dtype=torch.float32)
        weights, selected = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.router_gaps is not None and self.top_k < probs.shape[1]:
            top = torch.topk(probs, self.top_k + 1, dim=-1).values
            self.router_gaps.append(float((top[:, -2] - top[:, -1]).min()))
        out = torch.zeros_like(x)
        # [E, top_k, tokens]: loop only over experts that received tokens (HF's loop).
        expert_mask = F.one_hot(selected, num_classes=len(self.experts)).permute(2, 1, 0)
        hit = (expert_mask.sum(dim=(-1, -2)) > 0).nonzero(as_tuple=True)[0].tolist()
        for e in hit:
            slot, token = torch.where(expert_mask[e])
            y = self.experts[e](x[token]) * weights[token, slot, None]
            out.index_add_(0, token, y)
        if self.shared is not None:
            out = out + torch.sigmoid(F.linear(self.act(x), self.shared_gate)) * self.shared(x)
        return out.reshape(shape)


class Layer:
    pass


class Model:
    """bf16_activations: round every GEMM's input and the KV cache entries to BF16, as Joule's
    GPU path does (F32 activations, BF16 tensor-core GEMM inputs, a BF16 KV cache); the
    fixtures <name>.bf16act.json hold its numbers."""

    def __init__(self, config, tensors, device="cpu", strict=True, bf16_activations=False):
        self.config = c = config
        self.device = torch.device(device)
        self.act = act = _round_bf16 if bf16_activations else _same
        used = set()

        def get(name, shape=None, optional=False):
            if name not in tensors:
                if optional:
                    return None
                raise CheckpointError(f"checkpoint: tensor {name} is missing")
            arr = tensors[name]
            if shape is not None and list(arr.shape) != list(shape):
                raise CheckpointError(f"checkpoint: tensor {name} has shape {list(arr.shape)}, "
                                      f"expected {list(shape)}")
            used.add(name)
            return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(self.device)

        H, D = c.hidden_size, c.head_dim
        qd, kvd = c.num_heads * D, c.num_kv_heads * D
        self.embed = get("model.embed_tokens.weight", [c.vocab_size, H])
        self.norm = get("model.norm.weight", [H])
        if c.tie_word_embeddings:
            self.lm_head = self.embed
        else:
            self.lm_head = get("lm_head.weight", [c.vocab_size, H])

        def mlp(prefix, inter, names=("gate_proj", "up_proj", "down_proj")):
            g, u, d = names
            return Mlp(get(f"{prefix}.{g}.weight", [inter, H]),
                       get(f"{prefix}.{u}.weight", [inter, H]),
                       get(f"{prefix}.{d}.weight", [H, inter]), act)

        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}"
            L = Layer()
            L.input_norm = get(f"{p}.input_layernorm.weight", [H])
            L.post_norm = get(f"{p}.post_attention_layernorm.weight", [H])
            a = f"{p}.self_attn"
            L.wq = get(f"{a}.q_proj.weight", [qd, H])
            L.wk = get(f"{a}.k_proj.weight", [kvd, H])
            L.wv = get(f"{a}.v_proj.weight", [kvd, H])
            L.wo = get(f"{a}.o_proj.weight", [H, qd])
            L.bq = get(f"{a}.q_proj.bias", [qd]) if c.qkv_bias else None
            L.bk = get(f"{a}.k_proj.bias", [kvd]) if c.qkv_bias else None
            L.bv = get(f"{a}.v_proj.bias", [kvd]) if c.qkv_bias else None
            L.bo = get(f"{a}.o_proj.bias", [H]) if c.o_bias else None
            L.q_norm = get(f"{a}.q_norm.weight", [D]) if c.qk_norm else None
            L.k_norm = get(f"{a}.k_norm.weight", [D]) if c.qk_norm else None
            if c.family == "mixtral":
                m = f"{p}.block_sparse_moe"
                experts = [mlp(f"{m}.experts.{e}", c.moe_intermediate_size, ("w1", "w3", "w2"))
                           for e in range(c.num_experts)]
                L.mlp = MoeBlock(get(f"{m}.gate.weight", [c.num_experts, H]), experts, c.top_k, True,
                                 act=act)
            elif c.moe_layers[i]:
                m = f"{p}.mlp"
                experts = [mlp(f"{m}.experts.{e}", c.moe_intermediate_size) for e in range(c.num_experts)]
                shared = shared_gate = None
                if c.family == "qwen2_moe":
                    shared = mlp(f"{m}.shared_expert", c.shared_expert_intermediate_size)
                    shared_gate = get(f"{m}.shared_expert_gate.weight", [1, H])
                L.mlp = MoeBlock(get(f"{m}.gate.weight", [c.num_experts, H]), experts, c.top_k,
                                 c.norm_topk_prob, shared, shared_gate, act)
            else:
                L.mlp = mlp(f"{p}.mlp", c.intermediate_size)
            self.layers.append(L)

        ignorable = ("rotary_emb.inv_freq",)
        if c.tie_word_embeddings:  # HF ties lm_head to embed_tokens and ignores a stored copy
            ignorable += ("lm_head.weight",)
        unused = sorted(n for n in tensors if n not in used and not n.endswith(ignorable))
        if unused and strict:
            raise CheckpointError(f"checkpoint: {len(unused)} tensors the {c.architecture} layout does not "
                                  f"use, e.g. {unused[:5]}")

        # inv_freq = 1 / theta ** (arange(0, d, 2) / d), computed in float32 as HF does.
        self.inv_freq = 1.0 / (c.rope_theta ** (
            torch.arange(0, D, 2, dtype=torch.int64).float() / D)).to(self.device)
        self.scaling = D ** -0.5

    # ---- forward ----------------------------------------------------------

    def rope(self, positions):
        # freqs = inv_freq (outer) positions in float32; emb = cat(freqs, freqs).
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def attention(self, L, li, x, cos, sin, cache, q_pos):
        c = self.config
        B, T, _ = x.shape
        D = c.head_dim
        x = self.act(x)
        q = F.linear(x, L.wq, L.bq).view(B, T, c.num_heads, D)
        k = F.linear(x, L.wk, L.bk).view(B, T, c.num_kv_heads, D)
        v = F.linear(x, L.wv, L.bv).view(B, T, c.num_kv_heads, D)
        if L.q_norm is not None:  # Qwen3: per-head RMSNorm over head_dim, before RoPE
            q = rms_norm(q, L.q_norm, c.rms_norm_eps)
            k = rms_norm(k, L.k_norm, c.rms_norm_eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = self.act(k), self.act(v)  # what the KV cache stores
        if cache is not None:
            k, v = cache.update(li, k, v)
        groups = c.num_heads // c.num_kv_heads
        if groups > 1:  # repeat_kv
            S = k.shape[2]
            k = k[:, :, None].expand(B, c.num_kv_heads, groups, S, D).reshape(B, c.num_heads, S, D)
            v = v[:, :, None].expand(B, c.num_kv_heads, groups, S, D).reshape(B, c.num_heads, S, D)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        S = k.shape[2]
        k_pos = torch.arange(S, device=x.device)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if c.sliding_window is not None:
            # masking_utils.sliding_window_overlay: kv_idx > q_idx - W, i.e. W keys including the
            # query's own. (Some transformers 4.4x releases built the mask with tril(diagonal=
            # past - W - 1), which lets W + 1 keys through; this follows the current code.)
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - c.sliding_window)
        if not bool(allowed.all()):
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(B, T, c.num_heads * D)
        return F.linear(self.act(out), L.wo, L.bo)

    def forward(self, ids, cache=None):
        """ids: LongTensor [B, T] continuing the sequences held in `cache` (or fresh). Returns [B, T, V]."""
        c = self.config
        if ids.dim() == 1:
            ids = ids[None]
        ids = ids.to(self.device)
        if int(ids.min()) < 0 or int(ids.max()) >= c.vocab_size:
            raise CheckpointError(f"token id out of range [0, {c.vocab_size})")
        start = cache.length if cache is not None else 0
        T = ids.shape[1]
        q_pos = torch.arange(start, start + T, device=self.device)
        cos, sin = self.rope(q_pos)
        h = F.embedding(ids, self.embed)
        for li, L in enumerate(self.layers):
            h = h + self.attention(L, li, rms_norm(h, L.input_norm, c.rms_norm_eps), cos, sin, cache, q_pos)
            h = h + L.mlp(rms_norm(h, L.post_norm, c.rms_norm_eps))
        if cache is not None:
            cache.length += T
        return F.linear(self.act(rms_norm(h, self.norm, c.rms_norm_eps)), self.lm_head)

    def new_cache(self):
        return KVCache(self.config.num_layers)

    # ---- conveniences -----------------------------------------------------

    def logits(self, ids):
        """Full-recompute logits [T, V] for one sequence (no cache, causal mask)."""
        with torch.no_grad():
            return self.forward(torch.tensor([list(ids)], dtype=torch.long))[0]

    def min_router_gap(self, ids):
        """Smallest gap between the k-th and (k+1)-th routing probability over all tokens and MoE
        layers of a full-recompute pass: how close any token came to a different expert choice."""
        gaps = []
        blocks = [L.mlp for L in self.layers if isinstance(L.mlp, MoeBlock)]
        for b in blocks:
            b.router_gaps = gaps
        try:
            self.logits(ids)
        finally:
            for b in blocks:
                b.router_gaps = None
        return min(gaps) if gaps else None

    def greedy(self, ids, steps, return_logits=False):
        """KV-cached greedy decode. Returns (generated ids, top1-top2 margins[, per-step logits])."""
        with torch.no_grad():
            cache = self.new_cache()
            last = self.forward(torch.tensor([list(ids)], dtype=torch.long), cache)[0, -1]
            out, margins, step_logits = [], [], []
            for _ in range(steps):
                top2 = torch.topk(last, 2).values if last.numel() > 1 else torch.stack([last[0], last[0]])
                tok = int(torch.argmax(last))
                out.append(tok)
                margins.append(float(top2[0] - top2[1]))
                step_logits.append(last)
                last = self.forward(torch.tensor([[tok]], dtype=torch.long), cache)[0, -1]
        if return_logits:
            return out, margins, step_logits
        return out, margins


def load_model(model_dir, device="cpu", strict=True, bf16_activations=False):
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    dtypes = {}
    if (raw.get("architectures") or [None])[0] == DEEPSEEK_V3_ARCHITECTURE:
        config = DeepseekV3Config(raw)
        if bf16_activations and config.fp8_block is not None:
            raise CheckpointError("--bf16-activations: the GPU path refuses block-scaled FP8 weights, so "
                                  "there are no GPU numerics to mirror for this checkpoint (use the BF16 one)")
        return DeepseekV3Model(config, read_checkpoint_tensors(model_dir, dtypes), dtypes,
                               device=device, strict=strict, bf16_activations=bf16_activations)
    config = Config(raw)
    tensors = read_checkpoint_tensors(model_dir, dtypes)
    fp8 = sorted(n for n, d in dtypes.items() if d == "F8_E4M3")
    if fp8:
        raise CheckpointError(f"checkpoint: tensor {fp8[0]} is F8_E4M3; FP8 weights are read for "
                              f"{DEEPSEEK_V3_ARCHITECTURE} only")
    return Model(config, tensors, device=device, strict=strict, bf16_activations=bf16_activations)


# --------------------------------------------------------------------------
# DeepSeek-V3 (DeepseekV3ForCausalLM: transformers' modeling_deepseek_v3.py)
# --------------------------------------------------------------------------

DEEPSEEK_V3_ARCHITECTURE = "DeepseekV3ForCausalLM"
# q_a_layernorm and kv_a_layernorm are DeepseekV3RMSNorm(rank): the class default eps, not
# config.rms_norm_eps (DeepSeek's own inference code uses 1e-6 too).
MLA_LATENT_NORM_EPS = 1e-6
E4M3_MAX = 448.0
_E4M3_TABLE = None


def _e4m3_table():
    """float32 value of every FP8 E4M3 byte (OCP e4m3fn: bias 7, no infinities, 0x7f/0xff NaN)."""
    global _E4M3_TABLE
    if _E4M3_TABLE is None:
        codes = np.arange(256)
        exponent, mantissa = (codes >> 3) & 0xF, codes & 0x7
        magnitude = np.where(exponent == 0, mantissa * 2.0 ** -9, (8 + mantissa) * np.exp2(exponent - 10.0))
        magnitude = np.where((exponent == 0xF) & (mantissa == 0x7), np.nan, magnitude)
        _E4M3_TABLE = np.where(codes & 0x80, -magnitude, magnitude).astype(np.float32)
    return _E4M3_TABLE


def e4m3_to_f32(raw_u8):
    return _e4m3_table()[np.asarray(raw_u8, dtype=np.uint8)]


def f32_to_e4m3(x):
    """Nearest E4M3 code (ties to the even code, magnitudes past 448 saturate), as torch's
    float8_e4m3fn cast of in-range values: the encoder the FP8 checkpoints are checked against."""
    table = _e4m3_table()
    positive = table[:0x7F].astype(np.float64)          # codes 0..126, increasing, 0 .. 448
    a = np.minimum(np.abs(np.asarray(x, dtype=np.float64)), E4M3_MAX)
    hi = np.clip(np.searchsorted(positive, a), 1, 0x7E)
    lo = hi - 1
    d_lo, d_hi = a - positive[lo], positive[hi] - a
    code = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    return (code | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


def dequantize_block_fp8(values, scale_inv, block):
    """values: [out, in] decoded E4M3; scale_inv: [ceil(out/bo), ceil(in/bi)] float32. Returns
    values * scale_inv of each element's block, in float32 (DeepSeek's weight_dequant)."""
    bo, bi = block
    out_features, in_features = values.shape
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), bo, axis=0), bi, axis=1)
    return values * scale[:out_features, :in_features]


def _yarn_get_mscale(scale, mscale=1.0):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class DeepseekV3Config:
    """config.json of DeepseekV3ForCausalLM, validated. The MLA and routing sizes are required:
    DeepseekV3Config's defaults are DeepSeek-V3's own (kv_lora_rank 512, 256 experts, ...), which a
    config that omits them is unlikely to mean. Errors name the field."""

    def __init__(self, raw):
        self.raw = raw
        self.architecture = DEEPSEEK_V3_ARCHITECTURE
        self.family = "deepseek_v3"

        def err(msg):
            return CheckpointError(f"config.json: {msg}")

        def req_int(key, minimum=1):
            v = raw.get(key)
            if v is None:
                raise err(f"{key!r} is required for {DEEPSEEK_V3_ARCHITECTURE}")
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise err(f"{key!r} must be an integer >= {minimum}, got {v!r}")
            return v

        def opt(key, default):
            v = raw.get(key)
            return default if v is None else v

        self.vocab_size = req_int("vocab_size")
        self.hidden_size = req_int("hidden_size")
        self.num_layers = req_int("num_hidden_layers")
        self.num_heads = req_int("num_attention_heads")
        kv_heads = opt("num_key_value_heads", self.num_heads)
        if kv_heads != self.num_heads:
            raise err(f"num_key_value_heads={kv_heads!r} must equal num_attention_heads={self.num_heads} "
                      "(MLA expands a key and value per head; HF's repeat_kv would multiply the heads)")
        if "q_lora_rank" not in raw:
            raise err("'q_lora_rank' is required (an integer, or null for the q_proj form without LoRA)")
        q_lora_rank = raw["q_lora_rank"]
        if q_lora_rank is not None and (isinstance(q_lora_rank, bool) or not isinstance(q_lora_rank, int)
                                        or q_lora_rank < 1):
            raise err(f"q_lora_rank must be a positive integer or null (no LoRA), got {q_lora_rank!r}"
                      + (" (HF builds a rank-0 q_a_proj for 0; write null)" if q_lora_rank == 0 else ""))
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = req_int("kv_lora_rank")
        self.qk_nope_head_dim = req_int("qk_nope_head_dim")
        self.qk_rope_head_dim = req_int("qk_rope_head_dim")
        self.v_head_dim = req_int("v_head_dim")
        if self.qk_rope_head_dim % 2:
            raise err(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even for RoPE")
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.rms_norm_eps = float(opt("rms_norm_eps", 1e-6))
        act = opt("hidden_act", "silu")
        if act != "silu":
            raise err(f"hidden_act={act!r} unsupported (only 'silu')")
        if opt("attention_bias", False):
            raise err("attention_bias=true is unsupported (DeepSeek-V3 has no projection biases)")
        if float(opt("partial_rotary_factor", 1.0)) != 1.0:
            raise err("partial_rotary_factor != 1 is unsupported")
        self.tie_word_embeddings = bool(opt("tie_word_embeddings", False))
        self.rope_interleave = bool(opt("rope_interleave", True))
        # Multi-token-prediction layers (model.layers.<num_hidden_layers + i>): HF ignores them.
        self.num_nextn_predict_layers = req_int("num_nextn_predict_layers", 0) \
            if raw.get("num_nextn_predict_layers") is not None else 0

        # Mixture of experts: noaux_tc routing.
        self.num_experts = req_int("n_routed_experts")
        self.top_k = req_int("num_experts_per_tok")
        self.n_group = req_int("n_group")
        self.topk_group = req_int("topk_group")
        self.n_shared_experts = req_int("n_shared_experts", 0)
        self.moe_intermediate_size = req_int("moe_intermediate_size")
        self.first_k_dense_replace = req_int("first_k_dense_replace", 0)
        factor = raw.get("routed_scaling_factor")
        if factor is None or isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
            raise err(f"'routed_scaling_factor' must be a positive number, got {factor!r}")
        self.routed_scaling_factor = float(factor)
        self.norm_topk_prob = bool(opt("norm_topk_prob", True))
        if opt("scoring_func", "sigmoid") != "sigmoid":
            raise err(f"scoring_func={raw['scoring_func']!r} unsupported (DeepseekV3 routes with 'sigmoid')")
        if opt("topk_method", "noaux_tc") != "noaux_tc":
            raise err(f"topk_method={raw['topk_method']!r} unsupported (DeepseekV3 routes with 'noaux_tc')")
        if self.num_experts % self.n_group:
            raise err(f"n_group={self.n_group} does not divide n_routed_experts={self.num_experts}")
        self.experts_per_group = self.num_experts // self.n_group
        if self.experts_per_group < 2:
            raise err(f"n_group={self.n_group} leaves {self.experts_per_group} expert per group; a group's "
                      "score is the sum of its top 2")
        if self.topk_group > self.n_group:
            raise err(f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        if self.top_k > self.topk_group * self.experts_per_group:
            raise err(f"num_experts_per_tok={self.top_k} exceeds the {self.topk_group * self.experts_per_group} "
                      "experts of the topk_group chosen groups")
        freq = opt("moe_layer_freq", 1)
        if freq != 1:
            # DeepSeek's remote code makes layer i MoE iff i >= first_k_dense_replace and
            # i % moe_layer_freq == 0; transformers ignores the key. Only 1 means the same in both.
            raise err(f"moe_layer_freq={freq!r} unsupported (only 1; transformers ignores the key)")
        self.moe_layers = [i >= self.first_k_dense_replace for i in range(self.num_layers)]
        self.intermediate_size = int(opt("intermediate_size", 0))
        if not all(self.moe_layers) and self.intermediate_size <= 0:
            raise err("intermediate_size is required for the first_k_dense_replace dense layers")

        # RoPE over qk_rope_head_dim (DeepseekV3Config.head_dim), optionally YaRN-scaled.
        self.max_position_embeddings = req_int("max_position_embeddings") \
            if raw.get("max_position_embeddings") is not None else 4096
        self._parse_rope(raw, err)
        self._parse_quantization(raw.get("quantization_config"), err)

    def _parse_rope(self, raw, err):
        theta = raw.get("rope_theta")
        rs = raw.get("rope_scaling")
        field = "rope_scaling"
        if rs is None and raw.get("rope_parameters") is not None:  # transformers 5 spelling
            rs, field = raw["rope_parameters"], "rope_parameters"
        self.yarn = None
        self.rope_attention_factor = 1.0
        self.softmax_scale = self.qk_head_dim ** -0.5
        if rs is not None:
            if not isinstance(rs, dict):
                raise err(f"{field} must be an object or null")
            if rs.get("rope_theta") is not None:
                theta = rs["rope_theta"]
            rtype = rs.get("rope_type", rs.get("type", "default"))
            if rtype == "yarn":
                self.yarn = self._parse_yarn(rs, field, err)
            elif rtype != "default":
                raise err(f"{field}.rope_type={rtype!r} unsupported (default or yarn)")
        self.rope_theta = float(theta if theta is not None else 10000.0)

    def _parse_yarn(self, rs, field, err):
        original = rs.get("original_max_position_embeddings")
        if isinstance(original, bool) or not isinstance(original, int) or original < 1:
            raise err(f"{field}.original_max_position_embeddings must be a positive integer for yarn, "
                      f"got {original!r}")
        ratio = self.max_position_embeddings / original
        factor = rs.get("factor")
        if factor is None:
            factor = ratio
        elif isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
            raise err(f"{field}.factor must be a positive number, got {factor!r}")
        elif abs(float(factor) - ratio) > 1e-9 * ratio:
            # transformers 4.5x replaced the factor by this ratio whenever original_max_position_embeddings
            # is set; 5.x reads the factor. They agree only when the two match.
            raise err(f"{field}.factor={factor} differs from max_position_embeddings / "
                      f"original_max_position_embeddings = {self.max_position_embeddings}/{original}; "
                      "transformers releases disagree about which one applies")
        factor = float(factor)
        for key in ("mscale", "mscale_all_dim", "attention_factor", "beta_fast", "beta_slow"):
            v = rs.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise err(f"{field}.{key} must be a number, got {v!r}")
        mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
        # _compute_yarn_parameters: cos and sin are multiplied by the attention factor.
        attention_factor = rs.get("attention_factor")
        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = _yarn_get_mscale(factor, mscale) / _yarn_get_mscale(factor, mscale_all_dim)
            else:
                attention_factor = _yarn_get_mscale(factor)
        self.rope_attention_factor = float(attention_factor)
        # DeepseekV3Attention: softmax scale qk_head_dim^-0.5 * mscale^2, mscale from mscale_all_dim.
        if mscale_all_dim:
            m = _yarn_get_mscale(factor, mscale_all_dim)
            self.softmax_scale = self.softmax_scale * m * m
        return dict(factor=factor, original_max_position_embeddings=original,
                    beta_fast=float(rs.get("beta_fast") or 32), beta_slow=float(rs.get("beta_slow") or 1),
                    truncate=bool(rs.get("truncate", True)))

    def _parse_quantization(self, q, err):
        self.fp8_block = None
        if q is None:
            return
        if not isinstance(q, dict):
            raise err("quantization_config must be an object or null")
        if q.get("quant_method") != "fp8":
            raise err(f"quantization_config.quant_method={q.get('quant_method')!r} unsupported (only 'fp8')")
        if q.get("fmt", "e4m3") != "e4m3":
            raise err(f"quantization_config.fmt={q.get('fmt')!r} unsupported (only 'e4m3')")
        if q.get("activation_scheme", "dynamic") != "dynamic":
            raise err(f"quantization_config.activation_scheme={q.get('activation_scheme')!r} unsupported "
                      "(only 'dynamic': no activation scales are stored)")
        if q.get("modules_to_not_convert"):
            raise err("quantization_config.modules_to_not_convert is unsupported (the FP8 tensors are "
                      "DeepSeek-V3's projections)")
        block = q.get("weight_block_size")
        if (not isinstance(block, list) or len(block) != 2
                or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block)):
            raise err(f"quantization_config.weight_block_size must be two positive integers "
                      f"[rows, cols], got {block!r}")
        self.fp8_block = tuple(block)


class MlaCache:
    """What multi-head latent attention caches per token: the normalized latent
    [B, S, kv_lora_rank] and the rotated RoPE key [B, S, qk_rope_head_dim] shared by the heads."""

    def __init__(self, num_layers):
        self.latent = [None] * num_layers
        self.k_rope = [None] * num_layers
        self.length = 0

    def update(self, layer, latent, k_rope):
        if self.latent[layer] is None:
            self.latent[layer], self.k_rope[layer] = latent, k_rope
        else:
            self.latent[layer] = torch.cat([self.latent[layer], latent], dim=1)
            self.k_rope[layer] = torch.cat([self.k_rope[layer], k_rope], dim=1)
        return self.latent[layer], self.k_rope[layer]


class NoauxTcMoe:
    """DeepseekV3MoE: DeepseekV3TopkRouter's noaux_tc routing, routed experts, shared experts."""

    def __init__(self, router, bias, experts, shared, config, act=_same):
        c = config
        self.act = act                # rounds the router GEMM's input (identity in float32)
        self.router = router          # [E, H]
        self.bias = bias              # [E] e_score_correction_bias: selection only
        self.experts = experts        # list of Mlp
        self.shared = shared          # Mlp over n_shared_experts * moe_intermediate_size, or None
        self.n_group, self.topk_group, self.top_k = c.n_group, c.topk_group, c.top_k
        self.norm_topk_prob, self.routed_scaling_factor = c.norm_topk_prob, c.routed_scaling_factor
        self.router_gaps = None       # list to collect the smallest selection margin, if set
        self.probe = None             # list to collect (changed without bias, without groups, tokens)

    def select(self, scores, use_bias=True, group_limit=True):
        """Expert ids [N, top_k] from the sigmoid scores, as get_topk_indices."""
        E, G = scores.shape[1], self.n_group
        choice = scores + self.bias[None] if use_bias else scores
        group_scores = choice.view(-1, G, E // G).topk(2, dim=-1).values.sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        allowed = group_mask[:, :, None].expand(-1, G, E // G).reshape(-1, E).bool()
        if group_limit:
            # HF fills the other groups with 0.0 (DeepSeek's code: -inf): the same choice while the
            # biased scores are positive, as in joule-make-model's checkpoints.
            choice_masked = choice.masked_fill(~allowed, 0.0)
        else:
            choice_masked = choice
        selected = torch.topk(choice_masked, k=self.top_k, dim=-1, sorted=False).indices
        if self.router_gaps is not None and use_bias and group_limit:
            gaps = []
            if self.topk_group < G:
                top = torch.topk(group_scores, self.topk_group + 1, dim=-1).values
                gaps.append(float((top[:, -2] - top[:, -1]).min()))
            if self.top_k < self.topk_group * (E // G):
                top = torch.topk(choice.masked_fill(~allowed, float("-inf")), self.top_k + 1, dim=-1).values
                gaps.append(float((top[:, -2] - top[:, -1]).min()))
            if gaps:
                self.router_gaps.append(min(gaps))
        return selected

    def __call__(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        # float32 router, as HF (bf16 activations: its input rounded like every GEMM's on the GPU)
        scores = F.linear(self.act(x), self.router).sigmoid()
        selected = self.select(scores)
        if self.probe is not None:
            chosen = selected.sort(dim=-1).values
            no_bias = self.select(scores, use_bias=False).sort(dim=-1).values
            no_groups = self.select(scores, group_limit=False).sort(dim=-1).values
            self.probe.append((int((chosen != no_bias).any(-1).sum()), int((chosen != no_groups).any(-1).sum()),
                               chosen.shape[0]))
        weights = scores.gather(1, selected)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        out = torch.zeros_like(x)
        expert_mask = F.one_hot(selected, num_classes=len(self.experts)).permute(2, 0, 1)  # [E, N, k]
        for e in (expert_mask.sum(dim=(-1, -2)) > 0).nonzero(as_tuple=True)[0].tolist():
            token, slot = torch.where(expert_mask[e])
            out.index_add_(0, token, self.experts[e](x[token]) * weights[token, slot, None])
        if self.shared is not None:
            out = out + self.shared(x)
        return out.reshape(shape)


class DeepseekV3Model(Model):
    """DeepseekV3ForCausalLM in float32. Attention is multi-head latent attention; the cache holds
    the latent and the RoPE key of each token (MlaCache). Two implementations of it:
      expanded (the reference, as HF): K_nope and V = kv_b_proj(latent) for every cached token;
      absorbed (as DeepSeek's and vLLM's decode): kv_b_proj's key half folded into the query and its
      value half applied after attending over the latents.
    attention_form picks "expanded", "absorbed", or "absorbed_decode" (absorbed for single-token
    steps through a cache, expanded otherwise); self_check compares them.

    bf16_activations (Joule's GPU numerics, worker/model/mla.cc RunMlaAttention): always the
    absorbed form, as the engine runs it for every step; every linear's input is rounded to BF16
    (q_a_proj / q_proj, q_b_proj, kv_a_proj_with_mqa, the per-head q_nope x W_UK and latent x W_UV
    products, o_proj, router, experts, shared experts, dense MLP, lm_head); the cached row
    [normalized latent | rotated k_rope] is rounded once (the BF16 KV cache), also for the tokens
    of the current step; RMSNorms, RoPE, the absorbed query [q_latent | rotated q_rope] and the
    softmax stay float32."""

    def __init__(self, config, tensors, dtypes, device="cpu", strict=True, bf16_activations=False):
        self.config = c = config
        self.device = torch.device(device)
        self.bf16_activations = bf16_activations
        self.act = act = _round_bf16 if bf16_activations else _same
        self.attention_form = "absorbed" if bf16_activations else "expanded"
        used = set()
        block = c.fp8_block

        def tensor(name, shape):
            if name not in tensors:
                raise CheckpointError(f"checkpoint: tensor {name} is missing")
            arr = tensors[name]
            if list(arr.shape) != list(shape):
                raise CheckpointError(f"checkpoint: tensor {name} has shape {list(arr.shape)}, "
                                      f"expected {list(shape)}")
            used.add(name)
            return arr

        def to_torch(arr):
            return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(self.device)

        def get(name, shape):  # a tensor DeepSeek-V3 keeps unquantized
            if dtypes.get(name) == "F8_E4M3":
                raise CheckpointError(f"checkpoint: tensor {name} is F8_E4M3, but only the projections of "
                                      f"{c.architecture} are FP8")
            return to_torch(tensor(name, shape))

        def linear(prefix, out_features, in_features):
            name = f"{prefix}.weight"
            w = tensor(name, [out_features, in_features])
            fp8 = dtypes.get(name) == "F8_E4M3"
            if block is None:
                if fp8:
                    raise CheckpointError(f"checkpoint: tensor {name} is F8_E4M3 but config.json has no "
                                          "quantization_config")
                return to_torch(w)
            if not fp8:
                raise CheckpointError(f"checkpoint: tensor {name} is {dtypes.get(name)}, but config.json's "
                                      "quantization_config (fp8) makes it F8_E4M3 with block scales")
            scale_name = f"{name}_scale_inv"
            if scale_name not in tensors:
                raise CheckpointError(f"checkpoint: tensor {scale_name} is missing (the block scales of "
                                      f"FP8 tensor {name})")
            grid = [-(-out_features // block[0]), -(-in_features // block[1])]
            scale = tensors[scale_name]
            if list(scale.shape) != grid:
                raise CheckpointError(f"checkpoint: tensor {scale_name} has shape {list(scale.shape)}, "
                                      f"expected {grid} (one scale per {block[0]}x{block[1]} block of "
                                      f"{name} {[out_features, in_features]})")
            if not np.all(np.isfinite(scale)) or not np.all(np.isfinite(w)):
                raise CheckpointError(f"checkpoint: {name} or its scales hold NaN or infinity")
            used.add(scale_name)
            return to_torch(dequantize_block_fp8(w, scale, block))

        def mlp(prefix, inter):
            return Mlp(linear(f"{prefix}.gate_proj", inter, H), linear(f"{prefix}.up_proj", inter, H),
                       linear(f"{prefix}.down_proj", H, inter), act)

        H, nh = c.hidden_size, c.num_heads
        self.embed = get("model.embed_tokens.weight", [c.vocab_size, H])
        self.norm = get("model.norm.weight", [H])
        self.lm_head = self.embed if c.tie_word_embeddings else get("lm_head.weight", [c.vocab_size, H])
        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}"
            L = Layer()
            L.input_norm = get(f"{p}.input_layernorm.weight", [H])
            L.post_norm = get(f"{p}.post_attention_layernorm.weight", [H])
            a = f"{p}.self_attn"
            if c.q_lora_rank is None:
                L.wq = linear(f"{a}.q_proj", nh * c.qk_head_dim, H)
                L.wq_a = L.q_a_norm = L.wq_b = None
            else:
                L.wq = None
                L.wq_a = linear(f"{a}.q_a_proj", c.q_lora_rank, H)
                L.q_a_norm = get(f"{a}.q_a_layernorm.weight", [c.q_lora_rank])
                L.wq_b = linear(f"{a}.q_b_proj", nh * c.qk_head_dim, c.q_lora_rank)
            L.wkv_a = linear(f"{a}.kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, H)
            L.kv_a_norm = get(f"{a}.kv_a_layernorm.weight", [c.kv_lora_rank])
            L.wkv_b = linear(f"{a}.kv_b_proj", nh * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
            L.wo = linear(f"{a}.o_proj", H, nh * c.v_head_dim)
            if c.moe_layers[i]:
                m = f"{p}.mlp"
                experts = [mlp(f"{m}.experts.{e}", c.moe_intermediate_size) for e in range(c.num_experts)]
                shared = (mlp(f"{m}.shared_experts", c.moe_intermediate_size * c.n_shared_experts)
                          if c.n_shared_experts > 0 else None)
                L.mlp = NoauxTcMoe(get(f"{m}.gate.weight", [c.num_experts, H]),
                                   get(f"{m}.gate.e_score_correction_bias", [c.num_experts]),
                                   experts, shared, c, act)
            else:
                L.mlp = mlp(f"{p}.mlp", c.intermediate_size)
            self.layers.append(L)

        mtp = tuple(f"model.layers.{c.num_layers + k}." for k in range(c.num_nextn_predict_layers))
        ignorable = ("rotary_emb.inv_freq",) + (("lm_head.weight",) if c.tie_word_embeddings else ())
        unused = sorted(n for n in tensors if n not in used and not n.endswith(ignorable) and not n.startswith(mtp))
        if unused and strict:
            raise CheckpointError(f"checkpoint: {len(unused)} tensors the {c.architecture} layout does not "
                                  f"use, e.g. {unused[:5]}")
        self.inv_freq = self._inv_freq().to(self.device)
        self.scaling = c.softmax_scale

    def _inv_freq(self):
        """_compute_default_rope_parameters / _compute_yarn_parameters over qk_rope_head_dim."""
        c = self.config
        dim, base = c.qk_rope_head_dim, c.rope_theta
        if c.yarn is None:
            return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        y = c.yarn

        def correction_dim(rotations):
            return (dim * math.log(y["original_max_position_embeddings"] / (rotations * 2 * math.pi))) / \
                (2 * math.log(base))

        low, high = correction_dim(y["beta_fast"]), correction_dim(y["beta_slow"])
        if y["truncate"]:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # as HF: no division by zero
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extrapolation_factor = 1 - ramp
        pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
        extrapolation = 1.0 / pos_freqs
        interpolation = 1.0 / (y["factor"] * pos_freqs)
        return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor

    def rope(self, positions):
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        factor = self.config.rope_attention_factor
        return emb.cos() * factor, emb.sin() * factor

    def _rotate(self, x, cos, sin):
        if self.config.rope_interleave:
            # apply_rotary_pos_emb_interleave: pairs (x0, x1), (x2, x3), ... become halves
            # (x0, x2, ...), (x1, x3, ...) before the half-split rotation.
            d = x.shape[-1]
            x = x.reshape(*x.shape[:-1], d // 2, 2).transpose(-1, -2).reshape(x.shape)
        return x * cos + rotate_half(x) * sin

    def attention(self, L, li, x, cos, sin, cache, q_pos):
        c = self.config
        B, T, _ = x.shape
        nh, dn, dr, dv, R = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        act = self.act  # bf16 activations: each GEMM's input rounded (identity in float32)
        x = act(x)
        if L.wq is not None:
            q = F.linear(x, L.wq)
        else:
            q = F.linear(act(rms_norm(F.linear(x, L.wq_a), L.q_a_norm, MLA_LATENT_NORM_EPS)), L.wq_b)
        q_nope, q_rot = q.view(B, T, nh, dn + dr).transpose(1, 2).split([dn, dr], dim=-1)
        latent, k_rot = F.linear(x, L.wkv_a).split([R, dr], dim=-1)
        latent = rms_norm(latent, L.kv_a_norm, MLA_LATENT_NORM_EPS)    # [B, T, R]
        q_rot = self._rotate(q_rot, cos, sin)                           # [B, nh, T, dr]
        k_rot = self._rotate(k_rot, cos, sin)                           # [B, T, dr]
        # What the cache stores (bf16 activations: the BF16 cache row, which attention then reads
        # for the current tokens too).
        latent, k_rot = act(latent), act(k_rot)
        if cache is not None:
            latent, k_rot = cache.update(li, latent, k_rot)
        S = latent.shape[1]
        allowed = torch.arange(S, device=x.device)[None, :] <= q_pos[:, None]
        absorbed = self.bf16_activations or self.attention_form == "absorbed" or (
            self.attention_form == "absorbed_decode" and T == 1 and cache is not None)
        if absorbed:
            w_kv_b = L.wkv_b.view(nh, dn + dv, R)
            # Per head q_nope x W_UK (a GEMM: q_nope rounded), the result float32 like q_rot.
            q_latent = torch.einsum("bhtd,hdr->bhtr", act(q_nope), w_kv_b[:, :dn])
            scores = (torch.einsum("bhtr,bsr->bhts", q_latent, latent) +
                      torch.einsum("bhtd,bsd->bhts", q_rot, k_rot)) * self.scaling
        else:
            k_nope, v = F.linear(latent, L.wkv_b).view(B, S, nh, dn + dv).transpose(1, 2).split([dn, dv], dim=-1)
            k = torch.cat([k_nope, k_rot[:, None].expand(B, nh, S, dr)], dim=-1)
            scores = torch.matmul(torch.cat([q_nope, q_rot], dim=-1), k.transpose(2, 3)) * self.scaling
        if not bool(allowed.all()):
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32)
        if absorbed:
            # The float32 attention-weighted latent, then per head x W_UV (a GEMM: input rounded).
            out = torch.einsum("bhtr,hvr->bhtv", act(torch.einsum("bhts,bsr->bhtr", probs, latent)),
                               w_kv_b[:, dn:])
        else:
            out = torch.matmul(probs, v)
        return F.linear(act(out.transpose(1, 2).reshape(B, T, nh * dv)), L.wo)

    def new_cache(self):
        return MlaCache(self.config.num_layers)

    def _moe_blocks(self):
        return [L.mlp for L in self.layers if isinstance(L.mlp, NoauxTcMoe)]

    def min_router_gap(self, ids):
        """Smallest selection margin over all tokens and MoE layers: group scores (topk_group-th
        minus next) and biased expert scores within the chosen groups (k-th minus next)."""
        gaps = []
        for b in self._moe_blocks():
            b.router_gaps = gaps
        try:
            self.logits(ids)
        finally:
            for b in self._moe_blocks():
                b.router_gaps = None
        return min(gaps) if gaps else None

    def routing_sensitivity(self, prompts):
        """(token-layers whose experts change without e_score_correction_bias, ... without the group
        limit, token-layers): shows the checkpoint exercises both."""
        probe = []
        for b in self._moe_blocks():
            b.probe = probe
        try:
            for ids in prompts:
                self.logits(ids)
        finally:
            for b in self._moe_blocks():
                b.probe = None
        return tuple(sum(p[i] for p in probe) for i in range(3))

    def extra_self_check(self, prompts, steps, atol, log):
        """The absorbed MLA against the expanded one: full recompute, absorbed single-token decode
        after an expanded prefill, and batched absorbed decode. Returns the largest difference.
        With bf16 activations there is one form only (absorbed; the expanded one rounds elsewhere)."""
        if self.bf16_activations:
            print("self-check: bf16 activations run the absorbed MLA only; absorbed vs expanded is "
                  "checked in float32", file=log)
            return 0.0
        worst = {"absorbed": 0.0, "absorbed_decode": 0.0}

        def cmp(form, what, a, b):
            diff = float((a - b).abs().max())
            bound = atol * max(1.0, float(b.abs().max()))
            worst[form] = max(worst[form], diff)
            if not diff <= bound:
                raise AssertionError(f"self-check {what}: max |absorbed - expanded| {diff:.3g} > {bound:.3g}")

        try:
            with torch.no_grad():
                for ids in prompts:
                    self.attention_form = "absorbed_decode"
                    gen, _, step_logits = self.greedy(ids, steps, return_logits=True)
                    seq = list(ids) + gen[:-1]
                    self.attention_form = "expanded"
                    full = self.logits(seq)
                    for s, lg in enumerate(step_logits):
                        cmp("absorbed_decode", f"absorbed decode step {s} (prompt len {len(ids)})", lg,
                            full[len(ids) - 1 + s])
                    self.attention_form = "absorbed"
                    cmp("absorbed", f"absorbed full recompute (len {len(seq)})", self.logits(seq), full)
                # Batched: expanded prefill of equal-length prompts, then absorbed decode steps.
                n = max(len(p) for p in prompts)
                batch = [list(p) + [0] * (n - len(p)) for p in prompts]
                self.attention_form = "absorbed_decode"
                cache = self.new_cache()
                out = [self.forward(torch.tensor(batch), cache)]
                for _ in range(3):
                    out.append(self.forward(torch.argmax(out[-1][:, -1], dim=-1)[:, None], cache))
                batched = torch.cat(out, dim=1)
                self.attention_form = "expanded"
                for bi, seq in enumerate(batch):
                    toks = seq + [int(torch.argmax(batched[bi, n - 1 + j])) for j in range(3)]
                    cmp("absorbed_decode", f"batched absorbed decode row {bi}", batched[bi], self.logits(toks))
        finally:
            self.attention_form = "expanded"
        no_bias, no_groups, total = self.routing_sensitivity(prompts)
        print(f"self-check ok: absorbed MLA matches expanded (max |diff| full recompute "
              f"{worst['absorbed']:.2e}, cached decode {worst['absorbed_decode']:.2e}); without "
              f"e_score_correction_bias {no_bias}/{total} token-layers would route differently, without the "
              f"group limit {no_groups}/{total}", file=log)
        return max(worst.values())


def check_fp8_checkpoint(fp8_dir, bf16_dir, log=sys.stdout):
    """The FP8 checkpoint is the block quantization of the BF16 one written with the same seed:
    every scale_inv is max|w| / 448 of its block and every code the nearest E4M3 value of
    w / scale_inv (ties to even). Checks joule-make-model's encoder against this reader's decoder."""
    with open(os.path.join(fp8_dir, "config.json")) as f:
        config = DeepseekV3Config(json.load(f))
    if config.fp8_block is None:
        raise CheckpointError(f"{fp8_dir}: config.json has no quantization_config")
    dtypes = {}
    fp8 = read_checkpoint_tensors(fp8_dir, dtypes)
    ref = read_checkpoint_tensors(bf16_dir)
    bo, bi = config.fp8_block
    checked = 0
    for name in sorted(n for n, d in dtypes.items() if d == "F8_E4M3"):
        w = ref.get(name)
        if w is None:
            raise CheckpointError(f"{bf16_dir}: no tensor {name}")
        scale = fp8[f"{name}_scale_inv"]
        rows, cols = w.shape
        grid = np.abs(np.pad(w, ((0, -rows % bo), (0, -cols % bi)))).reshape(
            scale.shape[0], bo, scale.shape[1], bi).max(axis=(1, 3))
        want_scale = np.where(grid > 0, grid / np.float32(E4M3_MAX), np.float32(1)).astype(np.float32)
        if not np.array_equal(scale, want_scale):
            raise CheckpointError(f"{name}_scale_inv: {scale.ravel()[:4]} != max|w|/448 {want_scale.ravel()[:4]}")
        per_elem = np.repeat(np.repeat(scale, bo, axis=0), bi, axis=1)[:rows, :cols]
        want = f32_to_e4m3((w / per_elem).astype(np.float32))
        got = f32_to_e4m3(fp8[name])  # the stored codes, re-encoded from their exact values
        bad = np.argwhere(got != want)
        if len(bad):
            r, col = bad[0]
            raise CheckpointError(f"{name}[{r},{col}]: stored {fp8[name][r, col]!r}, nearest E4M3 of "
                                  f"{w[r, col] / per_elem[r, col]!r} is {e4m3_to_f32(want[r, col])!r}")
        checked += 1
    if not checked:
        raise CheckpointError(f"{fp8_dir}: no F8_E4M3 tensors")
    print(f"fp8 check ok: {checked} F8_E4M3 tensors of {os.path.basename(os.path.normpath(fp8_dir))} are "
          f"the {bo}x{bi}-block E4M3 quantization of {os.path.basename(os.path.normpath(bf16_dir))}", file=log)
    return checked


# --------------------------------------------------------------------------
# self-check: the KV-cache and batched paths reproduce the full recompute
# --------------------------------------------------------------------------

def self_check(model, prompts, steps=GOLDEN_GREEDY_STEPS, atol=SELF_CHECK_ATOL, log=sys.stderr):
    """Raises AssertionError when cached / chunked / batched logits differ from full recompute.

    The bound is `atol * max(1, max|logit|)`: float32 rounding grows with the logits' magnitude
    (e.g. tied embeddings give logits of ~40, where one float32 ulp is ~4e-6).
    """
    worst = 0.0

    def cmp(what, a, b):
        nonlocal worst
        diff = float((a - b).abs().max())
        bound = atol * max(1.0, float(b.abs().max()))
        worst = max(worst, diff)
        if not diff <= bound:
            raise AssertionError(f"self-check {what}: max |diff| {diff:.3g} > {bound:.3g}")

    with torch.no_grad():
        for ids in prompts:
            # (1) incremental decode with the cache == full recompute of prompt + generated.
            gen, _, step_logits = model.greedy(ids, steps, return_logits=True)
            full = model.logits(list(ids) + gen[:-1])
            for s, lg in enumerate(step_logits):
                cmp(f"cached decode step {s} (prompt len {len(ids)})", lg, full[len(ids) - 1 + s])
            # (2) chunked prefill through the cache == full recompute.
            if len(ids) >= 2:
                cache = model.new_cache()
                cut = len(ids) // 2
                a = model.forward(torch.tensor([ids[:cut]]), cache)[0]
                b = model.forward(torch.tensor([ids[cut:]]), cache)[0]
                cmp(f"chunked prefill (prompt len {len(ids)})", torch.cat([a, b]), full[:len(ids)])
        # (3) batched equal-length prompts + batched cached decode == per-sequence runs.
        n = max(len(p) for p in prompts)
        rng = np.random.RandomState(7)
        limit = min(TOKENIZER_ID_LIMIT, model.config.vocab_size)
        batch = [list(p) + rng.randint(0, limit, size=n - len(p)).tolist() for p in prompts]
        cache = model.new_cache()
        out = model.forward(torch.tensor(batch), cache)
        nxt = torch.argmax(out[:, -1], dim=-1)
        dec = [out]
        for _ in range(3):
            o = model.forward(nxt[:, None], cache)
            dec.append(o)
            nxt = torch.argmax(o[:, -1], dim=-1)
        batched = torch.cat(dec, dim=1)
        for bi, seq in enumerate(batch):
            toks = seq + [int(torch.argmax(batched[bi, n - 1 + j])) for j in range(3)]
            cmp(f"batched row {bi}", batched[bi], model.logits(toks))
    # A second implementation of the same model (DeepSeek-V3's absorbed MLA) against the first.
    extra = getattr(model, "extra_self_check", None)
    if extra is not None:
        worst = max(worst, extra(prompts, steps, atol, log))
    print(f"self-check ok: cached/chunked/batched logits match full recompute (max |diff| {worst:.2e})",
          file=log)
    return worst


# --------------------------------------------------------------------------
# golden fixtures
# --------------------------------------------------------------------------

def golden_prompts(vocab_size, lengths=GOLDEN_PROMPT_LENGTHS, seed=GOLDEN_SEED):
    rng = np.random.RandomState(seed)
    limit = min(TOKENIZER_ID_LIMIT, vocab_size)
    return [rng.randint(0, limit, size=n).tolist() for n in lengths]


def _fmt(v):
    # 8 significant digits: relative error <= 5e-8 (logits of ~40 keep ~2e-7 absolute).
    s = "%.8g" % v
    if s in ("nan", "inf", "-inf"):
        raise ValueError("non-finite logit")
    return s


def _row(values):
    return "[" + ",".join(_fmt(v) for v in values) + "]"


def write_fixture(path, doc, rows_per_prompt):
    """Writes JSON with one logits row per line (small diffs, readable)."""
    head = {k: v for k, v in doc.items() if k != "prompts"}
    parts = ["{"]
    for k, v in head.items():
        parts.append(f"{json.dumps(k)}: {json.dumps(v)},")
    parts.append('"prompts": [')
    for pi, p in enumerate(doc["prompts"]):
        parts.append("{")
        for k in ("ids", "logit_positions", "greedy"):
            parts.append(f"{json.dumps(k)}: {json.dumps(p[k])},")
        gap = p.get("min_router_gap")
        parts.append('"min_router_gap": ' + ("null" if gap is None else _fmt(gap)) + ",")
        parts.append('"greedy_margins": ' + _row(p["greedy_margins"]) + ",")
        parts.append('"logits": [')
        rows = rows_per_prompt[pi]
        for ri, r in enumerate(rows):
            parts.append(_row(r) + ("," if ri + 1 < len(rows) else ""))
        parts.append("]")
        parts.append("}" + ("," if pi + 1 < len(doc["prompts"]) else ""))
    parts.append("]")
    parts.append("}")
    text = "\n".join(parts) + "\n"
    json.loads(text)  # must round-trip
    with open(path, "w") as f:
        f.write(text)
    return len(text)


# The BF16-activation fixtures move with summation order: identical rounding points but float64
# instead of float32 sums moved the tiny models' logits by up to 5e-3 (a rounding at a BF16 tie
# goes the other way and propagates). Checks of those fixtures allow twice that.
BF16_ACT_TOLERANCE = 1e-2


def make_golden(model_dir, name, out_path, source, max_bytes=1_500_000, bf16_activations=False):
    model = load_model(model_dir, bf16_activations=bf16_activations)
    c = model.config
    prompts = golden_prompts(c.vocab_size)
    self_check(model, prompts)
    entries, full_rows = [], []
    with torch.no_grad():
        for ids in prompts:
            lg = model.logits(ids)
            gen, margins = model.greedy(ids, GOLDEN_GREEDY_STEPS)
            entries.append({"ids": ids, "greedy": gen, "greedy_margins": margins,
                            "min_router_gap": model.min_router_gap(ids)})
            full_rows.append(lg.tolist())
    # Layout: every prompt position, unless the file would exceed max_bytes; then every position
    # for the two shortest prompts and the last position only for the others.
    est = sum(len(r) for r in full_rows) * c.vocab_size * 14
    keep_all = [True] * len(prompts)
    if est > max_bytes:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        keep_all = [i in order[:2] for i in range(len(prompts))]
    rows = []
    for i, e in enumerate(entries):
        T = len(prompts[i])
        pos = list(range(T)) if keep_all[i] else [T - 1]
        e["logit_positions"] = pos
        rows.append([full_rows[i][p] for p in pos])
    doc = {
        "schema": "joule-golden-v1",
        "model": name,
        "architecture": c.architecture,
        "family": c.family,
        "source": source,
        "reference": "tests/reference/reference.py (float32 PyTorch, HF modeling math" +
                     (", GEMM inputs and KV cache rounded to BF16 as on Joule's GPU path)"
                      if bf16_activations else ")"),
        "activations": "bf16" if bf16_activations else "f32",
        "torch_version": torch.__version__,
        "checkpoint_sha256": checkpoint_digest(model_dir),
        "vocab_size": c.vocab_size,
        "greedy_steps": GOLDEN_GREEDY_STEPS,
        "prompt_seed": GOLDEN_SEED,
        "tolerance_abs": BF16_ACT_TOLERANCE if bf16_activations else 1e-4,
    }
    doc["prompts"] = entries
    size = write_fixture(out_path, doc, rows)
    if size > max_bytes:
        print(f"warning: {out_path} is {size} bytes (> {max_bytes})", file=sys.stderr)
    print(f"wrote {out_path} ({size} bytes, {len(prompts)} prompts)", file=sys.stderr)
    return size


def greedy_agrees(got, want, margins):
    """Greedy ids equal up to the first near-tie (margin < GREEDY_TIE_MARGIN): past it a
    legitimate last-bit difference (other BLAS, other CPU, other code) may pick the other token."""
    n = next((i for i, m in enumerate(margins) if m < GREEDY_TIE_MARGIN), len(want))
    return got[:n + 1] == want[:n + 1] or got[:n] == want[:n]


def compare_prompts(logits_fn, greedy_fn, prompts, atol):
    """An implementation's logits (logits_fn(ids) -> [T, vocab]) and greedy ids
    (greedy_fn(ids, steps)) against recorded prompts (dicts with ids, logit_positions, logits,
    greedy, greedy_margins). Returns (failure strings, worst max |logit diff|)."""
    failures, worst = [], 0.0
    with torch.no_grad():
        for pi, p in enumerate(prompts):
            got = logits_fn(p["ids"])[p["logit_positions"]]
            want = torch.as_tensor(p["logits"], dtype=torch.float32)
            if got.shape != want.shape:
                failures.append(f"prompt {pi}: logits shape {list(got.shape)} != {list(want.shape)}")
                continue
            diff = float((got - want).abs().max())
            worst = max(worst, diff)
            if not diff <= atol:
                failures.append(f"prompt {pi} (len {len(p['ids'])}): max |logit diff| {diff:.3g} > {atol:g}")
            gen = greedy_fn(p["ids"], len(p["greedy"]))
            if not greedy_agrees(gen, p["greedy"], p["greedy_margins"]):
                failures.append(f"prompt {pi}: greedy {gen} != {p['greedy']}")
    return failures, worst


def check_fixture(model_dir, fixture_path, atol, log=sys.stdout):
    """Regenerates a fixture's logits and greedy ids and compares. Returns list of failure strings."""
    with open(fixture_path) as f:
        doc = json.load(f)
    bf16 = doc.get("activations") == "bf16"
    if bf16:
        atol = max(atol, doc.get("tolerance_abs", BF16_ACT_TOLERANCE))
    model = load_model(model_dir, bf16_activations=bf16)
    failures = []
    digest = checkpoint_digest(model_dir)
    note = ""
    if doc.get("checkpoint_sha256") not in (None, digest):
        note = " [checkpoint bytes differ from the fixture's: other container or stale]"
    if doc.get("architecture") != model.config.architecture:
        failures.append(f"architecture {model.config.architecture} != fixture {doc.get('architecture')}")
        return failures
    failures, worst = compare_prompts(model.logits, lambda ids, n: model.greedy(ids, n)[0],
                                      doc["prompts"], atol)
    print(f"{os.path.basename(model_dir)} vs {os.path.basename(fixture_path)}: max |logit diff| "
          f"{worst:.2e} ({'ok' if not failures else 'FAIL'}){note}", file=log)
    return failures


# --------------------------------------------------------------------------
# benchmark
# --------------------------------------------------------------------------

def bench(model, batches, prompt_len, decode_steps, seed=0, warmup=1, repeats=3):
    """Times prefill (one forward over B x prompt_len) and KV-cached batched greedy decode.

    Each configuration runs `warmup` untimed times first, then `repeats` timed times; the median
    of the timed runs is reported.
    """
    c = model.config
    limit = min(TOKENIZER_ID_LIMIT, c.vocab_size)
    results = []
    with torch.inference_mode():
        for B in batches:
            rng = np.random.RandomState(seed + B)
            prompt = torch.tensor(rng.randint(0, limit, size=(B, prompt_len)), dtype=torch.long)

            def run():
                cache = model.new_cache()
                t0 = time.perf_counter()
                out = model.forward(prompt, cache)
                t1 = time.perf_counter()
                nxt = torch.argmax(out[:, -1], dim=-1)
                for _ in range(decode_steps):
                    nxt = torch.argmax(model.forward(nxt[:, None], cache)[:, -1], dim=-1)
                t2 = time.perf_counter()
                return t1 - t0, t2 - t1

            for _ in range(warmup):
                run()
            timings = [run() for _ in range(max(1, repeats))]
            prefill_s = float(np.median([t[0] for t in timings]))
            decode_s = float(np.median([t[1] for t in timings]))
            results.append({
                "batch": B,
                "prompt_len": prompt_len,
                "decode_steps": decode_steps,
                "repeats": len(timings),
                "prefill_s": prefill_s,
                "prefill_tokens_per_s": B * prompt_len / prefill_s,
                "decode_s": decode_s,
                "decode_tokens_per_s": B * decode_steps / decode_s if decode_steps else 0.0,
                "decode_ms_per_step": 1e3 * decode_s / decode_steps if decode_steps else 0.0,
            })
    return results


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

def _parse_ids(text):
    return [int(t) for t in text.replace(" ", "").split(",") if t]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("logits", help="print full-recompute logits for one prompt as JSON")
    p.add_argument("--model", required=True)
    p.add_argument("--ids", required=True, help="comma-separated token ids")
    p.add_argument("--last", action="store_true", help="only the last position")

    p = sub.add_parser("generate", help="greedy decode (KV-cached)")
    p.add_argument("--model", required=True)
    p.add_argument("--ids", required=True)
    p.add_argument("--steps", type=int, default=GOLDEN_GREEDY_STEPS)

    p = sub.add_parser("selfcheck", help="verify cached/chunked/batched paths against full recompute")
    p.add_argument("--model", required=True)

    p = sub.add_parser("fp8check", help="check that an FP8 checkpoint is the block quantization of a BF16 one")
    p.add_argument("--model", required=True, help="FP8 checkpoint (joule-make-model --dtype fp8)")
    p.add_argument("--like", required=True, help="the BF16 checkpoint of the same family, preset and seed")

    p = sub.add_parser("golden", help="write a golden fixture JSON")
    p.add_argument("--model", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--source", default="")
    p.add_argument("--max-bytes", type=int, default=1_500_000)
    p.add_argument("--bf16-activations", action="store_true",
                   help="round GEMM inputs and the KV cache to BF16 (Joule's GPU numerics)")

    p = sub.add_parser("check", help="recompute fixtures and compare (exit 1 on mismatch, 77 without torch)")
    p.add_argument("--models-dir", required=True, help="directory holding <fixture model name>/ checkpoints")
    p.add_argument("--fixtures", nargs="+", required=True)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--variants", action="store_true",
                   help="also check <models-dir>/<name>-* checkpoints (same weights, other containers)")
    p.add_argument("--selfcheck", action="store_true",
                   help="also verify the reference's cached/chunked/batched paths on each checkpoint")

    p = sub.add_parser("bench", help="prefill and KV-cached batched decode throughput")
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, action="append", required=True)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per batch size")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (median reported)")
    p.add_argument("--json", help="also write the result JSON here")

    args = ap.parse_args(argv)
    if torch is None:
        print(f"SKIP: numpy/PyTorch are not importable by {sys.executable}: {_IMPORT_ERROR}")
        return SKIP_RETURN_CODE

    try:
        if args.cmd == "logits":
            lg = load_model(args.model).logits(_parse_ids(args.ids))
            print(json.dumps((lg[-1:] if args.last else lg).tolist()))
        elif args.cmd == "generate":
            gen, margins = load_model(args.model).greedy(_parse_ids(args.ids), args.steps)
            print(json.dumps({"greedy": gen, "greedy_margins": margins}))
        elif args.cmd == "selfcheck":
            m = load_model(args.model)
            self_check(m, golden_prompts(m.config.vocab_size), log=sys.stdout)
        elif args.cmd == "fp8check":
            check_fp8_checkpoint(args.model, args.like)
        elif args.cmd == "golden":
            make_golden(args.model, args.name, args.out, args.source or
                        f"tests/reference/reference.py golden --model <{args.name}> --name {args.name}",
                        max_bytes=args.max_bytes, bf16_activations=args.bf16_activations)
        elif args.cmd == "check":
            failures = []
            for fx in args.fixtures:
                if not os.path.exists(fx):
                    failures.append(f"{fx}: fixture file does not exist")
                    continue
                with open(fx) as f:
                    name = json.load(f)["model"]
                model_dir = os.path.join(args.models_dir, name)
                if not os.path.exists(os.path.join(model_dir, "config.json")):
                    failures.append(f"{fx}: checkpoint {model_dir} does not exist")
                    continue
                failures += [f"{os.path.basename(fx)}: {m}" for m in check_fixture(model_dir, fx, args.atol)]
                # The same weights in other containers (e.g. <name>-sharded, -f16, -f32) must give
                # the same numbers: exercises the sharded / F16 / F32 reader paths.
                if args.variants:
                    for variant in sorted(glob.glob(os.path.join(args.models_dir, name + "-*"))):
                        if os.path.exists(os.path.join(variant, "config.json")):
                            failures += [f"{os.path.basename(variant)} vs {os.path.basename(fx)}: {m}"
                                         for m in check_fixture(variant, fx, args.atol)]
                if args.selfcheck:
                    m = load_model(model_dir)
                    try:
                        self_check(m, golden_prompts(m.config.vocab_size), log=sys.stdout)
                    except AssertionError as e:
                        failures.append(f"{name}: {e}")
            if failures:
                print("FAIL: golden fixtures are stale or the reference changed:\n  " + "\n  ".join(failures))
                print("Regenerate with: tests/reference/make_golden.sh BUILD_DIR (see tests/reference/README.md)")
                return 1
            print("fixtures current")
        elif args.cmd == "bench":
            if args.threads > 0:
                torch.set_num_threads(args.threads)
            model = load_model(args.model)
            res = {
                "tool": "tests/reference/reference.py bench",
                "model": os.path.basename(os.path.normpath(args.model)),
                "architecture": model.config.architecture,
                "dtype": "float32",
                "device": "cpu",
                "threads": torch.get_num_threads(),
                "torch_version": torch.__version__,
                "host": platform.node(),
                "cpu": platform.processor() or platform.machine(),
                "results": bench(model, args.batch, args.prompt_len, args.decode_steps, args.seed,
                                 args.warmup, args.repeats),
            }
            text = json.dumps(res, indent=2)
            print(text)
            if args.json:
                with open(args.json, "w") as f:
                    f.write(text + "\n")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
