"""Hybrid placement: routed experts in host RAM, computed by the CPU path; the rest on the compute device."""

from ernie45.offload.placement import HostMoE, Placement, PlacementError, choose_gpu_experts, place_experts

__all__ = ["HostMoE", "Placement", "PlacementError", "choose_gpu_experts", "place_experts"]
