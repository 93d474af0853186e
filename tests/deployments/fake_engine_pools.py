"""Fakes of the remote peers the ingress calls through Serve handles (the controller and the
engine replicas), for tests that drive the real `Frontend` (tokenizer, routing loop, retries).
The fake engines go on with token ids counting up from a prompt's last one (`FakePools`), or with
one fixed text (`FakeTextPools`), so that an answer served in pieces (a first token from the
prefill replica, a replica lost mid-answer) can be compared with an unbroken one."""

from __future__ import annotations

import asyncio
from typing import Any

from ray.exceptions import ActorDiedError

from pdserve.config.cluster import parse_config
from pdserve.controller.decision import Decision, Outcome, RouteRequest, Target
from pdserve.deployments.frontend import Frontend
from pdserve.errors import ReplicaGone
from pdserve.prefill.requests import GenerateChunk, Sampling
from tests.deployments.fake_serve_handles import FakeEngineStream, FakeRemoteMethod

PROMPT = [100, 101, 102]


def routed(prefill: str | None, decode: str, prefill_tp: int = 1, decode_tp: int = 1) -> Decision:
    return Decision(Outcome.ROUTED, prefill=Target(prefill, "", 0, "prefill", prefill_tp) if prefill else None,
                    decode=Target(decode, f"{decode}:1", 0, "decode", decode_tp), reason="fake route")


class FakeController:
    """The controller replica as the ingress calls it: `choose` answers from `decisions` in
    turn (the last one repeats; an exception instance is raised, as a dead actor's call is)."""

    def __init__(self, *decisions: Decision | Exception, route_s: float = 0.0):
        self.decisions = list(decisions)
        self.route_s = route_s
        """How long each choose call takes."""
        self.routes: list[tuple[int, int, bool]] = []
        """(prompt tokens, max tokens, resuming) of every choose call."""
        self.asked: list[RouteRequest] = []
        """The route request of every choose call."""
        self.lost: list[str] = []
        self.released: list[tuple[str, int]] = []
        self.choose = FakeRemoteMethod(self._choose)
        self.replica_lost = FakeRemoteMethod(self._replica_lost)
        self.release = FakeRemoteMethod(lambda request_id, tpot_ms, tokens: self.released.append((request_id, tokens)))
        self.told: list[tuple[str, float]] = []
        """(request id, prefill ms) of every prefill_done call."""
        self.prefill_done = FakeRemoteMethod(lambda request_id, ms: self.told.append((request_id, ms)))

    async def _choose(self, route, resuming: bool) -> Decision:
        self.routes.append((route.prompt_tokens, route.max_tokens, resuming))
        self.asked.append(route)
        await asyncio.sleep(self.route_s)
        answer = self.decisions.pop(0) if len(self.decisions) > 1 else self.decisions[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def _replica_lost(self, replica_id: str, departed: bool) -> None:
        self.lost.append(replica_id)


class FakePools:
    """Prefill and decode replicas by id. A decode replica waits for the prompt's KV (unless
    it prefills locally), then generates `max_tokens` ids counting up from the prompt's last;
    one in `decode_dies_after` dies after that many tokens (after its last chunk when that is
    all of them), one in `dead_prefills` dies when
    asked to prefill, so its KV never comes."""

    def __init__(self, decode_dies_after: dict[str, int] | None = None, dead_prefills: tuple[str, ...] = (),
                 departed: tuple[str, ...] = (), hung_prefills: tuple[str, ...] = (), first_token_s: float = 0.0):
        self.decode_dies_after = decode_dies_after or {}
        self.first_token_s = first_token_s
        """How long a replica takes to a prompt's first token: a prefill call's answer, a local prefill's
        first chunk."""
        self.departed = departed
        """Decode replicas the router saw leave (drained after a scale-down): calls fail at routing."""
        self.dead_prefills = dead_prefills
        self.hung_prefills = hung_prefills
        """Prefill replicas whose calls never answer (stuck in Serve's router on a replica going away)."""
        self.served: list[tuple[str, str, int]] = []
        """(replica, request id, prompt tokens) of every generate call."""
        self.sampled: list[int] = []
        """The `sampled_tokens` of every generate call's request."""
        self.prefills: list[tuple[str, str | None]] = []
        """(replica, KV destination) of every prefill call."""
        self.discarded: list[tuple[str, str]] = []
        """(transfer id, replica) of every discard_kv call."""
        self.tp_sizes: list[tuple[str, str, int]] = []
        """(call, replica, the other side's TP size) of every call that moves KV: a prefill's
        decode TP size, a generate's or a discard's prefill TP size."""
        self.streams: list[FakeEngineStream] = []
        self.generate = FakeRemoteMethod(self._generate)
        self.prefill = FakeRemoteMethod(self._prefill)
        self.discard_kv = FakeRemoteMethod(self._discard_kv)
        self._kv: dict[str, asyncio.Event] = {}

    def __getitem__(self, pool: str) -> FakePools:
        return self

    def options(self, stream: bool) -> FakePools:
        return self

    def _generate(self, req, max_tokens: int, lease_ms: int, *, replica_id: str,
                  local_prefill: bool = False, skip_tokens: int = 0, src_tp: int = 1) -> FakeEngineStream:
        self.served.append((replica_id, req.request_id, len(req.prompt_token_ids)))
        self.sampled.append(req.sampled_tokens)
        if not local_prefill:
            self.tp_sizes.append(("generate", replica_id, src_tp))
        dies_after = self.decode_dies_after.pop(replica_id, None)
        if replica_id in self.departed:
            gone = ReplicaGone(replica_id, 0.0, departed=True)

            async def refused():
                raise gone
                yield

            self.streams.append(FakeEngineStream(refused(), routing_error=gone))
            return self.streams[-1]

        async def chunks():
            if not local_prefill:
                await self._kv.setdefault(req.request_id, asyncio.Event()).wait()
            else:
                await asyncio.sleep(self.first_token_s)
            last = req.prompt_token_ids[-1]
            for i in range(max_tokens):
                if i == dies_after:
                    raise ActorDiedError()
                await asyncio.sleep(0)
                done = i + 1 == max_tokens
                yield GenerateChunk(f" t{last + i + 1}", [last + i + 1], len(req.prompt_token_ids), i + 1,
                                    "length" if done else None)
            if dies_after == max_tokens:
                raise ActorDiedError()

        self.streams.append(FakeEngineStream(chunks()))
        return self.streams[-1]

    async def _prefill(self, req, dest: str | None, lease_ms: int, skip_tokens: int = 0, dest_tp: int = 1, *,
                       replica_id: str) -> dict:
        self.prefills.append((replica_id, dest))
        self.tp_sizes.append(("prefill", replica_id, dest_tp))
        if replica_id in self.dead_prefills:
            raise ActorDiedError()
        if replica_id in self.hung_prefills:
            await asyncio.Event().wait()
        await asyncio.sleep(self.first_token_s)
        self._kv.setdefault(req.request_id, asyncio.Event()).set()
        first = req.prompt_token_ids[-1] + 1  # the answer's first token, as the decode replicas count
        return {"kv_transfer": None, "token_ids": [first], "text": f" t{first}",
                "finish_reason": "length"}

    async def _discard_kv(self, transfer_id: str, src_tp: int = 1, *, replica_id: str) -> None:
        self.discarded.append((transfer_id, replica_id))
        self.tp_sizes.append(("discard", replica_id, src_tp))


def frontend(model_path: str, controller: FakeController, pools: FakePools, **ingress: Any) -> Frontend:
    cfg = parse_config({"max_model_len": 256, "ingress": {"route_wait_s": 0.5, **ingress}})
    return Frontend(cfg, model_path, controller, {"prefill": pools, "decode": pools})


def collect(fe: Frontend, max_tokens: int, stop: list[str] | None = None) -> tuple[list[GenerateChunk],
                                                                                   BaseException | None]:
    """Every chunk the client receives, and the error that ended the answer, if any."""
    chunks: list[GenerateChunk] = []

    async def go() -> None:
        sampling = Sampling(max_tokens=max_tokens, stop=stop or [])
        async for chunk in fe.stream(await fe.completion_request(PROMPT, sampling)):
            chunks.append(chunk)

    try:
        asyncio.run(go())
    except Exception as exc:
        return chunks, exc
    return chunks, None


def unbroken(max_tokens: int) -> list[int]:
    return list(range(PROMPT[-1] + 1, PROMPT[-1] + 1 + max_tokens))


ANSWER = " Paris is the capital of France, a large city on the Seine with many museums."


class FakeTextPools(FakePools):
    """Engine replicas that go on with one fixed answer (`ANSWER`'s tokens, from wherever the
    prompt leaves off). Decode replicas stream its text as vLLM does with stop strings: detokenized
    after the prompt, the last `len(longest stop) - 1` characters held back, a stop string in the
    generated text ending the answer before it; the finish reason comes in a chunk of its own.
    Prefill replicas answer its next token, as vLLM does for one token."""

    def __init__(self, tokenizer: Any, **kw: Any):
        super().__init__(**kw)
        self.tokenizer = tokenizer
        self.answer_ids: list[int] = tokenizer.encode(ANSWER, add_special_tokens=False)

    def _generate(self, req, max_tokens: int, lease_ms: int, *, replica_id: str,
                  local_prefill: bool = False, skip_tokens: int = 0, src_tp: int = 1) -> FakeEngineStream:
        self.served.append((replica_id, req.request_id, len(req.prompt_token_ids)))
        if not local_prefill:
            self.tp_sizes.append(("generate", replica_id, src_tp))
        dies_after = self.decode_dies_after.pop(replica_id, None)
        start = len(req.prompt_token_ids) - len(PROMPT)
        ids = self.answer_ids[start:start + max_tokens]
        stop, prompt_chars = req.sampling.stop, len(self.tokenizer.decode(req.prompt_token_ids))
        hold = max((len(s) for s in stop), default=1) - 1

        async def chunks():
            if local_prefill:
                await asyncio.sleep(self.first_token_s)
            sent = 0
            for i, token in enumerate(ids):
                await asyncio.sleep(0)
                text = self.tokenizer.decode(req.prompt_token_ids + ids[:i + 1])[prompt_chars:]
                if hits := [at for s in stop if (at := text.find(s)) >= 0]:
                    yield GenerateChunk(text[sent:min(hits)], [token], len(req.prompt_token_ids), i + 1, "stop")
                    return
                upto = max(sent, len(text) - hold)
                yield GenerateChunk(text[sent:upto], [token], len(req.prompt_token_ids), i + 1)
                sent = upto
                if i + 1 == dies_after:
                    raise ActorDiedError()
            yield GenerateChunk(text[sent:], [], len(req.prompt_token_ids), len(ids), "length")

        self.streams.append(FakeEngineStream(chunks()))
        return self.streams[-1]

    async def _prefill(self, req, dest: str | None, lease_ms: int, skip_tokens: int = 0, dest_tp: int = 1, *,
                       replica_id: str) -> dict:
        out = await super()._prefill(req, dest, lease_ms, skip_tokens, dest_tp, replica_id=replica_id)
        token = self.answer_ids[len(req.prompt_token_ids) - len(PROMPT)]
        text = self.tokenizer.decode(req.prompt_token_ids + [token])[len(self.tokenizer.decode(req.prompt_token_ids)):]
        hits = [at for s in req.sampling.stop if (at := text.find(s)) >= 0]
        return {**out, "token_ids": [token], "text": text[:min(hits)] if hits else text,
                "finish_reason": "stop" if hits else "length"}


def text_of(chunks: list[GenerateChunk]) -> str:
    return "".join(c.text for c in chunks)
