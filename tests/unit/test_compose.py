"""The compose stack, checked without Docker and without a broker.

compose.yaml, the Dockerfile, deploy/worker-entrypoint.sh and deploy/rabbitmq/* are read as
files: every service's command must parse as a fedmq invocation (click's own parser, with the
service's environment), the RabbitMQ users' permission regexes must grant what the code does
on the broker and no more where it matters, the password hashes must match the documented dev
passwords, the broker is RabbitMQ 4 with its stock limits, and the `cluster` profile is three
nodes whose clients are given every node.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import click
import pytest

yaml = pytest.importorskip("yaml")

from fedmq.broker.settings import BrokerSettings  # noqa: E402
from fedmq.broker.topology import Topology  # noqa: E402
from fedmq.cli import main  # noqa: E402
from fedmq.options import aggregator_config  # noqa: E402
from fedmq.shared.data import BUILTINS  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENTRYPOINT = ROOT / "deploy" / "worker-entrypoint.sh"
DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"
RABBITMQ_CONF = ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf"
CLUSTER_CONF = ROOT / "deploy" / "rabbitmq" / "cluster.conf"
CLUSTER_NODES = ("rabbit1", "rabbit2", "rabbit3")
CLUSTER_CLIENTS = ("aggregator-ha", "aggregator-standby", "worker-ha")

NAMESPACE = "fedmq"
VHOST = "fedmq"
AGGREGATOR_USER = "fedmq-aggregator"
WORKER_USER = "fedmq-worker"
DEV_PASSWORDS = {AGGREGATOR_USER: "change-me-aggregator", WORKER_USER: "change-me-worker"}
BROKER_SERVICE = "rabbitmq"


# ---------------------------------------------------------------------------------- helpers
_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """Compose's variable interpolation (``${V}``, ``${V:-default}``, ``${V-default}``, ``$$``)."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, default = m.group(2), m.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        if op in (":?", "?"):
            assert name in env, f"compose requires ${name}"
        return env.get(name, "")

    return _VAR.sub(sub, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict) and "services" in doc
    return interpolate({k: v for k, v in doc.items() if not k.startswith("x-")})


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def definitions() -> dict[str, Any]:
    return json.loads(DEFINITIONS.read_text())


@pytest.fixture(scope="module")
def rabbitmq_conf() -> dict[str, str]:
    conf: dict[str, str] = {}
    for line in RABBITMQ_CONF.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"rabbitmq.conf: not a `key = value` line: {line!r}"
        conf[key.strip()] = value.strip()
    return conf


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(a) for a in cmd]


def volume_targets(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Mount target -> (source, read_only), short syntax."""
    out = {}
    for spec in service.get("volumes") or []:
        parts = spec.split(":")
        source, target = parts[0], parts[1]
        out[target] = (source, len(parts) > 2 and "ro" in parts[2].split(","))
    return out


def parse_fedmq(args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], click.Context]:
    """Parse ``fedmq <args>`` as click would, in ``env``, without running the command.

    Returns the subcommand path and the leaf command's context (``ctx.params``); raises
    click's UsageError / BadParameter on a bad invocation.
    """
    for key in list(os.environ):
        if key.startswith("FEDMQ_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    rest = list(args)
    cmd: click.Command = main
    ctx = main.context_class(main, info_name="fedmq", **main.context_settings)
    path: list[str] = []
    while isinstance(cmd, click.Group):
        assert rest, f"`fedmq {' '.join(path)}` needs a subcommand"
        name = rest.pop(0)
        sub = cmd.get_command(ctx, name)
        assert sub is not None, f"`fedmq {' '.join(path + [name])}`: no such command"
        path.append(name)
        cmd = sub
        if isinstance(cmd, click.Group):
            ctx = cmd.context_class(cmd, info_name=name, parent=ctx)
    return path, cmd.make_context(path[-1], rest, parent=ctx)


def entrypoint_invocation(script: str) -> tuple[dict[str, str], list[str]]:
    """The script's variable defaults and the argv of its `exec fedmq ...` line."""
    defaults = dict(re.findall(r"^(\w+)=\$\{FEDMQ_\w+:-([^}$]*)\}\s*$", script, re.M))
    lines = re.findall(r"^\s*exec\s+fedmq\s+(.+)$", script, re.M)
    assert len(lines) == 1, "the worker entrypoint must end in exactly one `exec fedmq ...`"
    return defaults, shlex.split(lines[0])


def expand_script_args(argv: list[str], values: dict[str, str], extra: list[str]) -> list[str]:
    out: list[str] = []
    for arg in argv:
        if arg == "$@":
            out.extend(extra)
            continue
        out.append(re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], arg))
    return out


def rabbit_sha256(password: str, salt: bytes) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def verify_hash(password: str, password_hash: str) -> bool:
    raw = base64.b64decode(password_hash)
    return len(raw) == 4 + 32 and rabbit_sha256(password, raw[:4]) == password_hash


def allowed(regex: str, name: str) -> bool:
    """RabbitMQ matches permission regexes unanchored (re:run), like re.search."""
    return regex != "" and re.search(regex, name) is not None


# ---------------------------------------------------------------------------------- compose
def test_broker_image_is_pinned_and_healthchecked(services: dict[str, dict[str, Any]]) -> None:
    broker = services[BROKER_SERVICE]
    image = broker["image"]
    repo, _, tag = image.partition(":")
    assert repo == "rabbitmq", image
    assert tag and tag != "latest" and re.match(r"^\d+\.\d+\.\d+(-management)?$", tag), (
        f"pin the broker image to an exact release, not {image!r}"
    )
    assert int(tag.split(".")[0]) >= 4, "RabbitMQ 3.13 is out of community support: use a 4.x release"
    assert "management" in tag, "the management UI (15672) needs the -management image"
    test = broker["healthcheck"]["test"]
    text = test if isinstance(test, str) else " ".join(test)
    assert re.search(r"rabbitmq-diagnostics.*(ping|check_port_connectivity|check_running)", text), text
    published = {str(p).rsplit(":", 1)[-1] for p in broker.get("ports", [])}
    assert {"5672", "15672"} <= published


def test_broker_mounts_config_and_definitions(services: dict[str, dict[str, Any]], rabbitmq_conf: dict[str, str]) -> None:
    mounts = volume_targets(services[BROKER_SERVICE])
    by_source = {src: (target, ro) for target, (src, ro) in mounts.items()}
    conf_target, conf_ro = by_source["./deploy/rabbitmq/rabbitmq.conf"]
    defs_target, defs_ro = by_source["./deploy/rabbitmq/definitions.json"]
    assert conf_ro and defs_ro, "mount the broker's config and definitions read-only"
    # the image's conf.d/10-defaults.conf sets loopback_users.guest = false; ours must come later
    assert re.fullmatch(r"/etc/rabbitmq/conf\.d/(\d\d)-[\w.-]+\.conf", conf_target), conf_target
    assert conf_target.rsplit("/", 1)[1] > "10-defaults.conf"
    assert rabbitmq_conf["load_definitions"] == defs_target


def test_services_wait_for_a_healthy_broker(services: dict[str, dict[str, Any]]) -> None:
    """Single-node services wait for `rabbitmq`, the cluster profile's for all three nodes; the
    split needs no broker (so the cluster profile does not start the single node for it)."""
    assert set(services) >= {BROKER_SERVICE, "split", "aggregator", "worker"}
    assert "depends_on" not in services["split"]
    for name, service in services.items():
        if name in (BROKER_SERVICE, "split", *CLUSTER_NODES):
            continue
        deps = service.get("depends_on")
        assert isinstance(deps, dict), f"{name}: depends_on needs the long form with conditions"
        brokers = CLUSTER_NODES if "cluster" in service.get("profiles", []) else (BROKER_SERVICE,)
        for broker in brokers:
            assert deps.get(broker, {}).get("condition") == "service_healthy", (name, broker)
        assert set(deps) - {"split"} == set(brokers), name
    for name in ("aggregator", "worker", *CLUSTER_CLIENTS):
        assert services[name]["depends_on"]["split"]["condition"] == "service_completed_successfully"


def test_cluster_profile_is_three_rabbitmq_4_nodes(services: dict[str, dict[str, Any]]) -> None:
    default = services[BROKER_SERVICE]
    assert "profiles" not in default, "the single node stays the default"
    ports = set()
    for name in CLUSTER_NODES:
        node = services[name]
        assert node["profiles"] == ["cluster"] and node["hostname"] == name
        assert node["image"] == default["image"] and node["healthcheck"] == default["healthcheck"]
        mounts = {src: target for target, (src, _ro) in volume_targets(node).items()}
        assert mounts["./deploy/rabbitmq/rabbitmq.conf"] == "/etc/rabbitmq/conf.d/90-fedmq.conf"
        assert mounts["./deploy/rabbitmq/cluster.conf"].startswith("/etc/rabbitmq/conf.d/9")
        assert mounts[name] == "/var/lib/rabbitmq", "each node its own data volume"
        (cookie,) = node["configs"]
        assert cookie["source"] == "erlang-cookie" and cookie["target"] == "/var/lib/rabbitmq/.erlang.cookie"
        assert oct(int(cookie["mode"])) == "0o400"
        ports |= {str(p).rsplit(":", 2)[-2] for p in node["ports"]}
    assert len(ports) == 2 * len(CLUSTER_NODES), "each node publishes its own host ports"
    conf = dict(line.split(" = ", 1) for line in CLUSTER_CONF.read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    assert conf["cluster_formation.peer_discovery_backend"] == "classic_config"
    assert sorted(v for k, v in conf.items() if k.startswith("cluster_formation.classic_config.nodes.")) == [
        f"rabbit@{n}" for n in CLUSTER_NODES]


def test_cluster_profile_clients_get_every_node(services: dict[str, dict[str, Any]], definitions: dict[str, Any],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    outs = {}
    for name, user in (("aggregator-ha", AGGREGATOR_USER), ("aggregator-standby", AGGREGATOR_USER),
                       ("worker-ha", WORKER_USER)):
        service = services[name]
        assert service["profiles"] == ["cluster"]
        env = environment(service)
        settings = BrokerSettings.from_url(env["FEDMQ_AMQP_URL"])
        assert [urlsplit(u).hostname for u in settings.urls] == list(CLUSTER_NODES)
        for url in settings.urls:
            parts = urlsplit(url)
            assert parts.username == user and unquote(parts.path[1:]) == VHOST
            assert unquote(parts.password or "") == DEV_PASSWORDS[user]
        if name.startswith("aggregator"):
            path, ctx = parse_fedmq(command(service), env, monkeypatch)
            assert path == ["aggregator"]
            aggregator_config(ctx.params)
            outs[name] = (ctx.params["out"], ctx.params["standby"])
    assert outs["aggregator-ha"][0] == outs["aggregator-standby"][0], "the standby takes over the same run directory"
    assert (outs["aggregator-ha"][1], outs["aggregator-standby"][1]) == (False, True)


def test_volumes_declared(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    declared = set(compose.get("volumes") or {})
    assert {"data", "runs"} <= declared
    for name, service in services.items():
        for target, (source, _ro) in volume_targets(service).items():
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source!r} for {target} is not declared"


def test_split_command(services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    split = services["split"]
    path, ctx = parse_fedmq(command(split), environment(split), monkeypatch)
    assert path == ["data", "split"]
    p = ctx.params
    assert p["dataset"] in BUILTINS and p["data_file"] is None
    assert p["workers"] == 4, "FEDMQ_WORKERS defaults to 4 shards"
    assert p["out"].startswith("/data/")
    assert "/data" in volume_targets(split) and not volume_targets(split)["/data"][1]
    # FEDMQ_WORKERS sets the shard count
    scaled = interpolate(yaml.safe_load(COMPOSE.read_text())["services"]["split"], {"FEDMQ_WORKERS": "8"})
    _, ctx8 = parse_fedmq(command(scaled), environment(scaled), monkeypatch)
    assert ctx8.params["workers"] == 8


def _broker_url_checks(url: str, user: str, definitions: dict[str, Any]) -> None:
    BrokerSettings.from_url(url)  # raises on a malformed URL
    parts = urlsplit(url)
    assert parts.hostname == BROKER_SERVICE and (parts.port or 5672) == 5672
    assert unquote(parts.path[1:]) == VHOST
    assert parts.username == user
    assert parts.password is not None and unquote(parts.password) == DEV_PASSWORDS[user]
    users = {u["name"]: u for u in definitions["users"]}
    assert verify_hash(unquote(parts.password), users[user]["password_hash"]), (
        f"the default password of {user} in compose.yaml does not match definitions.json"
    )


def test_aggregator_command(services: dict[str, dict[str, Any]], definitions: dict[str, Any],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    agg = services["aggregator"]
    env = environment(agg)
    path, ctx = parse_fedmq(command(agg), env, monkeypatch)
    assert path == ["aggregator"]
    p = ctx.params
    # env-var-provided options resolve
    assert p["amqp_url"] == env["FEDMQ_AMQP_URL"]
    assert p["namespace"] == env["FEDMQ_NAMESPACE"] == NAMESPACE
    _broker_url_checks(p["amqp_url"], AGGREGATOR_USER, definitions)
    # what the command does with the options: build and validate the config
    aggregator_config(p)  # every AggregatorConfig field is an option of `fedmq aggregator`
    # files it reads and writes are on its volumes, the test set where the split writes it
    _, split_ctx = parse_fedmq(command(services["split"]), {}, monkeypatch)
    assert p["test_data"] == f"{split_ctx.params['out']}/test.npz"
    mounts = volume_targets(agg)
    assert any(p["test_data"].startswith(t + "/") for t in mounts)
    runs = [t for t, (src, ro) in mounts.items() if src == "runs"]
    assert runs and not mounts[runs[0]][1] and p["out"].startswith(runs[0] + "/")


def test_worker_entrypoint_runs_a_valid_fedmq_worker(services: dict[str, dict[str, Any]], definitions: dict[str, Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    worker = services["worker"]
    entry = worker["entrypoint"]
    entry = entry if isinstance(entry, list) else shlex.split(entry)
    copied = re.findall(r"^COPY\s+deploy/worker-entrypoint\.sh\s+(\S+)\s*$", DOCKERFILE.read_text(), re.M)
    assert entry == copied, "the worker's entrypoint must be where the Dockerfile puts the script"

    script = ENTRYPOINT.read_text()
    assert script.startswith("#!/bin/sh\n"), "POSIX sh: python:*-slim has no bash guarantee"
    defaults, argv = entrypoint_invocation(script)
    values = {**defaults, "idx": "0"}
    args = expand_script_args(argv, values, command(worker))
    env = environment(worker)
    path, ctx = parse_fedmq(args, env, monkeypatch)
    assert path == ["worker"]
    p = ctx.params
    _, split_ctx = parse_fedmq(command(services["split"]), {}, monkeypatch)
    assert p["data_file"] == f"{split_ctx.params['out']}/worker-0.npz"
    assert p["worker_id"] == "worker-0"
    assert p["amqp_url"] == env["FEDMQ_AMQP_URL"] and p["namespace"] == NAMESPACE
    _broker_url_checks(p["amqp_url"], WORKER_USER, definitions)
    assert defaults["CLAIMS"].startswith("/data/"), "claims must live on the shared data volume"
    assert "/data" in volume_targets(worker) and not volume_targets(worker)["/data"][1]


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX sh")
def test_worker_entrypoint_gives_each_replica_its_own_shard(tmp_path: Path) -> None:
    """Three replicas race for two shards: two distinct shards, the third gives up (exit 3);
    a restarted replica gets its own shard back."""
    shards, stub = tmp_path / "shards", tmp_path / "bin"
    shards.mkdir()
    stub.mkdir()
    for i in range(2):
        (shards / f"worker-{i}.npz").write_bytes(b"")
    (stub / "fedmq").write_text('#!/bin/sh\necho "$*" > "$STUB_OUT/$FEDMQ_CLAIM_OWNER"\nsleep "$STUB_SLEEP"\n')
    (stub / "fedmq").chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PATH": f"{stub}{os.pathsep}{os.environ['PATH']}", "FEDMQ_SHARDS_DIR": str(shards),
           "FEDMQ_CLAIMS_DIR": str(tmp_path / "claims"), "FEDMQ_CLAIM_WAIT": "0", "FEDMQ_CLAIM_BEAT": "1",
           "STUB_OUT": str(out), "STUB_SLEEP": "2"}
    procs = {name: subprocess.Popen(["sh", str(ENTRYPOINT), "--slowdown", "2"], env={**env, "FEDMQ_CLAIM_OWNER": name},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name in ("a", "b", "c")}
    codes = {name: proc.wait(timeout=30) for name, proc in procs.items()}
    ran = {f.name: f.read_text().split() for f in out.iterdir()}
    assert sorted(codes.values()) == [0, 0, 3], codes
    assert len(ran) == 2
    ids = sorted(argv[argv.index("--worker-id") + 1] for argv in ran.values())
    assert ids == ["worker-0", "worker-1"]
    for argv in ran.values():
        assert argv[:1] == ["worker"] and argv[-2:] == ["--slowdown", "2"]
        index = argv[argv.index("--worker-id") + 1].split("-")[1]
        assert argv[argv.index("--data") + 1] == f"{shards}/worker-{index}.npz"
    # the same replica, restarted, takes back the shard it had
    first = next(iter(ran))
    (out / first).unlink()
    rc = subprocess.run(["sh", str(ENTRYPOINT)], env={**env, "FEDMQ_CLAIM_OWNER": first, "STUB_SLEEP": "0"},
                        capture_output=True, timeout=30).returncode
    assert rc == 0
    assert (out / first).read_text().split()[:5] == ran[first][:5]


def test_worker_entrypoint_fails_clearly_without_shards(tmp_path: Path) -> None:
    if shutil.which("sh") is None:
        pytest.skip("needs a POSIX sh")
    env = {**os.environ, "FEDMQ_SHARDS_DIR": str(tmp_path / "none"), "FEDMQ_CLAIMS_DIR": str(tmp_path / "claims"),
           "FEDMQ_CLAIM_OWNER": "x"}
    res = subprocess.run(["sh", str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "split" in res.stderr


# ---------------------------------------------------------------------------------- RabbitMQ
def test_definitions_users_and_vhost(definitions: dict[str, Any]) -> None:
    assert [v["name"] for v in definitions["vhosts"]] == [VHOST]
    users = {u["name"]: u for u in definitions["users"]}
    assert set(users) == {AGGREGATOR_USER, WORKER_USER}, "no guest, no admin: only the two roles"
    for name, user in users.items():
        assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        assert verify_hash(DEV_PASSWORDS[name], user["password_hash"]), name
        assert "administrator" not in user.get("tags", [])
    assert users[WORKER_USER].get("tags", []) == []
    perms = definitions["permissions"]
    assert {(p["user"], p["vhost"]) for p in perms} == {(AGGREGATOR_USER, VHOST), (WORKER_USER, VHOST)}
    assert not definitions.get("topic_permissions")


def _perms(definitions: dict[str, Any], user: str) -> dict[str, str]:
    (p,) = [p for p in definitions["permissions"] if p["user"] == user]
    return p


def _required(role: str) -> dict[str, set[str]]:
    """(permission -> resource names) each role needs, from what the code does on the broker.

    RabbitMQ access control, AMQP 0-9-1: exchange.declare and queue.declare need configure on
    the entity (a queue *created* with a DLX also needs write on the DLX and read on the
    queue); queue.delete / exchange.delete configure; queue.bind write on the queue and read
    on the exchange; basic.publish write on the exchange (the default exchange is
    ``amq.default``); basic.consume, basic.get and queue.purge read on the queue.
    """
    t = Topology(NAMESPACE)
    private = f"{t.control}.worker-0.0123abcd"  # worker/service.py: <control>.<worker id>.<8 hex>
    declared = set(t.queues) | {t.dlx, t.control}
    lock = {t.lock} if hasattr(t, "lock") else set()
    topology_binds_write = {t.tasks_dlq, t.updates_dlq}
    if role == "aggregator":
        return {
            # Topology.declare on connect; `fedmq broker delete` deletes the same entities
            "configure": declared,
            # publish: models and tasks via the default exchange, rejected updates to the DLX,
            # stop to the control fanout; creating the DLX'd queues; binding the DLQs
            "write": {"amq.default", t.dlx, t.control} | topology_binds_write,
            # consume presence and updates; purge tasks; DLX'd queue creation (tasks, updates);
            # `fedmq broker dlq` gets and purges the DLQs; binding the DLQs reads the DLX;
            # the exclusive consumer on the lock queue (one aggregator per namespace)
            "read": {t.presence, t.updates, t.tasks, t.tasks_dlq, t.updates_dlq, t.dlx} | lock,
        }
    return {
        # workers run with --no-declare (the topology comes from definitions.json): they
        # configure only their private control queue
        "configure": {private},
        # publish updates and presence via the default exchange; bind their private queue
        "write": {"amq.default", private},
        # consume models and tasks and the private queue; bind it to the control fanout
        "read": {t.models, t.tasks, t.control, private},
    }


@pytest.mark.parametrize("user,role", [(AGGREGATOR_USER, "aggregator"), (WORKER_USER, "worker")])
def test_permissions_grant_what_the_code_needs(definitions: dict[str, Any], user: str, role: str) -> None:
    perms = _perms(definitions, user)
    for perm, names in _required(role).items():
        missing = sorted(n for n in names if not allowed(perms[perm], n))
        assert not missing, f"{user}: {perm} regex {perms[perm]!r} refuses {missing}"


@pytest.mark.parametrize("user", [AGGREGATOR_USER, WORKER_USER])
def test_permissions_stay_inside_the_namespace(definitions: dict[str, Any], user: str) -> None:
    perms = _perms(definitions, user)
    other = Topology("other")
    for perm in ("configure", "write", "read"):
        for name in (*other.queues, other.dlx, other.control, f"{other.control}.w.0123abcd",
                     "amq.direct", "amq.topic", "fedmq", "xfedmq.tasks", "fedmq.tasksx", "fedmq.models.x"):
            assert not allowed(perms[perm], name), f"{user}: {perm} allows {name}"


def test_workers_cannot_forge_or_snoop(definitions: dict[str, Any]) -> None:
    """Worker limits the regexes can express (amq.default write still reaches every queue by
    name: see docs/compose.md)."""
    t = Topology(NAMESPACE)
    perms = _perms(definitions, WORKER_USER)
    for name in (t.models, t.tasks, t.control, t.dlx, t.presence, t.updates):
        assert not allowed(perms["write"], name), f"worker write allows {name}"
    # nor hold the aggregator's lock (an exclusive consumer on it would lock the aggregator out)
    lock = (t.lock,) if hasattr(t, "lock") else ()
    for name in (t.updates, t.presence, t.tasks_dlq, t.updates_dlq, t.dlx, *lock):
        assert not allowed(perms["read"], name), f"worker read allows {name}"
    # nor declare, delete or purge anything shared
    for name in (*t.queues, t.dlx, t.control):
        assert not allowed(perms["configure"], name), f"worker configure allows {name}"


def test_compose_workers_do_not_declare(services: dict[str, dict[str, Any]]) -> None:
    assert "--no-declare" in command(services["worker"])


def test_definitions_declare_the_topology_exactly(definitions: dict[str, Any]) -> None:
    """Pre-declared at boot with Topology's exact arguments: a client's redeclare is then a
    no-op (different arguments would fail with PRECONDITION_FAILED), and a worker that starts
    before the aggregator never creates a queue (which would need DLX permissions)."""
    t = Topology(NAMESPACE)
    queues = {q["name"]: q for q in definitions["queues"]}
    assert set(queues) == set(t.queues)
    for name, args in t.declarations():
        q = queues[name]
        assert q["vhost"] == VHOST and q["durable"] is True and q["auto_delete"] is False
        assert q["arguments"] == args, name
    exchanges = {(e["name"], e["type"], e["durable"], e["auto_delete"], e["internal"]) for e in definitions["exchanges"]}
    assert exchanges == {(t.dlx, "direct", True, False, False), (t.control, "fanout", True, False, False)}
    bindings = {(b["source"], b["destination"], b["destination_type"], b["routing_key"]) for b in definitions["bindings"]}
    assert bindings == {(t.dlx, t.tasks_dlq, "queue", "tasks"), (t.dlx, t.updates_dlq, "queue", "updates")}
    assert all(e["vhost"] == VHOST for e in definitions["exchanges"] + definitions["bindings"])


def test_rabbitmq_conf(rabbitmq_conf: dict[str, str], services: dict[str, dict[str, Any]]) -> None:
    assert rabbitmq_conf["loopback_users.guest"] == "true"
    assert int(rabbitmq_conf["consumer_timeout"]) >= 3_600_000
    # RabbitMQ 4's stock limits: no max_message_size of our own, and no client-side override
    # (the client takes the limit from the version the broker announces)
    assert "max_message_size" not in rabbitmq_conf
    for name, service in services.items():
        assert "FEDMQ_MAX_MESSAGE_BYTES" not in environment(service), name


# ---------------------------------------------------------------------------------- image
def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    ins = _instructions(DOCKERFILE.read_text())
    froms = [rest for op, rest in ins if op == "FROM"]
    assert len(froms) == 1 and re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", froms[0]), froms
    ops = [op for op, _ in ins]
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), "run as an unprivileged user"
    last_user = len(ops) - 1 - ops[::-1].index("USER")
    assert all(op != "RUN" for op in ops[last_user:]), "install as root, then drop privileges"
    assert ("ENTRYPOINT", '["fedmq"]') in ins

    def index(pred: Any) -> int:
        return next(i for i, item in enumerate(ins) if pred(*item))

    copy_pyproject = index(lambda op, rest: op == "COPY" and rest.split()[0] == "pyproject.toml")
    deps = index(lambda op, rest: op == "RUN" and "pip install" in rest and "tomllib" in rest)
    sources = index(lambda op, rest: op == "COPY" and rest.split()[0] in ("shared", ".", "fedmq"))
    install = index(lambda op, rest: op == "RUN" and re.search(r"pip install (--no-deps )?\.(\s|$)", rest))
    assert copy_pyproject < deps < sources < install, "dependency layer first, sources after"

    # the package is installed like the README/Makefile do: pip install of the project directory
    assert re.search(r"pip install .*-e '\.\[test,dev\]'", (ROOT / "Makefile").read_text())

    # everything the package needs is copied (and not excluded by .dockerignore)
    pyproject = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())
    copied = {rest.split()[0] for op, rest in ins if op == "COPY"}
    needed = set(pyproject["tool"]["setuptools"]["package-dir"].values()) | {"pyproject.toml"}
    if "readme" in pyproject["project"]:
        needed.add(pyproject["project"]["readme"])
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"
    ignored = [p.strip().rstrip("/") for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    for path in copied:
        assert path not in ignored and not any(path.startswith(p + "/") for p in ignored), f"{path} is .dockerignored"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the image's Python has tomllib")
def test_dockerfile_dependency_step_reads_pyproject(tmp_path: Path) -> None:
    """Run the Dockerfile's dependency-extraction one-liner on the real pyproject.toml."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    m = re.search(r'python -c "([^"]+)"', text)
    assert m, "dependency step: python -c \"...tomllib...\""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    res = subprocess.run([sys.executable, "-c", m.group(1)], cwd=tmp_path, capture_output=True, text=True, check=True)
    import tomllib

    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert res.stdout.splitlines() == expected


def test_generated_definitions_give_each_worker_its_own_user(definitions: dict[str, Any], tmp_path: Path) -> None:
    env_out, out = tmp_path / "workers.env", tmp_path / "definitions.workers.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "worker_users.py"), "--workers", "3", "--out", str(out),
                    "--env-out", str(env_out)], check=True, capture_output=True)
    generated = json.loads(out.read_text())
    users = {u["name"]: u for u in generated["users"]}
    workers = [f"{WORKER_USER}-{i}" for i in range(3)]
    assert set(users) == {AGGREGATOR_USER, *workers}, "the shared worker user is replaced"
    passwords = dict(line.split("=", 1) for line in env_out.read_text().splitlines())
    assert oct(env_out.stat().st_mode & 0o777) == "0o600"
    shared = _perms(definitions, WORKER_USER)
    for i, name in enumerate(workers):
        assert users[name]["tags"] == [], "no impersonator (nor any other) tag for a worker"
        assert verify_hash(passwords[f"FEDMQ_WORKER_{i}_PASSWORD"], users[name]["password_hash"])
        perms = _perms(generated, name)
        assert {k: perms[k] for k in ("configure", "write", "read", "vhost")} == {
            k: shared[k] for k in ("configure", "write", "read", "vhost")}
    assert generated["queues"] == definitions["queues"]
