"""Training on committed pairs with Ray Train: the spec (spec.py), the pairs as data (pairs_data.py) and the worker
(worker.py). The losses and the optimizer step are model math, in instaflow/training.py."""
