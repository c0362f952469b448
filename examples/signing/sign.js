#!/usr/bin/env node
// Signs keyfence requests: a reference signer (Node.js 16+, built-in modules only).
// Copy canonicalString, sign and signedHeaders.
//
//   node sign.js vectors docs/signing-test-vectors.json
//   node sign.js send BASE_URL METHOD PATH KEY_FILE SIGNING_KEY_FILE [BODY_FILE]
//
// KEY_FILE holds the API key. SIGNING_KEY_FILE holds the HMAC signing secret (base64, as keyfence
// issued it) or the Ed25519 private key (PKCS#8 PEM). The path is signed exactly as sent.
'use strict';
const crypto = require('crypto');
const fs = require('fs');

function canonicalString(timestamp, nonce, method, path, body) {
  const bodyHash = crypto.createHash('sha256').update(body).digest('hex');
  return Buffer.from([String(timestamp), nonce, method.toUpperCase(), path, bodyHash].join('\n'), 'utf8');
}

function sign(signingKey, canonical) {
  if (signingKey.trimStart().startsWith('-----BEGIN')) {
    return crypto.sign(null, canonical, crypto.createPrivateKey(signingKey)).toString('base64');
  }
  const secret = Buffer.from(signingKey.trim(), 'base64');
  return crypto.createHmac('sha256', secret).update(canonical).digest('base64');
}

function signedHeaders(apiKey, signingKey, method, path, body, timestamp, nonce) {
  timestamp = timestamp === undefined ? Math.floor(Date.now() / 1000) : timestamp;
  nonce = nonce === undefined ? crypto.randomBytes(16).toString('hex') : nonce;
  const headers = {
    'x-api-key': apiKey,
    'x-signature': sign(signingKey, canonicalString(timestamp, nonce, method, path, body)),
    'x-timestamp': String(timestamp),
  };
  if (nonce) headers['x-nonce'] = nonce;
  return headers;
}

function checkVectors(file) {
  const vectors = JSON.parse(fs.readFileSync(file, 'utf8')).vectors;
  let failed = 0;
  for (const v of vectors) {
    const body = Buffer.from(v.body_base64, 'base64');
    const canonical = canonicalString(v.timestamp, v.nonce, v.method, v.path, body);
    const signature = sign(v.secret_base64 || v.private_key_pem, canonical);
    const ok = canonical.toString('hex') === v.expected.canonical_string_hex && signature === v.expected.signature;
    if (!ok) failed += 1;
    console.log(ok ? `ok   ${v.name}` : `FAIL ${v.name}: ${JSON.stringify(canonical.toString())} ${signature}`);
  }
  console.log(`${vectors.length - failed} of ${vectors.length} vectors reproduced`);
  process.exitCode = failed ? 1 : 0;
}

function send(baseUrl, method, path, keyFile, signingKeyFile, bodyFile) {
  const body = bodyFile ? fs.readFileSync(bodyFile) : Buffer.alloc(0);
  const apiKey = fs.readFileSync(keyFile, 'utf8').trim();
  const headers = signedHeaders(apiKey, fs.readFileSync(signingKeyFile, 'utf8'), method, path, body);
  headers['content-length'] = body.length;
  const url = new URL(baseUrl);
  const client = require(url.protocol === 'https:' ? 'https' : 'http');
  const options = { host: url.hostname, port: url.port, method: method.toUpperCase(), path, headers };
  const request = client.request(options, (response) => {
    const chunks = [];
    response.on('data', (chunk) => chunks.push(chunk));
    response.on('end', () => {
      console.log(response.statusCode);
      console.log(Buffer.concat(chunks).toString('utf8'));
      process.exitCode = response.statusCode < 400 ? 0 : 1;
    });
  });
  request.on('error', (error) => { console.error(error.message); process.exitCode = 2; });
  request.end(body);
}

const commands = { vectors: checkVectors, send };
const [command, ...args] = process.argv.slice(2);
if (!commands[command]) {
  console.error('usage: node sign.js vectors FILE | send BASE_URL METHOD PATH KEY_FILE SIGNING_KEY_FILE [BODY_FILE]');
  process.exitCode = 2;
} else {
  commands[command](...args);
}
