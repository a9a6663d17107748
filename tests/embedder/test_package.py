"""The embedder package stands alone: usable in a plain torch training loop without Ray."""

from __future__ import annotations

import subprocess
import sys


def test_embedder_never_imports_ray():
    code = "import sys, embedder, embedder.inference, embedder.bert_embedder; print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
