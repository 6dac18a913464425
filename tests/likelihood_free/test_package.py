"""The toolkit stays a parts library: its public API and its import boundary."""

from __future__ import annotations

import subprocess
import sys

import likelihood_free


def test_public_api_is_reexported_and_documented():
    for name in likelihood_free.__all__:
        obj = getattr(likelihood_free, name)
        assert obj.__doc__ and len(obj.__doc__) > 40, f"{name} lacks a docstring"


def test_importing_the_toolkit_pulls_in_no_language_model_code():
    # measured against what torch itself imports (torch pulls in tqdm, for example)
    code = (
        "import sys, torch, numpy, scipy; before = set(sys.modules); import likelihood_free; "
        "bad = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in "
        "{'calm_models', 'tokenizers', 'safetensors', 'einops', 'tqdm', 'yaml', 'transformers'}); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"likelihood_free imported {out.stdout.strip()}"


def test_importing_the_toolkit_pulls_in_only_torch_and_numpy():
    code = (
        "import sys, torch, numpy; before = set(sys.modules); import likelihood_free; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(','.join(sorted(new - {'likelihood_free', 'torch', 'numpy'})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"likelihood_free imported {out.stdout.strip()}"


def test_fallback_warning_is_a_user_warning():
    assert issubclass(likelihood_free.TemperatureFallbackWarning, UserWarning)
