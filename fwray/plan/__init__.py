"""What to train (the planner): the scaling law, the family of shapes, one experiment's figures, the plan and its
measurements; `python -m fwray.plan`."""
