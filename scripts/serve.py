"""Serve a trained model from a source checkout; installed, the same job is `nanochat-serve`."""
from nanochat_rs.serve import main

if __name__ == "__main__":
    main()
