"""The policy stage: generation, the roles (policy, anchor, reward model) and where their weights live, RL, the stage."""
