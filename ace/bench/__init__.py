"""Benchmarks users run on their own data: ``python -m ace.bench quality|efficiency ...``.

- ``quality``: caption-proxy protocol on any supported caption file; ACE, its ablations and the
  dual-tower baselines on the same split and item embeddings (ace/bench/quality.py).
- ``efficiency``: end-to-end throughput, latency and bytes per item of ACE vs dual-tower search
  at growing corpus sizes (ace/bench/efficiency.py).
"""
