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

from pdserve.experts.buffer import ExpertBuffer
from pdserve.experts.config import ExpertBufferConfig
from pdserve.experts.counters import summarize

log = logging.getLogger("pdserve.experts")


def moe_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's fused-MoE layers that buffering supports, in forward order."""
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    layers = []
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if not hasattr(module, "w13_weight") or method is None or not hasattr(method, "moe_kernel"):
            continue
        if not isinstance(method, UnquantizedFusedMoEMethod) or method.is_monolithic:
            raise ValueError(f"expert buffering needs unquantized, modular MoE layers; {name} uses "
                             f"{type(method).__name__}")
        if module.expert_map is not None or getattr(method.moe, "has_bias", False):
            raise ValueError(f"expert buffering does not support expert parallelism or expert biases ({name})")
        layers.append(module)
    return layers


def _buffered_apply(buffer: ExpertBuffer, method: Any, layer: torch.nn.Module, x: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor, shared_experts: Any,
                    shared_experts_input: torch.Tensor | None) -> torch.Tensor:
    groups = buffer.plan(topk_ids)
    out = None
    for i, group in enumerate(groups):
        slot_ids, weights = buffer.admit(group, topk_ids, topk_weights, whole_batch=len(groups) == 1)
        y = method.moe_kernel.apply(
            hidden_states=x, w1=buffer.w13, w2=buffer.w2, topk_weights=weights, topk_ids=slot_ids,
            activation=layer.activation, apply_router_weight_on_input=layer.apply_router_weight_on_input,
            global_num_experts=buffer.config.slots, expert_map=None,
            shared_experts=shared_experts if i == 0 else None,
            shared_experts_input=shared_experts_input if i == 0 else None,
        )
        # The kernel may hand back its workspace, which the next round overwrites.
        out = y if len(groups) == 1 else (y.clone() if out is None else out.add_(y))
    buffer.prefetch_next()
    return out


def install(model: torch.nn.Module, config: ExpertBufferConfig) -> list[ExpertBuffer]:
    """Put every MoE layer of `model` in buffered mode. The full expert tensors move to host
    memory (pinned on a GPU) and the layer keeps only its slots."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("expert buffering asked for, but the model has no MoE layers")
    top_k = layers[0].top_k
    if config.slots < top_k:
        raise ValueError(f"{config.slots} expert slots cannot hold one token's {top_k} experts; use at least {top_k}")
    buffers = []
    for index, layer in enumerate(layers):
        if getattr(layer, "_pdserve_buffer", None) is not None:
            raise RuntimeError("expert buffers are already installed; uninstall them first")
        w13, w2 = layer.w13_weight.data, layer.w2_weight.data
        if w13.is_cuda:
            w13, w2 = w13.cpu().pin_memory(), w2.cpu().pin_memory()
        buffer = ExpertBuffer(index, w13, w2, config, layer.w13_weight.device, top_k)
        layer.w13_weight = torch.nn.Parameter(buffer.w13, requires_grad=False)
        layer.w2_weight = torch.nn.Parameter(buffer.w2, requires_grad=False)
        layer.quant_method.apply = functools.partial(_buffered_apply, buffer, layer.quant_method)
        layer._pdserve_buffer = buffer
        buffers.append(buffer)
    for current, following in zip(buffers, buffers[1:], strict=False):
        current.next = following
    log.info("expert buffering: %d MoE layers, %d of %d experts resident each (%.1f MiB of %.1f MiB per layer), "
             "policy %s, prefetch %s", len(buffers), config.slots, buffers[0].num_experts,
             buffers[0].slot_bytes / 2**20, buffers[0].num_experts * buffers[0].expert_bytes / 2**20,
             config.policy, config.prefetch and buffers[0].w13.is_cuda)
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


def buffers_of(model: torch.nn.Module) -> list[ExpertBuffer]:
    return [b for layer in moe_layers(model) if (b := getattr(layer, "_pdserve_buffer", None)) is not None]


def stats(model: torch.nn.Module) -> dict:
    """Counters of every buffered layer plus the engine-wide summary (empty when not buffered)."""
    buffers = buffers_of(model)
    if not buffers:
        return {}
    layers = []
    for b in buffers:
        b.counters.activations = b.activations()
        layers.append(b.counters)
    return {"slots": buffers[0].config.slots, "num_experts": buffers[0].num_experts, "top_k": buffers[0].top_k,
            "policy": buffers[0].config.policy, **summarize(layers, sum(b.slot_bytes for b in buffers))}
