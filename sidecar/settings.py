from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from sidecar._msgspec import describe
from sidecar.observe import tracing
from sidecar.usage.pricing import ModelPrice

DEFAULT_CONFIG = "config.toml"


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 33_554_432
    body_timeout_s: float = 30.0
    data_dir: str = ".sidecar"
    workers: int = 1
    keepalive_s: float = 75.0
    drain_s: float = 30.0
    metrics: bool = True  # serve GET /metrics (and count for it)
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = False  # one line per proxied request
    header_timeout_s: float = 10.0  # a connection's request headers must be in within this
    max_connections: int = 10_000  # open client connections; idle ones are closed first beyond it


class UpstreamSettings(_Section):
    url: str | None = None
    timeout_s: float = 600.0


class RedisSettings(_Section):
    url: str | None = None
    key_prefix: str = "sidecar"
    timeout_ms: int = 50
    on_error: Literal["allow", "deny"] = "allow"
    # Opened at start-up, before the server listens (per master of a cluster), so that a first
    # burst of up to this many concurrent requests opens none under load.
    warm_connections: int = 64


class AdminSettings(_Section):
    token: str | None = None
    hook_token: str | None = None
    # Failed admin sign-ins (API bearer, hooks, dashboard) one client address may make per
    # minute; beyond: 429 with retry-after.
    failed_auth_per_minute: int = 10


class MeteringSettings(_Section):
    extra_paths: list[str] = msgspec.field(default_factory=list)  # globs, metered as well
    other_paths: Literal["forward", "deny"] = "forward"  # a POST that is not metered
    spool_max_bytes: int = 1_073_741_824


class IdentitySettings(_Section):
    header: str = "X-ORQ-IDENTITY-ID"
    required: bool = False
    # Whose claims (body and header identities) are accepted: see docs/trust.md. None is the
    # default "any", not written: `serve` then refuses a non-loopback address (protected mode).
    trust: Literal["any", "keys"] | None = None
    trusted_networks: list[str] = msgspec.field(default_factory=list)  # CIDRs
    max_new_per_minute: int = 1000  # identities one key owner or client address may create
    user_fields: bool = False  # OpenAI's `user`, Anthropic's `metadata.user_id` as a source
    # How every incoming external id is normalized (identity.model.normalizer): "none",
    # "trim" (blanks around removed, runs inside made one space), "lower" (trim, then lower case).
    normalize: str = "none"  # checked against NORMALIZE (a clearer message than an enum's)

    @property
    def trust_mode(self) -> Literal["any", "keys"]:
        return self.trust or "any"


class ApiKeyOwner(_Section):
    sha256: str
    owner: str
    may_assert: list[str] = msgspec.field(default_factory=list)  # globs of external ids


class NotifierSettings(_Section):
    """Where budget alerts go (docs/budgets.md#notifiers)."""

    name: str
    url: str
    secret: str | None = None  # signs each body: x-sidecar-signature, hex HMAC-SHA256
    format: Literal["json", "slack"] = "json"


class PoliciesSettings(_Section):
    paths: list[str] = msgspec.field(default_factory=list)


class LimitsSettings(_Section):
    # Output tokens reserved for a request that names no cap of its own (see usage/estimate.py).
    default_output_reserve: int = 1024
    # A limited request that names no output cap is sent with one (the reserve): the estimate
    # is then an upper bound of its output, and concurrent requests cannot overshoot by more.
    cap_output: bool = True
    # Requests' worth of quota a process may hold ahead per limit (0: every limited request is
    # checked at Redis). See sidecar/quota/allowances.py and docs/policies.md.
    prefetch: int = 0
    # A request for a model the sidecar cannot price, when a cost limit applies to it: "allow"
    # (its cost counts as the upstream reports it, else 0) or "deny" (403 model_unpriced).
    unpriced: Literal["allow", "deny"] = "allow"
    # A request whose input its bytes do not carry (an image or file by URL or id, earlier
    # turns by previous_response_id, a hosted search tool), when a token or cost limit applies
    # to it: "allow" (as many at once as other limits let through) or "one_at_a_time" (one in
    # flight per identity; another is refused 429 while it runs).
    opaque_input: Literal["allow", "one_at_a_time"] = "allow"


class PricingSettings(_Section):
    models: dict[str, ModelPrice] = msgspec.field(default_factory=dict)


class TelemetrySettings(_Section):
    enabled: bool = False  # needs the `otel` extra
    endpoint: str = "http://127.0.0.1:4318/v1/traces"  # OTLP/HTTP (protobuf) traces URL
    service_name: str = "llm-sidecar"
    headers: dict[str, str] = msgspec.field(default_factory=dict)  # sent with every export
    sample_ratio: float = 1.0  # of traces the sidecar starts; a caller's sampled flag wins
    timeout_s: float = 10.0  # one export, retries included


class Settings(_Section):
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    upstream: UpstreamSettings = msgspec.field(default_factory=UpstreamSettings)
    redis: RedisSettings = msgspec.field(default_factory=RedisSettings)
    admin: AdminSettings = msgspec.field(default_factory=AdminSettings)
    metering: MeteringSettings = msgspec.field(default_factory=MeteringSettings)
    identity: IdentitySettings = msgspec.field(default_factory=IdentitySettings)
    api_keys: list[ApiKeyOwner] = msgspec.field(default_factory=list)
    notifiers: list[NotifierSettings] = msgspec.field(default_factory=list)
    policies: PoliciesSettings = msgspec.field(default_factory=PoliciesSettings)
    limits: LimitsSettings = msgspec.field(default_factory=LimitsSettings)
    pricing: PricingSettings = msgspec.field(default_factory=PricingSettings)
    telemetry: TelemetrySettings = msgspec.field(default_factory=TelemetrySettings)
    # Where the config came from; relative paths in it resolve against this folder.
    base_dir: str = "."
    source: str = "<defaults>"

    @property
    def data_path(self) -> Path:
        return resolve_path(self.base_dir, self.server.data_dir)


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_SECTIONS: dict[str, type[msgspec.Struct]] = {
    "server": ServerSettings,
    "upstream": UpstreamSettings,
    "redis": RedisSettings,
    "admin": AdminSettings,
    "metering": MeteringSettings,
    "identity": IdentitySettings,
    "policies": PoliciesSettings,
    "limits": LimitsSettings,
    "pricing": PricingSettings,
    "telemetry": TelemetrySettings,
}

_ENV: dict[str, tuple[str, str, type]] = {
    "SIDECAR_HOST": ("server", "host", str),
    "SIDECAR_PORT": ("server", "port", int),
    "SIDECAR_UPSTREAM_URL": ("upstream", "url", str),
    "SIDECAR_REDIS_URL": ("redis", "url", str),
    "SIDECAR_ADMIN_TOKEN": ("admin", "token", str),
    "SIDECAR_DATA_DIR": ("server", "data_dir", str),
    "SIDECAR_WORKERS": ("server", "workers", int),  # also `serve --workers N`
    # Comma-separated CIDRs: how a container image says whose identity claims it accepts.
    "SIDECAR_TRUSTED_NETWORKS": ("identity", "trusted_networks", list),
    "SIDECAR_TRUST": ("identity", "trust", str),
}

_SHA256 = re.compile(r"[0-9a-f]{64}")
NORMALIZE = ("none", "trim", "lower")
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# Arrays of tables, each item checked as the struct: [[api_keys]], [[notifiers]].
_TABLES: dict[str, type[msgspec.Struct]] = {"api_keys": ApiKeyOwner, "notifiers": NotifierSettings}
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an HTTP header name (RFC 9110 5.6.2)


def resolve_path(base_dir: str, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


def _where(prefix: str, err: msgspec.ValidationError) -> str:
    key, message = describe(err, prefix)
    if message == "unknown field":
        return f"{key}: unknown key"
    if message == "required field missing":
        return f"{key}: required key missing"
    return f"{key}: {message}"


def _check_values(s: Settings) -> list[str]:
    problems = []
    if s.identity.normalize not in NORMALIZE:
        problems.append(
            'identity.normalize: must be "none", "trim" or "lower" (see docs/configuration.md'
            f"#normalizing-external-ids), not {s.identity.normalize!r}"
        )
    if not 0 <= s.server.port <= 65535:
        problems.append("server.port: must be 0-65535")
    if s.server.max_body_bytes < 1024:
        problems.append("server.max_body_bytes: must be at least 1024")
    if not 0.1 <= s.server.body_timeout_s <= 3600:
        problems.append("server.body_timeout_s: must be between 0.1 and 3600")
    if s.server.workers < 1:
        problems.append("server.workers: must be at least 1")
    if not 1 <= s.server.keepalive_s <= 3600:
        problems.append("server.keepalive_s: must be between 1 and 3600")
    if not 0 <= s.server.drain_s <= 3600:
        problems.append("server.drain_s: must be between 0 and 3600")
    if s.upstream.url is not None and not re.match(r"https?://[^/]+", s.upstream.url):
        problems.append("upstream.url: must be an http:// or https:// URL")
    if s.upstream.timeout_s <= 0:
        problems.append("upstream.timeout_s: must be positive")
    if s.redis.url is not None:
        from sidecar.store.connect import SCHEMES

        scheme = s.redis.url.partition("://")[0]
        if scheme not in SCHEMES:
            problems.append(
                f"redis.url: scheme must be one of {', '.join(sorted(SCHEMES))}, not {scheme!r}"
            )
    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", s.redis.key_prefix):
        problems.append("redis.key_prefix: 1-64 of letters, digits, '_', '-', '.'")
    if not 1 <= s.redis.timeout_ms <= 60_000:
        problems.append("redis.timeout_ms: must be 1-60000")
    if not 0 <= s.redis.warm_connections <= 512:
        problems.append("redis.warm_connections: must be 0-512")
    for name, token in (("admin.token", s.admin.token), ("admin.hook_token", s.admin.hook_token)):
        if token is not None and len(token) < 16:
            problems.append(f"{name}: must be at least 16 characters")
    if not re.fullmatch(r"[A-Za-z0-9\-]{1,128}", s.identity.header):
        problems.append("identity.header: must be an HTTP header name")
    if s.metering.spool_max_bytes < 1_048_576:
        problems.append("metering.spool_max_bytes: must be at least 1048576 (1 MiB)")
    for path in s.metering.extra_paths:
        if not path.startswith("/"):
            problems.append(f"metering.extra_paths: {path!r} must start with '/'")
    if not 0.1 <= s.server.header_timeout_s <= 3600:
        problems.append("server.header_timeout_s: must be between 0.1 and 3600")
    if not 16 <= s.server.max_connections <= 1_000_000:
        problems.append("server.max_connections: must be 16-1000000")
    if not 1 <= s.admin.failed_auth_per_minute <= 1_000_000:
        problems.append("admin.failed_auth_per_minute: must be 1-1000000")
    if not 1 <= s.identity.max_new_per_minute <= 100_000_000:
        problems.append("identity.max_new_per_minute: must be 1-100000000")
    if not 0 <= s.limits.default_output_reserve <= 10_000_000:
        problems.append("limits.default_output_reserve: must be 0-10000000")
    if not 0 <= s.limits.prefetch <= 10_000:
        problems.append("limits.prefetch: must be 0-10000")
    for i, cidr in enumerate(s.identity.trusted_networks):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            problems.append(f"identity.trusted_networks[{i}]: {cidr!r} is not an address or CIDR")
    owners: set[str] = set()
    for i, key in enumerate(s.api_keys):
        if not _SHA256.fullmatch(key.sha256):
            problems.append(f"api_keys[{i}].sha256: must be 64 lowercase hex digits")
        elif key.sha256 in owners:
            problems.append(f"api_keys[{i}].sha256: listed twice")
        owners.add(key.sha256)
        if not key.owner.strip() or len(key.owner) > 255:
            problems.append(f"api_keys[{i}].owner: must be 1-255 characters")
        for j, glob in enumerate(key.may_assert):
            if not glob.strip() or len(glob) > 255:
                problems.append(f"api_keys[{i}].may_assert[{j}]: must be 1-255 characters")
    names: set[str] = set()
    for i, notifier in enumerate(s.notifiers):
        if not _NAME.fullmatch(notifier.name):
            problems.append(f"notifiers[{i}].name: 1-64 of letters, digits, '_', '-', '.'")
        elif notifier.name in names:
            problems.append(f"notifiers[{i}].name: {notifier.name!r} is listed twice")
        names.add(notifier.name)
        if not re.fullmatch(r"https?://[^/\s]+\S*", notifier.url) or len(notifier.url) > 2048:
            problems.append(f"notifiers[{i}].url: must be an http:// or https:// URL")
        if notifier.secret is not None and len(notifier.secret) < 16:
            problems.append(f"notifiers[{i}].secret: must be at least 16 characters")
    problems += _check_telemetry(s.telemetry)
    for model, price in s.pricing.models.items():
        for field in msgspec.structs.fields(price):
            value = getattr(price, field.name)
            if value is not None and value < 0:
                problems.append(f"pricing.models.{model}.{field.name}: must not be negative")
    return problems


def _check_telemetry(t: TelemetrySettings) -> list[str]:
    problems = []
    if not re.match(r"https?://[^/]+", t.endpoint):
        problems.append("telemetry.endpoint: must be an http:// or https:// URL")
    if not t.service_name.strip() or len(t.service_name) > 255:
        problems.append("telemetry.service_name: must be 1-255 characters")
    for name, value in t.headers.items():
        if not _TOKEN.fullmatch(name):
            problems.append(f"telemetry.headers: {name!r} is not an HTTP header name")
        elif not (value.isascii() and value.isprintable()):
            problems.append(f"telemetry.headers.{name}: must be printable ASCII on one line")
    if not 0 <= t.sample_ratio <= 1:
        problems.append("telemetry.sample_ratio: must be between 0 and 1")
    if not 0.1 <= t.timeout_s <= 300:
        problems.append("telemetry.timeout_s: must be between 0.1 and 300")
    if t.enabled and (missing := tracing.missing_extra()) is not None:
        problems.append(
            "telemetry.enabled: needs the `otel` extra, which is not installed (pip install "
            f"'llm-identity-sidecar[otel]'): no module {missing}"
        )
    return problems


def _unknown_keys(prefix: str, value: Any, struct: type[msgspec.Struct]) -> list[str]:
    """Every key the struct does not have, nested structs included; dropped from `value`."""
    if not isinstance(value, dict):
        return []
    problems = []
    for key in list(value):
        if key not in struct.__struct_fields__:
            problems.append(f"{prefix}.{key}: unknown key")
            del value[key]
        elif struct is PricingSettings and isinstance(value[key], dict):
            for name, price in value[key].items():
                problems += _unknown_keys(f"{prefix}.{key}.{name}", price, ModelPrice)
    return problems


def parse(raw: Mapping[str, Any], *, base_dir: str = ".") -> Settings:
    """Typed settings from a TOML mapping; every problem found is reported at once."""
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _TABLES:
            struct = _TABLES[key]
            if not isinstance(value, list):
                problems.append(f"{key}: expected an array of tables ([[{key}]])")
                continue
            items = []
            for i, item in enumerate(value):
                problems += _unknown_keys(f"{key}[{i}]", item, struct)
                try:
                    items.append(msgspec.convert(item, struct))
                except msgspec.ValidationError as exc:
                    problems.append(_where(f"{key}[{i}]", exc))
            sections[key] = items
        elif key in _SECTIONS:
            problems += _unknown_keys(key, value, _SECTIONS[key])
            try:
                sections[key] = msgspec.convert(value, _SECTIONS[key])
            except msgspec.ValidationError as exc:
                problems.append(_where(key, exc))
        else:
            problems.append(f"{key}: unknown key")
    if problems:
        raise ConfigError(problems)
    settings = Settings(**sections, base_dir=base_dir)
    problems = _check_values(settings)
    if problems:
        raise ConfigError(problems)
    return settings


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> list[str]:
    problems = []
    for var, (section, key, kind) in _ENV.items():
        if var not in env:
            continue
        value: Any = env[var]
        if kind is int:
            try:
                value = int(value)
            except ValueError:
                problems.append(f"{var}: expected an integer, got {env[var]!r}")
                continue
        elif kind is list:
            value = [part.strip() for part in value.split(",") if part.strip()]
        table = raw.setdefault(section, {})
        if isinstance(table, dict):
            table[key] = value
    return problems


def load(path: str | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Config file (explicit, $SIDECAR_CONFIG, ./config.toml, or none), then the environment."""
    env = os.environ if env is None else env
    path = path or env.get("SIDECAR_CONFIG")
    explicit = path is not None
    file = Path(path or DEFAULT_CONFIG)
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if explicit or file.exists():
        source = str(file)
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError([f"{file}: no such file"]) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{file}: cannot read: {exc}"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{file}: invalid TOML: {exc}"]) from None
    problems = _apply_env(raw, env)
    try:
        settings = parse(raw, base_dir=str(file.parent.resolve()) if explicit or raw else ".")
    except ConfigError as exc:
        problems += exc.problems
        settings = None
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    assert settings is not None
    return msgspec.structs.replace(settings, source=source)
