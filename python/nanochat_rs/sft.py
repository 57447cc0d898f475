"""The fine-tuning job: `nanochat-sft` / `python -m nanochat_rs.sft` (nanochat's chat_sft).

    nanochat-sft                                  # newest base checkpoint -> chat_checkpoints/d{depth}
    nanochat-sft --source RUN --step 300          # a given base run and step
    nanochat-sft --tasks arithmetic,identity:5    # your own mixture (see --list-tasks)
    torchrun --nproc_per_node=8 -m nanochat_rs.sft
    nanochat-sft --resume                         # continue the newest checkpoint of the chat run

Without CUDA it trains on the embedded synthetic mixture (calculator arithmetic, letter counting,
identity): a few minutes on 2 cores, offline. With CUDA: nanochat's mixture (SmolTalk, MMLU x3,
GSM8K x4 and the synthetic tasks), downloaded on first use. Library code: `nanochat_rs.finetune`.
"""

from __future__ import annotations

import argparse

from nanochat_rs.cli import add_device_arg, run_job


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanochat-sft", description="Fine-tune a base checkpoint into a chat model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    inherit = "(None: the base run's)"
    p.add_argument("--source", default=None,
                   help="base run directory holding step_NNNNNN/ (None: the newest under "
                        "NANOCHAT_BASE_DIR/base_checkpoints)")
    p.add_argument("--step", type=int, default=None, help="base checkpoint step (None: the newest)")
    p.add_argument("--preset", choices=["speedrun", "cpu"], default=None,
                   help="defaults bundle (None: speedrun with CUDA, cpu otherwise)")
    p.add_argument("--mixture", choices=["nanochat", "synthetic"], default=None,
                   help="training mixture (None: nanochat with CUDA, synthetic otherwise)")
    p.add_argument("--tasks", default=None, help="your own mixture instead: name[:epochs],... (see --list-tasks)")
    p.add_argument("--list-tasks", action="store_true", help="print the task names and exit")
    p.add_argument("--max-examples", type=int, default=None, help="use only the first N conversations of each task")
    p.add_argument("--sequence-len", "--max-seq-len", dest="sequence_len", type=int, default=None,
                   help=f"tokens per row {inherit}")
    p.add_argument("--device-batch-size", type=int, default=None, help=f"rows per micro-step per rank {inherit}")
    p.add_argument("--total-batch-size", type=int, default=None, help=f"tokens per optimizer step {inherit}")
    p.add_argument("--embedding-lr", type=float, default=None, help=f"peak LR of the embeddings {inherit}")
    p.add_argument("--unembedding-lr", type=float, default=None, help=f"peak LR of lm_head {inherit}")
    p.add_argument("--matrix-lr", type=float, default=None, help=f"peak Muon LR {inherit}")
    p.add_argument("--scalar-lr", type=float, default=None, help=f"peak LR of the per-layer scalars {inherit}")
    p.add_argument("--init-lr-frac", type=float, default=None,
                   help="LRs start at this fraction of the peak LRs (None: the recipe's 0.8)")
    p.add_argument("--warmup-ratio", type=float, default=None, help="fraction of the run in LR warmup (None: 0)")
    p.add_argument("--warmdown-ratio", type=float, default=None, help="fraction of the run in LR warmdown (None: 0.5)")
    p.add_argument("--final-lr-frac", type=float, default=None, help="final LR as a fraction (None: 0)")
    p.add_argument("--num-iterations", type=int, default=None, help="optimizer steps (None: one epoch of the mixture)")
    p.add_argument("--load-optimizer", action=argparse.BooleanOptionalAction, default=True,
                   help="warm-start the optimizer moments from the base checkpoint")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (<=0: at the end)")
    p.add_argument("--eval-tokens", type=int, default=None, help="validation tokens per evaluation")
    p.add_argument("--eval-examples", type=int, default=None,
                   help="held-out conversations per embedded task for the accuracy")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (<=0: at the end)")
    add_device_arg(p)
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="run eagerly instead of torch.compile'ing the model and the optimizer updates")
    p.add_argument("--resume", action="store_true", help="continue from a checkpoint in --run-dir")
    p.add_argument("--resume-step", type=int, default=None, help="with --resume: this step (default newest)")
    p.add_argument("--run-dir", default=None,
                   help="checkpoint directory (default NANOCHAT_BASE_DIR/chat_checkpoints/d{depth})")
    p.add_argument("--seed", type=int, default=42)
    return p


def task_list() -> str:
    from nanochat_rs.tasks.registry import TASKS  # imports the task modules: only when asked

    width = max(map(len, TASKS))
    return "\n".join(f"{name:<{width}}  {info.description}" for name, info in TASKS.items())


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.list_tasks:
        print(task_list())
        return
    values = {k: v for k, v in vars(args).items() if k != "list_tasks"}
    run_job(lambda: _finetune(values))


def _finetune(values: dict[str, object]) -> dict[str, object]:
    # imported here, not at the top, so --help answers at once, without torch
    from nanochat_rs.finetune import SFTConfig, finetune

    return finetune(SFTConfig(**values))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
