"""The adaptive pool's deployment: an engine that both prefills and decodes, and moves KV
either way (its connector is producer and consumer, `kv_both`). Per request the controller
picks one of three parts for it: the whole answer (a local prefill, as colocated serving
does), the prompt only (its KV pushed to another engine of the pool, the first token sampled
here, as a prefill replica does), or the answer after a prompt prefilled elsewhere (as a
decode replica does). Roles so drift with the load, where fixed pools would leave one idle."""

from __future__ import annotations

from pdserve.decode.server import DecodeServer
from pdserve.prefill.server import PrefillServer


class AdaptiveServer(DecodeServer, PrefillServer):
    """`generate` and `discard_kv` as the decode replica's (with its KV receiver), `prefill`
    as the prefill replica's."""

    role = "adaptive"
