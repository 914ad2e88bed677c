#!/usr/bin/env python3
"""Hugging Face transformers on the same checkpoint as joule-engine-bench: the baseline of
bench/engine/gpu_run.sh, measured in the same run on the same GPU.

    hf_bench.py --model DIR [--device cuda:0] [--batch 1,8,64,256] [--prompt-len 32]
                [--decode-steps 32] [--windows 3] [--prefill-len 512] [--json OUT]

What it measures (BF16 weights and activations, the model's default attention and MoE code):
  * decode: B prompts of P random tokens are prefilled, then D decode steps per window with the
    KV cache (one token per sequence per step, sampled at temperature 1 like joule-engine-bench:
    a random model's greedy tokens repeat and would route every step to the same experts);
    tokens/s is the median over the windows, each timed between torch.cuda.synchronize() calls.
    A batch that runs out of GPU memory is recorded as such and the rest go on.
  * prefill: one prompt of --prefill-len tokens into an empty cache; tokens/s of the best and
    the median of the repeats (joule-engine-bench reports the best).
  * energy: NVML's total-energy counter of the GPU torch computes on (found by PCI bus id),
    over all the windows of a measurement: tokens per joule and mean watts. The counter moves
    in ~100 ms steps, so a measurement shorter than ~1 s is rough; the JSON keeps the seconds.
  * copy bandwidth: device-to-device copies of a 1 GiB buffer, counted as bytes read + bytes
    written per second (CUDA's bandwidthTest convention), best of the repeats: the input of
    the batch-1 decode roofline (active weight bytes per token / this bandwidth), the same
    "bytes over the memory bus" convention as bench/engine/run.sh's read bandwidth on the CPU.
  * which other serving engines the machine has (vllm, sglang): recorded, not run.

--device cpu runs the same measurements on the host (no energy), to try the script where there
is no GPU. Exit status: 0 when every measurement ran (an out-of-memory batch counts as ran),
1 on a failure, 2 when torch or transformers cannot be imported.
"""

import argparse
import ctypes
import datetime
import importlib.metadata
import importlib.util
import json
import os
import statistics
import sys
import time

try:
    import torch
except ImportError as e:  # main() reports it
    torch = None
    _TORCH_ERROR = str(e)

MISSING_DEPENDENCY = 2
# The built-in tokenizer's ids (tests/reference/reference.py TOKENIZER_ID_LIMIT): prompts stay
# within them so every checkpoint joule-make-model writes sees the same kind of input.
PROMPT_ID_LIMIT = 259
COPY_BANDWIDTH_CONVENTION = ("(bytes read + bytes written) / seconds of a device-to-device copy, "
                             "as CUDA's bandwidthTest counts it; best of the repeats")


# ------------------------------------------------------------------------------------------
# NVML through ctypes (no pynvml needed): the energy counter of one GPU
# ------------------------------------------------------------------------------------------

class NvmlEnergy:
    """Cumulative joules of the GPU at a PCI bus id (or index), or None fields if NVML is absent."""

    def __init__(self, pci_bus_id=None, index=0, library="libnvidia-ml.so.1"):
        self.error = None
        self.description = None
        self._handle = None
        try:
            self._lib = ctypes.CDLL(library)
            if self._lib.nvmlInit_v2() != 0:
                raise OSError("nvmlInit_v2 failed")
            handle = ctypes.c_void_p()
            if pci_bus_id:
                r = self._lib.nvmlDeviceGetHandleByPciBusId_v2(pci_bus_id.encode(), ctypes.byref(handle))
                where = f"PCI bus id {pci_bus_id}"
            else:
                r = self._lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle))
                where = f"NVML index {index}"
            if r != 0:
                raise OSError(f"no GPU at {where} (NVML error {r})")
            self._handle = handle
            self.description = where
            if self.joules() is None:
                raise OSError(f"GPU at {where} has no total-energy counter")
        except (OSError, AttributeError) as e:
            self.error = str(e)
            self._handle = None

    def joules(self):
        if self._handle is None:
            return None
        mj = ctypes.c_ulonglong()
        if self._lib.nvmlDeviceGetTotalEnergyConsumption(self._handle, ctypes.byref(mj)) != 0:
            return None
        return mj.value / 1000.0


def torch_pci_bus_id(device):
    """NVML's spelling of the PCI bus id of a torch CUDA device, or None."""
    props = torch.cuda.get_device_properties(device)
    bus, dev, domain = (getattr(props, k, None) for k in ("pci_bus_id", "pci_device_id", "pci_domain_id"))
    if bus is None or dev is None:
        return None
    return f"{domain or 0:08X}:{bus:02X}:{dev:02X}.0"


# ------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------

class Timer:
    """Wall time of GPU work: synchronize before reading the clock."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.device = device

    def now(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def is_oom(e):
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(e, oom)) or "out of memory" in str(e).lower()


def copy_bandwidth_gbs(device, nbytes=1 << 30, repeats=10):
    """Device-to-device copy bandwidth, (read + written bytes) / s, best and median of `repeats`."""
    timer = Timer(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = timer.now()
        dst.copy_(src)
        rates.append(2 * nbytes / (timer.now() - t0) / 1e9)
    del src, dst
    return {"best_gbs": max(rates), "median_gbs": statistics.median(rates), "bytes": nbytes,
            "repeats": repeats, "convention": COPY_BANDWIDTH_CONVENTION}


def forward(model, ids, past=None):
    """One step of the model; returns (last-position logits [B, vocab], cache)."""
    kwargs = {"input_ids": ids, "use_cache": True}
    if past is not None:
        kwargs["past_key_values"] = past
    try:
        out = model(**kwargs, logits_to_keep=1)  # transformers >= 4.50: no logits for the prompt
    except TypeError:
        out = model(**kwargs)
    return out.logits[:, -1, :], out.past_key_values


def sample(logits, generator):
    """Temperature-1 sampling, as joule-engine-bench's decode does."""
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def random_prompts(batch, length, seed, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, PROMPT_ID_LIMIT, (batch, length), generator=g).to(device)


def measure_decode(model, device, batch, prompt_len, steps, windows, warmup_steps, energy, seed=7):
    """Median decode tokens/s over `windows` windows of `steps` steps after a prefill."""
    timer = Timer(device)
    generator = torch.Generator(device=device).manual_seed(seed + batch)
    with torch.inference_mode():
        logits, past = forward(model, random_prompts(batch, prompt_len, seed + batch, device))
        tokens = sample(logits, generator)
        for _ in range(warmup_steps):
            logits, past = forward(model, tokens, past)
            tokens = sample(logits, generator)
        seconds = []
        j0 = energy.joules() if energy else None
        for _ in range(windows):
            t0 = timer.now()
            for _ in range(steps):
                logits, past = forward(model, tokens, past)
                tokens = sample(logits, generator)
            seconds.append(timer.now() - t0)
        j1 = energy.joules() if energy else None
    median = statistics.median(seconds)
    row = {"tokens_per_s": batch * steps / median, "step_ms": 1e3 * median / steps,
           "window_seconds": seconds}
    row.update(energy_fields(j0, j1, batch * steps * windows, sum(seconds)))
    return row


def measure_prefill(model, device, length, repeats, energy, seed=1000):
    """Tokens/s of one prompt of `length` tokens into an empty cache: best and median."""
    timer = Timer(device)
    prompts = [random_prompts(1, length, seed + r, device) for r in range(repeats + 1)]
    seconds = []
    with torch.inference_mode():
        forward(model, prompts[0])  # warm-up
        j0 = energy.joules() if energy else None
        for ids in prompts[1:]:
            t0 = timer.now()
            forward(model, ids)
            seconds.append(timer.now() - t0)
        j1 = energy.joules() if energy else None
    row = {"len": length, "tokens_per_s": length / min(seconds),
           "median_tokens_per_s": length / statistics.median(seconds), "repeats": repeats}
    row.update(energy_fields(j0, j1, length * repeats, sum(seconds)))
    return row


def energy_fields(j0, j1, tokens, seconds):
    if j0 is None or j1 is None:
        return {}
    joules = j1 - j0
    return {"energy_joules": joules, "energy_seconds": seconds,
            "tokens_per_joule": tokens / joules if joules > 0 else None,
            "mean_watts": joules / seconds if seconds > 0 else None}


# ------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------

def active_bytes_per_token(config, bytes_per_weight=2):
    """Weight bytes one decode token reads, from config.json: every matrix of attention, the
    router, the top-k routed experts (plus shared expert / dense MLPs) and lm_head; the norms'
    vectors and the single embedding row are left out (as worker/model's ActiveBytesPerToken)."""
    h = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    d = config.get("head_dim") or h // heads
    layers = config["num_hidden_layers"]
    experts = config.get("num_experts", config.get("num_local_experts", 0))
    top_k = config["num_experts_per_tok"]
    moe_inter = config.get("moe_intermediate_size") or config["intermediate_size"]
    step = config.get("decoder_sparse_step") or 1
    mlp_only = set(config.get("mlp_only_layers") or [])
    total = config["vocab_size"] * h  # lm_head (or the tied embedding, read whole)
    for layer in range(layers):
        total += h * heads * d * 2 + h * kv * d * 2  # q, o; k, v
        moe = experts > 0 and layer not in mlp_only and (layer + 1) % step == 0
        if moe:
            total += experts * h + top_k * 3 * h * moe_inter
            shared = config.get("shared_expert_intermediate_size") or 0
            if shared:
                total += 3 * h * shared + h
        else:
            total += 3 * h * config["intermediate_size"]
    return total * bytes_per_weight


def load_model(model_dir, device, experts_implementation):
    """BF16 model on `device`, and the from_pretrained arguments that worked: straight onto the
    device where this transformers can (device_map), else through host memory."""
    from transformers import AutoModelForCausalLM
    extra = {"experts_implementation": experts_implementation} if experts_implementation else {}
    attempts = [{"dtype": torch.bfloat16, "device_map": str(device)},
                {"dtype": torch.bfloat16},
                {"torch_dtype": torch.bfloat16}]  # transformers < 4.56 names it torch_dtype
    errors = []
    for kwargs in attempts:
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs, **extra)
        except (TypeError, ValueError, ImportError) as e:  # an argument this version lacks
            errors.append(f"{sorted(kwargs)}: {type(e).__name__}: {e}"[:300])
            continue
        used = {k: str(v) for k, v in kwargs.items()}
        return model.to(device).eval(), used, errors
    raise RuntimeError("from_pretrained failed every way: " + " | ".join(errors))


def other_engines():
    """Which other serving engines are installed (not imported: that can take seconds)."""
    found = {}
    for name in ("vllm", "sglang"):
        present = importlib.util.find_spec(name) is not None
        version = None
        if present:
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                pass
        found[name] = {"installed": present, "version": version}
    return found


def gpu_facts(device):
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "total_memory_bytes": props.total_memory,
            "pci_bus_id": torch_pci_bus_id(device),
            "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count}


def parse_batches(text):
    batches = []
    for part in text.split(","):
        if not part.strip().isdigit() or int(part) < 1:
            raise argparse.ArgumentTypeError(f"--batch: '{part}' is not a positive integer")
        batches.append(int(part))
    return batches


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout)")
    ap.add_argument("--device", default="cuda:0", help="cuda:N, or cpu to try the script without a GPU")
    ap.add_argument("--batch", type=parse_batches, default=[1, 8, 64, 256], help="decode batch sizes, comma separated")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sequence before decoding")
    ap.add_argument("--decode-steps", type=int, default=32, help="decode steps per timed window")
    ap.add_argument("--windows", type=int, default=3, help="timed decode windows per batch (median)")
    ap.add_argument("--warmup-steps", type=int, default=2, help="untimed decode steps after the prefill")
    ap.add_argument("--prefill-len", type=int, default=512, help="prompt tokens of the prefill measurement (0: skip)")
    ap.add_argument("--prefill-repeats", type=int, default=3)
    ap.add_argument("--copy-bytes", type=int, default=1 << 30, help="buffer size of the copy-bandwidth measurement")
    ap.add_argument("--experts-implementation", default="",
                    help="passed to from_pretrained (transformers 5: eager, batched_mm, grouped_mm); empty: its default")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads on the CPU (0: torch's default)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    for flag in ("prompt_len", "decode_steps", "windows"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")

    if torch is None:
        print(f"hf_bench: torch is not importable ({_TORCH_ERROR})", file=sys.stderr)
        return MISSING_DEPENDENCY
    try:
        import transformers
    except ImportError as e:
        print(f"hf_bench: transformers is not importable ({e}); it is on the GPU hosts "
              "(tests/gpu/README.md), not on the Debian build host", file=sys.stderr)
        return MISSING_DEPENDENCY
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"hf_bench: --device {args.device} but torch sees no CUDA device "
              "(use --device cpu to try the script without one)", file=sys.stderr)
        return 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with open(os.path.join(args.model, "config.json")) as f:
        config = json.load(f)

    result = {
        "tool": "bench/engine/hf_bench.py", "date": datetime.date.today().isoformat(),
        "model": args.model, "device": str(device), "gpu": gpu_facts(device),
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "dtype": "bfloat16", "prompt_len": args.prompt_len, "decode_steps": args.decode_steps,
        "windows": args.windows, "decode_statistic": "median of windows",
        "prefill_statistic": "tokens_per_s: best of repeats (as joule-engine-bench); median_tokens_per_s too",
        "active_bytes_per_token": active_bytes_per_token(config),
        "other_engines": other_engines(), "decode": {}, "errors": [], "complete": False,
    }
    def save():  # after every measurement, so a run cut short keeps what it measured
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(result, f, indent=2)
                f.write("\n")
            os.replace(args.json + ".tmp", args.json)

    energy = None
    if device.type == "cuda":
        energy = NvmlEnergy(pci_bus_id=torch_pci_bus_id(device), index=device.index or 0)
        result["energy_source"] = "nvml" if energy.error is None else None
        result["energy_meter"] = energy.description if energy.error is None else energy.error
        if energy.error is not None:
            energy = None

    bw = copy_bandwidth_gbs(device, args.copy_bytes)
    result["copy_bandwidth"] = bw
    result["copy_bandwidth_gbs"] = bw["best_gbs"]
    result["roofline_tokens_per_s_batch1"] = bw["best_gbs"] * 1e9 / result["active_bytes_per_token"]
    print(f"copy bandwidth {bw['best_gbs']:.1f} GB/s (read + write); active weights "
          f"{result['active_bytes_per_token'] / 1e6:.2f} MB per token -> batch-1 roofline "
          f"{result['roofline_tokens_per_s_batch1']:.1f} tokens/s", flush=True)
    save()

    t0 = time.perf_counter()
    model, result["load_kwargs"], result["load_fallbacks"] = load_model(args.model, device,
                                                                         args.experts_implementation)
    result["load_seconds"] = time.perf_counter() - t0
    result["model_class"] = type(model).__name__
    result["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    result["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    print(f"transformers {transformers.__version__} (torch {torch.__version__}): {type(model).__name__} "
          f"on {device} in {result['load_seconds']:.1f} s; attention {result['attn_implementation']}, "
          f"experts {result['experts_implementation']}", flush=True)

    save()
    failed = False
    for batch in args.batch:
        try:
            row = measure_decode(model, device, batch, args.prompt_len, args.decode_steps, args.windows,
                                 args.warmup_steps, energy)
            extra = f", {row['tokens_per_joule']:.2f} tokens/J" if row.get("tokens_per_joule") else ""
            print(f"decode batch {batch:3d}: {row['tokens_per_s']:9.1f} tokens/s ({row['step_ms']:.2f} ms/step)"
                  f"{extra}", flush=True)
        except Exception as e:  # noqa: BLE001  (record and go on: the other rows still count)
            if not is_oom(e):
                failed = True
            row = {"error": ("out of memory: " if is_oom(e) else "") + f"{type(e).__name__}: {e}"[:500]}
            print(f"decode batch {batch:3d}: {row['error']}", flush=True)
            result["errors"].append(f"decode batch {batch}: {row['error']}")
        result["decode"][str(batch)] = row
        save()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.prefill_len > 0:
        try:
            result["prefill"] = measure_prefill(model, device, args.prefill_len, args.prefill_repeats, energy)
            print(f"prefill {args.prefill_len} tokens: {result['prefill']['tokens_per_s']:.1f} tokens/s", flush=True)
        except Exception as e:  # noqa: BLE001
            failed = failed or not is_oom(e)
            result["prefill"] = {"len": args.prefill_len, "error": f"{type(e).__name__}: {e}"[:500]}
            result["errors"].append(f"prefill: {result['prefill']['error']}")
            print(f"prefill: {result['prefill']['error']}", flush=True)
    if device.type == "cuda":
        result["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    for name, found in result["other_engines"].items():
        print(f"{name}: {'installed ' + (found['version'] or '') if found['installed'] else 'not installed'}")
    result["complete"] = True
    save()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
