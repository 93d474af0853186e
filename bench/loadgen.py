"""Open-loop load against a running pdserve service, through its public HTTP API.

Requests are sent the way real clients send them: streamed `POST /v1/completions`,
each at its own arrival time whatever the state of earlier ones (open loop, so a
slow server cannot slow the arrivals down and hide its own queueing). Latencies are
measured on the client, so they include HTTP, routing and queueing: what a user sees.
`summarize` turns the results into goodput and SLO attainment, counting a request
as good only if it was admitted and met both its TTFT and its TPOT objective.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
import numpy as np

# Short, common English words: each is about one token (with its leading space) for a
# GPT-2/Llama-like BPE tokenizer, which is what makes `long_tokens` roughly right.
COMMON_WORDS = ("the", "time", "people", "way", "day", "man", "thing", "world", "life", "hand", "part", "place",
                "case", "week", "work", "point", "water", "room", "book", "eye", "job", "word", "side", "house",
                "small", "large", "good", "new", "first", "last", "long", "great", "old", "right", "big", "high",
                "make", "know", "take", "see", "come", "think", "look", "want", "give", "use", "find", "tell")

_CHAT_PROMPTS = (
    "What is the capital of France?",
    "Explain in one sentence why the sky looks blue during the day.",
    "Write a short haiku about the first snow of winter.",
    "How many minutes are there in a full week?",
    "Give me three tips for sleeping better at night.",
    "What is the difference between a virus and a bacterium?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Translate 'good morning, how are you' into Spanish.",
    "Why do cats purr when they are happy?",
    "Suggest a name for a small coffee shop near the sea.",
    "What are the main causes of inflation in a modern economy?",
    "List four planets of the solar system in order from the sun.",
)


@dataclass(frozen=True)
class RequestSpec:
    """One request to send; the objectives, when set, travel as extra top-level body fields."""

    arrival_s: float  # offset from the start of the run
    prompt: str | list[int]  # text, or token ids (exact lengths whatever the tokenizer)
    max_tokens: int
    kind: str  # workload class label, e.g. "chat" or "long"
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    priority: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens: a workload's output lengths
    session_id: str | None = None  # sent as `user`: a conversation's turns name their conversation


@dataclass
class RequestResult:
    kind: str
    outcome: str  # "ok", "rejected" (HTTP 429) or "error" (anything else)
    status: int  # HTTP status; 0 when no response came
    ttft_ms: float | None  # request sent -> first event carrying text
    tpot_ms: float | None  # first -> last text event, per token after the first
    e2e_ms: float
    completion_tokens: int
    retry_after_s: float | None  # Retry-After of a 429
    server_slo: dict | None  # the usage chunk's `slo` object, as the server sent it
    error: str = ""
    prompt_tokens: int = 0  # as the server counted them (usage)
    kv_transfer: dict | None = None  # the usage chunk's `kv_transfer` object (disaggregated requests)
    cached_tokens: int | None = None  # prompt tokens the engine found in its prefix cache (usage)
    text: str = ""  # the answer, which a conversation's next turn sends back


def gamma_arrivals(rate_rps: float, n: int, burstiness: float, seed: int) -> list[float]:
    """n arrival offsets starting at 0 whose gaps are gamma distributed with mean 1/rate_rps.

    `burstiness` is the gaps' squared coefficient of variation (shape = 1/burstiness):
    1 is a Poisson process, larger values bunch requests into bursts at the same mean rate.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return []
    gaps = gamma_gaps(np.random.default_rng(seed), rate_rps, burstiness, n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def gamma_gaps(rng: np.random.Generator, rate_rps: float, burstiness: float, n: int) -> np.ndarray:
    """n gaps between arrivals, gamma distributed with mean 1/rate_rps and squared coefficient
    of variation `burstiness`."""
    if rate_rps <= 0:
        raise ValueError(f"rate_rps must be > 0, got {rate_rps}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    return rng.gamma(shape=1.0 / burstiness, scale=burstiness / rate_rps, size=n)


def mixed_prompts(n: int, long_fraction: float, long_tokens: int, seed: int) -> list[tuple[str, str]]:
    """n (kind, prompt) pairs: "long" with probability long_fraction, else "chat".

    A long prompt is `long_tokens` words drawn at random from a built-in list of short common
    words, which is roughly `long_tokens` tokens for a GPT-2/Llama-like BPE tokenizer (an
    approximation; count with the real tokenizer when it matters). Random words also keep long
    prompts from sharing prefixes, so a prefix cache does not make them cheaper than they look.
    A chat prompt is one of a dozen short built-in questions. Deterministic for a seed.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= long_fraction <= 1.0:
        raise ValueError(f"long_fraction must be in [0, 1], got {long_fraction}")
    if long_tokens < 1:
        raise ValueError(f"long_tokens must be >= 1, got {long_tokens}")
    rng = np.random.default_rng(seed)
    out: list[tuple[str, str]] = []
    for _ in range(n):
        if rng.random() < long_fraction:
            words = rng.choice(len(COMMON_WORDS), size=long_tokens)
            out.append(("long", " ".join(COMMON_WORDS[i] for i in words)))
        else:
            out.append(("chat", _CHAT_PROMPTS[int(rng.integers(len(_CHAT_PROMPTS)))]))
    return out


def _body(model: str, spec: RequestSpec) -> dict:
    body: dict = {"model": model, "prompt": spec.prompt, "max_tokens": spec.max_tokens, "temperature": 0,
                  "stream": True, "stream_options": {"include_usage": True}}
    for key in ("ttft_ms", "tpot_ms", "priority"):
        value = getattr(spec, key)
        if value is not None:
            body[key] = value
    if spec.ignore_eos:
        body["ignore_eos"] = True
    if spec.session_id is not None:
        body["user"] = spec.session_id
    return body


def _retry_after_s(resp: httpx.Response) -> float | None:
    try:
        return float(resp.headers["Retry-After"])
    except (KeyError, ValueError):
        return None  # absent, or an HTTP date: not worth parsing for a benchmark


async def send(client: httpx.AsyncClient, url: str, model: str, spec: RequestSpec) -> RequestResult:
    """Send one streamed request and time it; never raises for a failed request."""
    result = RequestResult(spec.kind, "error", 0, None, None, 0.0, 0, None, None)
    sent = time.perf_counter()
    first_s = last_s = None
    text_events, usage_tokens, done = 0, None, False
    pieces: list[str] = []
    try:
        async with client.stream("POST", url, json=_body(model, spec)) as resp:
            result.status = resp.status_code
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                result.outcome = "rejected" if resp.status_code == 429 else "error"
                result.retry_after_s = _retry_after_s(resp) if resp.status_code == 429 else None
                result.error = body[:500]
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, other SSE fields
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = json.dumps(event["error"])[:500]
                    return result
                # An answer's first token may end it (end of sequence, no text): its finish counts as one.
                choices = event.get("choices") or ()
                pieces += [c["text"] for c in choices if c.get("text")]
                if any(c.get("text") or c.get("finish_reason") for c in choices):
                    last_s = time.perf_counter()
                    first_s = first_s if first_s is not None else last_s
                    text_events += 1
                usage = event.get("usage")
                if usage:
                    usage_tokens = int(usage.get("completion_tokens", 0))
                    result.prompt_tokens = int(usage.get("prompt_tokens", 0))
                    slo = event.get("slo", usage.get("slo"))
                    result.server_slo = slo if isinstance(slo, dict) else None
                    kv = usage.get("kv_transfer")
                    result.kv_transfer = kv if isinstance(kv, dict) else None
                    details = usage.get("prompt_tokens_details")
                    if isinstance(details, dict) and details.get("cached_tokens") is not None:
                        result.cached_tokens = int(details["cached_tokens"])
        if not done:
            result.error = "stream ended without data: [DONE]"
            return result
        # Without a usage chunk (a server ignoring stream_options) text events are the best count.
        result.completion_tokens = usage_tokens if usage_tokens is not None else text_events
        result.text = "".join(pieces)
        if first_s is not None:
            result.ttft_ms = (first_s - sent) * 1e3
            if result.completion_tokens >= 2 and last_s is not None:
                result.tpot_ms = (last_s - first_s) * 1e3 / (result.completion_tokens - 1)
        result.outcome = "ok"
        return result
    except Exception as exc:  # connection refused, timeout, malformed event: a failed request, not a failed run
        result.outcome = "error"
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    finally:
        result.e2e_ms = (time.perf_counter() - sent) * 1e3


def completions_url(base_url: str) -> str:
    return base_url.rstrip("/") + "/v1/completions"


def http_client(timeout_s: float) -> httpx.AsyncClient:
    """A client for many requests in flight at once: open loop, so no connection cap may queue them."""
    return httpx.AsyncClient(limits=httpx.Limits(max_connections=1000, max_keepalive_connections=1000),
                             timeout=timeout_s)


async def run_load(base_url: str, model: str, specs: list[RequestSpec], timeout_s: float = 120.0,
                   progress: Callable[[int, int], None] | None = None) -> list[RequestResult]:
    """Send every spec at its arrival offset (open loop) and return the results in spec order."""
    url = completions_url(base_url)
    done = 0

    async with http_client(timeout_s) as client:
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def launch(spec: RequestSpec) -> RequestResult:
            nonlocal done
            await asyncio.sleep(max(0.0, start + spec.arrival_s - loop.time()))
            result = await send(client, url, model, spec)
            done += 1
            if progress is not None:
                progress(done, len(specs))
            return result

        return list(await asyncio.gather(*(launch(spec) for spec in specs)))


def percentiles(values: list[float], qs: tuple[int, ...]) -> dict[str, float] | None:
    if not values:
        return None
    return {f"p{q}": float(v) for q, v in zip(qs, np.percentile(values, qs), strict=True)}


Objectives = tuple[float, float]
"""(ttft_ms, tpot_ms) a request is judged against."""


def met_objectives(r: RequestResult, objectives: Objectives) -> bool:
    ttft_ms, tpot_ms = objectives
    return (r.outcome == "ok" and r.ttft_ms is not None and r.ttft_ms <= ttft_ms
            and (r.tpot_ms is None or r.tpot_ms <= tpot_ms))


def _counts(judged: list[tuple[RequestResult, Objectives]]) -> dict:
    counts = {"requests": len(judged), "ok": 0, "rejected": 0, "error": 0}
    for r, _ in judged:
        counts[r.outcome] += 1
    counts["met"] = sum(met_objectives(r, o) for r, o in judged)
    return counts


def summarize(results: list[RequestResult], duration_s: float, objectives: Sequence[Objectives]) -> dict:
    """Goodput (requests meeting both objectives per second) and attainment, overall and per
    kind, each request judged against its own objectives (`objectives[i]` for `results[i]`).

    `attainment_all` charges rejections against the service; `attainment_admitted` shows how
    well it served what it chose to admit. Both matter: rejecting everything but one request
    makes the second perfect and the first worthless.
    """
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    judged = list(zip(results, objectives, strict=True))
    summary = _counts(judged)
    ok = [r for r in results if r.outcome == "ok"]
    summary["goodput_rps"] = summary["met"] / duration_s
    summary["attainment_all"] = summary["met"] / len(results) if results else None
    summary["attainment_admitted"] = summary["met"] / len(ok) if ok else None
    summary["ttft_ms"] = percentiles([r.ttft_ms for r in ok if r.ttft_ms is not None], (50, 90, 99))
    summary["tpot_ms"] = percentiles([r.tpot_ms for r in ok if r.tpot_ms is not None], (50, 90, 99))
    summary["reject_ms"] = percentiles([r.e2e_ms for r in results if r.outcome == "rejected"], (50, 99))
    kinds = sorted({r.kind for r in results})
    summary["by_kind"] = {k: _counts([(r, o) for r, o in judged if r.kind == k]) for k in kinds}
    return summary
