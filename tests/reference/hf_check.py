#!/usr/bin/env python3
"""Checks Joule's checkpoints, golden fixtures and PyTorch reference against Hugging Face
transformers itself (its modeling code, its checkpoint loader).

reference.py follows transformers' math but does not import it, so the fixtures that the C++
engine is tested against are only as right as that transcription. Where transformers is
installed (not on the Debian CI host; it is on the GPU machines), this closes the loop:

    hf_check.py fixtures --models-dir BUILD/models --fixtures tests/data/golden/*.json
        Loads each fixture's checkpoint with AutoModelForCausalLM (float32, eager attention),
        compares its logits with the fixture's and its greedy ids with the fixture's greedy ids
        (up to the first near-tie).
    hf_check.py compare --model DIR [--model DIR ...]
        Same comparison between transformers and reference.py on any checkpoint (e.g. the mini
        preset, which has no fixture), on the golden prompts.

A checkpoint that transformers loads with missing or unexpected tensors is a failure: Joule's
writer must produce what transformers reads. Exit 0: all agree; 1: a mismatch; 77: transformers
or torch is not importable (ctest SKIP).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference  # noqa: E402  (same directory: the fixtures' greedy near-tie rule, the prompts)

try:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
except ImportError as e:  # main() reports it
    torch = None
    _IMPORT_ERROR = str(e)


def load_hf(model_dir):
    """Returns (model, problems): problems lists tensors transformers missed or did not use."""
    kwargs = {"attn_implementation": "eager", "output_loading_info": True}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, **kwargs)
    model.eval()
    problems = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        found = [k for k in info.get(key, []) if not (key == "missing_keys" and k == "lm_head.weight"
                                                      and model.config.tie_word_embeddings)]
        if found:
            problems.append(f"{key}: {sorted(map(str, found))[:8]}")
    return model, problems


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids], dtype=torch.long)).logits[0].float()


def hf_greedy(model, ids, steps):
    """Greedy ids by full recompute (no cache, EOS not special), and top1-top2 margins."""
    seq, out, margins = list(ids), [], []
    for _ in range(steps):
        last = hf_logits(model, seq)[-1]
        top2 = torch.topk(last, 2).values
        tok = int(torch.argmax(last))
        out.append(tok)
        margins.append(float(top2[0] - top2[1]))
        seq.append(tok)
    return out, margins


def check_prompts(label, model, prompts, atol, log):
    """transformers against recorded prompts (reference.compare_prompts). Returns failures."""
    failures, worst = reference.compare_prompts(lambda ids: hf_logits(model, ids),
                                                lambda ids, n: hf_greedy(model, ids, n)[0], prompts, atol)
    failures = [f"{label} {f}" for f in failures]
    print(f"{label}: max |logit diff| {worst:.2e} over {len(prompts)} prompts "
          f"({'ok' if not failures else 'FAIL'})", file=log)
    return failures


def cmd_fixtures(args, log):
    failures = []
    for fx in args.fixtures:
        with open(fx) as f:
            doc = json.load(f)
        model_dir = os.path.join(args.models_dir, doc["model"])
        if not os.path.exists(os.path.join(model_dir, "config.json")):
            failures.append(f"{fx}: checkpoint {model_dir} does not exist")
            continue
        model, problems = load_hf(model_dir)
        failures += [f"{doc['model']}: transformers loaded it with {p}" for p in problems]
        if type(model).__name__ != doc["architecture"]:
            failures.append(f"{doc['model']}: transformers built {type(model).__name__}, "
                            f"fixture says {doc['architecture']}")
        failures += check_prompts(f"transformers vs {os.path.basename(fx)}", model, doc["prompts"],
                                  args.atol, log)
    return failures


def cmd_compare(args, log):
    failures = []
    for model_dir in args.model:
        model, problems = load_hf(model_dir)
        name = os.path.basename(os.path.normpath(model_dir))
        failures += [f"{name}: transformers loaded it with {p}" for p in problems]
        ref = reference.load_model(model_dir)
        prompts = []
        for ids in reference.golden_prompts(ref.config.vocab_size):
            with torch.no_grad():
                logits = ref.logits(ids)
            greedy, margins = ref.greedy(ids, reference.GOLDEN_GREEDY_STEPS)
            prompts.append({"ids": ids, "logit_positions": list(range(len(ids))), "logits": logits,
                            "greedy": greedy, "greedy_margins": margins})
        failures += check_prompts(f"transformers vs reference.py on {name}", model, prompts, args.atol, log)
    return failures


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("fixtures", help="golden fixtures against transformers")
    p.add_argument("--models-dir", required=True)
    p.add_argument("--fixtures", nargs="+", required=True)
    p.add_argument("--atol", type=float, default=1e-4)
    p = sub.add_parser("compare", help="reference.py against transformers on checkpoints")
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--atol", type=float, default=1e-4)
    args = ap.parse_args(argv)
    if torch is None:
        print(f"SKIP: transformers/torch are not importable by {sys.executable}: {_IMPORT_ERROR}")
        return reference.SKIP_RETURN_CODE
    torch.backends.cuda.matmul.allow_tf32 = False  # everything runs on the CPU in float32 anyway
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    failures = (cmd_fixtures if args.cmd == "fixtures" else cmd_compare)(args, sys.stdout)
    if failures:
        print("FAIL:\n  " + "\n  ".join(failures))
        return 1
    print("transformers agrees")
    return 0


if __name__ == "__main__":
    sys.exit(main())
