"""Evaluate the tokenizer from a source checkout; installed, the same job is `nanochat-tok-eval`."""
from nanochat_rs.tok_eval import main

if __name__ == "__main__":
    main()
