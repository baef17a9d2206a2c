"""The teacher pipeline: rollouts of the base model, hidden-state extraction, and the store they produce."""
