"""Chat with a trained model from a source checkout; installed, the same job is `nanochat-chat`."""
from nanochat_rs.chat import main

if __name__ == "__main__":
    main()
