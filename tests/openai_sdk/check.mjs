// The OpenAI SDK (npm "openai", pinned in package-lock.json) against a running
// coordinator: every request field of docs/api.md's choices, log probabilities,
// penalties and logit_bias parses in the SDK's hands and behaves as documented.
//   node check.mjs --port P --model NAME --vocab V --max-logit-bias N [--bos ID] [--specials IDS]
// The model is a built-in tiny model: byte-level tokenizer (ids 0..255 are the
// bytes), random weights, so the checks are about structure and arithmetic,
// not about what the text says. Greedy decoding is deterministic.
// --bos: the id the tokenizer puts before a text prompt (DeepSeek-V3's
// <｜begin▁of▁sentence｜>); -1 (default): none. --specials: the special tokens' ids.
import OpenAI from 'openai';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, a, i, all) => (a.startsWith('--') ? [...pairs, [a.slice(2), all[i + 1]]] : pairs), []));
const model = args.model;
const vocab = Number(args.vocab);
const maxLogitBias = Number(args['max-logit-bias']);
const bos = Number(args.bos ?? -1);
const added = bos >= 0 ? 1 : 0;  // tokens the server adds before a text prompt
const client = new OpenAI({ baseURL: `http://127.0.0.1:${args.port}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 60_000 });

const failures = [];
function check(cond, what) {
  if (!cond) {
    failures.push(what);
    console.error(`MISMATCH: ${what}`);
  }
  return cond;
}
const near = (a, b, tol = 1e-4) => typeof a === 'number' && typeof b === 'number' && Math.abs(a - b) <= tol;
const sum = (xs) => xs.reduce((s, x) => s + x, 0);
const utf8 = new TextDecoder('utf-8');  // WHATWG replacement, as the server's decoder
const greedy = { temperature: 0 };
// The special tokens (Qwen's <|endoftext|>, <|im_start|>, <|im_end|>) banned:
// they have no entry in logprobs (they are not part of the text), which would
// spoil the counts.
const noSpecials = Object.fromEntries((args.specials ?? '256,257,258').split(',').map((id) => [Number(id), -100]));
const user = (content) => [{ role: 'user', content }];

// Chat: logprobs with top_logprobs, not streamed and streamed.
async function chatLogprobs() {
  const req = { model, messages: user('Hello there'), max_completion_tokens: 8, ...greedy, logprobs: true, top_logprobs: 3 };
  const r = await client.chat.completions.create(req);
  const c = r.choices[0];
  const content = c.logprobs?.content;
  if (!check(Array.isArray(content) && content.length >= 1, `chat logprobs.content ${JSON.stringify(c.logprobs)}`)) return;
  check(content.length <= r.usage.completion_tokens, `chat: ${content.length} entries for ${r.usage.completion_tokens} tokens`);
  for (const [i, e] of content.entries()) {
    check(typeof e.token === 'string' && typeof e.logprob === 'number' && e.logprob <= 1e-6, `chat entry ${i}: ${JSON.stringify(e)}`);
    // null: an id of the model's vocabulary that the tokenizer does not know.
    check(e.bytes === null || (e.bytes.length >= 1 && e.bytes.every((b) => Number.isInteger(b) && b >= 0 && b < 256)),
      `chat entry ${i} bytes ${JSON.stringify(e.bytes)}`);
    check(e.top_logprobs.length === 3, `chat entry ${i}: ${e.top_logprobs.length} top_logprobs, asked 3`);
    const lps = e.top_logprobs.map((t) => t.logprob);
    check(lps.every((x, j) => j === 0 || x <= lps[j - 1] + 1e-6), `chat entry ${i}: top_logprobs not most likely first ${lps}`);
    // Greedy: the chosen token is the most likely one.
    check(e.token === e.top_logprobs[0].token && near(e.logprob, e.top_logprobs[0].logprob),
      `chat entry ${i}: greedy token ${JSON.stringify(e.token)} (${e.logprob}) is not top_logprobs[0] ${JSON.stringify(e.top_logprobs[0])}`);
  }
  // The entries' bytes are the text.
  const text = utf8.decode(Uint8Array.from(content.flatMap((e) => e.bytes ?? [])));
  check(text === c.message.content, `chat: entries' bytes ${JSON.stringify(text)} != content ${JSON.stringify(c.message.content)}`);

  const stream = await client.chat.completions.create({ ...req, stream: true, stream_options: { include_usage: true } });
  const streamed = [];
  let streamedText = '';
  let usage = null;
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage;
    for (const sc of chunk.choices) {
      streamedText += sc.delta?.content ?? '';
      for (const e of sc.logprobs?.content ?? []) streamed.push(e);
    }
  }
  check(streamedText === c.message.content, `chat stream text ${JSON.stringify(streamedText)} != ${JSON.stringify(c.message.content)}`);
  check(streamed.length === content.length && streamed.every((e, i) => e.token === content[i].token && near(e.logprob, content[i].logprob)),
    `chat stream logprobs differ from the response's: ${JSON.stringify(streamed.map((e) => [e.token, e.logprob]))} vs ${JSON.stringify(content.map((e) => [e.token, e.logprob]))}`);
  check(usage?.completion_tokens === r.usage.completion_tokens, `chat stream usage ${JSON.stringify(usage)}`);
}

// Completions: logprobs N with echo: the prompt's tokens first (after the BOS
// where the tokenizer adds one), the first one null.
async function completionsEcho() {
  const prompt = 'The sky';
  const r = await client.completions.create({ model, prompt, max_tokens: 6, ...greedy, logprobs: 2, echo: true, ignore_eos: true,
    logit_bias: noSpecials });
  const c = r.choices[0];
  const lp = c.logprobs;
  check(c.text.startsWith(prompt), `echo: text ${JSON.stringify(c.text)} does not start with the prompt`);
  check(r.usage.prompt_tokens === added + prompt.length && r.usage.completion_tokens === 6, `echo usage ${JSON.stringify(r.usage)}`);
  const generated = added + prompt.length;  // the index of the first generated token
  const n = r.usage.prompt_tokens + r.usage.completion_tokens;
  if (!check(lp && lp.tokens.length === n && lp.token_logprobs.length === n && lp.top_logprobs.length === n && lp.text_offset.length === n,
    `echo logprobs lengths for ${n} tokens: ${JSON.stringify(lp)}`)) return;
  check(lp.tokens.slice(added, generated).join('') === prompt, `echo: prompt tokens ${JSON.stringify(lp.tokens)}`);
  check(lp.token_logprobs[0] === null && lp.top_logprobs[0] === null, 'echo: the first prompt token has a log probability');
  check(lp.text_offset[0] === 0 && lp.text_offset.every((o, i) => i === 0 || o >= lp.text_offset[i - 1]), `text_offset ${lp.text_offset}`);
  check(lp.text_offset[generated] - lp.text_offset[added] === prompt.length,
    `the first generated token's text_offset ${lp.text_offset[generated]} (the prompt's ${lp.text_offset[added]})`);
  for (let i = 1; i < n; ++i) {
    const top = Object.values(lp.top_logprobs[i] ?? {});
    check(typeof lp.token_logprobs[i] === 'number' && lp.token_logprobs[i] <= 1e-6 && top.length >= 1 && top.length <= 2,
      `echo token ${i}: ${lp.token_logprobs[i]} ${JSON.stringify(lp.top_logprobs[i])}`);
    if (i >= generated) {
      check(near(lp.token_logprobs[i], Math.max(...top)), `greedy token ${i}: ${lp.token_logprobs[i]} is not the best of ${JSON.stringify(lp.top_logprobs[i])}`);
    }
  }
}

// n choices, seeded: distinct indices, usage over all, the same answer twice.
async function nChoices() {
  const req = { model, prompt: 'abc', n: 3, max_tokens: 5, temperature: 1, seed: 42, ignore_eos: true };
  const a = await client.completions.create(req);
  check(JSON.stringify(a.choices.map((c) => c.index)) === '[0,1,2]', `n=3 indices ${a.choices.map((c) => c.index)}`);
  check(a.usage.completion_tokens === 15 && a.usage.prompt_tokens === 3 + added, `n=3 usage ${JSON.stringify(a.usage)}`);
  const b = await client.completions.create(req);
  check(JSON.stringify(a.choices.map((c) => c.text)) === JSON.stringify(b.choices.map((c) => c.text)), 'seeded n=3 did not repeat');

  const stream = await client.chat.completions.create({ model, messages: user('hi'), n: 3, max_tokens: 4, stream: true, seed: 1 });
  const finished = new Set();
  for await (const chunk of stream) {
    for (const c of chunk.choices) if (c.finish_reason) finished.add(c.index);
  }
  check(JSON.stringify([...finished].sort()) === '[0,1,2]', `chat n=3 stream finished choices ${[...finished]}`);
}

// best_of: the generation with the highest cumulative log probability. The
// same seeds with n give every candidate; best_of must return the best of them.
async function bestOf() {
  const base = { model, prompt: 'xyz', max_tokens: 5, temperature: 1, seed: 7, ignore_eos: true, logit_bias: noSpecials };
  const all = await client.completions.create({ ...base, n: 3, logprobs: 0 });
  const sums = all.choices.map((c) => sum(c.logprobs.token_logprobs));
  const best = sums.indexOf(Math.max(...sums));
  const r = await client.completions.create({ ...base, best_of: 3 });
  check(r.choices.length === 1 && r.choices[0].text === all.choices[best].text,
    `best_of=3 chose ${JSON.stringify(r.choices[0]?.text)}; candidates ${JSON.stringify(all.choices.map((c) => c.text))} with sums ${sums}`);
  check(r.choices[0].logprobs === null, 'best_of without logprobs returned logprobs');
  check(r.usage.completion_tokens === 15, `best_of usage counts every generation: ${JSON.stringify(r.usage)}`);
}

// Several prompts: choices prompt-major, each prompt counted once.
async function severalPrompts() {
  const r = await client.completions.create({ model, prompt: ['ab', 'xyz'], n: 2, max_tokens: 4, ...greedy, ignore_eos: true });
  check(JSON.stringify(r.choices.map((c) => c.index)) === '[0,1,2,3]', `several prompts: indices ${r.choices.map((c) => c.index)}`);
  check(r.usage.prompt_tokens === 5 + 2 * added && r.usage.completion_tokens === 16, `several prompts: usage ${JSON.stringify(r.usage)}`);
  const one = await client.completions.create({ model, prompt: 'xyz', max_tokens: 4, ...greedy, ignore_eos: true });
  check(r.choices[2].text === one.choices[0].text && r.choices[3].text === one.choices[0].text,
    `prompt[1]'s choices ${JSON.stringify(r.choices.map((c) => c.text))} != alone ${JSON.stringify(one.choices[0].text)}`);
  // Token ids are sent as given: the same text's ids, with the BOS the tokenizer would add.
  const xyz = [...(added ? [bos] : []), 120, 121, 122];
  const ids = await client.completions.create({ model, prompt: [xyz], max_tokens: 4, ...greedy, ignore_eos: true });
  check(ids.choices[0].text === one.choices[0].text, 'token-id prompts differ from the same text');
}

// logit_bias: +100 makes greedy decoding write that token; -100 bans one.
async function logitBias() {
  const r = await client.chat.completions.create({ model, messages: user('hi'), max_tokens: 5, ...greedy, logit_bias: { 65: 100 } });
  check(r.choices[0].message.content === 'AAAAA', `logit_bias +100 on 'A': ${JSON.stringify(r.choices[0].message.content)}`);
  const plain = await client.chat.completions.create({ model, messages: user('hi'), max_tokens: 1, ...greedy, logprobs: true });
  // The greedy first token, or <|im_end|> (258) when the answer is empty.
  const first = plain.choices[0].logprobs.content[0]?.bytes?.[0] ?? 258;
  const banned = await client.chat.completions.create({ model, messages: user('hi'), max_tokens: 1, ...greedy, logprobs: true,
    logit_bias: { [first]: -100 } });
  const now = banned.choices[0].logprobs.content[0]?.bytes?.[0] ?? 258;
  check(now !== first, `logit_bias -100 on token ${first}: it was still chosen`);
}

// Penalties, seen in the log probabilities (after penalties, logit_bias and
// temperature): with 'A' forced by +100, the runner-up at step k gains what 'A'
// lost: presence 2 once 'A' was generated, frequency 2 per time.
async function penalties() {
  const runnerUp = async (extra) => {
    const r = await client.completions.create({ model, prompt: 'hello', max_tokens: 3, ...greedy, logprobs: 2, logit_bias: { 65: 100 }, ...extra });
    check(r.choices[0].text === 'AAA', `penalties: forced text ${JSON.stringify(r.choices[0].text)}`);
    return r.choices[0].logprobs.top_logprobs.map((t) => Object.values(t).sort((x, y) => y - x)[1]);
  };
  const base = await runnerUp({});
  const presence = await runnerUp({ presence_penalty: 2 });
  const frequency = await runnerUp({ frequency_penalty: 2 });
  check(presence.every((p, k) => near(p, base[k] + (k > 0 ? 2 : 0), 0.05)), `presence_penalty 2: runner-up logprobs ${presence} vs ${base}`);
  check(frequency.every((f, k) => near(f, base[k] + 2 * k, 0.05)), `frequency_penalty 2: runner-up logprobs ${frequency} vs ${base}`);

  // repetition_penalty reaches every token of the prompt: a prompt of every byte changes the distribution.
  const allBytes = Array.from({ length: 256 }, (_, i) => i);
  const dist = async (extra) => (await client.completions.create({ model, prompt: allBytes, max_tokens: 1, ...greedy, logprobs: 5, ...extra }))
    .choices[0].logprobs.top_logprobs[0];
  const plain = await dist({});
  const penalized = await dist({ repetition_penalty: 1.5 });
  const moved = Object.keys(plain).some((t) => !(t in penalized) || Math.abs(plain[t] - penalized[t]) > 1e-3);
  check(moved, `repetition_penalty 1.5 changed nothing: ${JSON.stringify(plain)} vs ${JSON.stringify(penalized)}`);
}

// Limits and bad values: OpenAI-shaped 400s naming the field, as the SDK reports them.
async function badRequests() {
  const chat = { model, messages: user('hi'), max_tokens: 1 };
  const completion = { model, prompt: 'hi', max_tokens: 1 };
  const bias = Object.fromEntries(Array.from({ length: maxLogitBias + 1 }, (_, i) => [i, 1]));
  const cases = [
    ['chat', { ...chat, n: 17 }, 'n'],
    ['chat', { ...chat, logprobs: true, top_logprobs: 21 }, 'top_logprobs'],
    ['chat', { ...chat, top_logprobs: 2 }, 'top_logprobs'],
    ['chat', { ...chat, presence_penalty: 2.5 }, 'presence_penalty'],
    ['chat', { ...chat, frequency_penalty: -3 }, 'frequency_penalty'],
    ['chat', { ...chat, logit_bias: { [vocab]: 1 } }, 'logit_bias'],
    ['chat', { ...chat, logit_bias: { 1: 101 } }, 'logit_bias'],
    ['chat', { ...chat, logit_bias: bias }, 'logit_bias'],
    ['completions', { ...completion, logprobs: 21 }, 'logprobs'],
    ['completions', { ...completion, best_of: 2, stream: true }, 'best_of'],
    ['completions', { ...completion, n: 3, best_of: 2 }, 'best_of'],
    ['completions', { ...completion, repetition_penalty: 0 }, 'repetition_penalty'],
    ['completions', { ...completion, prompt: Array.from({ length: 17 }, () => 'x') }, 'prompt'],
  ];
  for (const [endpoint, body, param] of cases) {
    const api = endpoint === 'chat' ? client.chat.completions : client.completions;
    try {
      const r = await api.create(body);
      if (body.stream) for await (const _ of r);  // eslint-disable-line no-unused-vars
      check(false, `${endpoint} ${JSON.stringify(body).slice(0, 120)}: accepted, wanted a 400 on ${param}`);
    } catch (e) {
      check(e instanceof OpenAI.BadRequestError && e.status === 400 && e.type === 'invalid_request_error' && e.param === param,
        `${endpoint} ${JSON.stringify(body).slice(0, 120)}: got ${e?.status} ${e?.type} param ${e?.param} (${e?.message}), wanted 400 on ${param}`);
    }
  }
}

const checks = { chatLogprobs, completionsEcho, nChoices, bestOf, severalPrompts, logitBias, penalties, badRequests };
for (const [name, run] of Object.entries(checks)) {
  const before = failures.length;
  const t0 = Date.now();
  try {
    await run();
  } catch (e) {
    check(false, `${name} threw: ${e?.stack ?? e}`);
  }
  console.log(`${failures.length === before ? 'ok  ' : 'FAIL'} ${name} (${Date.now() - t0} ms)`);
}
if (failures.length > 0) {
  console.error(`${failures.length} mismatch(es)`);
  process.exit(1);
}
console.log('PASS: the OpenAI SDK reads every field');
