"""Settings from flags, RAPPORT_* variables and defaults (server/config.py)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from protocol.errors import RapportError
from server.config import (
    DEV_JWT_SECRET,
    ConfigError,
    Settings,
    add_arguments,
    env_name,
    is_loopback,
    settings_from,
)

SECRET = "s" * 48


def args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rapport")
    add_arguments(parser)
    return parser.parse_args(list(argv))


def load(*argv: str, **env: str) -> Settings:
    return settings_from(args(*argv), environ=dict(env))


def config_error(*argv: str, **env: str) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        load(*argv, **env)
    assert isinstance(exc.value, RapportError)
    return exc.value


# ---------------------------------------------------------------- defaults and names


def test_defaults_on_loopback() -> None:
    s = load()
    expected = Settings()
    for f in dataclasses.fields(Settings):
        if f.name != "jwt_secret":
            assert getattr(s, f.name) == getattr(expected, f.name), f.name
    assert s.host == "127.0.0.1"
    assert s.jwt_secret == DEV_JWT_SECRET  # filled in on loopback only
    assert s.max_history_turns == 16
    assert s.detached_grace_ms == 30_000
    assert s.heartbeat_interval_ms == 15_000 and s.heartbeat_timeout_ms == 45_000
    assert s.max_frame_bytes == 64 * 1024
    assert s.ttft_budget_ms == 2000


def test_settings_from_without_args_uses_the_given_environment() -> None:
    s = settings_from(None, environ={"RAPPORT_PORT": "9100"})
    assert s.port == 9100


def test_settings_from_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAPPORT_REDIS_PREFIX", "from-os:")
    assert settings_from(args()).redis_prefix == "from-os:"


def test_every_field_has_a_flag() -> None:
    ns = args()
    for f in dataclasses.fields(Settings):
        assert hasattr(ns, f.name)
        assert getattr(ns, f.name) is None  # unset flags leave room for env and default


@pytest.mark.parametrize(("name", "env"), [
    ("redis_url", "RAPPORT_REDIS_URL"),
    ("port", "RAPPORT_PORT"),
    ("jwt_secret", "RAPPORT_JWT_SECRET"),
    ("allowed_origins", "RAPPORT_ALLOWED_ORIGINS"),
])
def test_env_name(name: str, env: str) -> None:
    assert env_name(name) == env


# ---------------------------------------------------------------- precedence


def test_env_beats_default() -> None:
    s = load(RAPPORT_PORT="9001", RAPPORT_REDIS_URL="redis://r:6379/2", RAPPORT_SIM_TTFT_MS="12.5")
    assert s.port == 9001 and isinstance(s.port, int)
    assert s.redis_url == "redis://r:6379/2"
    assert s.sim_ttft_ms == 12.5 and isinstance(s.sim_ttft_ms, float)


def test_flag_beats_env() -> None:
    s = load("--port", "9002", "--redis-url", "redis://flag/0",
             RAPPORT_PORT="9001", RAPPORT_REDIS_URL="redis://env/0")
    assert s.port == 9002
    assert s.redis_url == "redis://flag/0"


def test_flag_equal_to_the_default_still_beats_env() -> None:
    s = load("--port", "8000", RAPPORT_PORT="9001")
    assert s.port == 8000


def test_flags_are_typed_like_the_field() -> None:
    s = load("--max-history-turns", "4", "--default-temperature", "0.2", "--sim-itl-ms", "3")
    assert s.max_history_turns == 4 and isinstance(s.max_history_turns, int)
    assert s.default_temperature == 0.2
    assert s.sim_itl_ms == 3.0 and isinstance(s.sim_itl_ms, float)


def test_unrelated_environment_is_ignored() -> None:
    s = load(PORT="1", RAPPORT="x", RAPPORT_NOT_A_SETTING="y", rapport_port="2")
    assert s.port == 8000


@pytest.mark.parametrize(("argv", "env"), [
    (["--port", "eighty"], {}),
    ([], {"RAPPORT_PORT": "eighty"}),
    ([], {"RAPPORT_PORT": ""}),
    ([], {"RAPPORT_PORT": "80.5"}),
    ([], {"RAPPORT_SIM_TTFT_MS": "fast"}),
    (["--max-input-chars", "1e3"], {}),
])
def test_values_of_the_wrong_type(argv: list[str], env: dict[str, str]) -> None:
    config_error(*argv, **env)


# ---------------------------------------------------------------- list fields


def test_upstream_flag_is_repeatable() -> None:
    s = load("--engine", "remote", "--upstream", "http://a:8000", "--upstream", "http://b:8000")
    assert s.upstream == ["http://a:8000", "http://b:8000"]


@pytest.mark.parametrize("value", [
    "http://a:8000,http://b:8000",
    "http://a:8000 http://b:8000",
    " http://a:8000 ,  http://b:8000 ,",
    "http://a:8000,,http://b:8000\n",
])
def test_upstream_env_is_comma_or_space_separated(value: str) -> None:
    s = load(RAPPORT_ENGINE="remote", RAPPORT_UPSTREAM=value)
    assert s.upstream == ["http://a:8000", "http://b:8000"]


def test_list_flag_beats_list_env() -> None:
    s = load("--upstream", "http://flag", RAPPORT_ENGINE="remote", RAPPORT_UPSTREAM="http://e1,http://e2")
    assert s.upstream == ["http://flag"]


def test_allowed_origin_flag_is_singular_and_repeatable() -> None:
    s = load("--allowed-origin", "https://a.example", "--allowed-origin", "https://b.example")
    assert s.allowed_origins == ["https://a.example", "https://b.example"]


def test_allowed_origins_env() -> None:
    s = load(RAPPORT_ALLOWED_ORIGINS="https://a.example https://b.example")
    assert s.allowed_origins == ["https://a.example", "https://b.example"]


def test_vllm_arg_is_repeatable() -> None:
    s = load("--vllm-arg", "enforce_eager=true", "--vllm-arg", "block_size=16")
    assert s.vllm_arg == ["enforce_eager=true", "block_size=16"]


def test_empty_list_env_gives_an_empty_list() -> None:
    assert load(RAPPORT_ALLOWED_ORIGINS="").allowed_origins == []
    assert load(RAPPORT_VLLM_ARG=" , ").vllm_arg == []


def test_list_defaults_are_not_shared() -> None:
    a, b = load(), load()
    a.upstream.append("x")
    assert b.upstream == [] and Settings().upstream == []


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
def test_dev_auth_off_loopback_is_refused(host: str) -> None:
    err = config_error("--auth", "dev", "--host", host)
    assert "loopback" in err.message
    config_error(RAPPORT_AUTH="dev", RAPPORT_HOST=host)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_dev_auth_on_loopback_is_allowed(host: str) -> None:
    s = load("--auth", "dev", "--host", host)
    assert s.auth == "dev"


@pytest.mark.parametrize("engine", ["gpt", "", "VLLM", "openai"])
def test_bad_engine(engine: str) -> None:
    config_error("--engine", engine)


@pytest.mark.parametrize("engine", ["vllm", "simulated"])
def test_good_engines(engine: str) -> None:
    assert load("--engine", engine).engine == engine


def test_bad_auth_mode() -> None:
    config_error("--auth", "basic")
    config_error(RAPPORT_AUTH="none")


def test_remote_engine_needs_an_upstream() -> None:
    err = config_error("--engine", "remote")
    assert "upstream" in err.message
    config_error("--engine", "remote", RAPPORT_UPSTREAM=" , ")
    assert load("--engine", "remote", "--upstream", "http://vllm:8000").upstream == ["http://vllm:8000"]


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5", "::", "rapport.internal"])
def test_jwt_without_secret_off_loopback_is_refused(host: str) -> None:
    err = config_error("--host", host)
    assert "secret" in err.message
    config_error("--host", host, "--jwt-secret", "")


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5"])
def test_jwt_with_secret_off_loopback(host: str) -> None:
    assert load("--host", host, "--jwt-secret", SECRET).jwt_secret == SECRET
    assert load(RAPPORT_HOST=host, RAPPORT_JWT_SECRET=SECRET).jwt_secret == SECRET


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "[::1]", "localhost"])
def test_jwt_without_secret_on_loopback_gets_the_dev_secret(host: str) -> None:
    assert load("--host", host).jwt_secret == DEV_JWT_SECRET


def test_configured_secret_is_kept_on_loopback() -> None:
    assert load("--jwt-secret", SECRET).jwt_secret == SECRET


def test_dev_auth_gets_no_dev_secret() -> None:
    assert load("--auth", "dev").jwt_secret == ""


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
def test_jwt_algorithm_none_is_refused(alg: str) -> None:
    config_error("--jwt-algorithm", alg)


def test_jwt_algorithm_is_configurable() -> None:
    assert load("--jwt-algorithm", "HS512").jwt_algorithm == "HS512"


@pytest.mark.parametrize(("argv", "env"), [
    (["--redis-prefix", ""], {}),
    ([], {"RAPPORT_REDIS_PREFIX": ""}),
    (["--max-history-turns", "-1"], {}),
    (["--heartbeat-interval-ms", "0"], {}),
    (["--heartbeat-timeout-ms", "-5"], {}),
])
def test_other_validation_errors(argv: list[str], env: dict[str, str]) -> None:
    config_error(*argv, **env)


def test_zero_history_turns_is_allowed() -> None:
    assert load("--max-history-turns", "0").max_history_turns == 0


def test_config_error_code() -> None:
    assert ConfigError("x").code == "internal"


# ---------------------------------------------------------------- is_loopback


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True),
    ("127.1.2.3", True),
    ("::1", True),
    ("[::1]", True),
    ("localhost", True),
    ("localhost.localdomain", True),
    ("0.0.0.0", False),
    ("::", False),
    ("[::]", False),
    ("10.0.0.1", False),
    ("192.168.0.1", False),
    ("8.8.8.8", False),
    ("2001:db8::1", False),
    ("example.com", False),
    ("localhost.example.com", False),
    ("127.0.0.1.nip.io", False),
    ("", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# ---------------------------------------------------------------- the JWT secret's strength


@pytest.mark.parametrize("secret", ["x", "short-secret", "s" * 31])
@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5"])
def test_a_short_jwt_secret_off_loopback_is_refused(secret: str, host: str) -> None:
    # RFC 7518 section 3.2: an HMAC key at least as long as the hash (32 bytes for HS256).
    err = config_error("--host", host, "--jwt-secret", secret)
    assert "--jwt-secret" in err.message and "32 bytes" in err.message
    config_error(RAPPORT_HOST=host, RAPPORT_JWT_SECRET=secret)


@pytest.mark.parametrize(("alg", "minimum"), [("HS256", 32), ("HS384", 48), ("HS512", 64)])
def test_the_minimum_secret_length_follows_the_hash(alg: str, minimum: int) -> None:
    assert load("--host", "0.0.0.0", "--jwt-algorithm", alg, "--jwt-secret", "k" * minimum).jwt_secret
    err = config_error("--host", "0.0.0.0", "--jwt-algorithm", alg, "--jwt-secret", "k" * (minimum - 1))
    assert f"{minimum} bytes" in err.message


def test_the_secret_length_counts_bytes() -> None:
    # 11 characters, 33 bytes in UTF-8.
    assert load("--host", "0.0.0.0", "--jwt-secret", "秘" * 11).jwt_secret == "秘" * 11


def test_the_public_development_secret_is_refused_off_loopback() -> None:
    err = config_error("--host", "0.0.0.0", "--jwt-secret", DEV_JWT_SECRET)
    assert "development" in err.message


def test_a_short_secret_is_still_allowed_on_loopback() -> None:
    assert load("--jwt-secret", "x").jwt_secret == "x"


# ---------------------------------------------------------------- limits on unauthenticated clients


def test_hardening_defaults() -> None:
    s = load()
    assert s.request_header_timeout_ms == 10_000
    assert s.request_body_timeout_ms == 30_000
    assert s.max_unauthenticated_connections == 0  # a share of the descriptor limit
    assert s.outbox_max_bytes == 8 * 1024 * 1024
    assert s.frames_per_second == 20.0
    assert s.frame_burst == 60


def test_hardening_flags_and_env() -> None:
    s = load("--request-header-timeout-ms", "500", "--max-unauthenticated-connections", "64",
             "--outbox-max-bytes", "1048576", "--frames-per-second", "2.5",
             RAPPORT_REQUEST_BODY_TIMEOUT_MS="700", RAPPORT_FRAME_BURST="10")
    assert (s.request_header_timeout_ms, s.request_body_timeout_ms) == (500, 700)
    assert s.max_unauthenticated_connections == 64
    assert s.outbox_max_bytes == 1_048_576
    assert (s.frames_per_second, s.frame_burst) == (2.5, 10)


@pytest.mark.parametrize("argv", [
    ["--request-header-timeout-ms", "0"],
    ["--request-body-timeout-ms", "-1"],
    ["--max-unauthenticated-connections", "-1"],
    ["--outbox-max-bytes", "1000"],
    ["--frames-per-second", "0"],
    ["--frame-burst", "0"],
    ["--outbox-max-frames", "0"],
])
def test_hardening_values_are_validated(argv: list[str]) -> None:
    config_error(*argv)
