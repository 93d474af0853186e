"""pdserve: disaggregated prefill/decode LLM serving.

This folder is the package root: what every part uses (config, errors, telemetry, model store)
and the CLI on top. The parts live in the repository's top-level folders, linked in here
(`pdserve/kvtransfer` -> `../kvtransfer`), so `pdserve.kvtransfer` is `kvtransfer/` for Python
and for tools that read files alike (README, "Layout").
"""

__version__ = "0.1.0"
