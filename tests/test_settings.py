"""persia._settings: the only module of persia that reads the environment, and its accessors."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from persia import _settings
from persia.errors import ConfigError

PACKAGE = Path(_settings.__file__).resolve().parent
SETTINGS = Path(_settings.__file__).resolve()

_ENVIRON = ("environ", "environb")
_GETENV = ("getenv", "getenvb")


def environment_reads(source: str) -> list[str]:
    """``line: code`` of every read of the environment through ``os`` in ``source``.

    ``os.environ[...] = ...``, ``del os.environ[...]`` and ``os.environ.update(...)`` are writes
    and allowed; any other use of ``os.environ`` (``.get``, ``in``, ``dict(...)``,
    ``.setdefault``, ``.pop``, a subscript read), ``os.getenv`` and importing either from ``os``
    count as reads.
    """
    tree = ast.parse(source)
    parents: dict[ast.AST, ast.AST] = {}
    os_names: set[str] = set()
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
        if isinstance(node, ast.Import):
            os_names.update(a.asname or a.name for a in node.names if a.name == "os")
    found: list[str] = []

    def report(node: ast.AST) -> None:
        found.append(f"{getattr(node, 'lineno', 0)}: {ast.unparse(node)}")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "os":
            if any(a.name in _ENVIRON + _GETENV for a in node.names):
                report(node)
            continue
        if not (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in os_names
        ):
            continue
        if node.attr in _GETENV:
            report(node)
        elif node.attr in _ENVIRON:
            parent = parents.get(node)
            if (
                isinstance(parent, ast.Subscript)
                and parent.value is node
                and isinstance(parent.ctx, (ast.Store, ast.Del))
            ):
                continue  # os.environ[k] = v / del os.environ[k]
            if (
                isinstance(parent, ast.Attribute)
                and parent.attr == "update"
                and isinstance(parents.get(parent), ast.Call)
                and parents[parent].func is parent  # type: ignore[attr-defined]
            ):
                continue  # os.environ.update(...)
            report(parent if parent is not None else node)
    return found


@pytest.mark.parametrize(
    "code",
    [
        "import os\nx = os.environ.get('A')",
        "import os\nx = os.environ['A']",
        "import os\nx = 'A' in os.environ",
        "import os\nx = dict(os.environ)",
        "import os\nos.environ.setdefault('A', '1')",
        "import os\nx = os.environ.pop('A')",
        "import os\nx = os.getenv('A')",
        "import os as o\nx = o.environ.copy()",
        "from os import environ",
        "from os import getenv as g",
        "def f():\n    import os\n    return os.environ.get('A', '')",
    ],
)
def test_the_checker_sees_reads(code):
    assert environment_reads(code), code


@pytest.mark.parametrize(
    "code",
    [
        "import os\nos.environ['A'] = '1'",
        "import os\ndel os.environ['A']",
        "import os\nos.environ.update({'A': '1'})",
        "import os\nx = os.path.join('a', 'b')",
        "environ = {}\nx = environ.get('A')",  # not os's
    ],
)
def test_the_checker_allows_writes_and_other_names(code):
    assert environment_reads(code) == []


def test_only_settings_reads_the_environment():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.resolve() == SETTINGS:
            continue
        for read in environment_reads(path.read_text(encoding="utf-8")):
            found.append(f"{path.relative_to(PACKAGE.parent)}:{read}")
    assert found == [], "read these through persia._settings:\n" + "\n".join(found)


# --- accessors -----------------------------------------------------------------------------------


def test_ray_timeout_s(monkeypatch):
    monkeypatch.delenv(_settings.PERSIA_RAY_TIMEOUT_S, raising=False)
    assert _settings.ray_timeout_s() == _settings.DEFAULT_RAY_TIMEOUT_S == 60.0
    monkeypatch.setenv(_settings.PERSIA_RAY_TIMEOUT_S, " 2.5 ")
    assert _settings.ray_timeout_s() == 2.5
    monkeypatch.setenv(_settings.PERSIA_RAY_TIMEOUT_S, "soon")
    with pytest.raises(ConfigError, match="PERSIA_RAY_TIMEOUT_S: expected seconds, got 'soon'"):
        _settings.ray_timeout_s()
    monkeypatch.setenv(_settings.PERSIA_RAY_TIMEOUT_S, "0")
    with pytest.raises(ConfigError, match="PERSIA_RAY_TIMEOUT_S: must be > 0"):
        _settings.ray_timeout_s()


def test_text_accessors_ignore_blanks(monkeypatch):
    for name in (
        _settings.PERSIA_BACKEND,
        _settings.RAY_ADDRESS,
        _settings.PERSIA_RAY_NAMESPACE,
        _settings.PERSIA_JOB_NAME,
        _settings.PERSIA_STREAM_CHANNEL,
        _settings.PERSIA_EMBEDDING_CONFIG,
    ):
        monkeypatch.delenv(name, raising=False)
    assert _settings.backend() == _settings.DEFAULT_BACKEND == "local"
    assert _settings.ray_address() is None
    assert _settings.ray_namespace() is None
    assert _settings.job_name() is None
    assert _settings.stream_channel() is None
    assert _settings.env_path(_settings.PERSIA_EMBEDDING_CONFIG) is None
    for name in (_settings.PERSIA_BACKEND, _settings.RAY_ADDRESS, _settings.PERSIA_JOB_NAME):
        monkeypatch.setenv(name, "  ")
    assert (_settings.backend(), _settings.ray_address(), _settings.job_name()) == (
        "local",
        None,
        None,
    )
    monkeypatch.setenv(_settings.PERSIA_BACKEND, " ray ")
    monkeypatch.setenv(_settings.RAY_ADDRESS, " 10.0.0.1:6379 ")
    monkeypatch.setenv(_settings.PERSIA_RAY_NAMESPACE, "ns")
    monkeypatch.setenv(_settings.PERSIA_JOB_NAME, " job ")
    monkeypatch.setenv(_settings.PERSIA_STREAM_CHANNEL, "ch")
    monkeypatch.setenv(_settings.PERSIA_EMBEDDING_CONFIG, " a/b.yml ")
    assert _settings.backend() == "ray"
    assert _settings.ray_address() == "10.0.0.1:6379"
    assert _settings.ray_namespace() == "ns"
    assert _settings.job_name() == "job"
    assert _settings.stream_channel() == "ch"
    assert _settings.env_path(_settings.PERSIA_EMBEDDING_CONFIG) == Path("a/b.yml")


def test_ray_temp_dir_and_auth(monkeypatch, tmp_path):
    monkeypatch.setenv(_settings.PERSIA_RAY_TEMP_DIR, str(tmp_path))
    assert _settings.ray_temp_dir() == tmp_path
    monkeypatch.delenv(_settings.PERSIA_RAY_TEMP_DIR)
    assert _settings.ray_temp_dir().name.startswith("persia-ray-")
    for name in (_settings.RAY_AUTH_TOKEN, _settings.RAY_AUTH_TOKEN_PATH, _settings.RAY_AUTH_MODE):
        monkeypatch.delenv(name, raising=False)
    assert not _settings.ray_auth_chosen()
    monkeypatch.setenv(_settings.RAY_AUTH_MODE, "Disabled")
    assert _settings.ray_auth_chosen()
    monkeypatch.setenv(_settings.RAY_AUTH_MODE, "token")
    assert not _settings.ray_auth_chosen()
    monkeypatch.setenv(_settings.RAY_AUTH_TOKEN_PATH, str(tmp_path / "t"))
    assert _settings.ray_auth_chosen()


def test_raw_values(monkeypatch):
    monkeypatch.delenv(_settings.GLOO_SOCKET_IFNAME, raising=False)
    assert _settings.gloo_socket_ifname() is None
    monkeypatch.setenv(_settings.GLOO_SOCKET_IFNAME, "")
    assert _settings.gloo_socket_ifname() == ""
    monkeypatch.setenv(_settings.RANK, "abc")
    assert _settings.env_raw(_settings.RANK) == "abc"
    monkeypatch.delenv(_settings.PERSIA_DEEP_CHECKS, raising=False)
    assert _settings.env_values([_settings.RANK, _settings.PERSIA_DEEP_CHECKS]) == {"RANK": "abc"}
    assert _settings.environment()[_settings.RANK] == "abc"


def test_embedding_worker_service_is_persias_rule(monkeypatch):
    """persia.service.get_embedding_worker_services: PERSIA's default when the variable is unset
    or empty, else its value as set."""
    from persia.service import get_embedding_worker_services

    monkeypatch.delenv(_settings.EMBEDDING_WORKER_SERVICE, raising=False)
    assert get_embedding_worker_services() == ["embedding_worker:8887"]
    monkeypatch.setenv(_settings.EMBEDDING_WORKER_SERVICE, "")
    assert get_embedding_worker_services() == ["embedding_worker:8887"]
    monkeypatch.setenv(_settings.EMBEDDING_WORKER_SERVICE, "10.0.0.2:9000")
    assert get_embedding_worker_services() == ["10.0.0.2:9000"]
