"""A private RabbitMQ node's open-files limit: the startup file that raises it (no broker needed).

As root, ``rabbitmq-server`` runs the node through ``su rabbitmq``, whose PAM session resets the
soft limit to 1024; ~1,000 clients (bench/scale.py --fetch --private-node) need more.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from fedmq.broker.provision import PrivateNode, env_conf


def run_startup_shell(conf: str, sys_prefix: Path, soft: int) -> list[str]:
    """Source ``conf`` the way rabbitmq-env does, from a shell whose soft limit is ``soft``."""
    script = f'ulimit -S -n {soft}; SYS_PREFIX={sys_prefix}; . "$1"; ulimit -S -n; echo "flag=$FLAG"'
    conf_path = sys_prefix / "node-env.conf"
    conf_path.write_text(conf)
    out = subprocess.run(["sh", "-c", script, "sh", str(conf_path)], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_the_startup_file_raises_the_soft_limit_and_keeps_the_system_settings(tmp_path: Path) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 4096) if hard != resource.RLIM_INFINITY else 4096
    (tmp_path / "etc" / "rabbitmq").mkdir(parents=True)
    (tmp_path / "etc" / "rabbitmq" / "rabbitmq-env.conf").write_text("FLAG=system\n")
    assert run_startup_shell(env_conf(want), tmp_path, soft=min(soft, 256)) == [str(want), "flag=system"]


def test_without_a_system_file_the_limit_is_still_raised(tmp_path: Path) -> None:
    assert run_startup_shell(env_conf(512), tmp_path, soft=256) == ["512", "flag="]


def test_a_node_names_its_startup_file_only_when_asked_to_raise_the_limit(tmp_path: Path) -> None:
    plain = PrivateNode(port=1, dist_port=2, base=tmp_path / "plain")
    plain._prepare()
    assert plain._env().get("RABBITMQ_CONF_ENV_FILE") == os.environ.get("RABBITMQ_CONF_ENV_FILE")
    assert not (tmp_path / "plain" / "rabbitmq-env.conf").exists()

    raised = PrivateNode(port=1, dist_port=2, base=tmp_path / "raised", open_files=20000)
    raised._prepare()
    path = Path(raised._env()["RABBITMQ_CONF_ENV_FILE"])
    assert path == tmp_path / "raised" / "rabbitmq-env.conf"
    assert path.read_text() == env_conf(20000)
