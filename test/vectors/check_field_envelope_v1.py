#!/usr/bin/env python3
"""Independent check of test/vectors/field-envelope-v1.json with Python's `cryptography`.

Written from the spec in the JSON file, sharing no code with the TypeScript implementation:
re-encrypts every valid vector (fixed nonce) and compares ciphertext, tag and envelope, then
parses and decrypts every envelope, and checks every invalid vector is refused with the same
error code. Firmware authors can port this file as their own self-check.

    python3 test/vectors/check_field_envelope_v1.py [path/to/field-envelope-v1.json]

Exit status 0 and "ok: N valid, M invalid" on success.
"""
import base64
import json
import re
import sys
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "ENC:v1:"
AAD_PREFIX = "keystrata:envelope:v1"
DEVICE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
FIELD = re.compile(r"[a-z][a-z0-9_]{0,63}")
FIELD_KID = re.compile(r"([A-Za-z0-9._:-]{1,128})/([a-z][a-z0-9_]{0,63}):v([1-9][0-9]{0,9})")
B64URL = re.compile(r"[A-Za-z0-9_-]*")


class Refused(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


def aad(device_id, field, timestamp, kid):
    assert DEVICE_ID.fullmatch(device_id) and FIELD.fullmatch(field) and FIELD_KID.fullmatch(kid)
    assert isinstance(timestamp, int) and 0 <= timestamp <= 2**53 - 1
    return "|".join([AAD_PREFIX, device_id, field, str(timestamp), kid]).encode("utf-8")


def decode_payload(text):
    if text == "":
        raise Refused("truncated")
    if re.search(r"[+/=]", text):
        raise Refused("non_canonical")
    if not B64URL.fullmatch(text):
        raise Refused("malformed")
    if len(text) % 4 == 1:
        raise Refused("truncated")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=") != text:
        raise Refused("non_canonical")
    if len(raw) < 12 + 16:
        raise Refused("truncated")
    return raw


def parse(envelope):
    if not envelope.startswith("ENC:"):
        raise Refused("malformed")
    if not envelope.startswith(PREFIX):
        raise Refused("unsupported_version")
    rest = envelope[len(PREFIX):]
    if ":" not in rest:
        raise Refused("malformed")
    kid, payload = rest.rsplit(":", 1)
    m = FIELD_KID.fullmatch(kid)
    if not m or int(m.group(3)) > 2147483647:
        raise Refused("malformed")
    return kid, m.group(1), m.group(2), decode_payload(payload)


def decrypt(key, device_id, field, timestamp, envelope):
    kid, kid_device, kid_field, raw = parse(envelope)
    if (kid_device, kid_field) != (device_id, field):
        raise Refused("context_mismatch")
    try:
        return AESGCM(key).decrypt(raw[:12], raw[12:], aad(device_id, field, timestamp, kid))
    except InvalidTag:
        raise Refused("authentication_failed")


def main():
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("field-envelope-v1.json")
    vectors = json.loads(path.read_text(encoding="utf-8"))
    for v in vectors["valid"]:
        key, nonce, plaintext = bytes.fromhex(v["key"]), bytes.fromhex(v["nonce"]), bytes.fromhex(v["plaintext"])
        assert plaintext == v["plaintextUtf8"].encode("utf-8"), v["name"]
        kid = f'{v["deviceId"]}/{v["field"]}:v{v["version"]}'
        assert kid == v["kid"], v["name"]
        a = aad(v["deviceId"], v["field"], v["timestamp"], kid)
        assert a == v["aad"].encode("utf-8"), v["name"]
        sealed = AESGCM(key).encrypt(nonce, plaintext, a)
        assert sealed[:-16].hex() == v["ciphertext"] and sealed[-16:].hex() == v["tag"], v["name"]
        envelope = PREFIX + kid + ":" + base64.urlsafe_b64encode(nonce + sealed).decode("ascii").rstrip("=")
        assert envelope == v["envelope"], v["name"]
        assert decrypt(key, v["deviceId"], v["field"], v["timestamp"], v["envelope"]) == plaintext, v["name"]
    for v in vectors["invalid"]:
        try:
            decrypt(bytes.fromhex(v["key"]), v["deviceId"], v["field"], v["timestamp"], v["envelope"])
        except Refused as refused:
            assert refused.code == v["error"], f'{v["name"]}: {refused.code} != {v["error"]}'
        else:
            raise AssertionError(f'{v["name"]}: accepted')
    print(f'ok: {len(vectors["valid"])} valid, {len(vectors["invalid"])} invalid')


if __name__ == "__main__":
    main()
