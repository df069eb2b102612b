#!/usr/bin/env node
// The conformance cases (../cases.json) run from Node.js, with @grpc/grpc-js and
// @grpc/proto-loader and the protos alone: no SDK, no reflection.
//
//     node tests/conformance/node/runner.js --target default=127.0.0.1:50051 --target tiny=127.0.0.1:50061
//
// The format is in ../README.md; this is runner.py again, flag for flag and case for case: one
// JSON line per case ({"name", "outcome", "detail"}), exit status 1 when any case failed.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const REPO = path.resolve(__dirname, '..', '..', '..');
const CASES_PATH = path.resolve(__dirname, '..', 'cases.json');
const READY_TIMEOUT_MS = 180_000;
const CALL_TIMEOUT_MS = 120_000;
const DETAILS_KEY = 'grpc-status-details-bin';
const USAGE =
  'usage: runner.js --target NAME=HOST:PORT [--target NAME=HOST:PORT ...] [--verdict PATH]\n' +
  '                 [--api-key KEY] [--tls-ca PATH] [--cases PATH]';

// ---- the protos: embedserve's from protos/, health and google.rpc from protos/third_party/,
// and the decoding service for error details beside this file

const PROTO_FILES = [
  'embedserve/v1/tokenizer.proto',
  'embedserve/v1/batches.proto',
  'embedserve/v1/embedding.proto',
  'embedserve/v1/word_vectors.proto',
  'grpc/health/v1/health.proto',
  'conformance/status_details.proto',
];
// Replies come out as proto3 JSON: field names as in the .proto, int64 as decimal strings, enums
// as names, bytes as base64, and fields the server did not send left out (defaults: false).
const LOADER_OPTIONS = {
  keepCase: true,
  longs: String,
  enums: String,
  bytes: String,
  defaults: false,
  oneofs: false,
  includeDirs: [
    path.join(REPO, 'protos'),
    path.join(REPO, 'protos', 'third_party'),
    path.join(__dirname, 'proto'),
  ],
};
const definition = protoLoader.loadSync(PROTO_FILES, LOADER_OPTIONS);
const loaded = grpc.loadPackageDefinition(definition);
const TYPES = indexTypes(definition);

function lookup(fullName) {
  const found = fullName.split('.').reduce((node, part) => (node ? node[part] : undefined), loaded);
  if (typeof found !== 'function') throw new Error(`no service ${fullName} in the protos`);
  return found;
}

// ---- requests: the two substitutions, then proto3 JSON checked against the protos

const ENCODERS = {
  DTYPE_INT32: (values) => Buffer.from(Int32Array.from(values).buffer),
  DTYPE_INT64: (values) => Buffer.from(BigInt64Array.from(values, (v) => BigInt(Math.trunc(v))).buffer),
  DTYPE_UINT16: (values) => Buffer.from(Uint16Array.from(values).buffer),
  DTYPE_FLOAT32: (values) => Buffer.from(Float32Array.from(values).buffer),
};

/** A `$tensor` request spec as a proto3 JSON Tensor (little-endian: typed arrays on x86 and arm). */
function encodeTensor(spec) {
  let data;
  if ('data_base64' in spec) {
    data = String(spec.data_base64);
  } else {
    const encode = ENCODERS[spec.dtype];
    if (!encode) throw new Mismatch(`cannot encode a ${spec.dtype} request tensor`);
    data = encode([spec.values].flat(Infinity)).toString('base64');
  }
  return { dtype: spec.dtype, shape: spec.shape.map(String), data };
}

function substitute(value, files) {
  if (Array.isArray(value)) return value.map((item) => substitute(item, files));
  if (isObject(value)) {
    if ('$tensor' in value) return encodeTensor(value.$tensor);
    if ('$text_file' in value) {
      if (!(value.$text_file in files)) throw new Mismatch(`no file ${value.$text_file}`);
      return files[value.$text_file];
    }
    return Object.fromEntries(Object.entries(value).map(([key, item]) => [key, substitute(item, files)]));
  }
  return value;
}

/** Every message and enum by full name (proto-loader's descriptors name types relative to their scope). */
function indexTypes(packageDefinition) {
  const index = new Map();
  const add = (fullName, type, isEnum) => {
    index.set(fullName, { fullName, type, isEnum });
    if (isEnum) return;
    for (const nested of type.nestedType) add(`${fullName}.${nested.name}`, nested, false);
    for (const nested of type.enumType) add(`${fullName}.${nested.name}`, nested, true);
  };
  for (const [name, entry] of Object.entries(packageDefinition)) {
    if (entry.format === 'Protocol Buffer 3 DescriptorProto') add(name, entry.type, false);
    if (entry.format === 'Protocol Buffer 3 EnumDescriptorProto') add(name, entry.type, true);
  }
  return index;
}

function resolveType(scope, typeName) {
  if (typeName.startsWith('.')) return TYPES.get(typeName.slice(1));
  for (let outer = scope; ; outer = outer.slice(0, Math.max(outer.lastIndexOf('.'), 0))) {
    const found = TYPES.get(outer ? `${outer}.${typeName}` : typeName);
    if (found || !outer) return found;
  }
}

const jsonName = (name) => name.replace(/_([a-z0-9])/g, (_, letter) => letter.toUpperCase());

/**
 * A proto3 JSON request checked as protobuf's ParseDict checks it: an unknown field or enum name is
 * an error here, where proto-loader's fromObject would drop it without a word. Field names may be
 * the .proto's or their lowerCamel JSON names; what comes back uses the .proto's.
 */
function checkRequest(value, message, where) {
  if (!isObject(value)) throw new Mismatch(`${where}: expected an object for ${message.fullName}`);
  const checked = {};
  for (const [key, item] of Object.entries(value)) {
    const field = message.type.field.find((f) => f.name === key || jsonName(f.name) === key);
    if (!field) throw new Mismatch(`${where}: ${message.fullName} has no field ${JSON.stringify(key)}`);
    if (item === null) continue;
    const at = `${where}.${field.name}`;
    const type = field.typeName ? resolveType(message.fullName, field.typeName) : undefined;
    if (type && !type.isEnum && type.type.options && type.type.options.mapEntry) {
      if (!isObject(item)) throw new Mismatch(`${at}: expected an object (a map)`);
      const valueField = type.type.field.find((f) => f.name === 'value');
      checked[field.name] = Object.fromEntries(
        Object.entries(item).map(([k, v]) => [k, checkValue(v, valueField, type, `${at}[${k}]`)]),
      );
    } else if (field.label === 'LABEL_REPEATED') {
      if (!Array.isArray(item)) throw new Mismatch(`${at}: expected a list`);
      checked[field.name] = item.map((v, i) => checkValue(v, field, message, `${at}[${i}]`));
    } else {
      checked[field.name] = checkValue(item, field, message, at);
    }
  }
  return checked;
}

function checkValue(value, field, message, where) {
  const type = field.typeName ? resolveType(message.fullName, field.typeName) : undefined;
  if (field.type === 'TYPE_MESSAGE') return checkRequest(value, type, where);
  if (field.type === 'TYPE_ENUM') {
    if (Number.isInteger(value)) return value; // proto3 enums are open: any number goes
    const known = type.type.value.find((v) => v.name === value);
    if (!known) throw new Mismatch(`${where}: ${JSON.stringify(value)} is no ${type.fullName}`);
    return known.name;
  }
  const kind = field.type.slice('TYPE_'.length).toLowerCase();
  const numeric = typeof value === 'number' || (typeof value === 'string' && value.trim() !== '');
  const ok =
    kind === 'string' ? typeof value === 'string'
    : kind === 'bool' ? typeof value === 'boolean'
    : kind === 'bytes' ? typeof value === 'string' && /^[A-Za-z0-9+/_-]*={0,2}$/.test(value)
    : kind === 'double' || kind === 'float' ? (numeric && !Number.isNaN(Number(value))) || value === 'NaN'
    : numeric && /^-?\d+$/.test(String(value));
  if (!ok) throw new Mismatch(`${where}: ${JSON.stringify(value)} is no ${kind}`);
  return value;
}

// ---- replies: the matcher

function isObject(value) {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** A reply as proto3 JSON: what proto-loader gives, with NaN and the infinities as their names. */
function toJson(value) {
  if (Array.isArray(value)) return value.map(toJson);
  if (isObject(value)) return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, toJson(v)]));
  if (typeof value === 'number' && !Number.isFinite(value)) {
    return Number.isNaN(value) ? 'NaN' : value > 0 ? 'Infinity' : '-Infinity';
  }
  return value;
}

/** A float16's bits as a number (node 20 has no Float16Array). */
function float16(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * fraction * 2 ** -24;
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
}

/** A bfloat16's bits as a number: they are the top 16 bits of a float32. */
function bfloat16(bits) {
  const view = new DataView(new ArrayBuffer(4));
  view.setUint32(0, bits << 16);
  return view.getFloat32(0);
}

const DECODERS = {
  DTYPE_INT32: (buffer) => Array.from(new Int32Array(buffer)),
  DTYPE_INT64: (buffer) => Array.from(new BigInt64Array(buffer), Number),
  DTYPE_UINT16: (buffer) => Array.from(new Uint16Array(buffer)),
  DTYPE_FLOAT32: (buffer) => Array.from(new Float32Array(buffer)),
  DTYPE_FLOAT16: (buffer) => Array.from(new Uint16Array(buffer), float16),
  DTYPE_BFLOAT16: (buffer) => Array.from(new Uint16Array(buffer), bfloat16),
};
const ITEM_SIZES = {
  DTYPE_INT32: 4, DTYPE_INT64: 8, DTYPE_UINT16: 2, DTYPE_FLOAT32: 4, DTYPE_FLOAT16: 2, DTYPE_BFLOAT16: 2,
};

/** A Tensor's values, flat and row-major; `data` (a Buffer) is copied first: it may start at an odd offset. */
function tensorValues(dtype, data) {
  const decode = DECODERS[dtype];
  if (!decode) throw new Mismatch(`cannot decode a ${dtype} tensor`);
  if (data.length % ITEM_SIZES[dtype] !== 0) {
    throw new Mismatch(`${data.length} bytes is no whole number of ${dtype}`);
  }
  const aligned = new Uint8Array(data).buffer; // a fresh ArrayBuffer, offset 0
  return decode(aligned);
}

class Mismatch extends Error {}

function matchTensor(expected, actual, where) {
  if (!isObject(actual)) throw new Mismatch(`${where}: expected a Tensor, got ${show(actual)}`);
  // A Tensor's dtype and shape left out are their defaults, as README.md says of every key.
  const withDefaults = { dtype: 'DTYPE_UNSPECIFIED', shape: [], ...actual };
  for (const key of ['dtype', 'shape']) {
    if (key in expected) match(expected[key], withDefaults[key], `${where}.${key}`);
  }
  const data = Buffer.from(actual.data || '', 'base64');
  const sha256 = crypto.createHash('sha256').update(data).digest('hex');
  if ('sha256' in expected && sha256 !== expected.sha256) {
    throw new Mismatch(`${where}: data's sha256 is ${sha256}`);
  }
  if ('byte_length' in expected && data.length !== expected.byte_length) {
    throw new Mismatch(`${where}: ${data.length} bytes, expected ${expected.byte_length}`);
  }
  if ('values' in expected) {
    const got = tensorValues(withDefaults.dtype, data);
    const want = [expected.values].flat(Infinity).map(Number);
    if (got.length !== want.length) {
      throw new Mismatch(`${where}: ${got.length} values, expected ${want.length}`);
    }
    const atol = Number(expected.atol ?? 0);
    const worst = got.findIndex((value, i) => !(Math.abs(value - want[i]) <= atol));
    if (worst >= 0) {
      throw new Mismatch(`${where}: value ${worst} is ${got[worst]}, expected ${want[worst]} (atol ${atol})`);
    }
  }
}

/** Throws Mismatch unless `actual` (proto3 JSON) matches `expected` as README.md defines. */
function match(expected, actual, where = 'reply') {
  if (isObject(expected)) {
    if ('$tensor' in expected) {
      matchTensor(expected.$tensor, actual, where);
    } else if ('$contains' in expected) {
      if (typeof actual !== 'string' || !actual.includes(expected.$contains)) {
        throw new Mismatch(`${where}: ${show(actual)} does not contain ${show(expected.$contains)}`);
      }
    } else if ('$approx' in expected) {
      const atol = Number(expected.atol ?? 0);
      const number = typeof actual === 'number' || typeof actual === 'boolean';
      if (!number || !(Number(actual) === expected.$approx || Math.abs(actual - expected.$approx) <= atol)) {
        throw new Mismatch(`${where}: ${show(actual)} is not within ${expected.atol} of ${expected.$approx}`);
      }
    } else {
      if (!isObject(actual)) throw new Mismatch(`${where}: expected an object, got ${show(actual)}`);
      for (const [key, value] of Object.entries(expected)) {
        if (key in actual) match(value, actual[key], `${where}.${key}`);
        else if (!isDefault(value)) throw new Mismatch(`${where}.${key} is missing, expected ${show(value)}`);
      }
    }
  } else if (Array.isArray(expected)) {
    if (!Array.isArray(actual) || actual.length !== expected.length) {
      throw new Mismatch(`${where}: expected ${expected.length} items, got ${show(actual)}`);
    }
    expected.forEach((want, index) => match(want, actual[index], `${where}[${index}]`));
  } else if (!sameScalar(expected, actual)) {
    throw new Mismatch(`${where}: ${show(actual)}, expected ${show(expected)}`);
  }
}

/** Scalars compare as Python's == does: numbers and booleans by value, anything else strictly. */
function sameScalar(expected, actual) {
  const numeric = (v) => typeof v === 'number' || typeof v === 'boolean';
  return numeric(expected) && numeric(actual) ? Number(expected) === Number(actual) : expected === actual;
}

/** The proto3 default a key the reply left out stands for: 0, "0", "", false, [] or *_UNSPECIFIED. */
function isDefault(value) {
  if (typeof value === 'string') return value === '' || value === '0' || value.endsWith('_UNSPECIFIED');
  if (Array.isArray(value)) return value.length === 0;
  return value === 0 || value === false;
}

function show(value) {
  return value === undefined ? 'nothing' : JSON.stringify(value);
}

// ---- calls

/** One client per service per target, all of a target's over one connection. */
class Connection {
  constructor(target, { apiKey, tlsCa }) {
    this.target = target;
    this.credentials = tlsCa
      ? grpc.credentials.createSsl(fs.readFileSync(tlsCa))
      : grpc.credentials.createInsecure();
    // grpc-js takes 4 MiB replies by default; the server sends up to 128 MiB.
    this.options = { 'grpc.max_receive_message_length': 256 << 20 };
    this.metadata = new grpc.Metadata();
    if (apiKey) this.metadata.set('authorization', `Bearer ${apiKey}`);
    this.clients = new Map();
  }

  client(service) {
    if (!this.clients.has(service)) {
      const Service = lookup(service);
      this.clients.set(service, new Service(this.target, this.credentials, this.options));
    }
    return this.clients.get(service);
  }

  close() {
    for (const client of this.clients.values()) client.close();
  }

  /** The replies of `package.Service/Method`, or the grpc-js ServiceError it ends with. */
  async call(method, kind, requests, { metadata = this.metadata, timeoutMs = CALL_TIMEOUT_MS } = {}) {
    const [service, name] = method.split('/');
    const client = this.client(service);
    const declared = client.constructor.service[name];
    if (!declared) throw new Mismatch(`${service} has no method ${name}`);
    const declaredKind = declared.requestStream
      ? declared.responseStream ? 'bidi_stream' : 'client_stream'
      : declared.responseStream ? 'server_stream' : 'unary';
    if (declaredKind !== kind) throw new Mismatch(`${method} is a ${declaredKind} call, not ${kind}`);
    const options = { deadline: Date.now() + timeoutMs };
    if (kind === 'unary') {
      const reply = await new Promise((resolve, reject) => {
        client[name](requests[0], metadata, options, (error, got) => (error ? reject(error) : resolve(got)));
      });
      return [reply];
    }
    let call;
    if (kind === 'server_stream') {
      call = client[name](requests[0], metadata, options);
    } else if (kind === 'bidi_stream') {
      call = client[name](metadata, options);
      for (const request of requests) call.write(request);
      call.end();
    } else {
      throw new Mismatch(`unknown kind ${JSON.stringify(kind)}`);
    }
    const replies = [];
    for await (const reply of call) replies.push(reply);
    return replies;
  }

  /** Polls grpc.health.v1 until `service` is SERVING (the word vectors load after the start). */
  async waitServing(service, timeoutMs = READY_TIMEOUT_MS) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const [reply] = await this.call('grpc.health.v1.Health/Check', 'unary', [{ service }], {
          metadata: new grpc.Metadata(),
          timeoutMs: 5_000,
        });
        if (reply.status === 'SERVING') return;
      } catch {
        // not up yet
      }
      if (Date.now() > deadline) {
        throw new Error(`${service || 'the server'} is not SERVING after ${Math.round(timeoutMs / 1000)} s`);
      }
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
  }
}

/** The index entry of a method's request type (proto-loader gives its descriptor, without its package). */
function requestTypeOf(method) {
  const [service, name] = method.split('/');
  const found = lookup(service).service[name];
  if (!found) throw new Mismatch(`${service} has no method ${name}`);
  const descriptor = JSON.stringify(found.requestType.type);
  const same = (entry) => entry && !entry.isEnum && JSON.stringify(entry.type) === descriptor;
  const scoped = resolveType(service, found.requestType.type.name);
  return same(scoped) ? scoped : [...TYPES.values()].find(same);
}

const codeName = (code) => Object.keys(grpc.status).find((key) => grpc.status[key] === code) || String(code);

const STATUS_DETAILS = lookup('conformance.StatusDetails').service;

/** The google.rpc.ErrorInfo details a refusal carries (none without grpc-status-details-bin). */
function errorInfos(error) {
  const infos = [];
  for (const value of error.metadata ? error.metadata.get(DETAILS_KEY) : []) {
    const status = STATUS_DETAILS.Status.responseDeserialize(value);
    for (const detail of status.details || []) {
      // An Any names its message by type_url ("type.googleapis.com/google.rpc.ErrorInfo").
      if (detail.type_url.split('/').pop() === 'google.rpc.ErrorInfo') {
        infos.push(STATUS_DETAILS.ErrorInfo.responseDeserialize(Buffer.from(detail.value || '', 'base64')));
      }
    }
  }
  return infos;
}

async function checkCase(testCase, connection, files) {
  const requestType = requestTypeOf(testCase.method);
  const raw = testCase.kind === 'bidi_stream' ? testCase.requests : [testCase.request];
  const requests = raw.map((item, i) => checkRequest(substitute(item, files), requestType, `request[${i}]`));
  let replies;
  try {
    replies = await connection.call(testCase.method, testCase.kind, requests);
  } catch (error) {
    if (error instanceof Mismatch || typeof error.code !== 'number') throw error;
    if (!('status' in testCase)) throw new Mismatch(`failed with ${codeName(error.code)}: ${error.details}`);
    checkStatus(testCase, error);
    return;
  }
  if ('status' in testCase) throw new Mismatch(`ended OK, expected ${testCase.status.code}`);
  checkReplies(testCase, replies.map(toJson));
}

function checkStatus(testCase, error) {
  const expected = testCase.status;
  const code = codeName(error.code);
  const details = error.details || '';
  if (code !== expected.code) {
    throw new Mismatch(`status ${code} (${show(details)}), expected ${expected.code}`);
  }
  for (const fragment of expected.message_contains || []) {
    if (!details.includes(fragment)) {
      throw new Mismatch(`status message ${show(details)} lacks ${show(fragment)}`);
    }
  }
  if ('error_info' in testCase) {
    const infos = errorInfos(error);
    if (infos.length === 0) throw new Mismatch('the status carries no google.rpc.ErrorInfo');
    match(testCase.error_info, toJson(infos[0]), 'error_info');
  }
}

function checkReplies(testCase, replies) {
  if ('expect' in testCase) {
    if (replies.length === 0) throw new Mismatch('no reply, expected one');
    match(testCase.expect, replies[0]);
  }
  if ('response_count' in testCase && replies.length !== testCase.response_count) {
    throw new Mismatch(`${replies.length} replies, expected ${testCase.response_count}`);
  }
  const expectedReplies = testCase.responses || [];
  if (replies.length < expectedReplies.length) {
    throw new Mismatch(`${replies.length} replies, expected at least ${expectedReplies.length}`);
  }
  expectedReplies.forEach((expected, index) => match(expected, replies[index], `reply[${index}]`));
  if ('stream_digest' in testCase) {
    const digest = crypto.createHash('sha256');
    const { field } = testCase.stream_digest;
    for (const reply of replies) digest.update(Buffer.from(reply[field]?.data || '', 'base64'));
    const hex = digest.digest('hex');
    if (hex !== testCase.stream_digest.sha256) throw new Mismatch(`the stream's ${field} digest is ${hex}`);
  }
}

/** Runs every case against the named servers; a case whose server has no target is skipped. */
async function* runCases(targets, { verdict, apiKey, tlsCa, casesPath = CASES_PATH } = {}) {
  const suite = JSON.parse(fs.readFileSync(casesPath, 'utf8'));
  const files = verdict ? { 'the-verdict': fs.readFileSync(verdict, 'utf8') } : {};
  const connections = new Map(
    Object.entries(targets).map(([name, target]) => [name, new Connection(target, { apiKey, tlsCa })]),
  );
  try {
    for (const ready of suite.ready || []) {
      if (connections.has(ready.server)) await connections.get(ready.server).waitServing(ready.service);
    }
    for (const testCase of suite.cases) {
      const connection = connections.get(testCase.server);
      if (!connection) {
        yield result(testCase.name, 'skipped', `no target for server ${pyRepr(testCase.server)}`);
        continue;
      }
      const absent = (testCase.requires || []).filter((name) => !(name in files));
      if (absent.length) {
        yield result(testCase.name, 'skipped', `needs ${absent.join(', ')}`);
        continue;
      }
      try {
        await checkCase(testCase, connection, files);
        yield result(testCase.name, 'passed');
      } catch (error) {
        // Anything else that went wrong fails the case too, and the run goes on.
        yield result(testCase.name, 'failed', error instanceof Mismatch ? error.message : String(error));
      }
    }
  } finally {
    for (const connection of connections.values()) connection.close();
  }
}

const result = (name, outcome, detail = '') => ({ name, outcome, detail });
const pyRepr = (text) => `'${text}'`;

/** One line as runner.py's json.dumps writes it (", " and ": ", non-ASCII escaped). */
function jsonLine({ name, outcome, detail }) {
  const escape = (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`;
  const dump = (text) => JSON.stringify(text).replace(/[\u0080-\uffff]/g, escape);
  return `{"name": ${dump(name)}, "outcome": ${dump(outcome)}, "detail": ${dump(detail)}}`;
}

function parseArgs(argv) {
  const args = { target: [] };
  const flags = {
    '--target': 'target',
    '--verdict': 'verdict',
    '--api-key': 'apiKey',
    '--tls-ca': 'tlsCa',
    '--cases': 'cases',
  };
  for (let i = 0; i < argv.length; i += 1) {
    if (argv[i] === '-h' || argv[i] === '--help') {
      process.stdout.write(`${USAGE}\n`);
      process.exit(0);
    }
    const given = argv[i];
    const [flag, inline] = given.startsWith('--') && given.includes('=') ? given.split(/=(.*)/s) : [given];
    const key = flags[flag];
    if (!key) usageError(`unrecognized arguments: ${given}`);
    const value = inline ?? argv[++i];
    if (value === undefined) usageError(`argument ${flag}: expected one argument`);
    if (key === 'target') args.target.push(value);
    else args[key] = value;
  }
  if (args.target.length === 0) usageError('the following arguments are required: --target');
  const targets = {};
  for (const item of args.target) {
    const at = item.indexOf('=');
    if (at < 0) usageError(`argument --target: ${JSON.stringify(item)} is not NAME=HOST:PORT`);
    targets[item.slice(0, at)] = item.slice(at + 1);
  }
  const { verdict, apiKey, tlsCa } = args;
  return { targets, verdict, apiKey, tlsCa, casesPath: args.cases || CASES_PATH };
}

function usageError(message) {
  process.stderr.write(`${USAGE}\nrunner.js: error: ${message}\n`);
  process.exit(2);
}

async function main(argv) {
  const { targets, ...options } = parseArgs(argv);
  let failed = false;
  for await (const outcome of runCases(targets, options)) {
    process.stdout.write(`${jsonLine(outcome)}\n`);
    failed ||= outcome.outcome === 'failed';
  }
  return failed ? 1 : 0;
}

module.exports = { runCases, match, tensorValues, float16, bfloat16, encodeTensor, Mismatch };

if (require.main === module) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (error) => {
      process.stderr.write(`${error.stack || error}\n`);
      process.exit(1);
    },
  );
}
