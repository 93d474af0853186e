"""pdserve: disaggregated prefill/decode LLM serving.

The subpackages live in the repository's top-level folders (see DESIGN.md):
`pdserve.kvtransfer` is `kvtransfer/`, `pdserve.proto` is `proto/`, and so on.
"""

__version__ = "0.1.0"
