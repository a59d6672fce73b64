"""Fill the remaining VRAM with as many replicas of one model as fit (`max_replicas`).

    python examples/2_deploy_max_llms.py [--model-id demo-max] [--vram-gb 1.5] [--gpu-type 4GB]

The planner packs replicas per GPU (never summed per node); `--gpu-type` restricts them to GPUs
whose name contains the text.
"""

from __future__ import annotations

import argparse
from collections import Counter

from vram_scheduler import VRAMScheduler

ENGINE = {"dtype": "float32", "enforce_eager": True, "max_num_seqs": 8}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-id", default="demo-max")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--vram-gb", type=float, default=1.5)
    parser.add_argument("--gpu-type")
    args = parser.parse_args(argv)
    with VRAMScheduler() as scheduler:
        result = scheduler.deploy_model(
            args.model_id,
            args.model,
            args.vram_gb,
            max_replicas=True,
            max_model_len=512,
            max_tokens=16,
            gpu_type=args.gpu_type,
            **ENGINE,
        )
        per_gpu = Counter(replica.where for replica in result.replicas)
        print(f"{args.model_id}: {len(result.replicas)} replica(s) of {args.vram_gb:g} GiB")
        for where, count in sorted(per_gpu.items()):
            print(f"  {where}: {count}")
        scheduler.display_vram_state()


if __name__ == "__main__":
    main()
