#!/usr/bin/env python3
"""Follow keysync's lifecycle events from Python: CloudEvents 1.0 (JSON) on
NATS JetStream, each validated against the JSON Schemas in schemas/json/.

Needs nats-py and jsonschema (`pip install nats-py jsonschema`).

Follow one key from `created` to `replicated`:

    python3 examples/python/lifecycle_consumer.py --nats nats://127.0.0.1:4222 --key KEY_ID

Replay the whole history (a consumer started after the fact reads it all),
stopping once an event of TYPE about SUBJECT was seen and nothing more came
for IDLE seconds:

    python3 examples/python/lifecycle_consumer.py --all --until io.keysync.hsm.recovered.v1:hsm-3

Each event is printed as one JSON line (stream sequence, id, type, subject,
keysyncseq, whether it is valid). The exit code is 1 if any event was
invalid, 2 if the condition to stop was not met within --timeout.
"""

import argparse
import asyncio
import json
import pathlib
import sys

import jsonschema
import nats
from nats.js.api import DeliverPolicy

CONTENT_TYPE = "application/cloudevents+json"
HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_SCHEMAS = HERE.parent.parent / "schemas" / "json"


class Schemas:
    """The schema files, by name, each with its validator."""

    def __init__(self, folder):
        self.folder = pathlib.Path(folder)
        self.validators = {}

    def validator(self, file_name):
        if file_name not in self.validators:
            path = self.folder / file_name
            schema = json.loads(path.read_text())
            cls = jsonschema.validators.validator_for(schema)
            cls.check_schema(schema)
            self.validators[file_name] = cls(schema, format_checker=cls.FORMAT_CHECKER)
        return self.validators[file_name]

    def errors(self, event):
        """Every way `event` breaks its envelope's or its data's schema."""
        errs = [e.message for e in self.validator("cloudevent.v1.json").iter_errors(event)]
        dataschema = event.get("dataschema", "")
        file_name = dataschema.rsplit("/", 1)[-1]
        if not file_name.endswith(".json"):
            return errs + [f"dataschema {dataschema!r} names no schema file"]
        try:
            v = self.validator(file_name)
        except FileNotFoundError:
            return errs + [f"no schema file {file_name} in {self.folder}"]
        return errs + [f"data: {e.message}" for e in v.iter_errors(event.get("data"))]


def check(msg, schemas):
    """One message: decoded, checked against the NATS binding and the schemas."""
    headers = msg.headers or {}
    errors = []
    if headers.get("content-type") != CONTENT_TYPE:
        errors.append(f"content-type {headers.get('content-type')!r} is not {CONTENT_TYPE}")
    try:
        event = json.loads(msg.data)
    except ValueError as e:
        return {"stream_seq": msg.metadata.sequence.stream, "valid": False, "errors": [f"not JSON: {e}"]}
    if headers.get("Nats-Msg-Id") != event.get("id"):
        errors.append("Nats-Msg-Id differs from the event's id")
    errors += schemas.errors(event)
    return {
        "stream_seq": msg.metadata.sequence.stream,
        "nats_subject": msg.subject,
        "id": event.get("id"),
        "type": event.get("type"),
        "subject": event.get("subject"),
        "keysyncseq": event.get("keysyncseq"),
        "time": event.get("time"),
        "traceparent": event.get("traceparent"),
        "data": event.get("data"),
        "valid": not errors,
        "errors": errors,
    }


async def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nats", default="nats://127.0.0.1:4222")
    p.add_argument("--prefix", default="keysync", help="the cluster's subject prefix")
    p.add_argument("--schemas", default=str(DEFAULT_SCHEMAS), help="folder of the *.v1.json schema files")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--key", help="follow this key until it is replicated (or deleted)")
    what.add_argument("--all", action="store_true", help="every lifecycle event, from the first")
    p.add_argument("--until", help="with --all: stop after an event TYPE:SUBJECT (and --idle seconds of quiet)")
    p.add_argument("--idle", type=float, default=1.0, help="seconds of quiet that end --all")
    p.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds")
    p.add_argument("--user", help="NATS user (with --password)")
    p.add_argument("--password", help="NATS password")
    p.add_argument("--creds", help="NATS credentials file (JWT + seed)")
    p.add_argument("--inbox-prefix", default="_INBOX",
                   help="inbox prefix the account confines this user to (e.g. _INBOX.auditor)")
    args = p.parse_args()

    schemas = Schemas(args.schemas)
    auth = {}
    if args.user:
        auth = {"user": args.user, "password": args.password}
    if args.creds:
        auth["user_credentials"] = args.creds
    nc = await nats.connect(args.nats, inbox_prefix=args.inbox_prefix, **auth)
    js = nc.jetstream()
    if args.key:
        subject = f"{args.prefix}.lifecycle.key.{args.key}.>"
        done_types = {"io.keysync.key.replicated.v1", "io.keysync.key.deleted.v1"}
    else:
        subject = f"{args.prefix}.lifecycle.>"
        done_types = set()
    until = tuple(args.until.split(":", 1)) if args.until else None
    # An ordered consumer: every stored event in stream order, then live ones.
    # The stream is named, not looked up by subject: a reader's permissions
    # need not include listing streams.
    stream = f"{args.prefix.upper()}_LIFECYCLE"
    sub = await js.subscribe(
        subject, stream=stream, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.timeout
    invalid = 0
    met = False
    while True:
        left = deadline - loop.time()
        if left <= 0:
            break
        wait = min(left, args.idle) if (met or not until) and args.all else left
        try:
            msg = await sub.next_msg(timeout=wait)
        except nats.errors.TimeoutError:
            if args.all and (met or not until):
                break
            continue
        line = check(msg, schemas)
        invalid += 0 if line["valid"] else 1
        print(json.dumps(line), flush=True)
        if args.key and line.get("type") in done_types:
            met = True
            break
        if until and (line.get("type"), line.get("subject")) == until:
            met = True
    await sub.unsubscribe()
    await nc.close()
    if invalid:
        print(f"{invalid} invalid event(s)", file=sys.stderr)
        return 1
    if (args.key or until) and not met:
        print("gave up: the event to stop at did not come", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
