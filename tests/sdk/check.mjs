// The official OpenAI Node SDK, used as an application would, through tollgate.
//
// Run by tests/sdk.rs with `node` (scripts/sdk-env.sh installs tests/sdk/node_modules):
//
//     node check.mjs CASE...
//
// Environment (set by tests/sdk.rs in this process only):
//     OPENAI_BASE_URL      tollgate's data-plane URL, http://127.0.0.1:PORT/v1 (nothing else is
//                          accepted: nothing may leave the machine)
//     TOLLGATE_SDK_TOKENS  JSON object: case name -> the internal token that case uses (each case
//                          has a tollgate project of its own, named after it)
//
// Each case asserts what the SDK returned or threw. The script prints `ok CASE (SECONDS s)` or
// `FAIL CASE: why` per case (the stack goes to stderr) and exits 1 if any case failed.
// tollgate's side of each case (what reached the mock, the counters) is checked by tests/sdk.rs.
//
// What the mock upstream answers (tests/common/mock_upstream.rs): its WORDS, all nine for a
// non-streamed chat completion and the first five (its DEFAULT_CHUNKS) for streams and Responses,
// and usage 12 input + 9 output tokens.

import OpenAI, { toFile } from 'openai';
import { VERSION as SDK_VERSION } from 'openai/version';

const FULL_TEXT = 'Sure, here is a short mock answer for you.';
const SHORT_TEXT = 'Sure, here is a short';
const TOTAL_TOKENS = 12 + 9;
const MESSAGES = [{ role: 'user', content: 'Say hi' }];
// The models of the mock's list that the cases' allowlist ("gpt-4o-mini", "gpt-4.1*",
// "text-embedding-3-small") lets through.
const LISTED = ['gpt-4.1', 'gpt-4.1-mini', 'gpt-4o-mini', 'text-embedding-3-small'];
// The mock's 8-dimensional vector for input 0: magnitude ((37 i) % 997 + 1) / 10000, odd i negative.
const VECTOR = Array.from({ length: 8 }, (_, i) => (((37 * i) % 997) + 1) / 10_000 * (i % 2 === 0 ? 1 : -1));
const BATCH_LINE = '{"custom_id": "sdk-1", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n';

const BASE_URL = process.env.OPENAI_BASE_URL;
const TOKENS = JSON.parse(process.env.TOLLGATE_SDK_TOKENS ?? '{}');

class CaseFailed extends Error {}

function expect(condition, message) {
  if (!condition) throw new CaseFailed(message);
}

function expectEq(actual, expected, what) {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  expect(a === e, `${what}: expected ${e}, got ${a}`);
}

// A client as an application builds it; `x-sdk-case` lets the Rust side sort the requests the
// mock received by case (tollgate passes unknown headers through).
function client(name, maxRetries = 2) {
  return new OpenAI({
    apiKey: TOKENS[name],
    baseURL: BASE_URL,
    maxRetries,
    timeout: 10_000,
    defaultHeaders: { 'x-sdk-case': name },
  });
}

// Awaits `call()`, which must throw `ErrorType` with HTTP `status`; returns the error.
async function throws(ErrorType, status, call) {
  let result;
  try {
    result = await call();
  } catch (error) {
    if (error instanceof ErrorType) {
      expectEq(error.status, status, 'status');
      return error;
    }
    throw new CaseFailed(`expected ${ErrorType.name}, got ${error?.constructor?.name}: ${error}`);
  }
  throw new CaseFailed(`expected ${ErrorType.name}, got a result: ${JSON.stringify(result)}`);
}

const cases = {
  async chat() {
    const { data, response } = await client('chat')
      .chat.completions.create({ model: 'gpt-4o-mini', messages: MESSAGES, max_tokens: 50 })
      .withResponse();
    expectEq(response.headers.get('x-tollgate-project'), 'chat', 'x-tollgate-project header');
    expectEq(data.choices[0].message.content, FULL_TEXT, 'content');
    expectEq(data.choices[0].finish_reason, 'stop', 'finish_reason');
    expectEq(data.usage.total_tokens, TOTAL_TOKENS, 'usage.total_tokens');
  },

  async chat_stream() {
    // No stream_options: tollgate asks the upstream for usage itself and must take the extra
    // usage-only chunk (with an empty `choices`) out, or `chunk.choices[0]` below would fail.
    const stream = await client('chat_stream').chat.completions.create({
      model: 'gpt-4o-mini',
      messages: MESSAGES,
      stream: true,
    });
    let text = '';
    let finish = null;
    let chunks = 0;
    for await (const chunk of stream) {
      chunks += 1;
      expect(chunk.usage == null, `chunk ${chunks} carries a usage the client did not ask for`);
      expectEq(chunk.choices.length, 1, `choices in chunk ${chunks}`);
      text += chunk.choices[0].delta.content ?? '';
      finish = chunk.choices[0].finish_reason ?? finish;
    }
    expectEq(text, SHORT_TEXT, 'assembled text');
    expectEq(finish, 'stop', 'finish_reason');
  },

  async chat_stream_helper() {
    const stream = client('chat_stream_helper').chat.completions.stream({
      model: 'gpt-4o-mini',
      messages: MESSAGES,
    });
    let deltas = '';
    stream.on('content', (delta) => {
      deltas += delta;
    });
    const final = await stream.finalChatCompletion();
    expectEq(deltas, SHORT_TEXT, 'content events');
    expectEq(final.choices[0].message.content, SHORT_TEXT, 'final completion');
  },

  async responses() {
    const response = await client('responses').responses.create({ model: 'gpt-4o-mini', input: 'Say hi' });
    expectEq(response.status, 'completed', 'status');
    expectEq(response.output_text, SHORT_TEXT, 'output_text');
    expectEq(response.usage.total_tokens, TOTAL_TOKENS, 'usage.total_tokens');
  },

  async responses_stream() {
    const stream = await client('responses_stream').responses.create({
      model: 'gpt-4o-mini',
      input: 'Say hi',
      stream: true,
    });
    let deltas = '';
    let last = null;
    for await (const event of stream) {
      if (event.type === 'response.output_text.delta') deltas += event.delta;
      last = event;
    }
    expectEq(deltas, SHORT_TEXT, 'output_text.delta events');
    expectEq(last?.type, 'response.completed', 'last event');
    expectEq(last.response.usage.total_tokens, TOTAL_TOKENS, 'usage.total_tokens');
  },

  async responses_stream_helper() {
    const stream = client('responses_stream_helper').responses.stream({ model: 'gpt-4o-mini', input: 'Say hi' });
    let deltas = '';
    for await (const event of stream) {
      if (event.type === 'response.output_text.delta') deltas += event.delta;
    }
    const final = await stream.finalResponse();
    expectEq(deltas, SHORT_TEXT, 'output_text.delta events');
    // The helper's final response has no `output_text` convenience field (openai 6.30.1 sets it
    // only on parsed formats and on `responses.create`), so read the message itself.
    const texts = final.output.flatMap((item) => (item.type === 'message' ? item.content : []));
    expectEq(texts.map((part) => part.text).join(''), SHORT_TEXT, 'final response text');
    expectEq(final.status, 'completed', 'final response status');
    expectEq(final.usage.total_tokens, TOTAL_TOKENS, 'usage.total_tokens');
  },

  async embeddings() {
    // No encoding_format: the SDK asks for base64 and decodes it (tests/sdk.rs checks it asked).
    const result = await client('embeddings').embeddings.create({ model: 'text-embedding-3-small', input: 'hello' });
    expectEq(result.data.length, 1, 'vectors');
    const vector = result.data[0].embedding;
    expect(Array.isArray(vector), `the vector is not an array of numbers: ${JSON.stringify(vector)}`);
    expectEq(vector.length, VECTOR.length, 'dimensions');
    vector.forEach((got, i) => {
      const want = VECTOR[i];
      expect(Math.abs(got - want) <= 1e-6 * Math.abs(want), `component ${i}: ${got} != ${want}`);
    });
    expectEq(result.usage.prompt_tokens, 12, 'usage.prompt_tokens');
  },

  async models() {
    const c = client('models');
    const ids = [];
    for await (const model of c.models.list()) ids.push(model.id);
    expectEq(ids.sort(), LISTED, 'listed models');
    expectEq((await c.models.retrieve('gpt-4o-mini')).id, 'gpt-4o-mini', 'retrieved model');
    await throws(OpenAI.NotFoundError, 404, () => c.models.retrieve('gpt-4o'));
  },

  async files() {
    const uploaded = await client('files').files.create({
      file: await toFile(Buffer.from(BATCH_LINE), 'batch.jsonl', { type: 'application/jsonl' }),
      purpose: 'batch',
    });
    expect(uploaded.id.startsWith('file-'), `file id ${uploaded.id}`);
    expectEq(uploaded.bytes, Buffer.byteLength(BATCH_LINE), 'bytes');
    expectEq(uploaded.filename, 'batch.jsonl', 'filename');
    expectEq(uploaded.purpose, 'batch', 'purpose');
  },

  async bad_token() {
    const c = client('bad_token');
    const error = await throws(OpenAI.AuthenticationError, 401, () =>
      c.chat.completions.create({ model: 'gpt-4o-mini', messages: MESSAGES }),
    );
    expectEq(error.code, 'invalid_api_key', 'code');
    expect(!String(error).includes(TOKENS.bad_token), 'the token is echoed in the error');
  },

  async model_not_allowed() {
    const c = client('model_not_allowed');
    const error = await throws(OpenAI.PermissionDeniedError, 403, () =>
      c.chat.completions.create({ model: 'gpt-4o', messages: MESSAGES }),
    );
    const message = 'Project `model_not_allowed` does not have access to model `gpt-4o`';
    expectEq(error.error?.message, message, 'message');
    expect(error.message.includes(message), `the message is not in ${JSON.stringify(error.message)}`);
    expectEq(error.type, 'invalid_request_error', 'type');
    expectEq(error.code, 'model_not_found', 'code');
  },

  async budget_exceeded() {
    // The SDK's default of 2 retries, set out loud: only `x-should-retry: false` stops them (the
    // budget's period is `total`, so there is no retry-after for the SDK to weigh).
    const c = client('budget_exceeded', 2);
    const error = await throws(OpenAI.RateLimitError, 429, () =>
      c.chat.completions.create({ model: 'gpt-4o-mini', messages: MESSAGES, max_tokens: 5 }),
    );
    expectEq(error.type, 'insufficient_quota', 'type');
    expectEq(error.code, 'project_spend_limit_exceeded', 'code');
    expect((error.error?.message ?? '').includes('budget_exceeded'), `message ${JSON.stringify(error.error)}`);
    expectEq(error.headers?.get('x-should-retry'), 'false', 'x-should-retry');
  },

  async upstream_500() {
    const c = client('upstream_500', 2);
    const error = await throws(OpenAI.InternalServerError, 500, () =>
      c.chat.completions.create(
        { model: 'gpt-4o-mini', messages: MESSAGES },
        { headers: { 'x-mock-status': '500' } },
      ),
    );
    expectEq(error.type, 'server_error', 'type');
  },
};

async function main(names) {
  let host;
  try {
    host = new URL(BASE_URL).hostname;
  } catch {
    host = undefined;
  }
  if (host !== '127.0.0.1') {
    console.error(`refusing OPENAI_BASE_URL ${JSON.stringify(BASE_URL)}: tests talk to 127.0.0.1 only`);
    process.exit(2);
  }
  const unknown = names.filter((n) => !Object.hasOwn(cases, n));
  if (unknown.length > 0 || names.length === 0) {
    console.error(`unknown or no cases ${JSON.stringify(unknown)}; known: ${Object.keys(cases).join(', ')}`);
    process.exit(2);
  }
  // A hung case must not hang the suite: each request has a 10 s timeout, this is the backstop.
  setTimeout(() => {
    console.error('check.mjs: still running after 90 s, giving up');
    process.exit(3);
  }, 90_000).unref();
  console.log(`node ${process.version}, openai ${SDK_VERSION}`);
  let failed = 0;
  for (const name of names) {
    const started = performance.now();
    try {
      await cases[name]();
      console.log(`ok ${name} (${((performance.now() - started) / 1000).toFixed(2)} s)`);
    } catch (error) {
      // One case's failure must not hide the others.
      failed += 1;
      const detail = String(error?.message ?? error).replaceAll('\n', ' ');
      console.log(`FAIL ${name}: ${error?.constructor?.name}: ${detail}`);
      console.error(`--- ${name}\n${error?.stack ?? error}`);
    }
  }
  process.exitCode = failed > 0 ? 1 : 0;
}

await main(process.argv.slice(2));
