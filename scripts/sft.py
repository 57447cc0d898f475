"""Thin wrapper: `python scripts/sft.py ...` is `nanochat-sft ...` (see nanochat_rs.sft)."""
from nanochat_rs.sft import main

main()
