"""Fuzzing the gateway end to end: whatever a client sends, the server keeps its contract.

A real ``rapport serve`` (simulated engine), real sockets, both subprotocols and
the OpenAI endpoint, driven by ``testkit.fuzzing`` (``bench/fuzz.py`` runs the
same generator for longer). Hypothesis draws one seed per example with
``derandomize``, so every run sends the same input and CI cannot flake on a
new draw; a failure names its seed, which ``random.Random(seed)`` replays.

The properties, for any sequence of frames: no ``error`` ``internal``, no
close 1011, only the close codes the contract gives for that input, an answer
to every socket the server keeps open, and a fresh honest client completing a
turn afterwards; over HTTP no 500 and an OpenAI-style JSON error for every
refusal. The fuzz server's frame rate is raised out of reach so the frames get
to the parsers; one test keeps the default rate and floods it.
"""

from __future__ import annotations

import asyncio
import random
import uuid

import httpx
import pytest
from conftest import JWT_SECRET, SIM_FLAGS, ServerProcess, make_token
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import close_codes
from testkit import fuzzing

FUZZ_FLAGS = [*SIM_FLAGS, "--sim-reply-tokens", "4", "--auth", "dev",
              "--frames-per-second", "1000000", "--frame-burst", "1000000"]

#: The server's defaults (server/config.py), which the flood test runs against.
DEFAULT_FRAME_BURST = 60

#: Example counts tuned so the whole module takes about 35 s on two cores (the
#: server's start included); bench/fuzz.py is the long run.
FUZZ_SETTINGS = settings(max_examples=50, derandomize=True, database=None, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow])
HTTP_FUZZ_SETTINGS = settings(FUZZ_SETTINGS, max_examples=30)
REQUESTS_PER_EXAMPLE = 5

SEEDS = st.integers(min_value=0, max_value=2**64 - 1)


@pytest.fixture(scope="module")
def fuzz_server(sim_prefix):
    server = ServerProcess(prefix=sim_prefix, extra=FUZZ_FLAGS).start()
    yield server
    server.stop()


async def _session_then_honest_turn(server: ServerProcess, plan: fuzzing.SessionPlan) -> list[str]:
    report = await fuzzing.run_session(server.ws_url, plan)
    problem = await fuzzing.honest_turn(server.ws_url, plan.subprotocol)
    return report.violations + ([problem] if problem else [])


@pytest.mark.parametrize("subprotocol", fuzzing.SUBPROTOCOLS)
@FUZZ_SETTINGS
@given(seed=SEEDS)
def test_fuzzed_frames_break_no_rule_of_the_contract(fuzz_server, subprotocol, seed):
    plan = fuzzing.session_plan(random.Random(seed), subprotocol=subprotocol, max_frames=25, jwt_secret=JWT_SECRET)
    violations = asyncio.run(_session_then_honest_turn(fuzz_server, plan))
    assert not violations, f"seed {seed} ({subprotocol}): {violations}"


async def _requests(server: ServerProcess, seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    violations: list[str] = []
    async with httpx.AsyncClient(timeout=30.0) as client:
        for _ in range(count):
            request = fuzzing.completion_request(rng, make_token("fuzz-http-" + uuid.uuid4().hex[:8]), JWT_SECRET)
            report = await fuzzing.send_request(client, server.base, request)
            violations += report.violations
    return violations


@HTTP_FUZZ_SETTINGS
@given(seed=SEEDS)
def test_fuzzed_completion_requests_never_answer_500(fuzz_server, seed):
    violations = asyncio.run(_requests(fuzz_server, seed, count=REQUESTS_PER_EXAMPLE))
    assert not violations, f"seed {seed}: {violations}"


def test_the_fuzzed_server_logged_no_traceback(fuzz_server):
    # Runs after the fuzz tests above (file order): an exception some task
    # swallowed without breaking a socket still shows in the log.
    assert fuzz_server.alive()
    log = fuzz_server.log(None)
    assert "Traceback" not in log, log[-5000:]


async def test_a_flood_at_the_default_frame_rate_is_rate_limited_then_closed(sim_server):
    # The shared server runs with the default --frame-burst 60 and --frames-per-second 20.
    rng = random.Random(20_240_601)
    user = "flood-" + uuid.uuid4().hex[:8]
    frames = []
    while len(frames) < 4 * DEFAULT_FRAME_BURST:
        frame = fuzzing.fuzz_frame(rng, fuzzing.JSON_SUBPROTOCOL, user=user)
        if not frame.fails_connection(fuzzing.DEFAULT_MAX_FRAME_BYTES):
            frames.append(frame)
    plan = fuzzing.SessionPlan(subprotocol=fuzzing.JSON_SUBPROTOCOL, user=user, hello_first=True,
                               frames=tuple(frames))
    report = await fuzzing.run_session(sim_server.ws_url, plan, flood_burst=DEFAULT_FRAME_BURST)
    assert not report.violations
    assert report.answers["error:rate_limited"] >= 1, report.answers
    assert report.close_code == close_codes.POLICY, report
    assert await fuzzing.honest_turn(sim_server.ws_url, fuzzing.JSON_SUBPROTOCOL) is None
