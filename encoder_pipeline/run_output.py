"""What `encoder-pipeline materialize` prints: one line per stage as it starts and finishes (seconds
and the asset's key counts), the stages' own progress lines (training and the corpus encodes log a
rate and an ETA), a failed blocking check, and a failed stage's one-line reason; not Dagster's DEBUG event
stream, which `--verbose` brings back. A Dagster logger, so it sees the run's events as they happen."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import dagster as dg

KEY_COUNTS = 3  # integer metadata entries shown after a stage finishes


def _reason(error) -> str:
    """The first line of what went wrong: a dg.Failure's own message, else the exception's."""
    while error is not None and error.cause is not None and "Failure" not in error.cls_name:
        error = error.cause
    return error.message.strip().splitlines()[0] if error is not None and error.message else "unknown"


class StageLines(logging.Handler):
    def __init__(self, out: TextIO | None = None) -> None:
        super().__init__(logging.DEBUG)
        self.out = out
        self.counts: dict[str, str] = {}
        self.failed: dict[str, str] = {}  # step: one-line reason
        self.refused: list[str] = []  # failed blocking checks

    def _print(self, line: str) -> None:
        print(line, file=self.out or sys.stdout, flush=True)  # stdout as it is now (tests swap it)

    def emit(self, record: logging.LogRecord) -> None:
        meta = record.__dict__.get("dagster_meta") or {}
        event, step = meta.get("dagster_event"), meta.get("step_key")
        if event is None:  # a stage's own log line (progress, ETA) or a warning
            if step and record.levelno >= logging.INFO:
                self._print(f"  {step}: {meta.get('orig_message', record.getMessage())}")
            return
        kind, data = event.event_type_value, event.event_specific_data
        if kind == "STEP_START":
            self._print(f"{step}: started")
        elif kind == "ASSET_MATERIALIZATION":
            ints = [(k, v.value) for k, v in data.materialization.metadata.items()
                    if isinstance(v, dg.IntMetadataValue)][:KEY_COUNTS]
            self.counts[step] = ", ".join(f"{k} {v:,}" for k, v in ints)
        elif kind == "ASSET_CHECK_EVALUATION" and not data.passed:
            self._print(f"{step}: check {data.check_name} did not pass"
                        + (f": {data.metadata['reason'].value}" if "reason" in data.metadata else ""))
            if data.severity == dg.AssetCheckSeverity.ERROR:
                self.refused.append(data.check_name)
        elif kind == "STEP_SUCCESS":
            counts = self.counts.get(step)
            self._print(f"{step}: done in {data.duration_ms / 1000:.1f} s" + (f" ({counts})" if counts else ""))
        elif kind == "STEP_FAILURE":
            reason = _reason(data.error)
            if "DagsterAssetCheckFailedError" in (data.error.cls_name or "") and self.refused:
                reason = f"refused by its blocking check {', '.join(self.refused)}"
            self.failed[step] = reason
            self._print(f"{step}: FAILED: {reason}")


def stage_logger_defs(out: TextIO | None = None) -> tuple[dict, dict, StageLines]:
    """(logger defs for `JobDefinition.with_logger_defs`, the run config that turns them on, the
    handler, which keeps the failed stages and their reasons for the closing block)."""
    handler = StageLines(out)

    @dg.logger
    def stages(_init_context) -> logging.Logger:
        logger = logging.getLogger("encoder_pipeline.stages")
        logger.handlers, logger.propagate = [handler], False
        logger.setLevel(logging.DEBUG)
        return logger

    return {"stages": stages}, {"loggers": {"stages": {}}}, handler
