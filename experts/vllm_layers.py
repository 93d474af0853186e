"""Buffered mode inside vLLM's fused-MoE layers, installed into a running engine's workers.

vLLM routes a MoE layer's tokens (`topk_ids`, expert ids) and then calls the layer's
quant method's `apply`. Buffering replaces that `apply` on the layer's own method object:
the routed experts are made resident in the layer's slots, the routing is remapped to
slot ids, and the same kernel runs on the slot tensors, so the output does not change.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from pdserve.config.experts import ExpertBufferConfig
from pdserve.experts.buffer import ExpertBuffer
from pdserve.experts.counters import summarize

log = logging.getLogger("pdserve.experts")


def moe_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's fused-MoE layers that buffering supports, in forward order."""
    layers = []
    for name, module in model.named_modules():
        if hasattr(module, "w13_weight") and hasattr(getattr(module, "quant_method", None), "moe_kernel"):
            check_supported(name, module)
            layers.append(module)
    return layers


def check_supported(name: str, layer: torch.nn.Module) -> None:
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    method = layer.quant_method
    if not isinstance(method, UnquantizedFusedMoEMethod) or method.is_monolithic:
        raise ValueError(f"expert buffering needs unquantized, modular MoE layers; {name} uses {type(method).__name__}")
    if layer.expert_map is not None or getattr(method.moe, "has_bias", False):
        raise ValueError(f"expert buffering does not support expert parallelism or expert biases ({name})")


def _rows(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return t if index is None else t.index_select(0, index)


def _buffered_apply(buffer: ExpertBuffer, method: Any, layer: torch.nn.Module, x: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor, shared_experts: Any,
                    shared_experts_input: torch.Tensor | None) -> torch.Tensor:
    rounds = buffer.plan(topk_ids)
    out = None
    for i, (tokens, experts) in enumerate(rounds):
        index = None if tokens is None else torch.tensor(tokens, device=x.device)
        y = method.moe_kernel.apply(
            hidden_states=_rows(x, index), w1=buffer.w13, w2=buffer.w2, topk_weights=_rows(topk_weights, index),
            topk_ids=buffer.admit(experts, _rows(topk_ids, index)), activation=layer.activation,
            apply_router_weight_on_input=layer.apply_router_weight_on_input,
            global_num_experts=buffer.config.slots, expert_map=None,
            shared_experts=shared_experts if i == 0 else None,
            shared_experts_input=shared_experts_input if i == 0 else None,
        )
        if index is None:
            out = y
        else:
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out.index_copy_(0, index, y)
    buffer.prefetch_next()
    return out


def buffer_layer(layer: torch.nn.Module, config: ExpertBufferConfig, index: int) -> ExpertBuffer:
    """Put one MoE layer in buffered mode: its full expert tensors become the host store
    (pinned on a GPU) and the layer keeps only its slots."""
    if config.slots < layer.top_k:
        raise ValueError(f"{config.slots} expert slots cannot hold one token's {layer.top_k} experts; "
                         f"use at least {layer.top_k}")
    if getattr(layer, "_pdserve_buffer", None) is not None:
        raise RuntimeError("expert buffers are already installed; uninstall them first")
    w13, w2 = layer.w13_weight.data, layer.w2_weight.data
    if w13.is_cuda:
        w13, w2 = w13.cpu().pin_memory(), w2.cpu().pin_memory()
    buffer = ExpertBuffer(index, w13, w2, config, layer.w13_weight.device, layer.top_k)
    layer.w13_weight = torch.nn.Parameter(buffer.w13, requires_grad=False)
    layer.w2_weight = torch.nn.Parameter(buffer.w2, requires_grad=False)
    layer.quant_method.apply = functools.partial(_buffered_apply, buffer, layer.quant_method)
    layer._pdserve_buffer = buffer
    if index == 0:
        log.info("expert buffering layer %d: %d of %d experts resident (%.1f of %.1f MiB), policy %s, prefetch %s",
                 index, config.slots, buffer.num_experts, buffer.slot_bytes / 2**20,
                 buffer.num_experts * buffer.expert_bytes / 2**20, config.policy, config.prefetch and w13.is_pinned())
    return buffer


def install(model: torch.nn.Module, config: ExpertBufferConfig) -> list[ExpertBuffer]:
    """Put every MoE layer of a loaded `model` in buffered mode."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("expert buffering asked for, but the model has no MoE layers")
    buffers = [buffer_layer(layer, config, index) for index, layer in enumerate(layers)]
    for current, following in zip(buffers, buffers[1:], strict=False):
        current.next = following
    return buffers


def uninstall(model: torch.nn.Module) -> None:
    """Back to all experts resident (the full tensors return to the device)."""
    for layer in moe_layers(model):
        buffer = getattr(layer, "_pdserve_buffer", None)
        if buffer is None:
            continue
        device = buffer.w13.device
        layer.w13_weight = torch.nn.Parameter(buffer.host_w13.to(device), requires_grad=False)
        layer.w2_weight = torch.nn.Parameter(buffer.host_w2.to(device), requires_grad=False)
        del layer.quant_method.apply  # the class's own method again
        layer._pdserve_buffer = None


def require_buffered(model: torch.nn.Module) -> None:
    """Fail loudly when buffering was configured but nothing got buffered (a dense model, or
    MoE layers vLLM runs without the unquantized fused kernel): the pool would hold every
    expert while its operator counts on the memory it was meant to free."""
    if not buffers_of(model):
        raise ValueError("expert buffering is configured, but the model has no MoE layers running vLLM's "
                         "unquantized fused-MoE kernel; remove `experts` from the pool or serve a MoE model")


def buffers_of(model: torch.nn.Module) -> list[ExpertBuffer]:
    return [b for layer in moe_layers(model) if (b := getattr(layer, "_pdserve_buffer", None)) is not None]


def stats(model: torch.nn.Module) -> dict:
    """Counters of every buffered layer plus the engine-wide summary (empty when not buffered)."""
    buffers = buffers_of(model)
    if not buffers:
        return {}
    first = buffers[0]
    summary = summarize([b.counters for b in buffers], [b.activations() for b in buffers],
                        sum(b.slot_bytes for b in buffers))
    return {"slots": first.config.slots, "num_experts": first.num_experts, "top_k": first.top_k,
            "policy": first.config.policy, "hot": [sorted(b.hot) for b in buffers], **summary}
