"""torch.compile as a recipe step."""
