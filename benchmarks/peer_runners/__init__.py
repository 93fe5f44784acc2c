"""Runners of benchmarks.peers: one module per framework, each run as a subprocess.

``shardtune_runner`` runs in shardtune's ``.venv``; ``hf_trainer``, ``trl_runner`` and
``torchtune_runner`` run in the peer virtual environment that ``python -m benchmarks.peers --setup``
creates. The driver starts each as ``python -m benchmarks.peer_runners.<runner> SPEC.json`` in the
repository root (so ``benchmarks`` imports in either environment); each reads the spec (JSON),
trains on the batch plan the driver wrote, and prints one ``PEER_RESULT {json}`` line per mode.
"""
