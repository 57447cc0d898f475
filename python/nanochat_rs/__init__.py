"""nanochat_rs: a Rust-accelerated nanochat.

Rust (``nanochat_rs._native``) owns the data plane: BPE training/encoding and best-fit sequence
packing. Python/torch owns the model, optimizer, fp8 and inference. Submodules are imported on demand
so that e.g. the tokenizer can be used without importing torch.
"""

__version__ = "0.1.0"
