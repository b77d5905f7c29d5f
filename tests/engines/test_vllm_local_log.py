"""server/engines/vllm_local.route_vllm_log, without vLLM: in a child interpreter (it changes
process-wide state), records of the ``vllm`` logger and whatever a spawned process prints go
to the log file, while the process's own output stays on its console."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import logging, multiprocessing, os, sys
    from pathlib import Path
    from server.engines.vllm_local import route_vllm_log

    def child():
        print("printed by a spawned child", flush=True)
        print("child stderr", file=sys.stderr, flush=True)
        logging.getLogger("vllm.somewhere").warning("logged by vllm in a child")

    if __name__ == "__main__":
        logging.basicConfig(level="INFO")
        log_file = Path(sys.argv[1])
        route_vllm_log(log_file)
        logging.getLogger("vllm.engine").info("logged by vllm here")
        logging.getLogger("rapport").warning("logged by rapport here")
        print("printed here", flush=True)
        p = multiprocessing.get_context("spawn").Process(target=child)
        p.start()
        p.join(60)
        assert p.exitcode == 0, p.exitcode
        print(os.environ["VLLM_LOGGING_CONFIG_PATH"])
""")


def run(tmp_path: Path, *, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], Path]:
    script = tmp_path / "route.py"
    script.write_text(SCRIPT, encoding="utf-8")
    log_file = tmp_path / "logs" / "vllm.log"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    done = subprocess.run([sys.executable, str(script), str(log_file)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**base_env, "PYTHONPATH": str(ROOT), **(env or {})})
    assert done.returncode == 0, done.stderr
    return done, log_file


def test_vllm_output_goes_to_the_file_and_the_rest_to_the_console(tmp_path: Path) -> None:
    done, log_file = run(tmp_path)
    console = done.stdout + done.stderr
    kept = log_file.read_text(encoding="utf-8")
    for line in ("printed by a spawned child", "child stderr", "logged by vllm in a child", "logged by vllm here"):
        assert line in kept, line
        assert line not in console, line
    assert "printed here" in console and "logged by rapport here" in console
    config = json.loads(Path(done.stdout.strip().splitlines()[-1]).read_text(encoding="utf-8"))
    assert config["handlers"]["vllm_file"]["filename"] == str(log_file)


def test_an_operators_own_logging_config_is_kept(tmp_path: Path) -> None:
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"version": 1, "disable_existing_loggers": False}), encoding="utf-8")
    done, log_file = run(tmp_path, env={"VLLM_LOGGING_CONFIG_PATH": str(own)})
    assert done.stdout.strip().splitlines()[-1] == str(own)
    # The child processes' printed output still goes to the file.
    assert "printed by a spawned child" in log_file.read_text(encoding="utf-8")
