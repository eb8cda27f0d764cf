// A teacher client in another language, built from protos/teacher.proto alone (no generated code, nothing
// from the Python side): GetInfo, GetVocab, Score, packed arrays read with a DataView, token strings decoded
// by TeacherInfo.vocab_encoding. tests/protos/test_node_client.py runs it against a real teacher and compares
// what it prints with the Python client's view of the same responses.
//
//   NODE_PATH=.tools/grpc-js/node_modules node tests/protos/node_client.cjs HOST:PORT PROTO REQUEST_JSON
//
// REQUEST_JSON: {"texts": [...], "top_k": k, "big_texts": [...]}; prints one JSON object on stdout.
"use strict";
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const DEADLINE_MS = 60_000;
const ITEM_SIZE = {
  D_TYPE_UINT8: 1, D_TYPE_UINT16: 2, D_TYPE_UINT32: 4, D_TYPE_INT32: 4, D_TYPE_INT64: 8,
  D_TYPE_FLOAT16: 2, D_TYPE_FLOAT32: 4,
};

/** IEEE 754 binary16 bits -> number (exact). */
function half(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
}

/** Array message -> {shape, values, unaligned}; data may start at any offset, so read through a DataView. */
function decodeArray(array) {
  const count = array.shape.reduce((a, b) => a * b, 1);
  const size = ITEM_SIZE[array.dtype];
  if (size === undefined) throw new Error(`unknown dtype ${array.dtype}`);
  if (array.data.length !== count * size) throw new Error(`${array.data.length} bytes for ${count} x ${size}`);
  const view = new DataView(array.data.buffer, array.data.byteOffset, array.data.byteLength);
  const read = {
    D_TYPE_UINT8: (i) => view.getUint8(i),
    D_TYPE_UINT16: (i) => view.getUint16(2 * i, true),
    D_TYPE_UINT32: (i) => view.getUint32(4 * i, true),
    D_TYPE_INT32: (i) => view.getInt32(4 * i, true),
    D_TYPE_INT64: (i) => Number(view.getBigInt64(8 * i, true)),
    D_TYPE_FLOAT16: (i) => half(view.getUint16(2 * i, true)),
    D_TYPE_FLOAT32: (i) => view.getFloat32(4 * i, true),
  }[array.dtype];
  const values = Array.from({ length: count }, (_, i) => read(i));
  return { shape: array.shape.map(Number), values, unaligned: array.data.byteOffset % size !== 0 };
}

/** GPT-2's bytes_to_unicode, inverted: character -> byte. */
function byteLevelDecoder() {
  const keep = [];
  for (const [lo, hi] of [[0x21, 0x7e], [0xa1, 0xac], [0xae, 0xff]]) for (let b = lo; b <= hi; b++) keep.push(b);
  const chars = [...keep];
  let extra = 0;
  for (let b = 0; b < 256; b++) if (!keep.includes(b)) { keep.push(b); chars.push(256 + extra++); }
  return new Map(chars.map((c, i) => [String.fromCodePoint(c), keep[i]]));
}

/** The bytes one token string stands for, by the rules TeacherInfo names (see VocabEncoding). */
function tokenBytes(token, info, decoder) {
  const fallback = /^<0x([0-9A-Fa-f]{2})>$/.exec(token);
  if (info.vocab_byte_fallback && fallback) return [parseInt(fallback[1], 16)];
  if (info.vocab_encoding === "VOCAB_ENCODING_BYTE_LEVEL") {
    return Array.from(token).flatMap((c) => (decoder.has(c) ? [decoder.get(c)] : [...Buffer.from(c, "utf8")]));
  }
  const text = info.vocab_encoding === "VOCAB_ENCODING_SENTENCEPIECE" ? token.replaceAll("\u2581", " ") : token;
  return [...Buffer.from(text, "utf8")];
}

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + DEADLINE_MS }, (err, res) => (err ? reject(err) : resolve(res)));
  });
}

function vocab(client) {
  return new Promise((resolve, reject) => {
    const tokens = [];
    const stream = client.GetVocab({ chunk_size: 0 }, { deadline: Date.now() + DEADLINE_MS });
    stream.on("data", (chunk) => chunk.tokens.forEach((t, i) => { tokens[chunk.start_id + i] = t; }));
    stream.on("error", reject);
    stream.on("end", () => resolve(tokens));
  });
}

/** One scored text, decoded; `pieces` are the token spans cut by code points (offsets are not UTF-16). */
function scored(result, text, vocabTokens, info, decoder) {
  const fields = ["input_ids", "offsets", "topk_ids", "topk_logprobs", "next_logprobs"];
  const [ids, offsets, topkIds, topkLogprobs, next] = fields.map((f) => decodeArray(result[f]));
  const codePoints = Array.from(text);
  const bytes = ids.values.flatMap((id) => tokenBytes(vocabTokens[id], info, decoder));
  return {
    input_ids: ids.values,
    offsets: offsets.values,
    topk_ids: topkIds,
    topk_logprobs: topkLogprobs,
    next_logprobs: next.values,
    dtypes: [result.topk_ids.dtype, result.topk_logprobs.dtype],
    unaligned: [ids, offsets, topkIds, topkLogprobs, next].filter((a) => a.unaligned).length,
    pieces: ids.values.map((_, j) => codePoints.slice(offsets.values[2 * j], offsets.values[2 * j + 1]).join("")),
    decoded: new TextDecoder("utf-8", { fatal: true }).decode(Uint8Array.from(bytes)),
  };
}

async function main() {
  const [address, protoPath, requestJson] = process.argv.slice(2);
  const request = JSON.parse(requestJson);
  const definition = protoLoader.loadSync(protoPath, { keepCase: true, longs: String, enums: String, defaults: true });
  const { Teacher } = grpc.loadPackageDefinition(definition).livefuse.v1;
  const small = new Teacher(address, grpc.credentials.createInsecure());  // grpc-js default: 4 MiB receive limit
  const info = await call(small, "GetInfo", {});
  // The contract's advice: accept up to max_message_bytes (the worst-case response is far above 4 MiB).
  const client = new Teacher(address, grpc.credentials.createInsecure(),
                             { "grpc.max_receive_message_length": Number(info.max_message_bytes) });
  const tokens = await vocab(client);
  const decoder = byteLevelDecoder();
  const out = { info: { ...info, special_token_ids: info.special_token_ids.map(Number) }, vocab_size: tokens.length };
  for (const [name, format, topK] of [["fp16_default_k", "LOGPROB_FORMAT_FLOAT16", 0],
                                      ["fp32", "LOGPROB_FORMAT_FLOAT32", request.top_k]]) {
    const res = await call(client, "Score", { texts: request.texts, top_k: topK, logprob_format: format });
    out[name] = res.results.map((r, i) => scored(r, request.texts[i], tokens, info, decoder));
    out.fingerprint = res.tokenizer_fingerprint;
  }
  if (request.big_texts) {  // a response over 4 MiB: refused under grpc-js's default limit, fine once raised
    const big = { texts: request.big_texts, top_k: Number(info.max_top_k), logprob_format: "LOGPROB_FORMAT_FLOAT32" };
    out.big_default_limit = await call(small, "Score", big).then(() => "OK", (err) => grpc.status[err.code]);
    out.big_raised_limit = await call(client, "Score", big).then((r) => r.results.length, (err) => grpc.status[err.code]);
  }
  small.close();
  client.close();
  process.stdout.write(JSON.stringify(out));
}

main().catch((err) => { console.error(err); process.exit(1); });
