"""Timestep level: diffusers schedulers as methods, and optimised step schedules."""
