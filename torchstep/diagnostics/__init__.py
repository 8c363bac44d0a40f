"""Training diagnostics built on the optimizers (``optim`` ← ``diagnostics`` ← ``bench``)."""
