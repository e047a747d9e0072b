//! Response bodies shaped like OpenAI's, written for the tests of this module (ids and text are
//! made up, the numbers are small and self-consistent).

/// Non-streaming chat completion from a reasoning model, with cached and reasoning tokens.
pub(crate) const CHAT_JSON: &str = r#"{
  "id": "chatcmpl-T0llgAte1",
  "object": "chat.completion",
  "created": 1761000000,
  "model": "o4-mini-2025-04-16",
  "choices": [
    {
      "index": 0,
      "message": {"role": "assistant", "content": "A \"quoted\" answer with {braces} and [brackets].", "refusal": null, "annotations": []},
      "logprobs": null,
      "finish_reason": "stop"
    }
  ],
  "usage": {
    "prompt_tokens": 1200,
    "completion_tokens": 300,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 192, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
  },
  "service_tier": "default",
  "system_fingerprint": null
}"#;

/// Legacy `/v1/completions` body.
pub(crate) const LEGACY_JSON: &str = r#"{"id":"cmpl-T0llg","object":"text_completion","created":1761000000,"model":"gpt-3.5-turbo-instruct","choices":[{"text":"\n\nOnce upon a time","index":0,"logprobs":null,"finish_reason":"length"}],"usage":{"prompt_tokens":6,"completion_tokens":16,"total_tokens":22}}"#;

/// Embeddings: no `completion_tokens`.
pub(crate) const EMBEDDINGS_JSON: &str = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.25,-0.5,1e-3,0.125]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;

/// Responses API body, `model` after a nested `usage`-free output.
pub(crate) const RESPONSES_JSON: &str = r#"{"id":"resp_T0llg","object":"response","created_at":1761000000,"status":"completed","error":null,"model":"o3-2025-04-16","output":[{"id":"rs_1","type":"reasoning","summary":[]},{"id":"msg_1","type":"message","status":"completed","role":"assistant","content":[{"type":"output_text","annotations":[],"text":"Done."}]}],"reasoning":{"effort":"medium","summary":null},"usage":{"input_tokens":2048,"input_tokens_details":{"cached_tokens":1536,"cache_write_tokens":0},"output_tokens":410,"output_tokens_details":{"reasoning_tokens":256},"total_tokens":2458},"user":null,"metadata":{}}"#;

/// gpt-image-1 generation with a small `b64_json`.
pub(crate) const IMAGES_JSON: &str = r#"{"created":1761000000,"background":"opaque","data":[{"b64_json":"iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYPj/HwAEAQH/"}],"output_format":"png","quality":"high","size":"1024x1024","usage":{"input_tokens":50,"input_tokens_details":{"image_tokens":0,"text_tokens":50},"output_tokens":4160,"output_tokens_details":{"image_tokens":4160,"text_tokens":0},"total_tokens":4210}}"#;

/// gpt-4o-transcribe: `input_token_details` (singular), no cached tokens.
pub(crate) const AUDIO_JSON: &str = r#"{"text":"Hello there.","usage":{"type":"tokens","input_tokens":31,"input_token_details":{"text_tokens":0,"audio_tokens":31},"output_tokens":12,"total_tokens":43}}"#;

/// whisper-1: usage in seconds.
pub(crate) const WHISPER_JSON: &str = r#"{"task":"transcribe","language":"english","duration":4.2,"text":"Hello there.","usage":{"type":"duration","seconds":5}}"#;

/// Moderations: no usage.
pub(crate) const MODERATION_JSON: &str = r#"{"id":"modr-T0llg","model":"omni-moderation-2024-09-26","results":[{"flagged":false,"categories":{"hate":false,"violence":false},"category_scores":{"hate":0.0002,"violence":0.0001},"category_applied_input_types":{"hate":["text"],"violence":["text"]}}]}"#;

/// An OpenAI error body.
pub(crate) const ERROR_JSON: &str = r#"{"error":{"message":"The model `nope` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#;

/// The usage-only chunk of [`CHAT_STREAM_USAGE`].
pub(crate) const CHAT_USAGE_EVENT: &str = "data: {\"id\":\"chatcmpl-T0llg\",\"object\":\"chat.completion.chunk\",\"created\":1761000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_t0\",\"choices\":[],\"usage\":{\"prompt_tokens\":19,\"completion_tokens\":5,\"total_tokens\":24,\"prompt_tokens_details\":{\"cached_tokens\":0,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}},\"obfuscation\":\"Zq\"}\n\n";

/// Chat stream with `stream_options.include_usage`: `"usage":null` on every chunk, then the
/// usage-only chunk, then `[DONE]`.
pub(crate) const CHAT_STREAM_USAGE: &str = concat!(
    "data: {\"id\":\"chatcmpl-T0llg\",\"object\":\"chat.completion.chunk\",\"created\":1761000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_t0\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null,\"obfuscation\":\"pQ3\"}\n\n",
    "data: {\"id\":\"chatcmpl-T0llg\",\"object\":\"chat.completion.chunk\",\"created\":1761000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_t0\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Tokens \"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null,\"obfuscation\":\"x\"}\n\n",
    "data: {\"id\":\"chatcmpl-T0llg\",\"object\":\"chat.completion.chunk\",\"created\":1761000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_t0\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"are \\\"counted\\\"\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null,\"obfuscation\":\"x\"}\n\n",
    "data: {\"id\":\"chatcmpl-T0llg\",\"object\":\"chat.completion.chunk\",\"created\":1761000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_t0\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" here.\\n\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null,\"obfuscation\":\"x\"}\n\n",
    "data: {\"id\":\"chatcmpl-T0llg\",\"object\":\"chat.completion.chunk\",\"created\":1761000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_t0\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":null,\"obfuscation\":\"\"}\n\n",
    "data: {\"id\":\"chatcmpl-T0llg\",\"object\":\"chat.completion.chunk\",\"created\":1761000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_t0\",\"choices\":[],\"usage\":{\"prompt_tokens\":19,\"completion_tokens\":5,\"total_tokens\":24,\"prompt_tokens_details\":{\"cached_tokens\":0,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}},\"obfuscation\":\"Zq\"}\n\n",
    "data: [DONE]\n\n",
);

/// Chat stream without `stream_options`: no `usage` key at all, no usage chunk.
pub(crate) const CHAT_STREAM_NO_USAGE: &str = concat!(
    "data: {\"id\":\"chatcmpl-T0llh\",\"object\":\"chat.completion.chunk\",\"created\":1761000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"chatcmpl-T0llh\",\"object\":\"chat.completion.chunk\",\"created\":1761000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"No usage\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"chatcmpl-T0llh\",\"object\":\"chat.completion.chunk\",\"created\":1761000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}]}\n\n",
    "data: [DONE]\n\n",
);

/// The usage-only chunk of [`LEGACY_STREAM_USAGE`].
pub(crate) const LEGACY_USAGE_EVENT: &str = "data: {\"id\":\"cmpl-T0llg\",\"object\":\"text_completion\",\"created\":1761000000,\"model\":\"gpt-3.5-turbo-instruct\",\"choices\":[],\"usage\":{\"prompt_tokens\":6,\"completion_tokens\":3,\"total_tokens\":9}}\n\n";

/// Legacy completions stream with a usage chunk.
pub(crate) const LEGACY_STREAM_USAGE: &str = concat!(
    "data: {\"id\":\"cmpl-T0llg\",\"object\":\"text_completion\",\"created\":1761000000,\"model\":\"gpt-3.5-turbo-instruct\",\"choices\":[{\"text\":\"Once\",\"index\":0,\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"cmpl-T0llg\",\"object\":\"text_completion\",\"created\":1761000000,\"model\":\"gpt-3.5-turbo-instruct\",\"choices\":[{\"text\":\" upon\",\"index\":0,\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"cmpl-T0llg\",\"object\":\"text_completion\",\"created\":1761000000,\"model\":\"gpt-3.5-turbo-instruct\",\"choices\":[{\"text\":\" a\",\"index\":0,\"logprobs\":null,\"finish_reason\":\"length\"}],\"usage\":null}\n\n",
    "data: {\"id\":\"cmpl-T0llg\",\"object\":\"text_completion\",\"created\":1761000000,\"model\":\"gpt-3.5-turbo-instruct\",\"choices\":[],\"usage\":{\"prompt_tokens\":6,\"completion_tokens\":3,\"total_tokens\":9}}\n\n",
    "data: [DONE]\n\n",
);

/// Responses API stream: `event:` lines, `usage: null` inside `response` until
/// `response.completed`, no `[DONE]`. Ten events.
pub(crate) const RESPONSES_STREAM: &str = concat!(
    "event: response.created\n",
    "data: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_T0llg\",\"object\":\"response\",\"created_at\":1761000000,\"status\":\"in_progress\",\"error\":null,\"model\":\"gpt-4.1-mini-2025-04-14\",\"output\":[],\"reasoning\":{\"effort\":null,\"summary\":null},\"text\":{\"format\":{\"type\":\"text\"}},\"usage\":null,\"metadata\":{}}}\n\n",
    "event: response.in_progress\n",
    "data: {\"type\":\"response.in_progress\",\"sequence_number\":1,\"response\":{\"id\":\"resp_T0llg\",\"object\":\"response\",\"created_at\":1761000000,\"status\":\"in_progress\",\"error\":null,\"model\":\"gpt-4.1-mini-2025-04-14\",\"output\":[],\"usage\":null,\"metadata\":{}}}\n\n",
    "event: response.output_item.added\n",
    "data: {\"type\":\"response.output_item.added\",\"sequence_number\":2,\"output_index\":0,\"item\":{\"id\":\"msg_1\",\"type\":\"message\",\"status\":\"in_progress\",\"content\":[],\"role\":\"assistant\"}}\n\n",
    "event: response.content_part.added\n",
    "data: {\"type\":\"response.content_part.added\",\"sequence_number\":3,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"part\":{\"type\":\"output_text\",\"annotations\":[],\"text\":\"\"}}\n\n",
    "event: response.output_text.delta\n",
    "data: {\"type\":\"response.output_text.delta\",\"sequence_number\":4,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Streaming \",\"obfuscation\":\"ab\"}\n\n",
    "event: response.output_text.delta\n",
    "data: {\"type\":\"response.output_text.delta\",\"sequence_number\":5,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"{\\\"usage\\\":1}\",\"obfuscation\":\"ab\"}\n\n",
    "event: response.output_text.done\n",
    "data: {\"type\":\"response.output_text.done\",\"sequence_number\":6,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"text\":\"Streaming {\\\"usage\\\":1}\"}\n\n",
    "event: response.content_part.done\n",
    "data: {\"type\":\"response.content_part.done\",\"sequence_number\":7,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"part\":{\"type\":\"output_text\",\"annotations\":[],\"text\":\"Streaming {\\\"usage\\\":1}\"}}\n\n",
    "event: response.output_item.done\n",
    "data: {\"type\":\"response.output_item.done\",\"sequence_number\":8,\"output_index\":0,\"item\":{\"id\":\"msg_1\",\"type\":\"message\",\"status\":\"completed\",\"content\":[{\"type\":\"output_text\",\"annotations\":[],\"text\":\"Streaming {\\\"usage\\\":1}\"}],\"role\":\"assistant\"}}\n\n",
    "event: response.completed\n",
    "data: {\"type\":\"response.completed\",\"sequence_number\":9,\"response\":{\"id\":\"resp_T0llg\",\"object\":\"response\",\"created_at\":1761000000,\"status\":\"completed\",\"error\":null,\"model\":\"gpt-4.1-mini-2025-04-14\",\"output\":[{\"id\":\"msg_1\",\"type\":\"message\",\"status\":\"completed\",\"content\":[{\"type\":\"output_text\",\"annotations\":[],\"text\":\"Streaming {\\\"usage\\\":1}\"}],\"role\":\"assistant\"}],\"usage\":{\"input_tokens\":37,\"input_tokens_details\":{\"cached_tokens\":32,\"cache_write_tokens\":0},\"output_tokens\":11,\"output_tokens_details\":{\"reasoning_tokens\":4},\"total_tokens\":48},\"metadata\":{}}}\n\n",
);

/// Streamed transcription: data-only events, usage on `transcript.text.done`.
pub(crate) const AUDIO_STREAM: &str = concat!(
    "data: {\"type\":\"transcript.text.delta\",\"delta\":\"Hello\"}\n\n",
    "data: {\"type\":\"transcript.text.delta\",\"delta\":\" there.\"}\n\n",
    "data: {\"type\":\"transcript.text.done\",\"text\":\"Hello there.\",\"usage\":{\"type\":\"tokens\",\"input_tokens\":31,\"input_token_details\":{\"text_tokens\":0,\"audio_tokens\":31},\"output_tokens\":4,\"total_tokens\":35}}\n\n",
);

/// A gpt-image-1 body whose `b64_json` is `b64_len` bytes long.
pub(crate) fn big_image_json(b64_len: usize) -> String {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b64: String = alphabet
        .iter()
        .cycle()
        .take(b64_len)
        .map(|&c| char::from(c))
        .collect();
    IMAGES_JSON.replacen(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYPj/HwAEAQH/",
        &b64,
        1,
    )
}

// Generated once with the `brotli` crate (not a dependency of this crate, which can only decode).
/// Brotli (quality 11, window 22) of [`CHAT_STREAM_USAGE`].
pub(crate) const CHAT_STREAM_USAGE_BR: &[u8] = &[
    0x1b, 0x19, 0x07, 0x00, 0x8c, 0x84, 0x72, 0xe3, 0xb2, 0xb2, 0x1d, 0x94, 0x30, 0x1e, 0x04, 0x51,
    0xcd, 0xa9, 0x6c, 0x66, 0xf5, 0x7d, 0x88, 0x8c, 0x2b, 0xa8, 0x20, 0x94, 0xa1, 0x75, 0x58, 0x14,
    0xfa, 0x0e, 0x9c, 0x53, 0x67, 0x1b, 0x20, 0x46, 0x87, 0x0e, 0xb7, 0x67, 0x51, 0x14, 0x36, 0x68,
    0x83, 0x14, 0xb0, 0x1c, 0xaf, 0x33, 0xfb, 0x30, 0x76, 0xd1, 0x03, 0x44, 0x93, 0xcd, 0xb1, 0xf6,
    0x65, 0xee, 0xc0, 0xc0, 0x7c, 0xdf, 0xee, 0x4f, 0x3b, 0xb5, 0x36, 0x77, 0xbb, 0x91, 0xe8, 0x14,
    0xa2, 0x68, 0xdf, 0x7b, 0x22, 0xc0, 0xa8, 0x72, 0xba, 0x1f, 0xb6, 0x44, 0x1d, 0xf3, 0xb0, 0x02,
    0xdf, 0x32, 0x03, 0x4d, 0x68, 0x93, 0x27, 0x60, 0x3c, 0xdd, 0x94, 0x7b, 0x54, 0x63, 0x29, 0xab,
    0x26, 0xc8, 0x76, 0x65, 0x06, 0xca, 0x0a, 0x89, 0xe6, 0x0b, 0xe5, 0x93, 0x42, 0xb0, 0xce, 0xfa,
    0x04, 0x86, 0x53, 0x79, 0x33, 0x89, 0x79, 0x40, 0x86, 0xf4, 0x4b, 0xe7, 0x66, 0x30, 0x85, 0x89,
    0x2d, 0xc5, 0x97, 0xde, 0x1f, 0x81, 0x21, 0x1b, 0x12, 0x93, 0x8e, 0x02, 0x4b, 0x7c, 0x92, 0x1f,
    0x54, 0xef, 0xd0, 0x51, 0xf9, 0xdd, 0x5f, 0xd8, 0x1d, 0xc7, 0xd3, 0xe5, 0xd8, 0x5c, 0x73, 0xea,
    0xc2, 0x14, 0xc1, 0x97, 0x83, 0x8f, 0x28, 0xd3, 0xcb, 0x63, 0xe8, 0x90, 0xac, 0xf9, 0xd8, 0x0c,
    0xf7, 0x6b, 0x5b, 0xdf, 0x66, 0xf6, 0xa7, 0x72, 0x5a, 0x38, 0x7c, 0xeb, 0x5b, 0xfd, 0xbd, 0x06,
    0x3b, 0x5f, 0xee, 0xf4, 0x57, 0x8d, 0x5e, 0xf2, 0xcb, 0x5f, 0xac, 0xa2, 0xbe, 0xf4, 0x5a, 0xc6,
    0x9a, 0x60, 0x09, 0xcc, 0xe8, 0x31, 0xe8, 0x6f, 0x04, 0x2a, 0x6b, 0xd9, 0x41, 0x4f, 0xd8, 0xf5,
    0x0f, 0xe1, 0x7a, 0x3b, 0x9e, 0xe0, 0x5f, 0x8d, 0xf4, 0x75, 0x41, 0xeb, 0x97, 0xd3, 0xe5, 0xb8,
    0x3f, 0xdd, 0xca, 0xc5, 0xe9, 0xb9, 0x2b, 0xac, 0x48, 0x68, 0x25, 0xaa, 0x90, 0xe7, 0x09, 0xcb,
    0x1d, 0x2a, 0xe7, 0x16, 0xdb, 0x95, 0xca, 0x85, 0x72, 0x71, 0x82, 0xd6, 0x17, 0x5b, 0x50, 0x82,
    0x9d, 0x67, 0x0a, 0x0b, 0xc7, 0x3e, 0x34, 0xe5, 0xdf, 0xa0, 0xc1, 0x9a, 0xe0, 0x7d, 0x7c, 0xdf,
    0xf9, 0x30, 0x7a, 0x53, 0x58, 0x58, 0x0a, 0xe5, 0xba, 0xd3, 0x40, 0x4b, 0x03, 0x26, 0xf1, 0xf0,
    0xb2, 0x71, 0x4a, 0xd9, 0xf8, 0xff, 0x80, 0x5b, 0x49, 0xce, 0x9c, 0x4d, 0x5f, 0xde, 0xdb, 0xcd,
    0x37,
];
/// Brotli (quality 11, window 22) of [`CHAT_JSON`].
pub(crate) const CHAT_JSON_BR: &[u8] = &[
    0x1b, 0xe5, 0x02, 0x20, 0x1c, 0x85, 0x71, 0x7b, 0x92, 0x9c, 0xc6, 0xd2, 0xfe, 0x7c, 0x95, 0xe0,
    0x94, 0x59, 0x3a, 0xe7, 0x6b, 0xd4, 0xe7, 0x74, 0x47, 0x24, 0x27, 0xfc, 0x1c, 0x10, 0xa8, 0xe6,
    0x4b, 0x01, 0xa4, 0x58, 0x74, 0xe6, 0xff, 0x9a, 0xef, 0x30, 0x12, 0xfd, 0x58, 0xba, 0x28, 0x29,
    0x0b, 0x7b, 0xf6, 0x7d, 0x09, 0x00, 0xb3, 0xa8, 0xdd, 0x49, 0x91, 0xb3, 0xf5, 0xf2, 0x3f, 0x94,
    0x48, 0x98, 0x3b, 0x8c, 0x76, 0xaa, 0xbf, 0x76, 0xbf, 0x36, 0x2d, 0x31, 0xb7, 0x6d, 0x8c, 0xbf,
    0xde, 0x02, 0x09, 0xab, 0x23, 0x0d, 0x04, 0xe8, 0x68, 0x11, 0x9c, 0x38, 0x4d, 0x56, 0xb7, 0x56,
    0xe0, 0x5b, 0x66, 0xc9, 0xf7, 0xe3, 0x97, 0x87, 0x1b, 0x33, 0x3c, 0x5d, 0x0d, 0xa8, 0x9a, 0x46,
    0x94, 0x8e, 0x66, 0xb6, 0x07, 0x96, 0x5f, 0x88, 0xc4, 0x0e, 0xa9, 0x69, 0x16, 0x11, 0xa9, 0x86,
    0x88, 0x08, 0x2b, 0x39, 0x60, 0x53, 0x16, 0xe2, 0x22, 0xb3, 0xd6, 0x53, 0xd8, 0xfe, 0xdc, 0x94,
    0xe5, 0x7d, 0x5b, 0x40, 0x50, 0xcf, 0x7a, 0xc4, 0x33, 0xec, 0xeb, 0xac, 0xcb, 0xf0, 0xa7, 0xcc,
    0x78, 0xaa, 0xd9, 0x09, 0xee, 0xcb, 0xdd, 0xc3, 0x8e, 0xd2, 0xf6, 0xc5, 0xda, 0x7f, 0x6f, 0xae,
    0x4f, 0x42, 0xfc, 0x90, 0x3f, 0xba, 0xde, 0xf8, 0x13, 0x1b, 0x80, 0x5d, 0xc1, 0x2f, 0x63, 0x9a,
    0xb3, 0x74, 0xa7, 0xed, 0x1c, 0xaf, 0xe7, 0x6c, 0xde, 0xc1, 0xa5, 0x5e, 0x02, 0xa9, 0x19, 0x25,
    0x2e, 0x38, 0xc9, 0x21, 0x47, 0xc7, 0x00, 0x2d, 0x4b, 0xf9, 0x6a, 0x5b, 0xff, 0x9a, 0xf0, 0x69,
    0x83, 0xeb, 0x39, 0xf7, 0xeb, 0x2b, 0xf1, 0x0c, 0xbf, 0x89, 0x65, 0x9b, 0x1e, 0xc0, 0xa6, 0xbe,
    0x0d, 0x61, 0x3b, 0x8a, 0x07, 0xc2, 0x7d, 0x54, 0xd2, 0x7b, 0x9c, 0xaa, 0x59, 0xee, 0x67, 0x7e,
    0xdb, 0xf1, 0x10, 0x06, 0xba, 0xf1, 0xb8, 0x4b, 0xae, 0x75, 0x60, 0xf7, 0xd6, 0xe3, 0x25, 0x93,
    0x97, 0xe1, 0x71, 0x7a, 0xc2, 0x9a, 0xfe, 0xce, 0xc7, 0x58, 0x3c, 0x8b, 0x6c, 0x95, 0xca, 0x00,
    0xb6, 0x59, 0x1e, 0xe7, 0xc4, 0xe2, 0x36, 0x8c, 0xf8, 0xa8, 0x21, 0x46, 0xdc, 0x06, 0x44, 0x59,
    0x84, 0xec, 0xb9, 0xfc, 0xe6, 0xfe, 0xc1, 0x38, 0x08, 0xf0, 0xfd, 0x05, 0x50, 0x9b, 0xe5, 0xe3,
    0x67, 0x78, 0x5a, 0x11, 0x77, 0x92, 0x27, 0x18,
];
