"""The C++ runtime (cpp/build/doge_run --serve) driven from Python, for `doge-export bench`.

The C++ program loads the artifact once and answers one greedy generation per request line with
its own timings (prefill, every step) and its peak RSS, so the bench measures the C++ runtime
without the cost of this pipe in its step times. Build it with `bash cpp/build.sh` (cpp/README.md);
DOGE_RUN=/path/to/doge_run points at another build.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from ..errors import DogeExportError

CPP_BACKEND = "onnxruntime-cpp"
DEFAULT_BINARY = Path(__file__).resolve().parents[2] / "cpp" / "build" / "doge_run"


def binary() -> Path:
    path = Path(os.environ.get("DOGE_RUN") or DEFAULT_BINARY)
    if not path.is_file():
        raise DogeExportError(f"the C++ runtime is not built ({path} is missing): run `bash cpp/build.sh` "
                              "(cpp/README.md), or set DOGE_RUN")
    return path


class CppServer:
    """doge_run --serve for one artifact and batch size. `ready`: its sizes and RSS after loading
    (MiB: start, baseline after ONNX Runtime's set-up, after_load)."""

    def __init__(self, folder, batch: int, threads: int | None = None, spin: bool = False):
        cmd = [str(binary()), str(folder), "--serve", "--batch", str(batch), "--no-verify"]
        cmd += ["--threads", str(threads)] if threads else []
        cmd += ["--spin"] if spin else []
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, bufsize=1)
        line = self.process.stdout.readline()
        if not line:
            error = self.process.stderr.read().strip() or f"exit status {self.process.wait()}"
            raise DogeExportError(f"the C++ runtime did not start: {error}")
        self.ready = json.loads(line)
        self.attend_filled = self.ready["attend_filled"]  # the step reads only the filled slots
        self.lm_rows = self.ready["lm_rows"]  # the rows-layout graphs run
        self.peak_rss_mib = self.ready["rss_mib"]["after_load"]  # updated by every generation

    def generate(self, prompts: list[list[int]], new_tokens: int) -> dict:
        """-> {"tokens", "prefill_ms", "step_ms": [...], "peak_rss_mib"}: greedy, no stop id."""
        self.process.stdin.write(json.dumps({"prompts": prompts, "max_new_tokens": new_tokens}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise DogeExportError(f"the C++ runtime exited: {self.process.stderr.read().strip()}")
        answer = json.loads(line)
        if "error" in answer:
            raise DogeExportError(f"the C++ runtime: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=30)
