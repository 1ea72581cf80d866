"""The runtime path needs only numpy + onnxruntime (+ tokenizers): proved with torch,
transformers and TensorRT made unimportable in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        root = name.split('.')[0]
        if root in ('torch', 'transformers', 'tensorrt', 'tensorrt_rtx', 'onnx'):
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
sys.argv = ['doge-export'] + {args!r}
from doge_export.cli import main
try:
    main()
finally:
    bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'tensorrt', 'tensorrt_rtx'))
    print('IMPORTED=' + ','.join(bad), file=sys.stderr)
"""


def run_blocked(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER.format(args=list(args))], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


def test_help_without_torch():
    result = run_blocked("--help")
    assert "generate" in result.stdout
    assert "IMPORTED=\n" in result.stderr + "\n"


def test_generate_and_inspect_without_torch(artifacts):
    manifest, _ = artifacts("tiny")
    result = run_blocked("generate", str(manifest.folder), "--input-ids", "5,6,7", "--max-new-tokens", "4", "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["tokens"][0]) == 4
    assert "IMPORTED=\n" in result.stderr + "\n"
    shown = run_blocked("inspect", str(manifest.folder))
    assert shown.returncode == 0 and "16 slots" in shown.stdout


def test_torch_backend_without_torch_is_a_clear_error(artifacts):
    manifest, _ = artifacts("tiny")
    result = run_blocked("generate", str(manifest.folder), "--input-ids", "5", "--backend", "torch")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "pip install doge-export[export]" in result.stderr
