"""Evaluate a model from a source checkout; installed, the same job is `nanochat-eval`."""
from nanochat_rs.eval import main

if __name__ == "__main__":
    main()
