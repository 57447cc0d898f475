"""The pretraining job: `nanochat-train` / `python -m nanochat_rs.train`.

    nanochat-train                                       # cpu preset without CUDA: a few minutes
    nanochat-train --depth 20                            # speedrun preset on one GPU
    torchrun --nproc_per_node=8 -m nanochat_rs.train --depth 26   # all GPUs of a node
    nanochat-train --resume --run-dir RUN                # continue the newest checkpoint in RUN

Everything not given is derived from --depth by the preset and the recipe (nanochat_rs.recipe).
"""

from __future__ import annotations

import argparse

from nanochat_rs.cli import add_device_arg, run_job


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanochat-train", description="Pretrain a nanochat_rs base model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=["speedrun", "cpu"], default=None,
                   help="defaults bundle (None: speedrun with CUDA, cpu otherwise)")
    p.add_argument("--depth", type=int, default=None, help="number of layers: the one model-size dial")
    p.add_argument("--aspect-ratio", type=int, default=None, help="model_dim = depth * aspect_ratio")
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--window-pattern", default=None, help="sliding windows per layer (L full, S short); "
                   "None: the recipe's SSSL")
    p.add_argument("--sequence-len", "--max-seq-len", dest="sequence_len", type=int, default=None,
                   help="tokens per row, the model's context (--max-seq-len is nanochat's name for it)")
    p.add_argument("--device-batch-size", type=int, default=None, help="sequences per micro-step per rank")
    p.add_argument("--total-batch-size", type=int, default=None,
                   help="tokens per optimizer step (None: derived from depth)")
    p.add_argument("--num-iterations", type=int, default=None,
                   help="optimizer steps (None: derived from the data:params ratio)")
    p.add_argument("--target-param-data-ratio", type=float, default=None,
                   help="training tokens per scaling parameter (None: the recipe's 8)")
    recipe_help = "(None: the recipe's value, then scaled by the depth dial)"
    p.add_argument("--embedding-lr", type=float, default=None,
                   help=f"AdamW LR of wte and value embeddings {recipe_help}")
    p.add_argument("--unembedding-lr", type=float, default=None, help=f"AdamW LR of lm_head {recipe_help}")
    p.add_argument("--matrix-lr", type=float, default=None, help=f"Muon LR of the block matrices {recipe_help}")
    p.add_argument("--scalar-lr", type=float, default=None, help=f"AdamW LR of the per-layer scalars {recipe_help}")
    p.add_argument("--weight-decay", type=float, default=None, help=f"Muon weight decay {recipe_help}")
    p.add_argument("--warmup-steps", type=int, default=None, help="LR warmup steps (None: recipe)")
    p.add_argument("--warmdown-ratio", type=float, default=None,
                   help="fraction of steps in the LR warmdown (None: recipe)")
    p.add_argument("--final-lr-frac", type=float, default=None,
                   help="final LR as a fraction of the peak (None: recipe)")
    p.add_argument("--eval-every", type=int, default=None, help="validation bpb every N steps (<=0: at end)")
    p.add_argument("--eval-tokens", type=int, default=None, help="validation tokens per evaluation")
    p.add_argument("--sample-every", type=int, default=None, help="greedy samples every N steps (<=0: at end)")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (<=0: at end)")
    add_device_arg(p)
    p.add_argument("--fp8", action="store_true", help="fp8 matmuls (CUDA, Hopper+)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="run eagerly instead of torch.compile'ing the model and the optimizer updates")
    p.add_argument("--resume", action="store_true", help="continue from a checkpoint in --run-dir")
    p.add_argument("--resume-step", type=int, default=None, help="with --resume: this step (default newest)")
    p.add_argument("--run-dir", default=None,
                   help="checkpoint directory (default NANOCHAT_BASE_DIR/base_checkpoints/d{depth})")
    p.add_argument("--data-dir", default=None, help="parquet shards (default NANOCHAT_DATA_DIR or embedded)")
    p.add_argument("--tokenizer-dir", default=None, help="default NANOCHAT_BASE_DIR/tokenizer")
    p.add_argument("--seed", type=int, default=42)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    values = {k: v for k, v in vars(args).items() if not (k == "window_pattern" and v is None)}
    run_job(lambda: _train(values))


def _train(values: dict[str, object]) -> dict[str, object]:
    # imported here, not at the top, so --help answers at once, without torch
    from nanochat_rs.pretrain import TrainConfig, train

    return train(TrainConfig(**values))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
