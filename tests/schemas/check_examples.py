#!/usr/bin/env python3
"""Validates the documented examples against the JSON Schemas in docs/schemas/.

Checks that every docs/examples/*.json and config/demo-snapshot.json is valid against the schema
its `kind` names, that every docs/examples/mqtt/*.json is valid against the MQTT schema its file
name maps to (MQTT_SCHEMAS; tests/mqtt_examples.rs uses the same map for the gateway's types), and
that a few invalid documents of each are rejected. Prints one line per document; exits 1 if any
check fails. Resolves the schemas' cross-file $refs from the local files only
(no network). Run from anywhere: paths are taken relative to this file.

    .venv/bin/python tests/schemas/check_examples.py
"""

import copy
import json
import re
import sys
from datetime import datetime
from pathlib import Path

from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "docs" / "schemas"
MQTT_EXAMPLES = ROOT / "docs" / "examples" / "mqtt"

# docs/examples/mqtt/<file name> -> schema, by prefix; the first match wins.
MQTT_SCHEMAS = [
    ("status-", "mqtt-status.schema.json"),
    ("health", "mqtt-health.schema.json"),
    ("alerts", "mqtt-alerts.schema.json"),
    ("ble-unlock-request", "mqtt-ble-unlock-request.schema.json"),
    ("ble-unlock-response", "mqtt-ble-unlock-response.schema.json"),
    ("device-state-", "mqtt-device-state.schema.json"),
    ("pairing-state", "mqtt-pairing-state.schema.json"),
    ("pairing-discovered", "mqtt-pairing-discovered.schema.json"),
    ("event-", "mqtt-event.schema.json"),
    ("snapshot-chunk-", "mqtt-snapshot-chunk.schema.json"),
    ("sync-result-", "mqtt-sync-result.schema.json"),
    ("command-envelope", "mqtt-command-envelope.schema.json"),
    ("command-result-", "mqtt-command-result.schema.json"),
    ("command-", "mqtt-command.schema.json"),
]


# For the MQTT examples, `date-time` values are checked (RFC 3339) without extra packages.
FORMATS = FormatChecker(formats=())


@FORMATS.checks("date-time", raises=ValueError)
def is_date_time(value):
    if not isinstance(value, str):
        return True
    m = re.fullmatch(r"(\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2})(\.\d+)?([Zz]|[+-](\d{2}):(\d{2}))", value)
    if not m or (m.group(4) and (int(m.group(4)) > 23 or int(m.group(5)) > 59)):
        raise ValueError(f"{value!r} is not an RFC 3339 date-time")
    datetime.strptime(m.group(1).upper(), "%Y-%m-%dT%H:%M:%S")
    return True


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def validators(format_checker=None):
    """One validator per schema file name, sharing a registry of all schema files."""
    schemas = {p.name: load(p) for p in sorted(SCHEMAS.glob("*.schema.json"))}
    for name, schema in schemas.items():
        Draft202012Validator.check_schema(schema)
    registry = Registry().with_resources(
        (s["$id"], Resource.from_contents(s, default_specification=DRAFT202012))
        for s in schemas.values()
    )
    return {
        name: Draft202012Validator(schema, registry=registry, format_checker=format_checker)
        for name, schema in schemas.items()
    }


def sync_validators(vals):
    """The sync document validators, by `kind`."""
    return {kind: vals[f"sync-{kind}.schema.json"] for kind in ("snapshot", "delta")}


def mqtt_schema_of(file_name):
    return next((schema for prefix, schema in MQTT_SCHEMAS if file_name.startswith(prefix)), None)


def schema_errors(v, doc):
    return [
        f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
        for e in sorted(v.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


def errors_of(vals, doc):
    v = vals.get(doc.get("kind")) if isinstance(doc, dict) else None
    if v is None:
        return [f"no schema for kind {doc.get('kind')!r}" if isinstance(doc, dict) else "not an object"]
    return schema_errors(v, doc)


def invalid_documents(snapshot):
    """(name, document) pairs that the schemas must reject; the gateway refuses them too."""
    out = []

    d = copy.deepcopy(snapshot)
    d["credentials"].append({"id": "c-both", "user": "alice", "code": "8080", "fob": "FOB-BOTH"})
    out.append(("credential with both code and fob", d))

    d = copy.deepcopy(snapshot)
    d["generated_by"] = "portal"
    out.append(("unknown top-level field", d))

    d = copy.deepcopy(snapshot)
    d["units"][0]["status"] = "occupid"
    out.append(("unit status `occupid`", d))

    d = copy.deepcopy(snapshot)
    d["schema_version"] = 2
    out.append(("schema_version 2", d))

    d = copy.deepcopy(snapshot)
    d["users"].append({"id": "vera", "role": "vendor"})
    out.append(("vendor without expires_at", d))

    d = copy.deepcopy(snapshot)
    d["credentials"].append({"id": "c-short", "user": "alice", "code": "123"})
    out.append(("code of 3 digits", d))

    d = copy.deepcopy(snapshot)
    d["schedules"].append({"id": "bad", "windows": [{"days": ["mon"], "start": "24:00", "end": "24:00"}]})
    out.append(("window starting at 24:00", d))

    d = copy.deepcopy(snapshot)
    d["credentials"].append({"id": "c-hmac", "user": "alice", "code_hmac": "ab" * 32})
    out.append(("code_hmac without code_key_id", d))

    d = copy.deepcopy(snapshot)
    d["blacklist"].append({"id": "bl-both", "fob": "FOB-X", "key_id": "dk-x"})
    out.append(("blacklist entry with fob and key_id", d))

    out.append((
        "delta with an unknown field in upsert",
        {"schema_version": 1, "kind": "delta", "base_version": 1, "version": 2,
         "upsert": {"unit": [{"id": "A-101", "status": "occupied"}]}},
    ))
    return out


def invalid_mqtt_documents():
    """(name, schema, document) triples that the MQTT schemas must reject."""
    ex = {p.name: load(p) for p in sorted(MQTT_EXAMPLES.glob("*.json"))}
    out = []

    d = copy.deepcopy(ex["status-offline.json"])
    d["site_version"] = 7
    out.append(("offline status with online-only fields", "mqtt-status.schema.json", d))

    d = copy.deepcopy(ex["status-online.json"])
    del d["started_at"]
    out.append(("online status without started_at", "mqtt-status.schema.json", d))

    d = copy.deepcopy(ex["event-access-granted.json"])
    d["id"] = "1042"
    out.append(("event id without epoch", "mqtt-event.schema.json", d))

    d = copy.deepcopy(ex["event-access-granted.json"])
    d["at"] = "2026-11-24 02:10"
    out.append(("event time not RFC 3339", "mqtt-event.schema.json", d))

    d = copy.deepcopy(ex["snapshot-chunk-0.json"])
    d["sha256"] = "abc"
    out.append(("snapshot part with a short sha256", "mqtt-snapshot-chunk.schema.json", d))

    d = copy.deepcopy(ex["snapshot-chunk-0.json"])
    d["data"] = "not base64!"
    out.append(("snapshot part data not base64", "mqtt-snapshot-chunk.schema.json", d))

    d = copy.deepcopy(ex["sync-result-refused.json"])
    del d["reason"]
    out.append(("refused sync result without reason", "mqtt-sync-result.schema.json", d))

    d = copy.deepcopy(ex["command-envelope.json"])
    d["signature"] = d["signature"] + "=="
    out.append(("envelope signature with padding", "mqtt-command-envelope.schema.json", d))

    d = copy.deepcopy(ex["command-envelope.json"])
    del d["signature"]
    out.append(("unsigned envelope", "mqtt-command-envelope.schema.json", d))

    d = copy.deepcopy(ex["command-unlock.json"])
    d["target"] = {"unit": "A-101", "entry": "gate-1"}
    out.append(("unlock with two targets", "mqtt-command.schema.json", d))

    d = copy.deepcopy(ex["command-emergency-unlock.json"])
    d["args"]["reason"] = "because"
    out.append(("emergency unlock with an unknown reason", "mqtt-command.schema.json", d))

    d = copy.deepcopy(ex["command-relay.json"])
    d["args"] = {"action": "on", "ms": 500}
    out.append(("relay on with ms", "mqtt-command.schema.json", d))

    d = copy.deepcopy(ex["command-relay.json"])
    d["args"]["ms"] = 60001
    out.append(("relay pulse over 60000 ms", "mqtt-command.schema.json", d))

    d = copy.deepcopy(ex["command-install-mode.json"])
    d["args"]["minutes"] = 241
    out.append(("install mode over 240 minutes", "mqtt-command.schema.json", d))

    d = copy.deepcopy(ex["command-adopt.json"])
    del d["args"]["candidate"]
    out.append(("adopt without a candidate", "mqtt-command.schema.json", d))

    d = copy.deepcopy(ex["command-adopt.json"])
    d["args"]["pin"] = "1234"
    out.append(("adopt with an unknown argument", "mqtt-command.schema.json", d))

    d = copy.deepcopy(ex["command-remove.json"])
    d["target"] = {"unit": "A-101"}
    out.append(("remove with a target", "mqtt-command.schema.json", d))

    d = copy.deepcopy(ex["pairing-discovered.json"])
    d["candidates"][0]["id"] = "zigbee:1"
    out.append(("candidate id of an unknown kind", "mqtt-pairing-discovered.schema.json", d))

    d = copy.deepcopy(ex["pairing-state.json"])
    del d["until"]
    out.append(("active pairing state without until", "mqtt-pairing-state.schema.json", d))

    d = copy.deepcopy(ex["command-ping.json"])
    d["target"] = {"unit": "A-101"}
    out.append(("ping with a target", "mqtt-command.schema.json", d))

    d = copy.deepcopy(ex["command-unlock.json"])
    d["v"] = 1
    out.append(("command v 1 (no audience)", "mqtt-command.schema.json", d))

    for field in ("site", "gateway"):
        d = copy.deepcopy(ex["command-unlock.json"])
        del d[field]
        out.append((f"command without {field}", "mqtt-command.schema.json", d))

    # Lengths are characters on both sides (tests/commands.rs sends the same strings to the
    # gateway): one character over the bound, in multi-byte characters.
    for doc, field, value in boundary_commands(ex, over=True):
        out.append((f"command {field} of {len(value)} characters ({len(value.encode())} bytes)", "mqtt-command.schema.json", doc))

    d = copy.deepcopy(ex["command-result-refused.json"])
    del d["id"]
    out.append(("refused result without id", "mqtt-command-result.schema.json", d))

    d = copy.deepcopy(ex["command-result-done.json"])
    d["status"] = "ok"
    out.append(("result status `ok`", "mqtt-command-result.schema.json", d))
    return out


def boundary_commands(ex, over):
    """Commands whose `id` or `note` is exactly at (over=False) or one past (over=True) the bound,
    in multi-byte characters: `é` (2 bytes) for the id, `€` (3 bytes) for the note."""
    extra = 1 if over else 0
    d = copy.deepcopy(ex["command-unlock.json"])
    d["id"] = "é" * (128 + extra)
    out = [(d, "id", d["id"])]
    d = copy.deepcopy(ex["command-emergency-unlock.json"])
    d["args"]["note"] = "€" * (500 + extra)
    out.append((d, "note", d["args"]["note"]))
    return out


def main():
    vals = sync_validators(validators())
    schemas = validators(format_checker=FORMATS)
    failed = 0
    valid_files = sorted((ROOT / "docs" / "examples").glob("*.json")) + [
        ROOT / "config" / "demo-snapshot.json"
    ]
    for path in valid_files:
        rel = path.relative_to(ROOT)
        errs = errors_of(vals, load(path))
        if errs:
            failed += 1
            print(f"FAIL {rel}: {len(errs)} schema error(s): " + "; ".join(errs))
        else:
            print(f"ok   {rel}: valid")

    snapshot = load(ROOT / "docs" / "examples" / "snapshot.json")
    for name, doc in invalid_documents(snapshot):
        errs = errors_of(vals, doc)
        if errs:
            print(f"ok   invalid: {name}: rejected ({errs[0]})")
        else:
            failed += 1
            print(f"FAIL invalid: {name}: accepted by the schema")

    for path in sorted(MQTT_EXAMPLES.glob("*.json")):
        rel = path.relative_to(ROOT)
        schema = mqtt_schema_of(path.name)
        if schema is None:
            failed += 1
            print(f"FAIL {rel}: no schema for this file name (see MQTT_SCHEMAS)")
            continue
        errs = schema_errors(schemas[schema], load(path))
        if errs:
            failed += 1
            print(f"FAIL {rel}: {len(errs)} {schema} error(s): " + "; ".join(errs))
        else:
            print(f"ok   {rel}: valid ({schema})")

    ex = {p.name: load(p) for p in MQTT_EXAMPLES.glob("*.json")}
    for doc, field, value in boundary_commands(ex, over=False):
        errs = schema_errors(schemas["mqtt-command.schema.json"], doc)
        name = f"command {field} of {len(value)} characters ({len(value.encode())} bytes)"
        if errs:
            failed += 1
            print(f"FAIL {name}: rejected by the schema ({errs[0]})")
        else:
            print(f"ok   {name}: valid")

    for name, schema, doc in invalid_mqtt_documents():
        errs = schema_errors(schemas[schema], doc)
        if errs:
            print(f"ok   invalid: {name}: rejected ({errs[0]})")
        else:
            failed += 1
            print(f"FAIL invalid: {name}: accepted by the schema")

    if failed:
        print(f"{failed} check(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
