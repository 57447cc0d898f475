"""Train the tokenizer from a source checkout; installed, the same job is `nanochat-tok-train`."""
from nanochat_rs.tok_train import main

if __name__ == "__main__":
    main()
