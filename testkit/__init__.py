"""What the test suite and the scripts under bench/ share to run Rapport for real.

Not shipped with the package: tests find it through pytest's ``pythonpath``,
bench scripts through the repository root they put on ``sys.path``. It stands
above every shipped package (it may import clients, server, protocol) and
none of them imports it.

* :mod:`testkit.ports`: a free loopback port;
* :mod:`testkit.servers`: ``rapport serve`` and vLLM's own OpenAI server as
  child processes in their own process groups, ready once their health URL
  answers, and several gateways sharing one Redis key prefix;
* :mod:`testkit.redis_prefix`: deleting every key under a prefix;
* :mod:`testkit.redis_server`: a private ``redis-server`` to stop, pause or kill;
* :mod:`testkit.procstats`: a process's RSS, CPU time and open fds from /proc;
* :mod:`testkit.metrics`: a server's Prometheus samples, parsed.
* :mod:`testkit.fuzzing`: seeded generators of hostile frames and requests
  for the fuzz test and ``bench/fuzz.py``.
"""
