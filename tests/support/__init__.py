"""Shared test helpers, imported qualified (``from tests.support.testdata import ...``) so collection works
in every pytest import mode. ``models`` is the micro-model registry; the fakes (TensorRT bindings and
recorders, pipeline stages, bench reports, Triton repositories) and the test data live beside it.
Scripts a test runs in a subprocess (``tests/engines/contract_harness.py``, ``tests/triton/ensemble_sim.py``)
stay beside the tests that run them."""
