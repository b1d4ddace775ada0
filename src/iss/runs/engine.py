"""The stage engine: run a named stage of a run folder once per fingerprint, under locks and process barriers.

:class:`iss.runs.RunFolder` owns the files (a stage's folder, its record, the manifest); the engine decides
whether a stage runs: it fingerprints the stage's inputs, reuses a finished artifact with that fingerprint (also
one an earlier call of this process made), and otherwise runs the stage's body, on the main process or, for a
training loop, on every process of a data-parallel group. The pipeline's stages are bodies handed to it.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from iss.runs.folder import RunFolder, StageResult, fingerprint
from iss.runs.processes import processes

log = logging.getLogger("iss")


class StageEngine:
    """Runs or reuses the stages of one run folder; ``results`` caches what this process has seen."""

    def __init__(
        self,
        run: RunFolder,
        results: dict[str, StageResult],
        numerics: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        self.folder = run
        self.results = results
        self.numerics = numerics  # the precision a stage body runs under (bf16 autocast or none)

    def run(
        self,
        name: str,
        parts: dict[str, Any],
        body: Callable[[Path, dict], None],
        data_parallel: bool = False,
        manifest: dict[str, Any] | None = None,
    ) -> StageResult:
        """Reuse the finished artifact ``name`` if its fingerprint matches ``parts``, else run ``body`` into it.

        Under several processes (:mod:`iss.parallel`) a ``data_parallel`` stage (a training loop) runs on every
        process, the main one writing the artifact and the others into a scratch folder; any other stage runs on
        the main process while the others wait. Every process then reads the same finished artifact. The main
        process merges the stage into the manifest, with ``manifest`` (the run's config) beside it.
        """
        stage_fingerprint = fingerprint(name, parts)
        known = self.results.get(name)
        if known is not None and known.fingerprint == stage_fingerprint:
            return known
        group = processes()
        main = group.is_main  # another process is refused; another thread of this one waits for the stage
        with self.folder.writing() if main else nullcontext(), self.folder.lock(name) if main else nullcontext():
            group.barrier()  # every process looks at the run folder as it is now
            result = self.folder.finished(name, stage_fingerprint)
            if result is None:
                log.info("stage %s: running", name)
                if group.is_main:
                    with self.folder.stage(name, stage_fingerprint, parts) as (folder, summary), self.numerics():
                        if data_parallel:
                            group.barrier()  # the work folder is claimed: the others may read its checkpoint
                        body(folder, summary)
                elif data_parallel:
                    with tempfile.TemporaryDirectory() as scratch, self.numerics():
                        group.barrier()
                        body(Path(scratch), {})
                group.barrier()  # the main process has written the artifact
                result = self.folder.finished(name, stage_fingerprint)
                assert result is not None
                result.reused = False
            else:
                log.info("stage %s: reusing finished artifact", name)
        self.results[name] = result
        if group.is_main:
            self.folder.update_manifest([result], manifest or {})
        return result
