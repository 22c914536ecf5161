"""Timestep level: diffusers schedulers as methods, and optimised step schedules."""

from effdiff.methods.solvers.schedule import AlignYourSteps
from effdiff.methods.solvers.schedulers import SCHEDULERS, SchedulerMethod

__all__ = ["SCHEDULERS", "AlignYourSteps", "SchedulerMethod"]
