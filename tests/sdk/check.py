"""The official OpenAI Python SDK, used as an application would, through tollgate.

Run by tests/sdk.rs with target/sdk-venv/bin/python (scripts/sdk-env.sh builds it):

    check.py CASE...

Environment (set by tests/sdk.rs in this process only):
    OPENAI_BASE_URL      tollgate's data-plane URL, http://127.0.0.1:PORT/v1 (nothing else is
                         accepted: nothing may leave the machine)
    TOLLGATE_SDK_TOKENS  JSON object: case name -> the internal token that case uses (each case
                         has a tollgate project of its own, named after it)

Each case asserts what the SDK returned or raised. The script prints `ok CASE (SECONDS s)` or
`FAIL CASE: why` per case (the traceback goes to stderr) and exits 1 if any case failed.
tollgate's side of each case (what reached the mock, the counters) is checked by tests/sdk.rs.

What the mock upstream answers (tests/common/mock_upstream.rs): its WORDS, all nine for a
non-streamed chat completion and the first five (its DEFAULT_CHUNKS) for streams and Responses,
and usage 12 input + 9 output tokens.
"""

import json
import math
import os
import signal
import sys
import time
import traceback
import urllib.parse

import openai
from openai import OpenAI

FULL_TEXT = "Sure, here is a short mock answer for you."
SHORT_TEXT = "Sure, here is a short"
TOTAL_TOKENS = 12 + 9
MESSAGES = [{"role": "user", "content": "Say hi"}]
# The models of the mock's list that the cases' allowlist ("gpt-4o-mini", "gpt-4.1*",
# "text-embedding-3-small") lets through.
LISTED = ["gpt-4.1", "gpt-4.1-mini", "gpt-4o-mini", "text-embedding-3-small"]
# The mock's 8-dimensional vector for input 0: magnitude ((37 i) % 997 + 1) / 10000, odd i negative.
VECTOR = [((37 * i) % 997 + 1) / 10_000 * (1 if i % 2 == 0 else -1) for i in range(8)]
BATCH_LINE = b'{"custom_id": "sdk-1", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'

BASE_URL = os.environ["OPENAI_BASE_URL"]
TOKENS = json.loads(os.environ["TOLLGATE_SDK_TOKENS"])


class CaseFailed(Exception):
    pass


def expect(condition, message):
    if not condition:
        raise CaseFailed(message)


def expect_eq(actual, expected, what):
    expect(actual == expected, f"{what}: expected {expected!r}, got {actual!r}")


def client(case, max_retries=2):
    """A client as an application builds it; `x-sdk-case` lets the Rust side sort the requests
    the mock received by case (tollgate passes unknown headers through)."""
    return OpenAI(
        api_key=TOKENS[case],
        base_url=BASE_URL,
        max_retries=max_retries,
        timeout=10,
        default_headers={"x-sdk-case": case},
    )


def raises(error_type, status, call):
    """Runs `call`, which must raise `error_type` with HTTP `status`; returns the error."""
    try:
        result = call()
    except error_type as error:
        expect_eq(error.status_code, status, "status code")
        return error
    except openai.APIError as error:
        raise CaseFailed(
            f"expected {error_type.__name__}, got {type(error).__name__}: {error}"
        ) from error
    raise CaseFailed(f"expected {error_type.__name__}, got a result: {result!r}")


def attempt_of(error):
    """The SDK's retry count on the request that produced `error` (0: the first attempt)."""
    return error.response.request.headers.get("x-stainless-retry-count")


def case_chat():
    c = client("chat")
    raw = c.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=50
    )
    expect_eq(raw.headers.get("x-tollgate-project"), "chat", "x-tollgate-project header")
    completion = raw.parse()
    expect_eq(completion.choices[0].message.content, FULL_TEXT, "content")
    expect_eq(completion.choices[0].finish_reason, "stop", "finish_reason")
    expect_eq(completion.usage.total_tokens, TOTAL_TOKENS, "usage.total_tokens")


def case_chat_stream():
    # No stream_options: tollgate asks the upstream for usage itself and must take the extra
    # usage-only chunk (with an empty `choices`) out, or `chunk.choices[0]` below would fail.
    stream = client("chat_stream").chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    )
    text = ""
    finish = None
    chunks = 0
    for chunk in stream:
        chunks += 1
        expect(chunk.usage is None, f"chunk {chunks} carries a usage the client did not ask for")
        expect_eq(len(chunk.choices), 1, f"choices in chunk {chunks}")
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    expect_eq(text, SHORT_TEXT, "assembled text")
    expect_eq(finish, "stop", "finish_reason")


def case_chat_stream_helper():
    with client("chat_stream_helper").chat.completions.stream(
        model="gpt-4o-mini", messages=MESSAGES
    ) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "content.delta")
        final = stream.get_final_completion()
    expect_eq(deltas, SHORT_TEXT, "content.delta events")
    expect_eq(final.choices[0].message.content, SHORT_TEXT, "final completion")


def case_responses():
    response = client("responses").responses.create(model="gpt-4o-mini", input="Say hi")
    expect_eq(response.status, "completed", "status")
    expect_eq(response.output_text, SHORT_TEXT, "output_text")
    expect_eq(response.usage.total_tokens, TOTAL_TOKENS, "usage.total_tokens")


def case_responses_stream():
    stream = client("responses_stream").responses.create(
        model="gpt-4o-mini", input="Say hi", stream=True
    )
    deltas = ""
    last = None
    for event in stream:
        if event.type == "response.output_text.delta":
            deltas += event.delta
        last = event
    expect_eq(deltas, SHORT_TEXT, "output_text.delta events")
    expect_eq(last.type, "response.completed", "last event")
    expect_eq(last.response.usage.total_tokens, TOTAL_TOKENS, "usage.total_tokens")


def case_responses_stream_helper():
    with client("responses_stream_helper").responses.stream(
        model="gpt-4o-mini", input="Say hi"
    ) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    expect_eq(deltas, SHORT_TEXT, "output_text.delta events")
    expect_eq(final.output_text, SHORT_TEXT, "final response")
    expect_eq(final.usage.total_tokens, TOTAL_TOKENS, "usage.total_tokens")


def case_embeddings():
    # No encoding_format: the SDK asks for base64 and decodes it (tests/sdk.rs checks it asked).
    result = client("embeddings").embeddings.create(
        model="text-embedding-3-small", input="hello"
    )
    expect_eq(len(result.data), 1, "vectors")
    vector = result.data[0].embedding
    expect(isinstance(vector, list), f"the vector is not a list of floats: {vector!r}")
    expect_eq(len(vector), len(VECTOR), "dimensions")
    for i, (got, want) in enumerate(zip(vector, VECTOR)):
        expect(math.isclose(got, want, rel_tol=1e-6), f"component {i}: {got} != {want}")
    expect_eq(result.usage.prompt_tokens, 12, "usage.prompt_tokens")


def case_models():
    c = client("models")
    ids = sorted(model.id for model in c.models.list())
    expect_eq(ids, LISTED, "listed models")
    expect_eq(c.models.retrieve("gpt-4o-mini").id, "gpt-4o-mini", "retrieved model")
    raises(openai.NotFoundError, 404, lambda: c.models.retrieve("gpt-4o"))


def case_files():
    uploaded = client("files").files.create(
        file=("batch.jsonl", BATCH_LINE, "application/jsonl"), purpose="batch"
    )
    expect(uploaded.id.startswith("file-"), f"file id {uploaded.id!r}")
    expect_eq(uploaded.bytes, len(BATCH_LINE), "bytes")
    expect_eq(uploaded.filename, "batch.jsonl", "filename")
    expect_eq(uploaded.purpose, "batch", "purpose")


def case_bad_token():
    c = client("bad_token")
    error = raises(
        openai.AuthenticationError,
        401,
        lambda: c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES),
    )
    expect_eq(error.code, "invalid_api_key", "code")
    expect(TOKENS["bad_token"] not in str(error), "the token is echoed in the error")


def case_model_not_allowed():
    c = client("model_not_allowed")
    error = raises(
        openai.PermissionDeniedError,
        403,
        lambda: c.chat.completions.create(model="gpt-4o", messages=MESSAGES),
    )
    message = "Project `model_not_allowed` does not have access to model `gpt-4o`"
    expect_eq(error.body.get("message"), message, "message")
    expect(message in str(error), f"the message is not in {str(error)!r}")
    expect_eq(error.type, "invalid_request_error", "type")
    expect_eq(error.code, "model_not_found", "code")


def case_budget_exceeded():
    # The SDK's default of 2 retries, set out loud: only `x-should-retry: false` stops them (the
    # budget's period is `total`, so there is no retry-after for the SDK to weigh).
    c = client("budget_exceeded", max_retries=2)
    error = raises(
        openai.RateLimitError,
        429,
        lambda: c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5),
    )
    expect_eq(error.type, "insufficient_quota", "type")
    expect_eq(error.code, "project_spend_limit_exceeded", "code")
    expect("budget_exceeded" in error.body.get("message", ""), f"message {error.body!r}")
    expect_eq(error.response.headers.get("x-should-retry"), "false", "x-should-retry")
    expect_eq(attempt_of(error), "0", "x-stainless-retry-count of the failing request")


def case_upstream_500():
    c = client("upstream_500", max_retries=2)
    error = raises(
        openai.InternalServerError,
        500,
        lambda: c.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={"x-mock-status": "500"}
        ),
    )
    expect_eq(error.type, "server_error", "type")
    expect_eq(attempt_of(error), "2", "x-stainless-retry-count of the last attempt")


CASES = {name[len("case_"):]: f for name, f in globals().items() if name.startswith("case_")}


def main(names):
    host = urllib.parse.urlsplit(BASE_URL).hostname
    if host != "127.0.0.1":
        sys.exit(f"refusing OPENAI_BASE_URL {BASE_URL!r}: tests talk to 127.0.0.1 only")
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        sys.exit(f"unknown or no cases {unknown}; known: {sorted(CASES)}")
    # A hung case must not hang the suite: each request has a 10 s timeout, this is the backstop.
    signal.alarm(90)
    print(f"python {sys.version.split()[0]}, openai {openai.__version__}", flush=True)
    failed = 0
    for name in names:
        started = time.monotonic()
        try:
            CASES[name]()
            print(f"ok {name} ({time.monotonic() - started:.2f} s)", flush=True)
        except Exception as error:  # one case's failure must not hide the others
            failed += 1
            detail = str(error).replace("\n", " ")
            print(f"FAIL {name}: {type(error).__name__}: {detail}", flush=True)
            print(f"--- {name}", file=sys.stderr)
            traceback.print_exc()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
