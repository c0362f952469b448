#!/usr/bin/env python3
"""Signs keyfence requests: a reference signer (Python 3.8+: the standard library, and the
`cryptography` package for Ed25519). Copy `canonical_string`, `sign` and `signed_headers`.

    python3 sign.py vectors docs/signing-test-vectors.json
    python3 sign.py send BASE_URL METHOD PATH KEY_FILE SIGNING_KEY_FILE [BODY_FILE]

KEY_FILE holds the API key. SIGNING_KEY_FILE holds the HMAC signing secret (base64, as keyfence
issued it) or the Ed25519 private key (PKCS#8 PEM). The path is signed exactly as sent.
"""
import base64, hashlib, hmac, json, secrets, sys, time, urllib.error, urllib.request


def canonical_string(timestamp, nonce, method, path, body):
    lines = [str(timestamp), nonce, method.upper(), path, hashlib.sha256(body).hexdigest()]
    return "\n".join(lines).encode("utf-8")


def sign(signing_key, canonical):
    if signing_key.lstrip().startswith("-----BEGIN"):
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
        signature = load_pem_private_key(signing_key.encode(), password=None).sign(canonical)
    else:
        secret = base64.b64decode(signing_key.strip())
        signature = hmac.new(secret, canonical, hashlib.sha256).digest()
    return base64.b64encode(signature).decode("ascii")


def signed_headers(api_key, signing_key, method, path, body, timestamp=None, nonce=None):
    timestamp = int(time.time()) if timestamp is None else timestamp
    nonce = secrets.token_hex(16) if nonce is None else nonce
    canonical = canonical_string(timestamp, nonce, method, path, body)
    headers = {"x-api-key": api_key, "x-signature": sign(signing_key, canonical),
               "x-timestamp": str(timestamp)}
    if nonce:
        headers["x-nonce"] = nonce
    return headers


def check_vectors(file):
    with open(file, encoding="utf-8") as f:
        vectors = json.load(f)["vectors"]
    failed = 0
    for v in vectors:
        body = base64.b64decode(v["body_base64"])
        canonical = canonical_string(v["timestamp"], v["nonce"], v["method"], v["path"], body)
        signature = sign(v.get("secret_base64") or v["private_key_pem"], canonical)
        expected = v["expected"]
        ok = canonical.hex() == expected["canonical_string_hex"] and signature == expected["signature"]
        failed += not ok
        print(f"ok   {v['name']}" if ok else f"FAIL {v['name']}: {canonical!r} {signature}")
    print(f"{len(vectors) - failed} of {len(vectors)} vectors reproduced")
    return 1 if failed else 0


def send(base_url, method, path, key_file, signing_key_file, body_file=None):
    read = lambda name, mode="r": open(name, mode).read()
    body = read(body_file, "rb") if body_file else b""
    headers = signed_headers(read(key_file).strip(), read(signing_key_file), method, path, body)
    request = urllib.request.Request(base_url.rstrip("/") + path, method=method.upper(),
                                     data=body if body_file else None, headers=headers)
    try:
        with urllib.request.urlopen(request) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read()
    print(status)
    print(text.decode("utf-8", "replace"))
    return 0 if status < 400 else 1


if __name__ == "__main__":
    commands = {"vectors": check_vectors, "send": send}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    sys.exit(commands[sys.argv[1]](*sys.argv[2:]))
