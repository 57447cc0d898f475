"""Pretrain a base model.

    python scripts/train.py                                  # cpu preset without CUDA: a few minutes
    python scripts/train.py --depth 20                       # speedrun preset on one GPU
    torchrun --nproc_per_node=8 scripts/train.py --depth 26  # all GPUs of a node
    python scripts/train.py --resume --run-dir RUN           # continue the newest checkpoint in RUN

Everything not given is derived from --depth by the preset (see nanochat_rs.pretrain).
"""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Pretrain a nanochat_rs base model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=["speedrun", "cpu"], default=None,
                   help="defaults bundle (None: speedrun with CUDA, cpu otherwise)")
    p.add_argument("--depth", type=int, default=None, help="number of layers: the one model-size dial")
    p.add_argument("--aspect-ratio", type=int, default=None, help="model_dim = depth * aspect_ratio")
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--window-pattern", default="SSSL", help="sliding windows per layer (L full, S short)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--device-batch-size", type=int, default=None, help="sequences per micro-step per rank")
    p.add_argument("--total-batch-size", type=int, default=None,
                   help="tokens per optimizer step (None: derived from depth)")
    p.add_argument("--num-iterations", type=int, default=None,
                   help="optimizer steps (None: derived from the data:params ratio)")
    p.add_argument("--target-param-data-ratio", type=float, default=None)
    p.add_argument("--eval-every", type=int, default=None, help="validation bpb every N steps (<=0: at end)")
    p.add_argument("--eval-tokens", type=int, default=None, help="validation tokens per evaluation")
    p.add_argument("--sample-every", type=int, default=None, help="greedy samples every N steps (<=0: at end)")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (<=0: at end)")
    p.add_argument("--device-type", choices=["cuda", "cpu", "mps"], default=None, help="None: autodetect")
    p.add_argument("--fp8", action="store_true", help="fp8 matmuls (CUDA, Hopper+)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--resume", action="store_true", help="continue from a checkpoint in --run-dir")
    p.add_argument("--resume-step", type=int, default=None, help="with --resume: this step (default newest)")
    p.add_argument("--run-dir", default=None,
                   help="checkpoint directory (default NANOCHAT_BASE_DIR/base_checkpoints/d{depth})")
    p.add_argument("--data-dir", default=None, help="parquet shards (default NANOCHAT_DATA_DIR or embedded)")
    p.add_argument("--tokenizer-dir", default=None, help="default NANOCHAT_BASE_DIR/tokenizer")
    p.add_argument("--seed", type=int, default=42)
    return p


def main() -> None:
    args = build_parser().parse_args()
    # Imported after parsing so --help works instantly and without the native extension.
    from nanochat_rs.common import DeviceUnavailableError
    from nanochat_rs.dataset import DownloadError
    from nanochat_rs.pretrain import TrainConfig, train

    config = TrainConfig(**vars(args))
    try:
        train(config)
    # problems with the user's input or machine get one line; anything else keeps its traceback
    except (ValueError, FileNotFoundError, DeviceUnavailableError, DownloadError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
