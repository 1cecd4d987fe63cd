"""What the tests and the benchmarks share: the gateway as a child process and its read-outs.

One copy of each, so that a change to the gateway's start-up contract, its
``/metrics`` format or its config file is followed in one place:

* ``tests.support.gateway``: ``iot-gateway serve`` in a child process
  (``GatewayProcess``), and the ``Exit`` it leaves;
* ``tests.support.wait``: waiting for a condition, with a deadline and a
  message naming what was awaited (``wait_until``, ``wait_until_sync``);
* ``tests.support.metrics``: ``GET /metrics`` as numbers (``parse_metrics``);
* ``tests.support.toml_writer``: a config dict as a TOML file (``dumps``).

The benchmarks (``python -m benchmarks.X`` from the repository root) import
these too; nothing here imports pytest.
"""
