#!/usr/bin/env python3
"""Fixtures for the engine's DeepSeek-V3 feed-forward and routing tests, from reference.py.

  deepseek_v3_ffn.py ffn --model DIR [--model DIR ...] --out tests/data/deepseek_v3/ffn-tiny.json
      Every layer's feed-forward block (the dense MLP below first_k_dense_replace, else noaux_tc
      routing + routed experts + shared experts: reference.py's Mlp / NoauxTcMoe) of each
      checkpoint, on the same random inputs (standing for post-attention-normed hidden states).
      The file records, per MoE layer, the chosen experts and the smallest routing margin, so a
      test can tell a near-tie from a wrong choice.
  deepseek_v3_ffn.py check --model DIR [--model DIR ...] --fixture tests/data/deepseek_v3/ffn-tiny.json
      Recomputes the fixture on the checkpoints (named by their directories) and fails when an
      output differs by more than 1e-5 or an expert choice differs (reference_deepseek_v3 runs it).
  deepseek_v3_ffn.py routing
      Prints the C++ constants of tests/kernels/moe_test.cc's noaux_tc fixture: fixed logits and
      selection biases through NoauxTcMoe's selection and weighting.

Regenerate the first after changing joule-make-model's deepseek_v3 tiny preset or the reference
(tests/reference/make_golden.sh BUILD_DIR deepseek_v3 does it with the golden fixtures), or by hand:
  build/default/worker/tools/joule-make-model --family deepseek_v3 --preset tiny --out /tmp/ds/deepseek_v3-tiny
  build/default/worker/tools/joule-make-model --family deepseek_v3 --preset tiny --dtype fp8 \\
      --out /tmp/ds/deepseek_v3_fp8-tiny
  /usr/bin/python3 tests/reference/deepseek_v3_ffn.py ffn --model /tmp/ds/deepseek_v3-tiny \\
      --name deepseek_v3-tiny --model /tmp/ds/deepseek_v3_fp8-tiny --name deepseek_v3_fp8-tiny \\
      --out tests/data/deepseek_v3/ffn-tiny.json
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402

FFN_TOKENS = 6
FFN_SEED = 20251206


def _fmt(v):
    return float(f"{float(v):.8g}")


def ffn_fixture(model_dir, name, x):
    import torch
    model = ref.load_model(model_dir)
    c = model.config
    layers = []
    xt = torch.from_numpy(x)
    with torch.no_grad():
        for i, L in enumerate(model.layers):
            entry = {"layer": i, "moe": isinstance(L.mlp, ref.NoauxTcMoe)}
            if entry["moe"]:
                gaps = []
                L.mlp.router_gaps = gaps
                scores = torch.sigmoid(torch.nn.functional.linear(xt, L.mlp.router))
                entry["experts"] = [sorted(row) for row in L.mlp.select(scores).tolist()]
                out = L.mlp(xt)
                L.mlp.router_gaps = None
                entry["min_router_gap"] = _fmt(min(gaps))
            else:
                out = L.mlp(xt)
            entry["output"] = [_fmt(v) for v in out.reshape(-1).tolist()]
            layers.append(entry)
    return {"model": name, "architecture": c.architecture, "hidden": c.hidden_size,
            "checkpoint_sha256": ref.checkpoint_digest(model_dir), "layers": layers}


def ffn_input(hidden):
    """The fixture's input rows, rounded to the 9 significant digits the file holds (so the engine
    parses the same float32 values)."""
    import numpy as np
    x = np.random.RandomState(FFN_SEED).standard_normal((FFN_TOKENS, hidden)).astype(np.float32)
    return np.array([float(f"{float(v):.9g}") for v in x.reshape(-1)], dtype=np.float32).reshape(x.shape)


def cmd_ffn(args):
    if len(args.model) != len(args.name):
        sys.exit("give one --name per --model")
    x = ffn_input(ref.load_model(args.model[0]).config.hidden_size)
    doc = {
        "schema": "joule-ffn-v1",
        "source": "tests/reference/deepseek_v3_ffn.py ffn (reference.py Mlp / NoauxTcMoe, float32)",
        "torch_version": __import__("torch").__version__,
        "tokens": FFN_TOKENS, "seed": FFN_SEED,
        "input": [float(v) for v in x.reshape(-1)],
        "models": [ffn_fixture(m, n, x) for m, n in zip(args.model, args.name)],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    for m in doc["models"]:
        gaps = [l["min_router_gap"] for l in m["layers"] if l["moe"]]
        print(f"{m['model']}: {len(m['layers'])} layers, smallest routing margin {min(gaps):.3g}")


def cmd_check(args):
    with open(args.fixture) as f:
        doc = json.load(f)
    by_name = {os.path.basename(os.path.normpath(m)): m for m in args.model}
    failures = []
    for want in doc["models"]:
        model_dir = by_name.get(want["model"])
        if model_dir is None:
            failures.append(f"{want['model']}: no --model directory of that name")
            continue
        x = ffn_input(want["hidden"])
        if [float(v) for v in x.reshape(-1)] != doc["input"]:
            failures.append("the fixture's input is not ffn_input()'s")
        got = ffn_fixture(model_dir, want["model"], x)
        worst = 0.0
        for g, w in zip(got["layers"], want["layers"]):
            if g.get("experts") != w.get("experts"):
                failures.append(f"{want['model']} layer {w['layer']}: experts {g.get('experts')} != {w.get('experts')}")
            worst = max([worst] + [abs(a - b) for a, b in zip(g["output"], w["output"])])
        if worst > 1e-5:
            failures.append(f"{want['model']}: max |output diff| {worst:.2e} > 1e-5")
        print(f"{want['model']} vs {os.path.basename(args.fixture)}: max |output diff| {worst:.2e}")
    for f in failures:
        print("FAIL:", f)
    sys.exit(1 if failures else 0)


class _RoutingConfig:
    def __init__(self, n_group, topk_group, top_k, norm_topk_prob, routed_scaling_factor):
        self.n_group, self.topk_group, self.top_k = n_group, topk_group, top_k
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor


def cmd_routing(_args):
    import numpy as np
    import torch
    cases = [("kGroupsOfFour", 16, _RoutingConfig(4, 2, 3, True, 2.5), 11),
             ("kUnnormalized", 8, _RoutingConfig(2, 1, 2, False, 1.5), 12)]
    for name, experts, cfg, seed in cases:
        rng = np.random.RandomState(seed)
        tokens = 8
        logits = np.round(rng.standard_normal((tokens, experts)) * 3, 3).astype(np.float32)
        bias = np.round(rng.uniform(0.0, 0.2, experts), 3).astype(np.float32)
        moe = ref.NoauxTcMoe(None, torch.from_numpy(bias), [], None, cfg)
        gaps = []
        moe.router_gaps = gaps
        scores = torch.sigmoid(torch.from_numpy(logits))
        selected = moe.select(scores)
        weights = scores.gather(1, selected)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * cfg.routed_scaling_factor
        order = torch.argsort(selected, dim=-1)
        ids = selected.gather(1, order).tolist()
        w = weights.gather(1, order).tolist()
        print(f"// {name}: {experts} experts, n_group {cfg.n_group}, topk_group {cfg.topk_group}, "
              f"top_k {cfg.top_k}, norm_topk_prob {cfg.norm_topk_prob}, routed_scaling_factor "
              f"{cfg.routed_scaling_factor}; smallest selection margin {min(gaps):.3g}")
        print("logits = {" + ", ".join(f"{v:g}f" for v in logits.reshape(-1)) + "};")
        print("bias = {" + ", ".join(f"{v:g}f" for v in bias) + "};")
        print("ids = {" + ", ".join(str(v) for row in ids for v in row) + "};  // sorted per token")
        print("weights = {" + ", ".join(f"{v:.9g}f" for row in w for v in row) + "};")
        print()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ffn")
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--name", action="append", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("check")
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--fixture", required=True)
    sub.add_parser("routing")
    args = ap.parse_args()
    if ref.torch is None:
        print(f"SKIP: {ref._IMPORT_ERROR}")
        sys.exit(ref.SKIP_RETURN_CODE)
    {"ffn": cmd_ffn, "check": cmd_check, "routing": cmd_routing}[args.cmd](args)


if __name__ == "__main__":
    main()
