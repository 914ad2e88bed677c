#!/usr/bin/env python3
"""Writes tests/data/tokenizer/deepseek_v3_chat_fixtures.json: DeepSeek-V3's own chat_template
(the tokenizer_config.json in tests/data/tokenizer/deepseek_v3.tar.xz) applied to a few
system/user/assistant conversations, rendered by Jinja2 the way transformers'
apply_chat_template renders it (a sandboxed environment with trim_blocks and lstrip_blocks;
bos_token and eos_token from tokenizer_config.json). chat_template_test.cc checks
RenderDeepseekV3Chat against the result; only Jinja2 is needed.

  python3 tests/reference/deepseek_v3_chat_fixtures.py      # from the repository root
  python3 tests/reference/deepseek_v3_chat_fixtures.py --check MODEL/tokenizer_config.json

--check writes nothing: the committed fixtures must still be what DeepSeek-V3's template renders,
and the given file's chat_template (joule-make-model's deepseek_v3 one) must render the same.
It exits 77 (SKIP) without Jinja2.
"""
import json
import os
import sys
import tarfile

try:
    from jinja2.sandbox import ImmutableSandboxedEnvironment
except ImportError:
    ImmutableSandboxedEnvironment = None

SRC = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "tokenizer"))

# Conversations like chat_fixtures.json's (Qwen3), plus what is DeepSeek-V3's own: system
# prompts are gathered, joined by a blank line, and written first wherever they stand.
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another one, in 中文 please 😀"},
    ],
    [
        {"role": "user", "content": "multi\nline\n\ncontent  "},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": ""},
    ],
    [
        {"role": "system", "content": "First."},
        {"role": "user", "content": "a"},
        {"role": "system", "content": "Second."},
        {"role": "assistant", "content": "b"},
    ],
]


def token_content(value):
    return value["content"] if isinstance(value, dict) else value


def render(config):
    """The fixture cases: each conversation rendered by config's chat_template."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(config["chat_template"])
    cases = []
    for messages in CONVERSATIONS:
        for add_generation_prompt in (False, True):
            rendered = template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                       bos_token=token_content(config.get("bos_token", "")),
                                       eos_token=token_content(config.get("eos_token", "")))
            cases.append({"messages": messages, "add_generation_prompt": add_generation_prompt,
                          "rendered": rendered})
    return cases


def check(other_config_path, out):
    with open(out, encoding="utf-8") as f:
        committed = json.load(f)["cases"]
    with open(other_config_path, encoding="utf-8") as f:
        other = json.load(f)
    failures = 0
    for name, cases in (("DeepSeek-V3's template", render(real_config())), (other_config_path, render(other))):
        for got, want in zip(cases, committed):
            if got != want:
                failures += 1
                print(f"MISMATCH ({name}): {json.dumps(got, ensure_ascii=False)}\n"
                      f"  committed: {json.dumps(want, ensure_ascii=False)}", file=sys.stderr)
        if len(cases) != len(committed):
            failures += 1
            print(f"MISMATCH ({name}): {len(cases)} cases, {len(committed)} committed", file=sys.stderr)
    if failures:
        return 1
    print(f"PASS: {len(committed)} conversations render alike (DeepSeek-V3's template, {other_config_path})")
    return 0


def real_config():
    with tarfile.open(os.path.join(SRC, "deepseek_v3.tar.xz")) as tar:
        return json.load(tar.extractfile("tokenizer_config.json"))


def main():
    if ImmutableSandboxedEnvironment is None:
        print("SKIP: Jinja2 is not installed (python3-jinja2)")
        return 77
    out = os.path.join(SRC, "deepseek_v3_chat_fixtures.json")
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        return check(sys.argv[2], out)
    if len(sys.argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    cases = render(real_config())
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"source": "DeepSeek-V3 tokenizer_config.json chat_template rendered by Jinja2 "
                             "(as transformers' apply_chat_template)", "cases": cases},
                  f, ensure_ascii=False, indent=1)
        f.write("\n")
    print("wrote", out, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
