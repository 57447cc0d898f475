"""nanochat_rs: a Rust-accelerated nanochat.

Rust (``nanochat_rs._native``) owns the data plane: BPE training/encoding and best-fit sequence
packing. Python/torch owns the model, optimizer, fp8 and inference. Submodules are imported on demand
so that e.g. the tokenizer can be used without importing torch.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version

try:  # the one version is Cargo.toml's; maturin writes it into the installed metadata
    __version__ = _dist_version("nanochat_rs")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
del PackageNotFoundError, _dist_version
