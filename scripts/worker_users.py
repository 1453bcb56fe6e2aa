"""Generate RabbitMQ definitions with one broker user per worker (for ``--require-user-id``).

    python scripts/worker_users.py --workers 4 --out deploy/rabbitmq/definitions.workers.json \\
        --env-out deploy/rabbitmq/workers.env

reads ``deploy/rabbitmq/definitions.json``, replaces its shared ``fedmq-worker`` user by
``fedmq-worker-0`` .. ``fedmq-worker-<N-1>``, each with the shared user's permissions (its
regexes: only its namespace, no configure on shared queues) and a random password, and writes
the passwords to an env file (``FEDMQ_WORKER_<i>_PASSWORD=...``, mode 0600) for the workers'
URLs. No user gets a tag: a worker must never be an ``impersonator``. Passwords are stored as
RabbitMQ's salted SHA-256 hashes (``rabbit_password_hashing_sha256``), the format the broker
imports at boot.
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

SHARED_WORKER = "fedmq-worker"
DEFAULT_DEFINITIONS = Path(__file__).resolve().parents[1] / "deploy" / "rabbitmq" / "definitions.json"


def rabbit_sha256(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256`` hash: base64(salt + sha256(salt + password))."""
    salt = salt if salt is not None else secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def per_worker(definitions: dict[str, Any], workers: int) -> tuple[dict[str, Any], dict[str, str]]:
    """Definitions with one user per worker instead of the shared one, and user -> password."""
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    out = copy.deepcopy(definitions)
    (shared_user,) = [u for u in out["users"] if u["name"] == SHARED_WORKER]
    shared_perms = [p for p in out["permissions"] if p["user"] == SHARED_WORKER]
    out["users"] = [u for u in out["users"] if u["name"] != SHARED_WORKER]
    out["permissions"] = [p for p in out["permissions"] if p["user"] != SHARED_WORKER]
    passwords: dict[str, str] = {}
    for i in range(workers):
        name = f"{SHARED_WORKER}-{i}"
        passwords[name] = secrets.token_urlsafe(18)
        out["users"].append({**shared_user, "name": name, "password_hash": rabbit_sha256(passwords[name]),
                             "tags": []})
        out["permissions"].extend({**p, "user": name} for p in shared_perms)
    return out, passwords


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--definitions", type=Path, default=DEFAULT_DEFINITIONS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--env-out", type=Path, required=True)
    args = parser.parse_args()
    defs, passwords = per_worker(json.loads(args.definitions.read_text()), args.workers)
    args.out.write_text(json.dumps(defs, indent=2) + "\n")
    args.env_out.write_text("".join(f"FEDMQ_WORKER_{i}_PASSWORD={pw}\n" for i, pw in enumerate(passwords.values())))
    os.chmod(args.env_out, 0o600)
    print(f"{args.out}: {len(passwords)} worker users; passwords in {args.env_out}")  # noqa: T201


if __name__ == "__main__":
    main()
