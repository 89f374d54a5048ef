"""``yaie serve`` with a fault injected into the model executor — a test double, never shipped.

Run as ``python tests/e2e/fault_server.py [yaie serve arguments]``. Any step that would compute
the ``FAULT_AFTER + 1``-th output token of a request whose prompt contains ``FAULT_TOKEN`` raises
``RuntimeError("injected fault")`` instead of running the model, so a test can make one chosen
request fail mid-stream (after ``FAULT_AFTER`` tokens) while other requests run normally. It
lives here, outside the package, so no installed code path can reach it.
"""

from __future__ import annotations

import sys
from dataclasses import asdict

from yaie.api.cli import serve
from yaie.args import EngineArgs
from yaie.cli import build_parser
from yaie.core.batch import ScheduledBatch, StepResult
from yaie.llm import LLM

FAULT_TOKEN = 49151  # the default model's last vocabulary id: no test prompt contains it by chance
FAULT_AFTER = 2


def main() -> None:
    args = build_parser().parse_args(["serve", *sys.argv[1:]])
    llm = LLM(**asdict(EngineArgs.from_cli(args)))
    execute = llm.executor.execute

    def faulty_execute(batch: ScheduledBatch) -> StepResult:
        for req in batch.requests:
            if FAULT_TOKEN in req.prompt_token_ids and len(req.output_token_ids) >= FAULT_AFTER:
                raise RuntimeError("injected fault")
        return execute(batch)

    llm.executor.execute = faulty_execute
    serve(llm, args.host, args.port, args.api_key)


if __name__ == "__main__":
    main()
