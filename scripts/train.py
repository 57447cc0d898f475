"""Thin wrapper: `python scripts/train.py ...` is `nanochat-train ...` (see nanochat_rs.train)."""
from nanochat_rs.train import main

main()
