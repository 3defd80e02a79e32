"""One frozen settings object, built from the environment and passed in. Nothing here connects anywhere.

Timeout variables keep the ElizaOS names (SESSION_*_MINUTES); the server's own use the SESSIOND_ prefix.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BeforeValidator, Field
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from .domain.policy import TimeoutLimits
from .domain.validation import Limits
from .tls import TlsFiles


class StartupError(ValueError):
    """The server cannot start as configured; the message names the setting to fix."""


LogLevel = Annotated[
    Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
    BeforeValidator(lambda value: value.upper() if isinstance(value, str) else value),
]


CpuAffinity = Annotated[
    str,
    BeforeValidator(lambda value: value.strip().lower() if isinstance(value, str) else value),
    Field(pattern=r"^(auto|off|[0-9]{1,4})$"),
]


def _env(name: str) -> AliasChoices:
    return AliasChoices(name, name.lower())


def _variable(field: FieldInfo) -> str:
    """The environment variable a field is read from (the first of its aliases)."""
    alias = field.validation_alias
    assert isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str)
    return alias.choices[0]


class Settings(BaseSettings):
    # Read from the variables the fields name only (no `populate_by_name`: with it, pydantic-settings
    # also reads each field's bare name, and a platform's DATABASE_URL or LOG_LEVEL meant for another
    # program configured sessiond). Code passes values by field name through `Settings.of`.
    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    @classmethod
    def of(cls, **values: Any) -> Settings:
        """The settings from the environment, with `values` (by field name) taking precedence."""
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(unknown)}")
        return cls(**{_variable(cls.model_fields[name]): value for name, value in values.items()})

    listen: str = Field("127.0.0.1:50051", validation_alias=_env("SESSIOND_LISTEN"))
    database_url: str = Field("sqlite:///./var/sessiond.db", validation_alias=_env("SESSIOND_DATABASE_URL"))
    # PostgreSQL only: the schema (search_path) the tables live in.
    database_schema: str | None = Field(None, validation_alias=_env("SESSIOND_DATABASE_SCHEMA"))
    database_pool_size: int = Field(10, ge=1, validation_alias=_env("SESSIOND_DATABASE_POOL_SIZE"))
    # How long a write waits for a lock another client holds (PostgreSQL: a row lock; SQLite: the
    # database's write lock, as another process's transaction holds it), and (PostgreSQL only) how long
    # any statement may run, before it fails UNAVAILABLE (0: no limit). Migrations run without either.
    database_lock_timeout_seconds: float = Field(
        5.0, ge=0, validation_alias=_env("SESSIOND_DATABASE_LOCK_TIMEOUT_SECONDS")
    )
    database_statement_timeout_seconds: float = Field(
        60.0, ge=0, validation_alias=_env("SESSIOND_DATABASE_STATEMENT_TIMEOUT_SECONDS")
    )
    # How long a group commit (appends, creates) may wait for more writes before it starts, which it does
    # only while the process is CPU-bound and several writers are under way (0: never wait). Larger
    # groups cost less per write (store.database.GroupSizer).
    database_write_linger_ms: float = Field(
        10.0, ge=0, le=100, validation_alias=_env("SESSIOND_DATABASE_WRITE_LINGER_MS")
    )
    # Linux: the event loop's thread and the SQLite writer's kept on one CPU (sessiond.affinity): auto (on
    # SQLite, the CPU the loop starts on), off, or a CPU number.
    cpu_affinity: CpuAffinity = Field("auto", validation_alias=_env("SESSIOND_CPU_AFFINITY"))
    migrate_on_start: bool = Field(True, validation_alias=_env("SESSIOND_MIGRATE_ON_START"))
    grace_seconds: float = Field(10.0, ge=0, validation_alias=_env("SESSIOND_GRACE_SECONDS"))
    log_level: LogLevel = Field("INFO", validation_alias=_env("SESSIOND_LOG_LEVEL"))
    # TLS on the gRPC port (sessiond.tls): PEM files of the certificate chain and its key, both or
    # neither; with a client CA, clients must present a certificate it signed (mutual TLS). Changed
    # files are served to new connections without a restart.
    tls_cert_file: str | None = Field(None, validation_alias=_env("SESSIOND_TLS_CERT_FILE"))
    tls_key_file: str | None = Field(None, validation_alias=_env("SESSIOND_TLS_KEY_FILE"))
    tls_client_ca_file: str | None = Field(None, validation_alias=_env("SESSIOND_TLS_CLIENT_CA_FILE"))
    # Traces (sessiond.tracing): "off", "otlp" (OTLP/gRPC, the OTEL_EXPORTER_OTLP_* variables) or "console".
    tracing: Literal["off", "otlp", "console"] = Field("off", validation_alias=_env("SESSIOND_TRACING"))
    # Prometheus metrics over HTTP (GET /metrics) on this host:port; empty: no metrics endpoint.
    metrics_listen: str = Field("", validation_alias=_env("SESSIOND_METRICS_LISTEN"))

    default_timeout_minutes: int = Field(30, ge=1, validation_alias=_env("SESSION_DEFAULT_TIMEOUT_MINUTES"))
    min_timeout_minutes: int = Field(5, ge=1, validation_alias=_env("SESSION_MIN_TIMEOUT_MINUTES"))
    max_timeout_minutes: int = Field(1440, ge=1, validation_alias=_env("SESSION_MAX_TIMEOUT_MINUTES"))
    max_duration_minutes: int = Field(720, ge=1, validation_alias=_env("SESSION_MAX_DURATION_MINUTES"))
    warning_threshold_minutes: int = Field(
        5, ge=1, validation_alias=_env("SESSION_WARNING_THRESHOLD_MINUTES")
    )
    cleanup_interval_minutes: int = Field(5, ge=1, validation_alias=_env("SESSION_CLEANUP_INTERVAL_MINUTES"))
    auto_renew: bool = Field(True, validation_alias=_env("SESSION_AUTO_RENEW"))
    # How long expired and ended sessions stay readable before the sweeper purges them (0: forever).
    retention_minutes: int = Field(7 * 24 * 60, ge=0, validation_alias=_env("SESSIOND_RETENTION_MINUTES"))
    # How often due expiry warnings and expiries are pushed (the purge runs every cleanup interval).
    notify_interval_seconds: float = Field(
        5.0, gt=0, validation_alias=_env("SESSIOND_NOTIFY_INTERVAL_SECONDS")
    )
    # Run the sweeper in this process (turn off where another process sweeps, or in tests that drive it).
    sweeper_enabled: bool = Field(True, validation_alias=_env("SESSIOND_SWEEPER"))
    # Live events buffered per watcher before it is cut off with WATCH_LAGGING and must resume.
    watch_buffer: int = Field(1024, ge=1, validation_alias=_env("SESSIOND_WATCH_BUFFER"))
    # How live events reach watchers: "local" (this process only) or "postgres" (LISTEN/NOTIFY, so that
    # a watcher on any replica sees every replica's changes live); "auto" picks postgres on PostgreSQL.
    event_bus: Literal["auto", "local", "postgres"] = Field(
        "auto", validation_alias=_env("SESSIOND_EVENT_BUS")
    )

    # TOML file declaring agents (see sessiond.agents_file), upserted at start.
    config_file: str | None = Field(None, validation_alias=_env("SESSIOND_CONFIG"))
    # How long a crashed process can keep a session's turn from others (renewed every fifth of it; a
    # StopTurn for a turn on another replica arrives with the next renewal).
    turn_lease_seconds: float = Field(15.0, gt=0, validation_alias=_env("SESSIOND_TURN_LEASE_SECONDS"))
    # Timeout of a chat-completions request whose agent sets none (time between streamed chunks).
    agent_http_timeout_seconds: float = Field(
        300.0, gt=0, validation_alias=_env("SESSIOND_AGENT_HTTP_TIMEOUT_SECONDS")
    )

    # The environment variables that agents created through the API may name as `api_key_env`, separated
    # by commas (agents declared in the config file may name any). Empty: none.
    agent_key_vars: str = Field("", validation_alias=_env("SESSIOND_AGENT_KEY_VARS"))

    max_batch_messages: int = Field(100, ge=1, validation_alias=_env("SESSIOND_MAX_BATCH_MESSAGES"))
    max_message_bytes: int = Field(1024 * 1024, ge=1024, validation_alias=_env("SESSIOND_MAX_MESSAGE_BYTES"))
    max_metadata_entries: int = Field(64, ge=0, validation_alias=_env("SESSIOND_MAX_METADATA_ENTRIES"))
    max_variables_bytes: int = Field(64 * 1024, ge=2, validation_alias=_env("SESSIOND_MAX_VARIABLES_BYTES"))

    def tls_files(self) -> TlsFiles | None:
        return TlsFiles.from_settings(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)

    def allowed_key_vars(self) -> frozenset[str]:
        return frozenset(name.strip() for name in self.agent_key_vars.split(",") if name.strip())

    def timeout_limits(self) -> TimeoutLimits:
        limits = TimeoutLimits(
            default_timeout_minutes=self.default_timeout_minutes,
            min_timeout_minutes=self.min_timeout_minutes,
            max_timeout_minutes=self.max_timeout_minutes,
            max_duration_minutes=self.max_duration_minutes,
            warning_threshold_minutes=self.warning_threshold_minutes,
            auto_renew=self.auto_renew,
        )
        limits.check()
        return limits

    def limits(self) -> Limits:
        return Limits(
            max_batch_messages=self.max_batch_messages,
            max_message_bytes=self.max_message_bytes,
            max_metadata_entries=self.max_metadata_entries,
            max_variables_bytes=self.max_variables_bytes,
        )
