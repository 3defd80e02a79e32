"""`sessiond serve` with settings it cannot start with: a message naming the setting and exit status 2,
never a traceback; and only SESSIOND_* (and SESSION_*) variables configure it, never a bare
DATABASE_URL or LOG_LEVEL that the platform set for another program."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from sessiond.cli import main
from sessiond.config import Settings


@pytest.fixture
def argv(tmp_path: Path) -> list[str]:
    return ["serve", "--database-url", f"sqlite:///{tmp_path / 'x.db'}", "--listen", "127.0.0.1:0"]


@pytest.mark.parametrize(
    ("variables", "complaint"),
    [
        ({"SESSIOND_GRACE_SECONDS": "abc"}, "SESSIOND_GRACE_SECONDS: Input should be a valid number"),
        ({"SESSIOND_LOG_LEVEL": "verbose"}, "SESSIOND_LOG_LEVEL: Input should be 'DEBUG'"),
        ({"SESSIOND_DATABASE_POOL_SIZE": "0"}, "SESSIOND_DATABASE_POOL_SIZE: Input should be greater"),
        (
            {"SESSION_MIN_TIMEOUT_MINUTES": "100", "SESSION_MAX_TIMEOUT_MINUTES": "50"},
            "the SESSION_*_MINUTES settings disagree",
        ),
        ({"SESSIOND_EVENT_BUS": "postgres"}, "SESSIOND_EVENT_BUS=postgres needs a PostgreSQL database"),
        ({"SESSIOND_METRICS_LISTEN": "abc"}, "cannot serve metrics on 'abc' (SESSIOND_METRICS_LISTEN)"),
        ({"SESSIOND_CPU_AFFINITY": "fast"}, "SESSIOND_CPU_AFFINITY: String should match pattern"),
        ({"SESSIOND_CPU_AFFINITY": "4096"}, "SESSIOND_CPU_AFFINITY: CPU 4096 is not one this process may"),
    ],
)
def test_a_setting_it_cannot_start_with_is_named(
    argv: list[str],
    variables: dict[str, str],
    complaint: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert complaint in err and "Traceback" not in err, err


def test_a_database_url_of_another_database_and_a_taken_port_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--database-url", "mysql://x/y", "--listen", "127.0.0.1:0"]) == 2
    assert "SESSIOND_DATABASE_URL: unsupported database 'mysql'" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        argv = ["serve", "--database-url", f"sqlite:///{tmp_path / 'x.db'}", "--listen", address]
        assert main(argv) == 2
    assert f"cannot listen on '{address}' (SESSIOND_LISTEN)" in capsys.readouterr().err


def test_an_agents_file_entry_that_is_not_a_table_is_named(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "agents.toml"
    config.write_text("agents = [1]\n")
    assert main([*argv, "--config", str(config)]) == 2
    assert f"{config}: agents[0]: must be a table" in capsys.readouterr().err


def test_only_the_services_own_variables_configure_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, pydantic-settings also read each field's bare name: a platform's DATABASE_URL made sessiond
    migrate and write another program's database, and LOG_LEVEL=trace stopped its start."""
    bare = {"DATABASE_URL": "postgresql://other@db/app", "LOG_LEVEL": "trace", "LISTEN": "x"}
    for name, value in bare.items():
        monkeypatch.setenv(name, value)
    for name in ("SESSIOND_DATABASE_URL", "SESSIOND_LOG_LEVEL", "SESSIOND_LISTEN"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert (settings.database_url, settings.log_level, settings.listen) == (
        "sqlite:///./var/sessiond.db",
        "INFO",
        "127.0.0.1:50051",
    )
    monkeypatch.setenv("SESSIOND_LOG_LEVEL", "debug")
    assert Settings().log_level == "DEBUG"
    assert Settings.of(listen="127.0.0.1:1").listen == "127.0.0.1:1"
    with pytest.raises(TypeError):
        Settings.of(no_such_setting=1)
