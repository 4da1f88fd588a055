"""Server settings (pydantic-settings): keyword arguments / CLI flags > ``LORASAE_*`` env vars >
an optional TOML or JSON config file (``LORASAE_CONFIG`` or ``Settings.load(config=...)``) > defaults.
"""

from __future__ import annotations

import ipaddress
import os
from contextvars import ContextVar
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from lorasae.errors import LorasaeError
from lorasae.paths import data_dir

CONFIG_ENV = "LORASAE_CONFIG"
_config_file: ContextVar[Path | None] = ContextVar("lorasae_config_file", default=None)


class Settings(BaseSettings):
    """Everything the server needs; every field can be set as ``LORASAE_<FIELD>`` and as a
    `lorasae serve` flag (``lorasae.cliargs``: ``json_schema_extra`` names or hides the flag)."""

    model_config = SettingsConfigDict(env_prefix="LORASAE_", extra="ignore")

    model: str = Field("default", description="hub id, local HF dir or .gguf (default: embedded SmolLM2)")
    saes: list[str] = Field(
        default_factory=list,
        json_schema_extra={"flag": "--sae"},
        description="SAE to splice: sae-lens folder or release/sae_id (repeat; "
        "default: the default SAE of the default model)",
    )
    dashboards: list[str] = Field(
        default_factory=list,
        description="latent dashboard folder (`lorasae dashboards`) to serve (repeat); made with the "
        "loaded model and SAEs, else the server refuses to start",
    )
    drift: list[str] = Field(
        default_factory=list,
        description="latent drift report folder (`lorasae drift`) to serve (repeat); made with the "
        "loaded model and SAEs, else the server refuses to start",
    )
    device: str | None = Field(None, description="cuda / cpu (default: cuda if available)")
    dtype: str | None = Field(None, description="float32 / bfloat16 (default: bf16 on cuda, fp32 on cpu)")
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads (default: torch's); 1 avoids oversubscription on a busy CPU",
    )
    keep_first: bool = Field(
        True,
        json_schema_extra={"flag": "--splice-first"},
        description="also splice position 0 (BOS); by default it keeps its clean activation (as in training)",
    )
    adapter_root: Path | None = Field(
        None, description="adapters are registered from inside this folder (default: $LORASAE_HOME/adapters)"
    )
    db_path: Path | None = Field(
        None,
        json_schema_extra={"flag": "--db"},
        description="SQLite registry (default: <adapter_root>/registry.sqlite3)",
    )
    registry: str | None = Field(
        None,
        description="a PostgreSQL registry shared by several servers (postgresql://user@host/db; "
        "password from ~/.pgpass or PGPASSWORD, never on the command line); default: the SQLite --db",
    )
    registry_poll_s: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="how often a server sharing a PostgreSQL registry reads the others' changes",
    )
    max_loaded_adapters: int = Field(
        16,
        ge=1,
        description="adapters held in the model at once; the others load on first use and the least "
        "recently used one is evicted (also: most adapters mixed in one forward)",
    )
    max_cpu_adapters: int = Field(
        0, ge=0, description="evicted adapters kept in host memory (CPU tier) before falling back to disk"
    )
    api_key_env: str | None = Field(None, description="env var holding the admin bearer key")
    api_key: SecretStr | None = Field(
        None,
        json_schema_extra={"flag": None},  # never on a command line
        description="admin bearer key (prefer api_key_env)",
    )
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="port")
    max_tokens: int = Field(1024, ge=1, description="tokens per input sequence")
    max_inputs: int = Field(64, ge=1, description="input sequences per request")
    max_batch: int = Field(16, ge=1, description="sequences per forward (micro-batch)")
    max_batch_tokens: int = Field(8192, ge=1, description="padded tokens per forward")
    max_wait_ms: float = Field(5.0, ge=0, description="longest a request waits for a batch to fill")
    max_queue: int = Field(256, ge=1, description="queued sequences; past it requests get 429")
    max_new_tokens: int = Field(256, ge=1, description="tokens one generation may ask for")
    max_generations: int = Field(4, ge=1, description="generations running at once (each steps in turn)")
    max_generation_queue: int = Field(16, ge=0, description="generations waiting for a slot; then 429")
    max_full_logits: int = Field(4_000_000, ge=0, description="tokens x vocab per request for logits=full")
    max_response_entries: int = Field(
        2_000_000,
        ge=1,
        description="tokens x (top_k x SAEs + logits_top_k + requested latents) per request: "
        "bounds the answer's size",
    )
    max_upload_mb: float = Field(
        1024, gt=0, description="largest adapter archive accepted (compressed, and again unpacked)"
    )
    max_body_kb: int = Field(4096, ge=1, description="largest request body other than an upload")
    unpack_timeout_s: float = Field(30.0, gt=0, description="longest an archive may take to unpack")
    retry_after_s: int = Field(1, ge=1, description="Retry-After on 429/503")
    insecure_no_auth: bool = Field(
        False,
        description="allow binding a non-loopback address without "
        "an API key (anyone who reaches the port can register adapters)",
    )
    allowed_hosts: list[str] | None = Field(
        None,
        json_schema_extra={"flag": "--allowed-host"},
        description="Host header accepted (repeat; '*', "
        "'*.example.org'); default: loopback names when bound "
        "to loopback, else any",
    )
    max_connections: int = Field(
        256, ge=1, description="open connections + requests in flight; past it uvicorn answers 503"
    )
    header_timeout_s: float = Field(10.0, gt=0, description="time a client has to send its headers")
    body_timeout_s: float = Field(30.0, gt=0, description="longest pause while sending a body")
    keep_alive_s: int = Field(5, ge=1, description="idle keep-alive connections close after this")

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        if self.adapter_root is None:
            self.adapter_root = data_dir() / "adapters"
        self.adapter_root = Path(self.adapter_root).expanduser()
        if self.db_path is None:
            self.db_path = self.adapter_root / "registry.sqlite3"
        self.db_path = Path(self.db_path).expanduser()
        if self.registry is not None and not self.registry.startswith(("postgresql://", "postgres://")):
            raise ValueError("registry must be a postgresql:// URL (the SQLite registry is --db)")
        return self

    @property
    def shared_registry(self) -> bool:
        """Whether several servers share the registry (and the adapter root): PostgreSQL."""
        return self.registry is not None

    def is_loopback(self) -> bool:
        """Whether ``host`` only accepts connections from this machine."""
        if self.host.strip("[]").lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:  # a host name: it may resolve to anything
            return False

    def trusted_hosts(self) -> list[str]:
        """Host header patterns the server answers (DNS-rebinding guard)."""
        if self.allowed_hosts is not None:
            return self.allowed_hosts
        return ["localhost", "127.0.0.1", "::1", "*.localhost"] if self.is_loopback() else ["*"]

    def check_safe(self) -> str | None:
        """The admin key, after refusing an unauthenticated admin API on a reachable address (and
        a key variable that is unset)."""
        key = self.resolved_api_key()
        if key is None and not self.is_loopback() and not self.insecure_no_auth:
            raise LorasaeError(
                f"refusing to serve on {self.host} without an API key: anyone who "
                "reaches it could register and delete adapters. Set --api-key-env "
                "VAR (or LORASAE_API_KEY_ENV), bind 127.0.0.1, or pass "
                "--insecure-no-auth"
            )
        return key

    def resolved_api_key(self) -> str | None:
        """The admin key (never logged): from ``api_key`` or the env var named by ``api_key_env``."""
        if self.api_key is not None and self.api_key.get_secret_value():
            return self.api_key.get_secret_value()
        if self.api_key_env:
            value = os.environ.get(self.api_key_env)
            if not value:
                raise LorasaeError(
                    f"--api-key-env {self.api_key_env}: that environment variable is empty or unset"
                )
            return value
        return None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ):
        sources = [init_settings, env_settings]
        path = _config_file.get() or os.environ.get(CONFIG_ENV)
        if path:
            path = Path(path).expanduser()
            if not path.is_file():
                raise LorasaeError(f"config file not found: {path}")
            if path.suffix == ".json":
                sources.append(JsonConfigSettingsSource(settings_cls, json_file=path))
            else:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @classmethod
    def load(cls, config: str | Path | None = None, **overrides) -> Settings:
        """Settings from ``overrides`` (None values ignored), env vars, then the config file."""
        token = _config_file.set(Path(config) if config else None)
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        finally:
            _config_file.reset(token)
