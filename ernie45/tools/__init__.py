"""Tools around the model: the memory / hardware planner (``plan_memory``, ``ernie45 plan``)."""

from ernie45.tools.formats import Storage, WeightFormat, parse_weight_format
from ernie45.tools.hardware import CATALOGUE, Device, catalogue, find_device
from ernie45.tools.plan import MemoryPlan, PlanRequest, plan_memory
from ernie45.tools.plan_cli import format_plan
from ernie45.tools.weights import Parallel, tensor_inventory, weight_bytes

__all__ = [
    "CATALOGUE", "Device", "MemoryPlan", "Parallel", "PlanRequest", "Storage", "WeightFormat", "catalogue",
    "find_device", "format_plan", "parse_weight_format", "plan_memory", "tensor_inventory", "weight_bytes",
]
