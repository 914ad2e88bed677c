#!/usr/bin/env python3
"""Reference numbers for tests/worker/engine/sampler_test.cc.

Follows vLLM's sampler in PyTorch, float32: logit_bias added first, then
apply_penalties (vllm/model_executor/layers/utils.py): repetition_penalty on
every token of the prompt or output (logit > 0: divided, else multiplied),
then logits -= frequency_penalty * output counts, logits -= presence_penalty *
(count > 0); logprobs = log_softmax(logits / temperature) (temperature 0: the
logits unscaled), top-k by torch.topk. Prints C++ initializers to paste.

  /usr/bin/python3 tests/reference/sampler_reference.py
"""
import torch

LOGITS = [1.5, -0.5, 3.0, 0.0, -2.0, 0.75, 2.25, -1.25, 0.25, 2.25]
PROMPT = [0, 1, 1, 5, 9]
OUTPUT = [2, 2, 4, 2, 6]
CASES = {
    # name: (presence, frequency, repetition, logit_bias, temperature)
    "all": (0.5, 0.3, 1.3, {1: 2.5, 7: -1.0}, 0.7),  # token 1 is in the prompt: order matters
    "repetition_only": (0.0, 0.0, 2.0, {}, 1.0),
    "negative_penalties": (-0.75, -1.5, 1.0, {8: 100.0}, 0.0),
}


def process(presence, frequency, repetition, bias):
    logits = torch.tensor([LOGITS], dtype=torch.float32)
    vocab = logits.shape[1]
    for token, value in bias.items():
        logits[0, token] += value
    prompt_mask = torch.zeros(1, vocab, dtype=torch.bool)
    prompt_mask[0, PROMPT] = True
    counts = torch.zeros(1, vocab, dtype=torch.int64)
    for t in OUTPUT:
        counts[0, t] += 1
    output_mask = counts > 0
    rep = torch.where(prompt_mask | output_mask, torch.tensor(repetition), torch.tensor(1.0))
    logits[logits > 0] /= rep[logits > 0]
    logits[logits <= 0] *= rep[logits <= 0]
    logits -= torch.tensor([[frequency]]) * counts
    logits -= torch.tensor([[presence]]) * output_mask
    return logits


def fmt(values):
    return "{" + ", ".join("%.9gf" % v for v in values) + "}"


for name, (presence, frequency, repetition, bias, temperature) in CASES.items():
    logits = process(presence, frequency, repetition, bias)
    scaled = logits / temperature if temperature > 0 else logits
    logprobs = torch.log_softmax(scaled, dim=-1)[0]
    top = torch.topk(logprobs, 4)
    print(name)
    print("  processed:", fmt(logits[0].tolist()))
    print("  logprobs: ", fmt(logprobs.tolist()))
    print("  top4:     ", top.indices.tolist(), fmt(top.values.tolist()))
