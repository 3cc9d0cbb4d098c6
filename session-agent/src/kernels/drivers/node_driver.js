// Session kernel driver for Node.js, run as `node -e <this>` inside the sandbox.
// Same protocol as the Python driver (see kernels/mod.rs).
'use strict';
const vm = require('vm');
const util = require('util');
globalThis.require = require;
// Packages the data plane installed, mounted read-only (never fetched here).
if (process.env.SANDBOX_PACKAGES) {
  // `require` is this module's: its lookup paths are the ones that count.
  module.paths.unshift(require('path').join(process.env.SANDBOX_PACKAGES, 'node_modules'));
}

let step = 0;
let pending = null; // { interrupt(): void } while an async step runs
let running = false;

process.on('SIGINT', () => {
  if (pending) pending.interrupt();
});

function finish(nonce, payload) {
  const mark = '\x1e\x1eSA:' + nonce + ':';
  process.stderr.write(mark + '\n');
  process.stdout.write(mark + JSON.stringify(payload) + '\n');
}

function encode(value, strict) {
  if (value === undefined) return null;
  try {
    const text = JSON.stringify(value);
    if (text !== undefined) return JSON.parse(text);
  } catch (e) {
    if (strict) throw new TypeError('handler(event) must return a JSON value: ' + e.message);
  }
  if (strict) throw new TypeError('handler(event) must return a JSON value');
  return util.inspect(value);
}

function settle(value) {
  if (!value || typeof value.then !== 'function') return Promise.resolve(value);
  return new Promise((resolve, reject) => {
    pending = { interrupt: () => reject(Object.assign(new Error('Script execution interrupted.'), { name: 'Interrupted' })) };
    value.then(resolve, reject);
  }).finally(() => { pending = null; });
}

async function run(req) {
  step += 1;
  const filename = 'step-' + step + '.js';
  running = true;
  let value;
  try {
    value = vm.runInThisContext(req.code || '', { filename, breakOnSigint: true });
  } finally {
    running = false;
  }
  value = await settle(value);
  if (req.mode === 'handler') {
    const handler = vm.runInThisContext('typeof handler === "function" ? handler : undefined');
    if (typeof handler !== 'function') throw new ReferenceError('handler mode needs a function named handler(event)');
    running = true;
    let out;
    try {
      out = handler(req.event === undefined ? null : req.event);
    } finally {
      running = false;
    }
    return encode(await settle(out), true);
  }
  return encode(value, false);
}

async function handle(line) {
  let req;
  try {
    req = JSON.parse(line);
  } catch (e) {
    return;
  }
  const nonce = String(req.nonce);
  if (req.op === 'env') {
    Object.assign(process.env, req.env || {});
    finish(nonce, { status: 'ok' });
    return;
  }
  try {
    finish(nonce, { status: 'ok', result: await run(req) });
  } catch (err) {
    const e = err instanceof Error ? err : new Error(util.inspect(err));
    finish(nonce, {
      status: 'error',
      error: { type: e.name || 'Error', message: e.message || String(err), traceback: e.stack || '' },
    });
  }
}

let buffered = '';
let queue = Promise.resolve();
const input = process.stdin;
input.setEncoding('utf8');
input.on('data', (chunk) => {
  buffered += chunk;
  let nl;
  while ((nl = buffered.indexOf('\n')) >= 0) {
    const line = buffered.slice(0, nl);
    buffered = buffered.slice(nl + 1);
    queue = queue.then(() => handle(line));
  }
});
input.on('end', () => process.exit(0));
