"""Server configuration: one dataclass, filled from flags and ``RAPPORT_*`` variables.

Precedence: a command-line flag, then the environment variable
``RAPPORT_<FLAG>`` (``--redis-url`` -> ``RAPPORT_REDIS_URL``), then the default.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass, field, fields
from urllib.parse import urlsplit

# DEV_JWT_SECRET is used only when no secret is configured and the server
# listens on loopback, so that `make run` works out of the box.
from protocol.development import DEV_JWT_SECRET
from protocol.errors import RapportError
from protocol.webhook_signature import DEVELOPMENT_SECRET as DEV_WEBHOOK_SECRET

from .identity import ASYMMETRIC_ALGORITHMS

DEFAULT_SYSTEM_PROMPT = (
    "You are a warm, attentive companion. Keep replies short and natural, "
    "remember what the user told you, and ask a caring follow-up question."
)


class ConfigError(RapportError):
    code = "internal"


#: RFC 7518 section 3.2: "A key of the same size as the hash output (for
#: instance, 256 bits for HS256) or larger MUST be used with this algorithm."
HMAC_MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}

#: The smallest outbox byte bound accepted: below it ordinary history answers
#: would count as a stuck socket.
MIN_OUTBOX_BYTES = 64 * 1024


@dataclass(slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    # gateway processes on the port ("auto": one per usable core); server.workers
    workers: str = "1"
    engine: str = "vllm"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "rapport:"
    auth: str = "jwt"
    jwt_secret: str = ""
    jwt_algorithm: str = "HS256"
    # identity providers, roles and the audit log
    jwt_algorithms: list[str] = field(default_factory=list)
    jwks_url: str = ""
    jwt_issuer: str = ""
    jwt_audience: list[str] = field(default_factory=list)
    jwt_leeway_s: float = 30.0
    jwks_refresh_s: float = 600.0
    jwks_min_refetch_s: float = 30.0
    roles_claim: str = "roles"
    audit_retention_days: float = 90.0
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_history_turns: int = 16
    # conversation memory: trimmed turns folded into a running summary (server.summaries)
    memory_summaries: bool = True
    summary_instructions: str = ""
    summary_max_tokens: int = 200
    allowed_origins: list[str] = field(default_factory=list)
    # limits
    max_frame_bytes: int = 64 * 1024
    max_input_chars: int = 4000
    turns_per_minute: int = 30
    max_connections_per_user: int = 8
    outbox_max_frames: int = 2048
    outbox_max_bytes: int = 8 * 1024 * 1024
    stuck_timeout_ms: int = 10_000
    frames_per_second: float = 20.0
    frame_burst: int = 60
    # clients that have not authenticated yet
    request_header_timeout_ms: int = 10_000
    request_body_timeout_ms: int = 30_000
    max_unauthenticated_connections: int = 0
    socket_send_buffer: int = 65_536
    # heartbeats and grace periods
    heartbeat_interval_ms: int = 15_000
    heartbeat_timeout_ms: int = 45_000
    hello_timeout_ms: int = 5_000
    detached_grace_ms: int = 30_000
    lease_ms: int = 10_000
    shutdown_drain_s: float = 10.0
    delta_log_ttl_s: int = 600
    idempotency_ttl_s: int = 86_400
    # latency budget
    ttft_budget_ms: int = 2000
    hard_deadline_ms: int = 10_000
    # sampling bounds: the server clamps what clients ask for
    default_max_tokens: int = 256
    max_tokens_limit: int = 1024
    default_temperature: float = 0.7
    # moderation (server.moderation): a list file and/or a module:callable policy
    moderation_list: str = ""
    moderation: str = ""
    # simulated engine (a timing simulation, not a model)
    sim_ttft_ms: float = 40.0
    sim_itl_ms: float = 20.0
    sim_max_num_seqs: int = 256
    sim_reply_tokens: int = 0
    sim_echo: bool = False
    # vLLM
    model: str = ""
    max_model_len: int = 0
    dtype: str = "auto"
    vllm_arg: list[str] = field(default_factory=list)
    # LoRA adapters (characters name them): peft folders in lora_dir, by name
    lora_dir: str = ""
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16
    # where vLLM's own log goes unless --log-level debug
    vllm_log: str = ""
    # remote engine
    upstream: list[str] = field(default_factory=list)
    # push on detached completion (server.webhooks, docs/protocol.md addition 23)
    webhook_url: str = ""
    webhook_secret: str = ""
    webhook_timeout_s: float = 5.0
    log_level: str = "info"

    def worker_count(self) -> int:
        """``--workers`` as a number: ``auto`` is one per core this process may run on."""
        if self.workers.strip().lower() == "auto":
            return max(1, len(os.sched_getaffinity(0)))
        try:
            count = int(self.workers)
        except ValueError:
            raise ConfigError(f"--workers must be a number or auto, not {self.workers!r}") from None
        if count < 1:
            raise ConfigError("--workers must be at least 1")
        return count

    def validate(self) -> None:
        if self.engine not in ("vllm", "remote", "simulated"):
            raise ConfigError(f"--engine must be vllm, remote or simulated, not {self.engine!r}")
        if self.auth not in ("jwt", "dev"):
            raise ConfigError(f"--auth must be jwt or dev, not {self.auth!r}")
        if self.auth == "dev" and not is_loopback(self.host):
            raise ConfigError(
                "--auth dev trusts any user name and is only allowed while listening on "
                f"loopback; --host is {self.host}"
            )
        self._validate_identity()
        if self.auth == "jwt" and not self.jwt_secret and not self.jwks_url:
            if not is_loopback(self.host):
                raise ConfigError("--jwt-secret (or RAPPORT_JWT_SECRET) is required off loopback")
            self.jwt_secret = DEV_JWT_SECRET
        if self.jwt_algorithm.lower() == "none" or not self.jwt_algorithm:
            raise ConfigError("the JWT algorithm must be pinned to a real algorithm, never 'none'")
        if self.auth == "jwt" and self.jwt_secret == DEV_JWT_SECRET and not is_loopback(self.host):
            raise ConfigError("the built-in development JWT secret is public; set your own --jwt-secret off loopback")
        minimum = max((HMAC_MIN_SECRET_BYTES.get(a.upper(), 0) for a in self.accepted_jwt_algorithms()),
                      default=0) if not self.jwks_url else 0
        secret_bytes = len(self.jwt_secret.encode("utf-8"))
        if self.auth == "jwt" and minimum and secret_bytes < minimum and not is_loopback(self.host):
            # RFC 7518 section 3.2: an HMAC key at least as long as the hash output.
            # Anyone who guesses a short secret can mint tokens for every user.
            raise ConfigError(
                f"--jwt-secret (or RAPPORT_JWT_SECRET) must be at least {minimum} bytes for "
                f"{'/'.join(self.accepted_jwt_algorithms())} off loopback (RFC 7518 section 3.2); "
                f"it is {secret_bytes} bytes. "
                "Generate one with: python -c 'import secrets; print(secrets.token_urlsafe(48))'"
            )
        if not self.redis_prefix:
            raise ConfigError("--redis-prefix must not be empty")
        from .redis_clients import RedisUrlError, parse_redis_url

        try:
            parse_redis_url(self.redis_url)  # one server, or a cluster with redis+cluster://
        except RedisUrlError as exc:
            raise ConfigError(exc.message) from None  # one line, not a traceback
        self.worker_count()  # refuses a bad --workers
        if self.max_history_turns < 0:
            raise ConfigError("--max-history-turns must be >= 0")
        if self.summary_max_tokens < 1:
            raise ConfigError("--summary-max-tokens must be at least 1")
        if self.heartbeat_interval_ms <= 0 or self.heartbeat_timeout_ms <= 0:
            raise ConfigError("heartbeat intervals must be positive")
        if self.max_loras < 1:
            raise ConfigError("--max-loras must be at least 1")
        if self.max_lora_rank not in (1, 8, 16, 32, 64, 128, 256, 320, 512):
            raise ConfigError("--max-lora-rank must be one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (vLLM's choices)")
        if self.engine == "remote" and not self.upstream:
            raise ConfigError("--engine remote needs at least one --upstream URL")
        if self.request_header_timeout_ms <= 0 or self.request_body_timeout_ms <= 0:
            raise ConfigError("--request-header-timeout-ms and --request-body-timeout-ms must be positive")
        if self.max_unauthenticated_connections < 0:
            raise ConfigError("--max-unauthenticated-connections must be >= 0 (0: a share of the descriptor limit)")
        if self.outbox_max_frames < 1:
            raise ConfigError("--outbox-max-frames must be at least 1")
        if self.outbox_max_bytes < MIN_OUTBOX_BYTES:
            raise ConfigError(f"--outbox-max-bytes must be at least {MIN_OUTBOX_BYTES}")
        if not self.frames_per_second > 0:
            raise ConfigError("--frames-per-second must be positive")
        if self.frame_burst < 1:
            raise ConfigError("--frame-burst must be at least 1")
        if self.moderation_list or self.moderation:
            # Loaded now, so a bad list or callable stops the server at start.
            from . import moderation

            try:
                moderation.load(self)
            except RapportError as exc:
                raise ConfigError(exc.message) from None
        if not self.audit_retention_days > 0:
            raise ConfigError("--audit-retention-days must be positive")
        self._validate_webhooks()

    def _validate_webhooks(self) -> None:
        """--webhook-url, --webhook-secret, --webhook-timeout-s (docs/protocol.md addition 23).

        Without a secret nothing is signed, so nothing is sent: off loopback that
        turns webhooks off (and --webhook-url is refused); on loopback a public
        development secret stands in (:meth:`webhook_signing_secret`), as for JWTs.
        """
        loopback = is_loopback(self.host)
        if self.webhook_secret and not loopback:
            if self.webhook_secret == DEV_WEBHOOK_SECRET:
                raise ConfigError("the built-in development webhook secret is public; set your own "
                                  "--webhook-secret off loopback")
            if len(self.webhook_secret.encode("utf-8")) < 32:
                # As for HS256 (RFC 2104 section 3): a key shorter than the hash weakens the MAC.
                raise ConfigError("--webhook-secret must be at least 32 bytes off loopback")
        if self.webhook_url:
            if not self.webhook_signing_secret():
                raise ConfigError("--webhook-url needs --webhook-secret (or RAPPORT_WEBHOOK_SECRET) off loopback")
            try:
                url = urlsplit(self.webhook_url)
                host = url.hostname or ""
            except ValueError:
                raise ConfigError(f"--webhook-url is not a valid URL: {self.webhook_url!r}") from None
            if not host or (url.scheme != "https" and not (url.scheme == "http" and is_loopback(host))):
                raise ConfigError("--webhook-url must be an https:// URL (http:// only on loopback), "
                                  f"not {self.webhook_url!r}")
            if url.username is not None or url.password is not None:
                raise ConfigError("--webhook-url must not carry credentials; receivers check the signature")
        if not 0 < self.webhook_timeout_s <= 60:
            raise ConfigError("--webhook-timeout-s must be between 0 and 60 seconds")

    def webhook_signing_secret(self) -> str:
        """``--webhook-secret``, else on loopback the public development one, else "" (webhooks off)."""
        if self.webhook_secret:
            return self.webhook_secret
        return DEV_WEBHOOK_SECRET if is_loopback(self.host) else ""

    def accepted_jwt_algorithms(self) -> list[str]:
        """``--jwt-algorithms``, or its default: RS256 with ``--jwks-url``, else ``--jwt-algorithm``."""
        if self.jwt_algorithms:
            return list(self.jwt_algorithms)
        return ["RS256"] if self.jwks_url else [self.jwt_algorithm.upper()]

    def _validate_identity(self) -> None:
        """The accepted algorithms, the identity provider's URL, issuer, audience and roles claim."""
        self.jwt_algorithms = _split(self.jwt_algorithms)
        self.jwt_audience = _split(self.jwt_audience)
        if not self.jwt_algorithm or any(a.lower() == "none" for a in [self.jwt_algorithm, *self.jwt_algorithms]):
            raise ConfigError("the JWT algorithm must be pinned to a real algorithm, never 'none'")
        if self.jwks_url:
            url = urlsplit(self.jwks_url)
            if url.scheme != "https" and not (url.scheme == "http" and is_loopback(url.hostname or "")):
                raise ConfigError("--jwks-url must be an https:// URL (http:// only on loopback), "
                                  f"not {self.jwks_url!r}")
            wrong = [a for a in self.accepted_jwt_algorithms() if a not in ASYMMETRIC_ALGORITHMS]
            if wrong:
                # RFC 8725 section 2.1: a public key must never be usable as an HMAC secret.
                raise ConfigError(
                    f"--jwt-algorithms with --jwks-url takes public-key algorithms only "
                    f"({', '.join(sorted(ASYMMETRIC_ALGORITHMS))}), not {', '.join(wrong)}")
            if not is_loopback(self.host) and (not self.jwt_issuer or not self.jwt_audience):
                # A provider's JWK Set signs tokens for every application it serves
                # (Firebase: every project): without iss and aud any of them would do.
                raise ConfigError("--jwks-url needs --jwt-issuer and --jwt-audience off loopback "
                                  "(otherwise tokens the provider issued for other applications are accepted)")
        else:
            self.jwt_algorithms = [a.upper() for a in self.jwt_algorithms]
            wrong = [a for a in self.accepted_jwt_algorithms() if a not in HMAC_MIN_SECRET_BYTES]
            if wrong:
                raise ConfigError(f"{', '.join(wrong)} needs the identity provider's keys: set --jwks-url "
                                  "(without it only HS256, HS384 and HS512 with --jwt-secret are possible)")
        if not 0 <= self.jwt_leeway_s <= 300:
            raise ConfigError("--jwt-leeway-s must be between 0 and 300 seconds")
        if not self.jwks_refresh_s > 0 or not self.jwks_min_refetch_s > 0:
            raise ConfigError("--jwks-refresh-s and --jwks-min-refetch-s must be positive")
        if not self.roles_claim.strip():
            raise ConfigError("--roles-claim must name a claim")


def _split(items: list[str]) -> list[str]:
    """Repeated flags and comma-separated values alike: ``["RS256,ES256", "EdDSA"]``."""
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_HELP: dict[str, str] = {
    "host": "address to listen on",
    "port": "port to listen on",
    "engine": "vllm (in-process), remote (OpenAI-compatible vLLM servers) or simulated (a timing simulation, no model)",
    "redis_url": "Redis holding conversations, turns and delta logs (redis+cluster://host:port: a Redis Cluster)",
    "redis_prefix": "every Redis key the server writes starts with this",
    "auth": "jwt (Bearer tokens) or dev (trust hello.user; loopback only)",
    "jwt_secret": "HMAC secret for JWTs, at least as long as the hash off loopback (32 bytes for HS256); "
                  "a built-in development secret is used on loopback if empty",
    "jwt_algorithm": "the HMAC algorithm of --jwt-secret (the only one accepted unless --jwt-algorithms says more)",
    "jwt_algorithms": "accepted JWT algorithms, comma-separated or repeated (default: RS256 with --jwks-url, "
                      "else --jwt-algorithm); never none, and public-key ones only with --jwks-url",
    "jwks_url": "the identity provider's JWK Set URL (https); tokens are then verified with its public keys",
    "jwt_issuer": "the required iss claim (the identity provider's issuer URL)",
    "jwt_audience": "an accepted aud claim (repeatable; required with --jwks-url off loopback)",
    "jwt_leeway_s": "clock skew allowed on exp and nbf, in seconds",
    "jwks_refresh_s": "refetch the JWK Set this often (keys published ahead of a rotation)",
    "jwks_min_refetch_s": "a token with an unknown kid refetches the JWK Set at most this often",
    "roles_claim": "the claim listing the caller's roles (operator, admin); a dotted path such as "
                   "realm_access.roles also works",
    "audit_retention_days": "audit log entries older than this are trimmed",
    "workers": "gateway processes sharing the port and Redis (auto: one per core); with --engine vllm "
               "and more than one, they share one vLLM OpenAI server started as a child",
    "system_prompt": "system prompt placed before every conversation",
    "max_history_turns": "past turns the model sees at most",
    "memory_summaries": "fold the turns the prompt window trims into a running summary of the conversation, "
                        "shown after the system prompt (a background request at low priority)",
    "summary_instructions": "instructions for summarising (default: a built-in prompt asking for names, "
                            "relationships, facts, feelings and promises; {max_words} is the length bound)",
    "summary_max_tokens": "the longest conversation summary, in tokens",
    "allowed_origins": "browser Origin allowed to open the WebSocket (repeatable; same-origin always allowed)",
    "max_frame_bytes": "largest client frame; larger ones close the socket with 1009",
    "max_input_chars": "longest turn.start text",
    "turns_per_minute": "turns a user may start per minute",
    "max_connections_per_user": "open WebSockets a user may hold",
    "outbox_max_frames": "frames queued for one socket before it counts as stuck and is closed",
    "outbox_max_bytes": "bytes of frames queued for one socket before it counts as stuck and is closed with 1008",
    "frames_per_second": "client frames one socket may send per second, on average (a token bucket); "
                         "over it the client hears rate_limited",
    "frame_burst": "client frames one socket may send at once; a socket that sends this many more while "
                   "rate limited is closed with 1008",
    "request_header_timeout_ms": "a connection must complete its request headers within this time of "
                                 "connecting (or of starting its next request), else 408 and close",
    "request_body_timeout_ms": "a request body must arrive within this time of its headers, else 408 and close",
    "max_unauthenticated_connections": "connections per process not yet authenticated (before their request "
                                       "or hello); over it the oldest is closed (0: a quarter of the "
                                       "file-descriptor limit)",
    "socket_send_buffer": "kernel send buffer per socket in bytes (0: the OS default); keeps a lagging "
                          "phone's backlog where it can be merged",
    "stuck_timeout_ms": "close a socket whose queued frames have not moved for this long",
    "heartbeat_interval_ms": "server ping interval",
    "heartbeat_timeout_ms": "close with 4408 after this much client silence",
    "hello_timeout_ms": "close with 4401 without valid credentials within this time",
    "detached_grace_ms": "how long a turn keeps generating after its last socket dropped",
    "lease_ms": "a running turn's lease; another process ends it interrupted if its owner stops renewing",
    "shutdown_drain_s": "on SIGTERM, how long running turns may finish before they are ended interrupted",
    "delta_log_ttl_s": "how long a turn's delta log is kept after it ends",
    "idempotency_ttl_s": "how long client_turn_id keys and turn records are kept",
    "ttft_budget_ms": "first-token budget: turns that would miss it are refused with busy",
    "hard_deadline_ms": "a turn without a first token after this ends budget_exceeded",
    "default_max_tokens": "reply length when the client does not ask",
    "max_tokens_limit": "the largest max_tokens a client may ask for",
    "default_temperature": "sampling temperature when the client does not ask",
    "moderation_list": "block list file: one term a line, 're:' for a pattern with a bounded match, "
                       "'#' comments, 'input:' or 'output:' for one direction (docs/protocol.md)",
    "moderation": "a moderation policy as module:callable, returning an object with input_blocked(text) "
                  "and output_filter()",
    "sim_ttft_ms": "simulated engine: time to first token alone",
    "sim_itl_ms": "simulated engine: time per decode step",
    "sim_max_num_seqs": "simulated engine: batch capacity",
    "sim_reply_tokens": "simulated engine: fixed reply length (0: varies)",
    "sim_echo": "simulated engine: begin each reply by repeating the user's message (for tests)",
    "model": "model folder or name for --engine vllm (default: the small CPU model prepared by the project)",
    "max_model_len": "context window for vLLM (0: the model's own)",
    "dtype": "vLLM dtype (auto, float32, bfloat16, ...)",
    "vllm_arg": "any further vLLM engine argument as KEY=VALUE (repeatable)",
    "lora_dir": "folder of LoRA adapters for --engine vllm, one peft folder per adapter name "
                "(default: $RAPPORT_CACHE_DIR/loras); LoRA is enabled when it holds any",
    "enable_lora": "enable vLLM's LoRA support even when --lora-dir holds no adapter yet "
                   "(adapters added later are then served without a restart; costs memory)",
    "max_loras": "LoRA adapters vLLM runs in one batch at most",
    "max_lora_rank": "the largest LoRA rank vLLM accepts (1, 8, 16, 32, 64, 128, 256, 320 or 512)",
    "vllm_log": "file for vLLM's own log (its configuration dump, start-up and exit messages) with "
                "--engine vllm, unless --log-level debug (default: $RAPPORT_CACHE_DIR/logs/vllm.log)",
    "upstream": "an OpenAI-compatible vLLM server base URL for --engine remote (repeatable)",
    "webhook_url": "POST a signed turn.completed event here when a reply ends with no socket following it "
                   "(https; a user's own PUT /v1/users/me/webhook takes precedence)",
    "webhook_secret": "HMAC-SHA256 secret signing webhook events (Rapport-Signature: t=...,v1=...); at least "
                      "32 bytes, required for webhooks off loopback (a public development secret on loopback)",
    "webhook_timeout_s": "how long one webhook attempt may take before it counts as failed and is retried",
    "log_level": "uvicorn log level",
}

_LIST_FIELDS = {"allowed_origins", "vllm_arg", "upstream", "jwt_algorithms", "jwt_audience"}


def env_name(field_name: str) -> str:
    return "RAPPORT_" + field_name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; the environment supplies defaults."""
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{_HELP.get(f.name, '')} (env {env_name(f.name)})"
        if f.name in _LIST_FIELDS:
            parser.add_argument(flag.removesuffix("s") if f.name == "allowed_origins" else flag,
                                dest=f.name, action="append", default=None, help=help_text)
        elif isinstance(getattr(Settings(), f.name), bool):
            parser.add_argument(flag, dest=f.name, action="store_const", const="true", default=None,
                                help=help_text)
            if getattr(Settings(), f.name):  # on by default: --no-<flag> turns it off
                parser.add_argument("--no-" + flag.removeprefix("--"), dest=f.name, action="store_const",
                                    const="false", default=None, help=f"turn {flag} off")
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_text)


def settings_from(args: argparse.Namespace | None = None, environ: dict[str, str] | None = None) -> Settings:
    environ = dict(os.environ) if environ is None else environ
    base = Settings()
    values: dict[str, object] = {}
    for f in fields(Settings):
        raw = getattr(args, f.name, None) if args is not None else None
        if raw is None and env_name(f.name) in environ:
            raw = environ[env_name(f.name)]
            if f.name in _LIST_FIELDS:
                raw = [item for item in raw.replace(",", " ").split() if item]
        if raw is None:
            continue
        default = getattr(base, f.name)
        try:
            if f.name in _LIST_FIELDS:
                values[f.name] = list(raw)
            elif isinstance(default, bool):
                values[f.name] = str(raw).lower() in ("1", "true", "yes", "on")
            elif isinstance(default, int):
                values[f.name] = int(raw)
            elif isinstance(default, float):
                values[f.name] = float(raw)
            else:
                values[f.name] = str(raw)
        except ValueError:
            raise ConfigError(f"{f.name}: {raw!r} is not a valid {type(default).__name__}") from None
    settings = Settings(**values)  # type: ignore[arg-type]
    settings.validate()
    return settings
